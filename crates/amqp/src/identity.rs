//! Who sent a message, and whether that sender may send it: the one place a handler asks.
//!
//! Every Baton publisher sets the AMQP `user_id` property to its own broker user
//! ([`crate::Publisher`]), and RabbitMQ refuses a publish whose `user_id` is not the
//! connection's user (`406 PRECONDITION_FAILED`, unless that user has the `impersonator` tag),
//! so the property names the sending user and cannot be forged. Which component that user is
//! comes from how `scripts/broker-users.sh` names the users, `<prefix><component>`: a receiver
//! whose own user is `<prefix><its component>` reads the prefix off its own name and a sender's
//! component off the sender's ([`Identity::PerUser`]). A receiver whose user is not named so
//! (the demo's and the tests' shared `guest`) has only the sender's word, its `app_id`
//! ([`Identity::Shared`]): the same check, which stops a component that names itself, not one
//! that lies.

use std::fmt;

use lapin::uri::AMQPUri;

use crate::{Envelope, HandleError};

/// How this component tells who sent a message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Identity {
    /// Every component has its own broker user, `<prefix><component>`: the sender is the
    /// component its `user_id` names.
    PerUser { prefix: String },
    /// The components share broker user `user`: the sender is the component its `app_id` names.
    Shared { user: String },
}

/// The sender of one message, as [`Identity::sender`] found it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Sender {
    /// A component, by its broker user (`user` is `Some`) or by its `app_id` (`None`).
    Component { name: String, user: Option<String> },
    /// A broker user that is no component's (an operator's, a tool's, another deployment's).
    Stranger(String),
    /// Nothing to tell by: no `user_id` under per-component users, no `app_id` on a shared one.
    Unknown,
}

impl Sender {
    fn is(&self, component: &str) -> bool {
        matches!(self, Sender::Component { name, .. } if name == component)
    }
}

impl fmt::Display for Sender {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Sender::Component { name, user: Some(user) } => write!(f, "{name} (broker user {user})"),
            Sender::Component { name, user: None } => write!(f, "{name} (by its app_id)"),
            Sender::Stranger(user) => write!(f, "broker user {user}, which is no Baton component's"),
            Sender::Unknown => write!(f, "a sender that did not say who it is"),
        }
    }
}

/// The user of a broker URL (the first of a cluster's list): `guest` when the URL names none,
/// as the AMQP client then logs in with it.
pub fn broker_user(url: &str) -> String {
    let first = url.split(',').next().unwrap_or_default().trim();
    first.parse::<AMQPUri>().map_or_else(|_| "guest".to_owned(), |uri| uri.authority.userinfo.username)
}

impl Identity {
    /// The identity of `component` connected as broker user `user`: per-component users when
    /// the user is `<prefix><component>`, a shared user otherwise.
    pub fn of(component: &str, user: &str) -> Identity {
        match user.strip_suffix(component) {
            Some(prefix) => Identity::PerUser { prefix: prefix.to_owned() },
            None => Identity::Shared { user: user.to_owned() },
        }
    }

    /// The identity of `component` on the broker at `url` (its user: [`broker_user`]).
    pub fn of_url(component: &str, url: &str) -> Identity {
        Identity::of(component, &broker_user(url))
    }

    /// Who sent `env`.
    pub fn sender(&self, env: &Envelope) -> Sender {
        match self {
            Identity::PerUser { prefix } => match env.user_id.as_deref() {
                None => Sender::Unknown,
                Some(user) => match user.strip_prefix(prefix.as_str()) {
                    Some(name) if !name.is_empty() => {
                        Sender::Component { name: name.to_owned(), user: Some(user.to_owned()) }
                    }
                    _ => Sender::Stranger(user.to_owned()),
                },
            },
            Identity::Shared { .. } => match env.app_id.as_deref() {
                Some(name) => Sender::Component { name: name.to_owned(), user: None },
                None => Sender::Unknown,
            },
        }
    }

    /// `component` as a sender is named to the reader of a dead-letter reason.
    fn named(&self, component: &str) -> String {
        match self {
            Identity::PerUser { prefix } => format!("{component} (broker user {prefix}{component})"),
            Identity::Shared { user } => {
                format!("{component} (by app_id: the components share broker user {user})")
            }
        }
    }

    /// Accept `env` only from one of `allowed` (component names); otherwise a dead-letter whose
    /// reason names the sender and who may send it.
    pub fn expect(&self, env: &Envelope, allowed: &[&str]) -> Result<(), HandleError> {
        let sender = self.sender(env);
        if allowed.iter().any(|c| sender.is(c)) {
            return Ok(());
        }
        let may: Vec<String> = allowed.iter().map(|c| self.named(c)).collect();
        Err(HandleError::reject(format!(
            "a `{}` message came from {sender}, but only {} may send it",
            env.kind,
            crate::envelope::listed_or(&may)
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(kind: &str, app_id: Option<&str>, user_id: Option<&str>) -> Envelope {
        Envelope {
            message_id: uuid::Uuid::nil(),
            correlation_id: None,
            kind: kind.into(),
            app_id: app_id.map(str::to_owned),
            user_id: user_id.map(str::to_owned),
            reply_to: None,
            mode: None,
            attempt: 1,
            traceparent: baton_protocol::TraceParent::new_root(),
            redelivered: false,
            body: Vec::new(),
        }
    }

    #[test]
    fn a_user_named_after_the_component_means_one_user_per_component() {
        assert_eq!(
            Identity::of("orchestrator", "baton-orchestrator"),
            Identity::PerUser { prefix: "baton-".into() }
        );
        assert_eq!(
            Identity::of("gateway", "prod-baton-gateway"),
            Identity::PerUser { prefix: "prod-baton-".into() }
        );
        assert_eq!(Identity::of("orchestrator", "guest"), Identity::Shared { user: "guest".into() });
        assert_eq!(
            Identity::of_url(
                "gateway",
                "amqp://baton-gateway:pw@127.0.0.1:5672/%2F,amqp://baton-gateway:pw@h2/%2F"
            ),
            Identity::PerUser { prefix: "baton-".into() }
        );
        assert_eq!(broker_user("amqp://127.0.0.1:5672/%2F"), "guest", "the client's default user");
    }

    #[test]
    fn per_component_users_name_the_sender_by_its_broker_user_not_its_word() {
        let id = Identity::of("orchestrator", "baton-orchestrator");
        let forged = env("routing.route.reply", Some("routing"), Some("baton-records"));
        assert_eq!(
            id.sender(&forged),
            Sender::Component { name: "records".into(), user: Some("baton-records".into()) }
        );
        let err = id.expect(&forged, &["routing"]).unwrap_err().to_string();
        assert_eq!(
            err,
            "a `routing.route.reply` message came from records (broker user baton-records), \
             but only routing (broker user baton-routing) may send it"
        );
        let real = env("routing.route.reply", Some("routing"), Some("baton-routing"));
        assert!(id.expect(&real, &["routing"]).is_ok());
    }

    #[test]
    fn per_component_users_refuse_a_stranger_and_a_message_with_no_user() {
        let id = Identity::of("gateway", "baton-gateway");
        let by_guest = env("orchestrator.start.reply", Some("orchestrator"), Some("guest"));
        let err = id.expect(&by_guest, &["orchestrator"]).unwrap_err().to_string();
        assert!(err.contains("came from broker user guest, which is no Baton component's"), "{err}");
        assert!(err.contains("only orchestrator (broker user baton-orchestrator) may send it"), "{err}");
        let unsigned = env("orchestrator.start.reply", Some("orchestrator"), None);
        let err = id.expect(&unsigned, &["orchestrator"]).unwrap_err().to_string();
        assert!(err.contains("came from a sender that did not say who it is"), "{err}");
    }

    #[test]
    fn a_shared_user_names_the_sender_by_its_app_id() {
        let id = Identity::of("orchestrator", "guest");
        let wrong = env("routing.route.reply", Some("records"), Some("guest"));
        assert_eq!(
            id.expect(&wrong, &["routing"]).unwrap_err().to_string(),
            "a `routing.route.reply` message came from records (by its app_id), \
             but only routing (by app_id: the components share broker user guest) may send it"
        );
        assert!(id.expect(&env("routing.route.reply", Some("routing"), Some("guest")), &["routing"]).is_ok());
        let anonymous = env("orchestrator.start", None, None);
        assert!(id.expect(&anonymous, &["gateway"]).is_err());
    }

    #[test]
    fn several_senders_may_be_allowed() {
        let id = Identity::of("gateway", "baton-gateway");
        let rejected = env("space.rejected", None, Some("baton-placement"));
        assert!(id.expect(&rejected, &["records", "placement"]).is_ok());
        let err = id.expect(&rejected, &["records", "routing"]).unwrap_err().to_string();
        assert!(
            err.ends_with(
                "only records (broker user baton-records) or routing (broker user baton-routing) may send it"
            ),
            "{err}"
        );
    }
}
