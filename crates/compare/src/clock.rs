//! The clock fault: the orchestrator runs under libfaketime, whose offset from the true time is
//! read from a file at every call, so a run can move the wall clock of the running process.
//! Its monotonic clock stays true (`DONT_FAKE_MONOTONIC=1`), as it does when NTP or an operator
//! steps a real machine's clock: only what reads the wall clock sees the jump.

use std::path::{Path, PathBuf};

use anyhow::{Context as _, bail};

/// Where Debian's package `faketime` puts the library (multi-threaded variant), per architecture.
const LIBFAKETIME: [&str; 3] = [
    "/usr/lib/x86_64-linux-gnu/faketime/libfaketimeMT.so.1",
    "/usr/lib/aarch64-linux-gnu/faketime/libfaketimeMT.so.1",
    "/usr/lib/faketime/libfaketimeMT.so.1",
];

/// The offset file of one run's orchestrator.
pub struct FakeClock {
    file: PathBuf,
    lib: PathBuf,
}

impl FakeClock {
    /// libfaketime, if this machine has it (`BATON_LIBFAKETIME` names it when it is elsewhere).
    pub fn library() -> Option<PathBuf> {
        let named = std::env::var("BATON_LIBFAKETIME").ok().filter(|s| !s.is_empty());
        named.iter().map(String::as_str).chain(LIBFAKETIME).map(PathBuf::from).find(|p| p.exists())
    }

    /// What a run says when it skips the plan's clock items for want of libfaketime.
    pub const MISSING: &str = "the plan jumps the orchestrator's clock, which needs libfaketime (the Debian \
                               package `faketime`, or BATON_LIBFAKETIME naming its libfaketimeMT.so.1): \
                               clock items skipped";

    /// A clock at the true time, its file in `dir`; fails, saying how to fix it, without
    /// libfaketime ([`FakeClock::library`]).
    pub fn new(dir: &Path) -> anyhow::Result<FakeClock> {
        let Some(lib) = FakeClock::library() else {
            bail!(
                "the fault plan jumps the orchestrator's clock, which needs libfaketime: install the Debian \
                 package `faketime`, set BATON_LIBFAKETIME to its libfaketimeMT.so.1, or drop the clock items"
            );
        };
        let clock = FakeClock { file: dir.join("faketime"), lib };
        clock.set(0)?;
        Ok(clock)
    }

    /// Set the wall clock to `offset_s` from the true time; written whole (a rename), so that no
    /// read sees half of it.
    pub fn set(&self, offset_s: i64) -> anyhow::Result<()> {
        let tmp = self.file.with_extension("tmp");
        std::fs::write(&tmp, format!("{offset_s:+}\n"))
            .with_context(|| format!("writing {}", tmp.display()))?;
        std::fs::rename(&tmp, &self.file).with_context(|| format!("writing {}", self.file.display()))
    }

    /// The environment of a process that runs on this clock.
    pub fn env(&self) -> Vec<(String, String)> {
        [
            ("LD_PRELOAD", self.lib.display().to_string()),
            ("FAKETIME_TIMESTAMP_FILE", self.file.display().to_string()),
            ("FAKETIME_NO_CACHE", "1".into()),
            ("DONT_FAKE_MONOTONIC", "1".into()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect()
    }
}
