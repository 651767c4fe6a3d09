//! docs/asyncapi.yaml against the code: every message's payload schema has examples, and each
//! example decodes with the type the components decode that message with. A field the code
//! requires and the spec leaves out (or names otherwise) fails here, so the two cannot drift.

use baton_protocol::{CancelSaga, RetrySaga, SagaOutcome, SpaceEvent, StartSaga, StepCommand, StepReply};
use serde_json::Value;

fn spec() -> Value {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../../docs/asyncapi.yaml");
    let text = std::fs::read_to_string(path).expect("docs/asyncapi.yaml");
    serde_norway::from_str(&text).expect("docs/asyncapi.yaml is YAML")
}

/// Decode `example` as the components decode a body of schema `schema`.
fn decode(schema: &str, example: &Value) -> Result<(), String> {
    fn as_<T: serde::de::DeserializeOwned>(v: &Value) -> Result<(), String> {
        serde_json::from_value::<T>(v.clone()).map(|_| ()).map_err(|e| e.to_string())
    }
    match schema {
        "StartCommand" => as_::<StartSaga>(example),
        "CancelSaga" => as_::<CancelSaga>(example),
        "RetrySaga" => as_::<RetrySaga>(example),
        "StartReply" => as_::<SagaOutcome>(example),
        "StepCommand" => as_::<StepCommand>(example),
        "StepReply" => as_::<StepReply>(example),
        "SpaceEvent" | "SpaceRejectedEvent" => as_::<SpaceEvent>(example),
        other => Err(format!("no decoder is known for schema {other}: add it to this test")),
    }
}

#[test]
fn every_payload_example_of_the_spec_decodes_with_the_code() {
    let spec = spec();
    let messages = spec["components"]["messages"].as_object().expect("components.messages");
    let mut schemas: Vec<String> = messages
        .values()
        .filter_map(|m| m["payload"]["$ref"].as_str())
        .map(|r| r.rsplit('/').next().unwrap().to_owned())
        .collect();
    schemas.sort();
    schemas.dedup();
    assert!(schemas.len() >= 8, "payload schemas found: {schemas:?}");
    let mut failures = Vec::new();
    for name in &schemas {
        let examples =
            spec["components"]["schemas"][name]["examples"].as_array().cloned().unwrap_or_default();
        if examples.is_empty() {
            failures.push(format!("{name}: no example"));
        }
        for (i, ex) in examples.iter().enumerate() {
            if let Err(e) = decode(name, ex) {
                failures.push(format!("{name} example {}: {e}", i + 1));
            }
        }
    }
    assert!(failures.is_empty(), "docs/asyncapi.yaml and the code disagree:\n{}", failures.join("\n"));
}
