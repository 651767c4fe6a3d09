//! Named crash points, for tests that kill a component at a dangerous instant.
//!
//! A component process started with `BATON_CRASH_AT=<point>` (or `<point>:<n>`, the n-th time the
//! point is reached) sends itself SIGKILL there: no cleanup, no flush, exactly as if the machine
//! had killed it. Unarmed, a crash point costs one atomic load.
//!
//! Owns: the names of the points and the arming. Must not touch: anything else. A point is one
//! line, [`crash_point!`] or [`stall_point!`]; as fail-rs's `fail_point!`, each macro is defined
//! twice, and without this crate's `crash-points` feature it compiles to nothing (its argument
//! is type-checked, never evaluated), so that a release build (`cargo build --release -p
//! baton-cli`) contains none of them. The crates that have points forward their own
//! `crash-points` feature to this one's; the test crate turns it on for the `baton` binary it
//! runs.

#[cfg(feature = "crash-points")]
use std::sync::OnceLock;
#[cfg(feature = "crash-points")]
use std::sync::atomic::{AtomicU64, Ordering};

/// Whether this build has its crash points: code that works out where it stands only for a
/// crash point may skip that work when it is `false`.
pub const ENABLED: bool = cfg!(feature = "crash-points");

/// Die here, with SIGKILL, when the point named (a `&str`, or an `Option<&str>`: `None` is no
/// point) is armed by `BATON_CRASH_AT` and its turn has come. Nothing without the feature.
#[cfg(feature = "crash-points")]
#[macro_export]
macro_rules! crash_point {
    ($point:expr) => {
        $crate::point($point)
    };
}

/// Die here, with SIGKILL, when the point named (a `&str`, or an `Option<&str>`: `None` is no
/// point) is armed by `BATON_CRASH_AT` and its turn has come. Nothing without the feature.
#[cfg(not(feature = "crash-points"))]
#[macro_export]
macro_rules! crash_point {
    ($point:expr) => {
        if false {
            let _ = $point;
        }
    };
}

/// Wait here while the file named by `BATON_STALL_FILE` exists ([`stall`]). Nothing without
/// the feature.
#[cfg(feature = "crash-points")]
#[macro_export]
macro_rules! stall_point {
    ($point:expr) => {
        $crate::stall($point)
    };
}

/// Wait here while the file named by `BATON_STALL_FILE` exists (`stall`). Nothing without
/// the feature.
#[cfg(not(feature = "crash-points"))]
#[macro_export]
macro_rules! stall_point {
    ($point:expr) => {
        if false {
            let _ = $point;
        }
    };
}

/// After the handler's transaction committed, before the delivery is acked.
pub const AFTER_COMMIT_BEFORE_ACK: &str = "after-commit-before-ack";
/// After the broker confirmed an outbox batch, before its rows are deleted.
pub const AFTER_PUBLISH_BEFORE_DELETE: &str = "after-publish-before-delete";
/// In the orchestrator: a compensation is done and committed, another is still to come.
pub const BETWEEN_COMPENSATIONS: &str = "between-compensations";
/// In the orchestrator: one member of a parallel group is done and committed, another is not.
pub const MID_PARALLEL_GROUP: &str = "mid-parallel-group";

/// In the orchestrator: a child saga ended and its parent moved on, committed together; the
/// parent's next command is not published yet.
pub const CHILD_ENDED: &str = "child-ended";
/// In the orchestrator (hybrid mode): a saga's event step is committed, its announcement in the
/// outbox and not yet published, when the follow-ups have still heard nothing.
pub const AFTER_ANNOUNCE_COMMIT: &str = "after-announce-commit";
pub const ALL: [&str; 6] = [
    AFTER_COMMIT_BEFORE_ACK,
    AFTER_PUBLISH_BEFORE_DELETE,
    BETWEEN_COMPENSATIONS,
    MID_PARALLEL_GROUP,
    CHILD_ENDED,
    AFTER_ANNOUNCE_COMMIT,
];

#[cfg(feature = "crash-points")]
struct Armed {
    point: String,
    at: u64,
    seen: AtomicU64,
}

#[cfg(feature = "crash-points")]
fn armed() -> Option<&'static Armed> {
    static ARMED: OnceLock<Option<Armed>> = OnceLock::new();
    ARMED
        .get_or_init(|| {
            let spec = std::env::var("BATON_CRASH_AT").ok()?;
            let (point, at) = match spec.split_once(':') {
                Some((p, n)) => (p.to_owned(), n.parse().unwrap_or(1)),
                None => (spec, 1),
            };
            if !ALL.contains(&point.as_str()) {
                tracing::error!(%point, known = ?ALL, "BATON_CRASH_AT names no crash point; ignored");
                return None;
            }
            tracing::warn!(%point, at, "crash point armed: this process will kill itself there");
            Some(Armed { point, at, seen: AtomicU64::new(0) })
        })
        .as_ref()
}

/// Die here, with SIGKILL, if this point is armed and its turn has come ([`crash_point!`]).
#[cfg(feature = "crash-points")]
pub fn point<'a>(name: impl Into<Option<&'a str>>) {
    let Some(name) = name.into() else { return };
    let Some(a) = armed() else { return };
    if a.point != name || a.seen.fetch_add(1, Ordering::SeqCst) + 1 != a.at {
        return;
    }
    eprintln!("crash point {name} reached: SIGKILL");
    let _ = rustix::process::kill_process(rustix::process::getpid(), rustix::process::Signal::KILL);
    // The signal is on its way; never go past the point.
    loop {
        std::thread::sleep(std::time::Duration::from_secs(1));
    }
}

/// A stall point: while the file named by `BATON_STALL_FILE` exists, a thread that reaches
/// [`stall`] waits there, alive but doing nothing, as a thread stuck on a disk or a database
/// that stopped answering would. Tests create the file to stall a process's database thread
/// while its connections live, and remove it to let it go on. Unarmed, it costs one load.
#[cfg(feature = "crash-points")]
pub fn stall(name: &str) {
    static FILE: OnceLock<Option<std::path::PathBuf>> = OnceLock::new();
    let Some(file) = FILE.get_or_init(|| std::env::var_os("BATON_STALL_FILE").map(Into::into)) else {
        return;
    };
    if !file.exists() {
        return;
    }
    tracing::warn!(point = name, file = %file.display(), "stall point reached: waiting while the file exists");
    while file.exists() {
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    tracing::warn!(point = name, "stall point released");
}

/// The database thread of a store, before each transaction ([`stall`]).
pub const DB_THREAD: &str = "db-thread";
