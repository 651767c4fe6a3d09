//! The few calls of RabbitMQ's management HTTP API that Baton needs: vhosts, connections and
//! queue depths.
//!
//! Owns: [`Mgmt`], the client of that API (over `http://` or `https://`), and the words its
//! failures are explained in. Used by `baton up` (connection drops), compare, chaos and bench
//! (fresh vhosts), the console's health page (queues and clients) and the tests. Must not touch: AMQP itself (see `baton-amqp`), or what a run
//! does with the vhosts.

use std::time::Duration;

use anyhow::bail;
use serde_json::Value;

/// A management API endpoint with its login.
#[derive(Debug, Clone)]
pub struct Mgmt {
    pub url: String,
    pub user: String,
    pub password: String,
    http: reqwest::Client,
}

impl Mgmt {
    pub fn new(url: &str, user: &str, password: &str) -> Mgmt {
        // Only a TLS backend that cannot start fails here (no certificates to trust at all).
        let http = reqwest::Client::builder().timeout(TIMEOUT).build().expect("an HTTP client");
        Mgmt { url: url.trim_end_matches('/').into(), user: user.into(), password: password.into(), http }
    }

    fn req(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        self.http
            .request(method, format!("{}/api{path}", self.url))
            .basic_auth(&self.user, Some(&self.password))
    }

    /// Create `vhost` (fresh: an old one of the name is deleted first) and let our user in.
    pub async fn fresh_vhost(&self, vhost: &str) -> anyhow::Result<()> {
        self.delete_vhost(vhost).await?;
        let r = self.send(self.req(reqwest::Method::PUT, &format!("/vhosts/{vhost}"))).await?;
        self.check(r, &format!("creating vhost {vhost}")).await?;
        let r = self
            .send(
                self.req(reqwest::Method::PUT, &format!("/permissions/{vhost}/{}", self.user))
                    .json(&serde_json::json!({"configure": ".*", "write": ".*", "read": ".*"})),
            )
            .await?;
        self.check(r, &format!("granting {} on {vhost}", self.user)).await
    }

    /// Delete `vhost`; one that does not exist is no error.
    pub async fn delete_vhost(&self, vhost: &str) -> anyhow::Result<()> {
        let r = self.send(self.req(reqwest::Method::DELETE, &format!("/vhosts/{vhost}"))).await?;
        if r.status() != reqwest::StatusCode::NOT_FOUND {
            return self.check(r, &format!("deleting vhost {vhost}")).await;
        }
        // The API's own "no such vhost" is no error; a 404 from anything else is.
        match r.text().await {
            Ok(body) if body.contains("Object Not Found") => Ok(()),
            _ => bail!(
                "deleting vhost {vhost}: {} has no management API (HTTP 404); is the URL right, and the \
                 plugin enabled (`rabbitmq-plugins enable rabbitmq_management`)?",
                self.url
            ),
        }
    }

    /// Delete a run's `vhost` once its results are in: a failure costs a leftover vhost and a
    /// warning that says how to remove it, never the results.
    pub async fn clean_up_vhost(&self, vhost: &str) {
        if let Err(e) = self.delete_vhost(vhost).await {
            tracing::warn!(
                %vhost, error = format!("{e:#}"),
                "could not delete the run's vhost (the results stand); remove it later with \
                 `rabbitmqctl delete_vhost {vhost}`"
            );
        }
    }

    /// Send a request, saying what went wrong in words: a timeout, nothing listening, or else.
    async fn send(&self, req: reqwest::RequestBuilder) -> anyhow::Result<reqwest::Response> {
        req.send().await.map_err(|e| anyhow::anyhow!(explain(&self.url, &e)).context(e))
    }

    /// A success, or an error that tells a refusal of the login, a missing API and any other
    /// refusal apart, with what the API said.
    async fn check(&self, r: reqwest::Response, what: &str) -> anyhow::Result<()> {
        let status = r.status();
        if status.is_success() {
            return Ok(());
        }
        let body: String = r.text().await.unwrap_or_default().chars().take(200).collect();
        match status {
            reqwest::StatusCode::UNAUTHORIZED | reqwest::StatusCode::FORBIDDEN => bail!(
                "{what}: the management API at {} refused user {} (HTTP {status}); check --mgmt-user and \
                 --mgmt-password, and that the user has the administrator tag",
                self.url,
                self.user
            ),
            reqwest::StatusCode::NOT_FOUND => bail!(
                "{what}: {} has no management API (HTTP 404); is the URL right, and the plugin enabled \
                 (`rabbitmq-plugins enable rabbitmq_management`)?",
                self.url
            ),
            _ => bail!("{what}: the management API at {} refused it (HTTP {status}): {body}", self.url),
        }
    }

    /// Messages delivered to a consumer of `vhost` and not yet acked, over its work queues (not
    /// the dead-letter queues). The broker refreshes these figures every few seconds, so a
    /// count above zero may be a little late: good to wait on, not to time with.
    pub async fn unacked(&self, vhost: &str) -> anyhow::Result<u64> {
        let queues: Vec<Value> = self
            .req(reqwest::Method::GET, &format!("/queues/{vhost}?columns=name,messages_unacknowledged"))
            .send()
            .await?
            .error_for_status()?
            .json()
            .await?;
        Ok(queues
            .iter()
            .filter(|q| !q["name"].as_str().unwrap_or_default().ends_with(".dlq"))
            .map(|q| q["messages_unacknowledged"].as_u64().unwrap_or(0))
            .sum())
    }

    /// [`Mgmt::drop_connections`], tried for up to 10 s while it finds none: the API lists a
    /// connection only once its statistics are in, a few seconds after it opened. Returns how
    /// many were closed (0: none was ever listed).
    pub async fn drop_connections_once_listed(&self, vhost: &str) -> anyhow::Result<usize> {
        for _ in 0..40 {
            match self.drop_connections(vhost).await? {
                0 => tokio::time::sleep(Duration::from_millis(250)).await,
                n => return Ok(n),
            }
        }
        Ok(0)
    }

    /// Close every client connection of `vhost` from the broker's side; returns how many.
    pub async fn drop_connections(&self, vhost: &str) -> anyhow::Result<usize> {
        let conns: Vec<Value> = self
            .req(reqwest::Method::GET, &format!("/vhosts/{vhost}/connections"))
            .send()
            .await?
            .json()
            .await?;
        let mut n = 0;
        for c in conns {
            let Some(name) = c["name"].as_str() else { continue };
            let path = format!("/connections/{}", encode(name));
            let r = self
                .req(reqwest::Method::DELETE, &path)
                .header("X-Reason", "baton fault injection")
                .send()
                .await?;
            if r.status().is_success() {
                n += 1;
            }
        }
        Ok(n)
    }
}

/// One queue's depth as the broker last sampled it (every few seconds).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueueDepth {
    pub name: String,
    /// Messages waiting for a consumer.
    pub ready: u64,
    /// Messages delivered to a consumer and not yet acked.
    pub unacked: u64,
    pub consumers: u64,
}

/// One client connection of a vhost, and the queues its consumers read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientConnection {
    /// The name the client gave its connection (Baton's: `baton <component> [<instance>]`).
    pub name: String,
    /// `running`, `blocked` (by a memory or disk alarm), `flow`...
    pub state: String,
    /// The queues it consumes, sorted, each once.
    pub consuming: Vec<String>,
}

impl Mgmt {
    async fn get_list(&self, path: &str) -> anyhow::Result<Vec<Value>> {
        let r = self.send(self.req(reqwest::Method::GET, path)).await?;
        let status = r.status();
        if !status.is_success() {
            self.check(r, &format!("reading {path}")).await?;
            bail!("reading {path}: HTTP {status}");
        }
        Ok(r.json().await?)
    }

    /// Every queue of `vhost` (as [`vhost_of`] spells it), by name.
    pub async fn queue_depths(&self, vhost: &str) -> anyhow::Result<Vec<QueueDepth>> {
        let path = format!("/queues/{vhost}?columns=name,messages_ready,messages_unacknowledged,consumers");
        Ok(depths(&self.get_list(&path).await?))
    }

    /// Every client connection of `vhost`, by name, with the queues each consumes.
    pub async fn clients(&self, vhost: &str) -> anyhow::Result<Vec<ClientConnection>> {
        let conns = self.get_list(&format!("/vhosts/{vhost}/connections")).await?;
        let consumers = self.get_list(&format!("/consumers/{vhost}")).await?;
        Ok(clients(&conns, &consumers))
    }
}

/// The depths in an answer of `GET /api/queues/{vhost}`; a figure not yet sampled is 0.
fn depths(queues: &[Value]) -> Vec<QueueDepth> {
    let n = |q: &Value, k: &str| q[k].as_u64().unwrap_or(0);
    let mut all: Vec<QueueDepth> = queues
        .iter()
        .filter_map(|q| {
            Some(QueueDepth {
                name: q["name"].as_str()?.to_owned(),
                ready: n(q, "messages_ready"),
                unacked: n(q, "messages_unacknowledged"),
                consumers: n(q, "consumers"),
            })
        })
        .collect();
    all.sort_by(|a, b| a.name.cmp(&b.name));
    all
}

/// The connections of `GET /api/vhosts/{vhost}/connections`, each with the queues of its
/// consumers in `GET /api/consumers/{vhost}` (the user-given name when there is one, as
/// `rabbitmqctl` shows it).
fn clients(conns: &[Value], consumers: &[Value]) -> Vec<ClientConnection> {
    let given = |c: &Value| {
        c["client_properties"]["connection_name"]
            .as_str()
            .or(c["user_provided_name"].as_str())
            .map(str::to_owned)
    };
    let mut all: Vec<ClientConnection> = conns
        .iter()
        .filter_map(|c| {
            let id = c["name"].as_str()?;
            let mut consuming: Vec<String> = consumers
                .iter()
                .filter(|k| k["channel_details"]["connection_name"].as_str() == Some(id))
                .filter_map(|k| k["queue"]["name"].as_str().map(str::to_owned))
                .collect();
            consuming.sort();
            consuming.dedup();
            Some(ClientConnection {
                name: given(c).unwrap_or_else(|| id.to_owned()),
                state: c["state"].as_str().unwrap_or("unknown").to_owned(),
                consuming,
            })
        })
        .collect();
    all.sort_by(|a, b| a.name.cmp(&b.name));
    all
}

/// The vhost of an AMQP URL as the management API's paths want it: its path, still
/// percent-encoded (the default vhost `/` is `%2F`, as is a URL without a path). Of a cluster's
/// comma-separated list, the first URL's: they all name the same vhost.
pub fn vhost_of(amqp_url: &str) -> String {
    let amqp_url = amqp_url.split(',').next().unwrap_or(amqp_url);
    let path =
        url::Url::parse(amqp_url).map(|u| u.path().trim_start_matches('/').to_owned()).unwrap_or_default();
    if path.is_empty() { "%2F".into() } else { path }
}

/// Why a request to the management API at `url` got no answer, in words a user can act on.
fn explain(url: &str, e: &reqwest::Error) -> String {
    if e.is_timeout() {
        format!(
            "the management API at {url} did not answer within {} s (the broker may be busy)",
            TIMEOUT.as_secs()
        )
    } else if e.is_connect() {
        format!(
            "nothing answers at {url}: is RabbitMQ running, with its management plugin enabled \
             (`rabbitmq-plugins enable rabbitmq_management`)?"
        )
    } else {
        format!("the request to the management API at {url} failed")
    }
}

/// How long one call of the management API may take.
const TIMEOUT: Duration = Duration::from_secs(30);

/// Percent-encode a path segment (connection names hold spaces, `:` and `>`): everything but
/// RFC 3986's unreserved characters.
fn encode(s: &str) -> String {
    const SEGMENT: &percent_encoding::AsciiSet =
        &percent_encoding::NON_ALPHANUMERIC.remove(b'-').remove(b'_').remove(b'.').remove(b'~');
    percent_encoding::utf8_percent_encode(s, SEGMENT).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_vhost_comes_from_the_url() {
        assert_eq!(vhost_of("amqp://guest:guest@127.0.0.1:5672/%2f"), "%2f");
        assert_eq!(vhost_of("amqp://guest:guest@127.0.0.1:5672"), "%2F");
        assert_eq!(vhost_of("amqp://guest:guest@127.0.0.1:5672/"), "%2F");
        assert_eq!(vhost_of("amqps://u:p@host:5671/baton-demo?cacertfile=/x/ca.pem"), "baton-demo");
        assert_eq!(vhost_of("amqp://u:p@host/baton%20test#frag"), "baton%20test");
        assert_eq!(vhost_of("amqp://u:p@h:5681/baton-demo,amqp://u:p@h:5682/baton-demo"), "baton-demo");
    }

    #[test]
    fn queue_depths_are_read_and_missing_figures_are_zero() {
        let got = depths(&[
            serde_json::json!({"name": "records.commands", "messages_ready": 3, "messages_unacknowledged": 2, "consumers": 1}),
            serde_json::json!({"name": "a.fresh.queue"}),
            serde_json::json!({"no": "name"}),
        ]);
        let row = |n: &str, r, u, c| QueueDepth { name: n.into(), ready: r, unacked: u, consumers: c };
        assert_eq!(got, vec![row("a.fresh.queue", 0, 0, 0), row("records.commands", 3, 2, 1)]);
    }

    #[test]
    fn a_client_is_named_as_it_named_itself_with_the_queues_it_consumes() {
        let conn = |id: &str, given: Option<&str>| serde_json::json!({"name": id, "state": "running", "client_properties": {"connection_name": given}});
        let consumer = |id: &str, queue: &str| serde_json::json!({"channel_details": {"connection_name": id}, "queue": {"name": queue}});
        let got = clients(
            &[
                conn("127.0.0.1:1 -> 127.0.0.1:5672", Some("baton orchestrator main")),
                conn("127.0.0.1:2 -> x", None),
            ],
            &[
                consumer("127.0.0.1:1 -> 127.0.0.1:5672", "orchestrator.replies"),
                consumer("127.0.0.1:1 -> 127.0.0.1:5672", "orchestrator.commands"),
                consumer("127.0.0.1:1 -> 127.0.0.1:5672", "orchestrator.replies"),
                consumer("127.0.0.1:9 -> x", "records.commands"),
            ],
        );
        assert_eq!(
            got,
            vec![
                ClientConnection {
                    name: "127.0.0.1:2 -> x".into(),
                    state: "running".into(),
                    consuming: vec![]
                },
                ClientConnection {
                    name: "baton orchestrator main".into(),
                    state: "running".into(),
                    consuming: vec!["orchestrator.commands".into(), "orchestrator.replies".into()],
                },
            ]
        );
    }

    #[test]
    fn connection_names_are_encoded() {
        assert_eq!(super::encode("127.0.0.1:5 -> 127.0.0.1:5672"), "127.0.0.1%3A5%20-%3E%20127.0.0.1%3A5672");
    }

    /// A server of the test's own that is no TLS server: the client must open a TLS handshake
    /// to it (its first byte is a TLS handshake record), and fail on the answer, rather than
    /// refuse the scheme.
    #[tokio::test]
    async fn an_https_url_is_spoken_to_in_tls() {
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(async move {
            let (mut conn, _) = listener.accept().await.unwrap();
            let first = conn.read_u8().await.unwrap();
            let _ = conn.write_all(b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\n\r\n").await;
            first
        });
        let mgmt = Mgmt::new(&format!("https://{addr}"), "guest", "guest");
        let err = tokio::time::timeout(Duration::from_secs(20), mgmt.delete_vhost("v"))
            .await
            .expect("the call ends")
            .expect_err("a server that speaks no TLS is an error");
        let text = format!("{err:#}");
        assert!(!text.contains("scheme"), "https is spoken, not refused: {text}");
        let first = tokio::time::timeout(Duration::from_secs(5), server).await.unwrap().unwrap();
        assert_eq!(first, 0x16, "the client opened with a TLS handshake record");
    }
}
