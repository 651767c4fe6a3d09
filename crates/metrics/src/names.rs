//! The name of every series, and its help text (`# HELP` in the exposition). docs/operations.md
//! lists the same, with the labels.

use metrics::{describe_counter, describe_gauge, describe_histogram};

pub const REQUESTS: &str = "baton_requests_total";
pub const REQUEST_SECONDS: &str = "baton_request_duration_seconds";
pub const IDEMPOTENT_REPLAYS: &str = "baton_idempotent_replays_total";
pub const SAGAS_STARTED: &str = "baton_sagas_started_total";
pub const SAGAS_FINISHED: &str = "baton_sagas_finished_total";
pub const STEP_SECONDS: &str = "baton_step_duration_seconds";
pub const COMPENSATIONS: &str = "baton_compensations_total";
pub const COMPENSATION_FAILURES: &str = "baton_compensation_failures_total";
pub const STEP_TIMEOUTS: &str = "baton_step_timeouts_total";
pub const STEP_RETRIES: &str = "baton_step_retries_total";
pub const LATE_REPLIES: &str = "baton_late_replies_total";
pub const CANCELS: &str = "baton_cancels_total";
pub const INBOX_DUPLICATES: &str = "baton_inbox_duplicates_total";
pub const TOMBSTONE_HITS: &str = "baton_tombstone_hits_total";
pub const DEAD_LETTERED: &str = "baton_dead_lettered_total";
pub const STORE_CONFLICTS: &str = "baton_store_conflicts_retried_total";
pub const RELAY: &str = "baton_relay_published_total";
pub const OUTBOX_DEPTH: &str = "baton_outbox_depth";
pub const OUTBOX_OLDEST: &str = "baton_outbox_oldest_unpublished_seconds";
pub const OUTBOX_TAKEN_OVER: &str = "baton_outbox_taken_over_total";
pub const PURGED: &str = "baton_retention_purged_total";
pub const RECONCILE_FINDINGS: &str = "baton_reconcile_findings_total";
pub const READY: &str = "baton_ready";
pub const STAGE_SECONDS: &str = "baton_stage_duration_seconds";

/// Give every series its help text, once the recorder is installed.
pub(crate) fn describe() {
    describe_counter!(REQUESTS, "POST /spaces answered, by mode and HTTP status.");
    describe_histogram!(
        REQUEST_SECONDS,
        "Time from a POST /spaces arriving to its answer, by mode and status."
    );
    describe_counter!(
        IDEMPOTENT_REPLAYS,
        "Requests whose Idempotency-Key was seen before: the first one's outcome."
    );
    describe_counter!(SAGAS_STARTED, "Sagas started, by workflow and definition version (content hash).");
    describe_counter!(SAGAS_FINISHED, "Sagas ended, by workflow, version and outcome.");
    describe_histogram!(
        STEP_SECONDS,
        "Time from a step's command to its reply, by service and action (do, undo)."
    );
    describe_counter!(COMPENSATIONS, "Steps undone, by service.");
    describe_counter!(COMPENSATION_FAILURES, "Compensations that kept failing (saga left for an operator).");
    describe_counter!(STEP_TIMEOUTS, "Step commands that got no reply in time, by service.");
    describe_counter!(STEP_RETRIES, "Step commands sent again, by service.");
    describe_counter!(LATE_REPLIES, "Replies that came after their step had moved on, ignored, by service.");
    describe_counter!(CANCELS, "Cancels the orchestrator took (accepted) or could not carry out (refused).");
    describe_counter!(INBOX_DUPLICATES, "Messages already handled that came again and were dropped.");
    describe_counter!(
        TOMBSTONE_HITS,
        "Commands for a step already compensated, made no-ops by its tombstone."
    );
    describe_counter!(DEAD_LETTERED, "Deliveries rejected to the dead-letter exchange, by queue and reason.");
    describe_counter!(
        STORE_CONFLICTS,
        "PostgreSQL transactions that conflicted with another instance's and were retried."
    );
    describe_counter!(RELAY, "Outbox rows the relay published: confirmed, nacked (or returned), failed.");
    describe_gauge!(OUTBOX_DEPTH, "Outbox rows not yet confirmed by the broker.");
    describe_gauge!(OUTBOX_OLDEST, "Age of the oldest outbox row not yet confirmed, in seconds.");
    describe_counter!(
        OUTBOX_TAKEN_OVER,
        "Another instance's outbox rows, left past their lease, published here."
    );
    describe_counter!(PURGED, "Rows the retention task purged, by what they were.");
    describe_counter!(RECONCILE_FINDINGS, "What baton reconcile found and did in events mode, by kind.");
    describe_histogram!(
        STAGE_SECONDS,
        "Time one stage of a hop took (decode, handoff, run, commit, resume, handle, ack, relay_wake, \
         publish, confirm, delete), by component."
    );
    describe_gauge!(READY, "1 when every check of the component passes (GET /health/ready), else 0.");
}
