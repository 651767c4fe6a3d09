//! TLS for `amqps://` URLs: which certificate authorities the client trusts.
//!
//! By default an `amqps://` connection trusts the system's roots (rustls with the native
//! certificates). A broker with a certificate of its own CA (self-signed, or a company CA) needs
//! that CA's PEM, named by, in this order:
//!
//! 1. the URL's `cacertfile` query parameter (the name RabbitMQ's own URI spec uses):
//!    `amqps://user:pw@host:5671/%2f?cacertfile=/etc/baton/ca.pem`, handy in a per-component
//!    credentials file;
//! 2. the environment variable [`CA_FILE_ENV`] (`BATON_AMQP_CA_FILE`), for every component of
//!    a process at once.
//!
//! The CA is added to the system's roots, not substituted for them. Plain `amqp://` URLs ignore
//! both.

use std::sync::Arc;

use lapin::tcp::OwnedTLSConfig;
use lapin::uri::{AMQPScheme, AMQPUri};

use crate::AmqpError;
use crate::error::Cause;
use crate::url::{query_param, redact};

/// The environment variable naming the PEM file of a CA to trust for `amqps://`.
pub const CA_FILE_ENV: &str = "BATON_AMQP_CA_FILE";

/// The URL query parameter naming the PEM file of a CA to trust for `amqps://`.
pub const CA_FILE_PARAM: &str = "cacertfile";

/// Where the CA to trust comes from, if anywhere: the URL's parameter first, then `env` (the
/// value of [`CA_FILE_ENV`]). Pure, so that it is tested without touching the environment.
pub fn ca_file(url: &str, env: Option<&str>) -> Option<String> {
    query_param(url, CA_FILE_PARAM).or_else(|| env.filter(|v| !v.trim().is_empty()).map(str::to_owned))
}

/// The TLS settings for connecting to `url`: the default ones for `amqp://`, and for `amqps://`
/// the system roots plus the CA named by the URL or by [`CA_FILE_ENV`].
pub(crate) fn config(url: &str, uri: &AMQPUri) -> Result<OwnedTLSConfig, AmqpError> {
    if uri.scheme != AMQPScheme::AMQPS {
        return Ok(OwnedTLSConfig::default());
    }
    let env = std::env::var(CA_FILE_ENV).ok();
    let Some(path) = ca_file(url, env.as_deref()) else {
        return Ok(OwnedTLSConfig::default());
    };
    let bad = |cause: String| AmqpError::BadUrl { url: redact(url), cause: crate::error::cause(cause) };
    let pem = std::fs::read_to_string(&path).map_err(|e| {
        bad(format!("cannot read the CA file {path} (from `{CA_FILE_PARAM}` or {CA_FILE_ENV}): {e}"))
    })?;
    if !pem.contains("-----BEGIN CERTIFICATE-----") {
        return Err(bad(format!(
            "the CA file {path} (from `{CA_FILE_PARAM}` or {CA_FILE_ENV}) holds no PEM certificate"
        )));
    }
    tracing::debug!(ca = %path, "trusting an extra CA for amqps");
    Ok(OwnedTLSConfig { identity: None, cert_chain: Some(pem) })
}

/// A connection error, with what to do about it when it is about the broker's certificate.
pub(crate) fn explain(url: &str, e: lapin::Error) -> Cause {
    let text = e.to_string();
    let about_cert = text.contains("certificate") || text.contains("UnknownIssuer");
    if url.starts_with("amqps://") && about_cert { Arc::new(Untrusted(e)) } else { Arc::new(e) }
}

/// The broker's certificate is not trusted: the handshake's error, and what to do about it.
#[derive(Debug, thiserror::Error)]
#[error(
    "{0}. The broker's TLS certificate is not trusted: name the PEM of its CA with \
     {CA_FILE_ENV}=/path/ca.pem or `?{CA_FILE_PARAM}=/path/ca.pem` in the URL, and connect with a \
     host name the certificate lists"
)]
struct Untrusted(#[source] lapin::Error);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_url_parameter_wins_over_the_environment() {
        let url = "amqps://u:p@host:5671/%2f?heartbeat=10&cacertfile=%2Fetc%2Fbaton%2Fca.pem";
        assert_eq!(ca_file(url, Some("/env/ca.pem")).as_deref(), Some("/etc/baton/ca.pem"));
        assert_eq!(ca_file("amqps://u:p@host/%2f", Some("/env/ca.pem")).as_deref(), Some("/env/ca.pem"));
        assert_eq!(ca_file("amqps://u:p@host/%2f", Some(" ")), None);
        assert_eq!(ca_file("amqps://u:p@host/%2f", None), None);
    }

    #[test]
    fn plain_amqp_ignores_the_ca() {
        let url = "amqp://u:p@host/%2f?cacertfile=/nonexistent.pem";
        let uri: AMQPUri = url.parse().unwrap();
        assert!(config(url, &uri).unwrap().cert_chain.is_none());
    }

    #[test]
    fn a_missing_ca_file_is_named() {
        let url = "amqps://u:p@host/%2f?cacertfile=/nonexistent/ca.pem";
        let uri: AMQPUri = url.parse().unwrap();
        let err = config(url, &uri).unwrap_err().to_string();
        assert!(err.contains("/nonexistent/ca.pem"), "{err}");
        assert!(!err.contains(":p@"), "the password is redacted: {err}");
    }

    #[test]
    fn lapin_ignores_the_parameter() {
        let uri: AMQPUri = "amqps://u:p@host/%2f?cacertfile=/x.pem&heartbeat=7".parse().unwrap();
        assert_eq!(uri.query.heartbeat, Some(7));
        assert_eq!(uri.authority.port, 5671);
    }
}
