use thiserror::Error;

/// The error under an [`AmqpError`] whose type varies (lapin's, the URL parser's sentence, an
/// I/O error): kept as the error's `source`, and shown in its message too. Shared, since the
/// last connection error is returned to every caller until the next attempt.
pub use baton_store::SharedCause as Cause;

/// A [`Cause`] of `e`: an error, or a sentence.
pub(crate) fn cause(e: impl Into<baton_store::Cause>) -> Cause {
    Cause::from(e.into())
}

/// Errors of the connection and of declarations: the component cannot work without the broker.
#[derive(Debug, Error, Clone)]
pub enum AmqpError {
    #[error(
        "could not reach RabbitMQ at {url} ({cause}); start one with `rabbitmq-server -detached` \
         (or `scripts/demo.sh`, which starts it for you), or point AMQP_URL at a running broker"
    )]
    Unreachable {
        url: String,
        #[source]
        cause: Cause,
    },
    #[error("AMQP_URL `{url}` is not a valid AMQP URL ({cause}); expected amqp://user:pass@host:5672/vhost")]
    BadUrl {
        url: String,
        #[source]
        cause: Cause,
    },
    #[error(
        "AMQP_URL `{urls}` is not a list of broker URLs ({cause}); expected one URL, or the URLs of \
         one cluster's nodes separated by commas: amqp://user:pass@host1:5672/vhost,amqp://user:pass@host2:5672/vhost"
    )]
    BadUrlList {
        urls: String,
        #[source]
        cause: Cause,
    },
    #[error("RabbitMQ at {url} refused the connection ({cause}); check the user, password and vhost")]
    Refused {
        url: String,
        #[source]
        cause: Cause,
    },
    #[error(
        "RabbitMQ at {url} refused user `{user}` on vhost `{vhost}` ({cause}); check the user's \
         password, that the vhost exists (`rabbitmqctl add_vhost {vhost}`) and that the user may use \
         it (`rabbitmqctl set_permissions -p {vhost} {user} '.*' '.*' '.*'`), or fix AMQP_URL"
    )]
    AccessRefused {
        url: String,
        user: String,
        vhost: String,
        #[source]
        cause: Cause,
    },
    #[error("the connection to RabbitMQ at {url} is lost; reconnecting")]
    Reconnecting { url: String },
    #[error("the connection to RabbitMQ is closed: this component is shutting down")]
    Closed,
    #[error("declaring {what} failed: {source}")]
    Declare {
        what: String,
        #[source]
        source: lapin::Error,
    },
    #[error("replaying onto {queue} failed ({cause}); the message stays in the dead-letter queue")]
    Replay {
        queue: String,
        #[source]
        cause: PublishError,
    },
    #[error("AMQP channel error: {0}")]
    Channel(#[from] lapin::Error),
    #[error("RabbitMQ did not answer {what} within {secs} s; the caller retries on a fresh channel")]
    NoAnswer { what: &'static str, secs: u64 },
}

impl AmqpError {
    /// The broker said no (credentials, vhost, permissions, TLS, a declaration it rejects): it
    /// will go on saying so until someone acts, so it is retried slowly.
    pub fn is_refusal(&self) -> bool {
        matches!(
            self,
            AmqpError::AccessRefused { .. }
                | AmqpError::Refused { .. }
                | AmqpError::BadUrl { .. }
                | AmqpError::BadUrlList { .. }
                | AmqpError::Declare { .. }
        )
    }
}

/// Why a publish did not count as sent: the outbox relay's vocabulary, which `baton-store`
/// owns (it parks a row that keeps being returned). Every variant leaves the message unsent.
pub use baton_store::relay::PublishError;

/// A failure of lapin's under a publish: the channel cannot be trusted after it.
pub(crate) fn channel_failed(e: lapin::Error) -> PublishError {
    PublishError::channel(e)
}
