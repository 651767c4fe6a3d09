//! The broker's part of a component's readiness.

use std::sync::{Arc, Weak};

use baton_health::{Health, Kind};

use crate::Broker;

/// Keeps the "broker connected" check of a component answering; drop it with the component.
pub struct BrokerWatch {
    /// Held, never read: the check fails once this reference is gone.
    _broker: Arc<Broker>,
}

/// Register `component`'s readiness check "broker connected" (connected, and not blocked by a
/// resource alarm). The check holds no connection of its own: once the returned guard is
/// dropped (the component stopped or crashed), it fails, and the connection can close.
pub fn watch_broker(health: &Health, component: &str, broker: &Broker) -> BrokerWatch {
    let held = Arc::new(broker.clone());
    let weak: Weak<Broker> = Arc::downgrade(&held);
    health.probe(component, "broker connected", Kind::Ready, move || {
        let broker = weak.upgrade();
        async move {
            match broker {
                Some(b) => b.health().await,
                None => Err("the component has stopped".into()),
            }
        }
    });
    BrokerWatch { _broker: held }
}
