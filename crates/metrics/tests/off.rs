//! A process that never installs the recorder (a binary of its own, so no other test installs
//! one first): the hot path's stopwatches read no clock and record nothing.

use baton_metrics::{Stage, Stopwatch};

#[test]
fn without_a_recorder_a_stopwatch_holds_no_time_and_records_nothing() {
    assert!(!baton_metrics::enabled());
    let mut watch = Stopwatch::start();
    assert!(!watch.running());
    watch.lap("records", Stage::Decode);
    assert!(!watch.running());
    let health = baton_health::Health::default();
    let rendered = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(baton_metrics::render(&health));
    assert!(rendered.is_none(), "nothing to render without a recorder");
}
