//! Broker URLs: a comma-separated list of a cluster's nodes, and how a URL is shown without its
//! password.

use std::fmt;

use lapin::uri::AMQPUri;

use crate::AmqpError;

/// A broker URL, or the comma-separated URLs of a cluster's nodes ([`parse_urls`]), which may
/// hold passwords. Its `Debug` and `Display` show it with every password hidden ([`redact`]),
/// so a config that derives `Debug` or a log line that prints it never leaks one; only
/// [`AmqpUrl::expose`] gives the URL itself, to connect with.
#[derive(Clone, PartialEq, Eq, Hash, Default)]
pub struct AmqpUrl(String);

impl AmqpUrl {
    pub fn new(url: impl Into<String>) -> AmqpUrl {
        AmqpUrl(url.into())
    }

    /// The URL with its password, for [`crate::Broker::connect`] and the sender check; never
    /// for a message or a log.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl From<String> for AmqpUrl {
    fn from(url: String) -> AmqpUrl {
        AmqpUrl(url)
    }
}

impl From<&str> for AmqpUrl {
    fn from(url: &str) -> AmqpUrl {
        AmqpUrl(url.to_owned())
    }
}

impl fmt::Display for AmqpUrl {
    /// The URL with every password as `***`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&redact(&self.0))
    }
}

impl fmt::Debug for AmqpUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("AmqpUrl").field(&redact(&self.0)).finish()
    }
}

/// `amqp://user:secret@host/vhost` -> `amqp://user:***@host/vhost`, for messages and logs;
/// every URL of a comma-separated list. A URL too broken to parse keeps only what follows its
/// last `@`, which holds no secret.
pub fn redact(url: &str) -> String {
    url.split(',').map(redact_one).collect::<Vec<_>>().join(",")
}

fn redact_one(url: &str) -> String {
    match ::url::Url::parse(url) {
        Ok(mut parsed) if parsed.password().is_some() => match parsed.set_password(Some("***")) {
            Ok(()) => parsed.to_string(),
            Err(()) => "(a URL whose password cannot be hidden)".into(),
        },
        Ok(_) => url.to_owned(),
        Err(_) => url.rsplit_once('@').map_or_else(|| url.to_owned(), |(_, host)| format!("***@{host}")),
    }
}

/// The nodes of `list`: one broker URL, or the URLs of one cluster's nodes separated by commas
/// (`amqp://u:p@host1:5672/v,amqp://u:p@host2:5672/v`). Every URL must parse, and all must name
/// the same vhost: a component that fails over must land on the same queues. A comma inside a
/// password is written `%2C`.
pub fn parse_urls(list: &str) -> Result<Vec<String>, AmqpError> {
    let urls: Vec<&str> = list.split(',').map(str::trim).collect();
    let bad_list =
        |cause: String| AmqpError::BadUrlList { urls: redact(list), cause: crate::error::cause(cause) };
    if let Some(i) = urls.iter().position(|u| u.is_empty()) {
        return Err(bad_list(if urls.len() == 1 {
            "it is empty".into()
        } else {
            format!("URL {} of {} is empty (two commas in a row, or one at an end)", i + 1, urls.len())
        }));
    }
    let mut vhost: Option<(usize, String)> = None;
    for (i, url) in urls.iter().enumerate() {
        let uri: AMQPUri = url.parse().map_err(|cause: String| AmqpError::BadUrl {
            url: redact(url),
            cause: crate::error::cause(if urls.len() == 1 {
                cause
            } else {
                format!("URL {} of {}: {cause}", i + 1, urls.len())
            }),
        })?;
        match &vhost {
            None => vhost = Some((i, uri.vhost)),
            Some((first, v)) if *v != uri.vhost => {
                return Err(bad_list(format!(
                    "URL {} names vhost `{}` and URL {} names `{v}`; the nodes of one cluster share their vhosts",
                    i + 1,
                    uri.vhost,
                    first + 1
                )));
            }
            Some(_) => {}
        }
    }
    Ok(urls.into_iter().map(str::to_owned).collect())
}

/// The decoded value of query parameter `name`, if the URL has it.
pub(crate) fn query_param(url: &str, name: &str) -> Option<String> {
    let (_, query) = url.split_once('?')?;
    let query = query.split('#').next().unwrap_or_default();
    query.split('&').find_map(|pair| {
        let (k, v) = pair.split_once('=')?;
        (k == name).then(|| percent_decode(v))
    })
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |b: u8| (b as char).to_digit(16);
        match (bytes[i], bytes.get(i + 1).copied().and_then(hex), bytes.get(i + 2).copied().and_then(hex)) {
            (b'%', Some(h), Some(l)) => {
                out.push((h * 16 + l) as u8);
                i += 3;
            }
            (b, _, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_amqp_url_never_shows_its_password() {
        let url = AmqpUrl::from("amqp://a:secret1@h1:5672/v,amqps://b:secret2@h2:5671/v");
        let shown = [url.to_string(), format!("{url:?}"), format!("{:?}", Some(&url)), format!("{url:#?}")];
        for text in &shown {
            assert!(!text.contains("secret"), "a password shown: {text}");
        }
        assert_eq!(shown[0], "amqp://a:***@h1:5672/v,amqps://b:***@h2:5671/v");
        assert_eq!(shown[1], r#"AmqpUrl("amqp://a:***@h1:5672/v,amqps://b:***@h2:5671/v")"#);
        assert_eq!(url.expose(), "amqp://a:secret1@h1:5672/v,amqps://b:secret2@h2:5671/v");
    }

    #[test]
    fn a_config_that_derives_debug_hides_it_too() {
        #[derive(Debug)]
        #[allow(dead_code)] // Read only through its Debug.
        struct Config {
            amqp_url: AmqpUrl,
        }
        let cfg = Config { amqp_url: "amqp://guest:hunter2@127.0.0.1/%2f".into() };
        let text = format!("{cfg:?}");
        assert!(!text.contains("hunter2") && text.contains("guest:***@127.0.0.1"), "{text}");
    }

    #[test]
    fn redacts_the_password_only() {
        assert_eq!(redact("amqp://guest:guest@127.0.0.1:5672/%2f"), "amqp://guest:***@127.0.0.1:5672/%2f");
        assert_eq!(redact("amqp://127.0.0.1"), "amqp://127.0.0.1");
        assert_eq!(redact("amqps://u:p%40ss@host:5671/v?x=1"), "amqps://u:***@host:5671/v?x=1");
        assert_eq!(redact("amqp://u:secret@[::1/v"), "***@[::1/v");
    }

    #[test]
    fn redacts_every_url_of_a_list() {
        assert_eq!(
            redact("amqp://a:s1@h1:5681/v,amqps://b:s2@h2:5682/v, amqp://h3/v"),
            "amqp://a:***@h1:5681/v,amqps://b:***@h2:5682/v, amqp://h3/v"
        );
    }

    #[test]
    fn one_url_is_a_list_of_one_node() {
        let nodes = parse_urls("amqp://guest:guest@127.0.0.1:5672/%2f").unwrap();
        assert_eq!(nodes, ["amqp://guest:guest@127.0.0.1:5672/%2f"]);
    }

    #[test]
    fn a_cluster_is_its_nodes_in_order() {
        let nodes = parse_urls(
            "amqp://u:p@127.0.0.1:5681/v, amqp://u:p@127.0.0.1:5682/v,amqp://u:p@127.0.0.1:5683/v",
        )
        .unwrap();
        assert_eq!(
            nodes,
            ["amqp://u:p@127.0.0.1:5681/v", "amqp://u:p@127.0.0.1:5682/v", "amqp://u:p@127.0.0.1:5683/v"]
        );
    }

    fn refusal(list: &str) -> String {
        let e = parse_urls(list).expect_err(list);
        assert!(e.is_refusal(), "{e}");
        let text = e.to_string();
        assert!(!text.contains("secret"), "a password in the message: {text}");
        text
    }

    #[test]
    fn an_empty_item_is_named_by_its_place() {
        assert!(refusal("").contains("it is empty"));
        let text = refusal("amqp://u:secret@h1/v,,amqp://u:secret@h3/v");
        assert!(text.contains("URL 2 of 3 is empty"), "{text}");
        assert!(refusal("amqp://u:secret@h1/v,").contains("URL 2 of 2 is empty"));
    }

    #[test]
    fn a_bad_url_of_a_list_is_named_by_its_place() {
        let text = refusal("amqp://u:secret@h1/v,http://u:secret@h2/v");
        assert!(text.contains("URL 2 of 2"), "{text}");
        assert!(text.contains("http://u:***@h2/v"), "{text}");
    }

    #[test]
    fn the_nodes_of_a_list_share_a_vhost() {
        let text = refusal("amqp://u:secret@h1/a,amqp://u:secret@h2/b");
        assert!(text.contains("URL 2 names vhost `b` and URL 1 names `a`"), "{text}");
        assert!(text.contains("separated by commas"), "{text}");
    }
}
