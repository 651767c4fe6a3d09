//! What the broker's management API says of the system behind this gateway: every component
//! instance connected to its vhost (in whatever process it runs), the queues each consumes, and
//! every queue's depth. The API's URL and login come from `BATON_MGMT_URL`, `BATON_MGMT_USER` and
//! `BATON_MGMT_PASSWORD`; the login is the AMQP URL's unless they say otherwise (that broker user
//! needs the `monitoring` tag to read them).

use baton_mgmt::{ClientConnection, Mgmt, QueueDepth};
use baton_protocol::Component;
use serde::Serialize;

/// The broker's view, or why there is none.
#[derive(Debug, Serialize)]
pub(crate) struct Broker {
    /// The vhost, as the management API's paths spell it.
    vhost: String,
    mgmt_url: String,
    instances: Vec<Instance>,
    queues: Vec<Queue>,
    /// Why the management API could not be read (then both lists are empty).
    error: Option<String>,
}

/// One component instance: one AMQP connection named `baton <component> [<instance>]`.
#[derive(Debug, PartialEq, Eq, Serialize)]
struct Instance {
    component: String,
    instance: String,
    /// The broker's state of its connection: `running`, or `blocked` by an alarm...
    state: String,
    consuming: Vec<String>,
    /// Connected, not blocked, and consuming: it takes work.
    ready: bool,
}

#[derive(Debug, PartialEq, Eq, Serialize)]
struct Queue {
    name: String,
    ready: u64,
    unacked: u64,
    consumers: u64,
}

/// Read the broker's view of the vhost of `amqp_url`.
pub(crate) async fn broker(amqp_url: &str) -> Broker {
    let vhost = baton_mgmt::vhost_of(amqp_url);
    let mgmt = client(amqp_url);
    let mut view =
        Broker { vhost, mgmt_url: mgmt.url.clone(), instances: Vec::new(), queues: Vec::new(), error: None };
    match tokio::try_join!(mgmt.clients(&view.vhost), mgmt.queue_depths(&view.vhost)) {
        Ok((clients, queues)) => {
            view.instances = instances(clients);
            view.queues = queues.into_iter().map(queue).collect();
        }
        Err(e) => view.error = Some(format!("{e:#}")),
    }
    view
}

/// The management API's client: its URL from the environment, its login the AMQP URL's unless
/// the environment names another.
fn client(amqp_url: &str) -> Mgmt {
    let first = amqp_url.split(',').next().unwrap_or_default();
    let parsed = url::Url::parse(first).ok();
    let decode = |s: &str| percent_decode(s);
    let user = parsed.as_ref().map(|u| decode(u.username())).filter(|u| !u.is_empty());
    let password = parsed.as_ref().and_then(|u| u.password().map(decode));
    let env = |name: &str| std::env::var(name).ok().filter(|v| !v.is_empty());
    Mgmt::new(
        &env("BATON_MGMT_URL").unwrap_or_else(|| "http://127.0.0.1:15672".into()),
        &env("BATON_MGMT_USER").or(user).unwrap_or_else(|| "guest".into()),
        &env("BATON_MGMT_PASSWORD").or(password).unwrap_or_else(|| "guest".into()),
    )
}

fn percent_decode(s: &str) -> String {
    url::form_urlencoded::parse(format!("v={}", s.replace('+', "%2B")).as_bytes())
        .next()
        .map_or_else(|| s.to_owned(), |(_, v)| v.into_owned())
}

fn queue(q: QueueDepth) -> Queue {
    Queue { name: q.name, ready: q.ready, unacked: q.unacked, consumers: q.consumers }
}

/// The connections that are Baton's components (`baton <component>` or `baton <component>
/// <instance>`; a service's default instance leaves its name out, the others say `main`), by
/// component and instance; tools' connections (`baton operator`, probes) are left out.
fn instances(clients: Vec<ClientConnection>) -> Vec<Instance> {
    let mut all: Vec<Instance> = clients
        .into_iter()
        .filter_map(|c| {
            let rest = c.name.strip_prefix("baton ")?;
            let (component, instance) = rest.split_once(' ').unwrap_or((rest, "main"));
            let component = Component::parse(component)?;
            Some(Instance {
                component: component.name().to_owned(),
                instance: instance.to_owned(),
                ready: c.state == "running" && !c.consuming.is_empty(),
                state: c.state,
                consuming: c.consuming,
            })
        })
        .collect();
    all.sort_by(|a, b| (&a.component, &a.instance).cmp(&(&b.component, &b.instance)));
    all
}

#[cfg(test)]
mod tests {
    use super::*;

    fn conn(name: &str, state: &str, consuming: &[&str]) -> ClientConnection {
        ClientConnection {
            name: name.into(),
            state: state.into(),
            consuming: consuming.iter().map(|q| q.to_string()).collect(),
        }
    }

    #[test]
    fn component_connections_are_instances_and_tools_are_left_out() {
        let got = instances(vec![
            conn("baton records", "running", &["records.commands"]),
            conn("baton orchestrator o2", "blocked", &["orchestrator.replies"]),
            conn("baton gateway main", "running", &[]),
            conn("baton operator", "running", &[]),
            conn("127.0.0.1:4 -> 127.0.0.1:5672", "running", &[]),
        ]);
        let seen: Vec<_> = got.iter().map(|i| (i.component.as_str(), i.instance.as_str(), i.ready)).collect();
        assert_eq!(
            seen,
            vec![("gateway", "main", false), ("orchestrator", "o2", false), ("records", "main", true)],
            "not consuming, or blocked, is not ready"
        );
    }

    #[test]
    fn the_login_is_the_amqp_urls_unless_the_environment_says_otherwise() {
        let m = client("amqp://baton%2Dgw:s%40cret@127.0.0.1:5672/v,amqp://x:y@h2/v");
        if std::env::var_os("BATON_MGMT_USER").is_none() {
            assert_eq!(m.user, "baton-gw");
        }
        if std::env::var_os("BATON_MGMT_PASSWORD").is_none() {
            assert_eq!(m.password, "s@cret");
        }
    }
}
