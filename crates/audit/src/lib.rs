//! The cross-service invariant of the design, checked over a data dir.
//!
//! A space the client was told succeeded (200) has exactly one record, placement, licence, route
//! and email; a space the client was told failed has none of them; a space nobody got a definite
//! answer for must be all or nothing; a saga starts no compensable step once its client's
//! deadline passed. Owns: reading the five services' databases, the gateway's record of what
//! each client was told and the orchestrator's saga states and history, all read-only, and the
//! list of violations. Must not touch: anything that writes.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::path::Path;

use baton_protocol::Service;
use serde::Serialize;

/// What is wrong with one space.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    /// Told 200, yet some of the five rows are missing.
    MissingAfterSuccess,
    /// Told it failed, yet some rows remain.
    LeftAfterFailure,
    /// No definite answer (none yet, or a 504), and only some of the rows exist.
    Partial,
    /// The rollback stopped: an operator must retry it.
    CompensationFailed,
    /// Its saga stopped because the definition it started on cannot be found: an operator must
    /// make it available again and retry it.
    DefinitionMissing,
    /// Told 504 (no outcome in time), yet the space was completed afterwards: the client
    /// believes it may not exist.
    TimedOutButCompleted,
    /// Told 504, and nothing of the space exists: the client cannot know.
    TimedOutNothing,
    /// Its saga started a compensable step at or after its client's deadline: a 504 could
    /// then leave a space half made (workflow mode's contract is nothing, or all five).
    StepAfterDeadline,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::MissingAfterSuccess => "missing_after_success",
            Kind::LeftAfterFailure => "left_after_failure",
            Kind::Partial => "partial",
            Kind::CompensationFailed => "compensation_failed",
            Kind::DefinitionMissing => "definition_missing",
            Kind::TimedOutButCompleted => "timed_out_but_completed",
            Kind::TimedOutNothing => "timed_out_nothing",
            Kind::StepAfterDeadline => "step_after_deadline",
        }
    }
}

/// One violation: a space, what is wrong, and the rows it has.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Violation {
    pub space_id: String,
    pub kind: Kind,
    pub told: Option<u16>,
    pub present: Vec<Service>,
    pub missing: Vec<Service>,
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let names = |v: &[Service]| {
            if v.is_empty() {
                "nothing".to_string()
            } else {
                v.iter().map(|s| row_name(*s)).collect::<Vec<_>>().join(", ")
            }
        };
        let told = self.told.map_or_else(|| "no answer".to_string(), |t| format!("told {t}"));
        write!(
            f,
            "{} space {} ({told}): has {}; lacks {}",
            self.kind.as_str(),
            self.space_id,
            names(&self.present),
            names(&self.missing)
        )
    }
}

/// The row a service keeps for a space.
pub fn row_name(s: Service) -> &'static str {
    match s {
        Service::Records => "record",
        Service::Placement => "placement",
        Service::Entitlements => "licence",
        Service::Routing => "route",
        Service::Notifier => "email",
    }
}

/// The audit of one data dir.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Report {
    pub spaces: usize,
    pub complete: usize,
    pub in_flight: usize,
    pub violations: Vec<Violation>,
    /// Rows left behind by spaces that did not complete, per service (emails included).
    pub orphans: BTreeMap<Service, usize>,
    /// Emails sent for spaces whose record does not exist.
    pub emails_without_space: usize,
}

impl Report {
    pub fn is_clean(&self) -> bool {
        self.violations.is_empty()
    }

    /// Violations counted by kind.
    pub fn by_kind(&self) -> BTreeMap<Kind, usize> {
        let mut m = BTreeMap::new();
        for v in &self.violations {
            *m.entry(v.kind).or_default() += 1;
        }
        m
    }
}

#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    #[error("{0} has no Baton databases (records.db, ...); point --data-dir at the data dir of a run")]
    Empty(String),
    #[error(transparent)]
    Store(#[from] baton_store::StoreError),
    #[error("reading {db}: {source}")]
    Read { db: String, source: rusqlite::Error },
}

const TABLES: [(Service, &str); 5] = [
    (Service::Records, "spaces"),
    (Service::Placement, "placements"),
    (Service::Entitlements, "licences"),
    (Service::Routing, "routes"),
    (Service::Notifier, "emails"),
];

/// What one space has, across the databases, and what its client was told.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpaceRows {
    pub space_id: String,
    /// The saga (workflow mode) or the space itself (events mode) that the rows belong to.
    pub saga_id: Option<String>,
    pub present: BTreeSet<Service>,
    pub told: Option<u16>,
    /// When its oldest row was written (ms since the epoch).
    pub oldest_ms: Option<i64>,
    /// A saga is still working on it (running, compensating, or its email is on its way).
    pub in_flight: bool,
    pub compensation_failed: bool,
    /// Its saga waits for its definition and an operator.
    pub definition_missing: bool,
    /// Compensable steps its saga sent at or after its client's deadline.
    pub steps_after_deadline: u32,
}

impl SpaceRows {
    pub fn is_complete(&self) -> bool {
        self.present.len() == Service::ALL.len()
    }
}

/// Read every space of `dir`: which services hold a row for it, and what its client was told.
pub fn scan(dir: &Path) -> Result<Vec<SpaceRows>, AuditError> {
    if !TABLES.iter().any(|(s, _)| dir.join(format!("{}.db", s.name())).exists()) {
        return Err(AuditError::Empty(dir.display().to_string()));
    }
    let mut spaces: BTreeMap<String, SpaceRows> = BTreeMap::new();
    for (service, table) in TABLES {
        let time = if service == Service::Notifier { "sent_at" } else { "created_at" };
        for (id, saga, at) in rows3::<String, String, i64>(
            dir,
            &format!("{}.db", service.name()),
            &format!("SELECT space_id, saga_id, {time} FROM {table}"),
        )? {
            let s = space(&mut spaces, id);
            s.present.insert(service);
            s.saga_id.get_or_insert(saga);
            s.oldest_ms = Some(s.oldest_ms.map_or(at, |o| o.min(at)));
        }
    }
    // What each client was told: the gateway's record first, the orchestrator's answer where
    // the gateway has none (a saga started without it).
    for (id, status, state) in rows3::<String, i64, String>(
        dir,
        "orchestrator.db",
        "SELECT space_id, COALESCE(answer_status, -1), status FROM sagas",
    )? {
        let s = space(&mut spaces, id);
        s.told = u16::try_from(status).ok();
        s.in_flight = ["running", "compensating", "succeeded"].contains(&state.as_str());
        s.compensation_failed = state == "compensation_failed";
        s.definition_missing = state == "definition_missing";
    }
    // Forward commands sent at or after the deadline, both times on the clock of the process that
    // started the saga (a later process's clock may differ by a jump: see `Saga::rearm`).
    if has_column(dir, "orchestrator.db", "sagas", "deadline_at")? {
        for (id, n, _) in rows3::<String, i64, String>(
            dir,
            "orchestrator.db",
            "SELECT s.space_id, COUNT(*), '' FROM sagas s JOIN history h ON h.saga_id = s.saga_id
             WHERE s.deadline_at IS NOT NULL AND h.event = 'sent' AND h.action = 'do'
               AND h.step <> 'notifier' AND h.at >= s.deadline_at
             GROUP BY s.space_id",
        )? {
            space(&mut spaces, id).steps_after_deadline = n as u32;
        }
    }
    for (id, status, _) in rows3::<String, i64, String>(
        dir,
        "gateway.db",
        "SELECT space_id, COALESCE(told_status, -1), '' FROM requests",
    )? {
        let s = space(&mut spaces, id);
        if let Ok(t) = u16::try_from(status) {
            s.told = Some(t);
        }
    }
    Ok(spaces.into_values().collect())
}

fn space(spaces: &mut BTreeMap<String, SpaceRows>, id: String) -> &mut SpaceRows {
    spaces.entry(id.clone()).or_insert_with(|| SpaceRows {
        space_id: id,
        saga_id: None,
        present: BTreeSet::new(),
        told: None,
        oldest_ms: None,
        in_flight: false,
        compensation_failed: false,
        definition_missing: false,
        steps_after_deadline: 0,
    })
}

fn rows3<A, B, C>(dir: &Path, db: &str, sql: &str) -> Result<Vec<(A, B, C)>, AuditError>
where
    A: rusqlite::types::FromSql,
    B: rusqlite::types::FromSql,
    C: rusqlite::types::FromSql,
{
    let path = dir.join(db);
    if !path.exists() {
        return Ok(Vec::new());
    }
    let conn = baton_store::open_read_only(&path)?;
    let read = |e| AuditError::Read { db: db.into(), source: e };
    let mut stmt = conn.prepare(sql).map_err(read)?;
    let rows = stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?))).map_err(read)?;
    rows.collect::<Result<_, _>>().map_err(read)
}

fn has_column(dir: &Path, db: &str, table: &str, column: &str) -> Result<bool, AuditError> {
    let path = dir.join(db);
    if !path.exists() {
        return Ok(false);
    }
    let conn = baton_store::open_read_only(&path)?;
    conn.query_row("SELECT COUNT(*) > 0 FROM pragma_table_info(?1) WHERE name = ?2", [table, column], |r| {
        r.get(0)
    })
    .map_err(|e| AuditError::Read { db: db.into(), source: e })
}

/// The verdict on one space, if something is wrong with it.
pub fn judge(s: &SpaceRows) -> Option<Kind> {
    let complete = s.is_complete();
    if s.compensation_failed {
        return Some(Kind::CompensationFailed);
    }
    if s.definition_missing {
        return Some(Kind::DefinitionMissing);
    }
    if s.steps_after_deadline > 0 {
        return Some(Kind::StepAfterDeadline);
    }
    if s.in_flight {
        return None;
    }
    match s.told {
        Some(200) if !complete => Some(Kind::MissingAfterSuccess),
        Some(200) => None,
        Some(504) if complete => Some(Kind::TimedOutButCompleted),
        Some(504) if s.present.is_empty() => Some(Kind::TimedOutNothing),
        Some(504) | None if !s.present.is_empty() && !complete => Some(Kind::Partial),
        Some(504) | None => None,
        Some(_) if !s.present.is_empty() => Some(Kind::LeftAfterFailure),
        Some(_) => None,
    }
}

/// Check the invariant over `dir`.
pub fn audit(dir: &Path) -> Result<Report, AuditError> {
    let spaces = scan(dir)?;
    let mut report = Report { spaces: spaces.len(), ..Default::default() };
    for s in spaces {
        if s.is_complete() {
            report.complete += 1;
        }
        if s.in_flight {
            report.in_flight += 1;
        }
        if !s.is_complete() {
            for svc in &s.present {
                *report.orphans.entry(*svc).or_default() += 1;
            }
            if s.present.contains(&Service::Notifier) && !s.present.contains(&Service::Records) {
                report.emails_without_space += 1;
            }
        }
        if let Some(kind) = judge(&s) {
            let missing = Service::ALL.into_iter().filter(|x| !s.present.contains(x)).collect();
            report.violations.push(Violation {
                space_id: s.space_id,
                kind,
                told: s.told,
                present: s.present.into_iter().collect(),
                missing,
            });
        }
    }
    report.violations.sort_by(|a, b| (a.kind, &a.space_id).cmp(&(b.kind, &b.space_id)));
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rusqlite::Connection;

    fn make(dir: &Path, db: &str, ddl: &str, ids: &[&str]) {
        let c = Connection::open(dir.join(db)).unwrap();
        c.execute_batch(ddl).unwrap();
        for id in ids {
            c.execute("INSERT INTO t VALUES (?1)", [id]).unwrap();
        }
    }

    fn fixture(dir: &Path) {
        let tables = [
            ("records.db", "spaces"),
            ("placement.db", "placements"),
            ("entitlements.db", "licences"),
            ("routing.db", "routes"),
            ("notifier.db", "emails"),
        ];
        // ok: everything; failed: told 403 and a record left; half: no answer, record + placement.
        let present: [&[&str]; 5] = [
            &["ok", "failed", "half", "told-ok"],
            &["ok", "half", "told-ok"],
            &["ok", "told-ok"],
            &["ok", "told-ok"],
            &["ok"],
        ];
        for ((db, table), ids) in tables.iter().zip(present) {
            let time = if *table == "emails" { "sent_at" } else { "created_at" };
            let ddl = format!(
                "CREATE TABLE t (space_id TEXT); CREATE VIEW {table} AS SELECT space_id, 's' AS saga_id, 1 AS {time} FROM t;"
            );
            make(dir, db, &ddl, ids);
        }
        let g = Connection::open(dir.join("gateway.db")).unwrap();
        g.execute_batch(
            "CREATE TABLE requests (space_id TEXT, told_status INTEGER);
             INSERT INTO requests VALUES ('ok', 200), ('failed', 403), ('half', NULL), ('told-ok', 200), ('clean-fail', 409),
                                         ('late', 504);",
        )
        .unwrap();
    }

    #[test]
    fn finds_each_kind_of_violation_and_nothing_else() {
        let dir = tempfile::tempdir().unwrap();
        fixture(dir.path());
        let r = audit(dir.path()).unwrap();
        let got: Vec<(&str, Kind)> = r.violations.iter().map(|v| (v.space_id.as_str(), v.kind)).collect();
        assert_eq!(
            got,
            vec![
                ("told-ok", Kind::MissingAfterSuccess),
                ("failed", Kind::LeftAfterFailure),
                ("half", Kind::Partial),
                ("late", Kind::TimedOutNothing)
            ]
        );
        assert_eq!(r.spaces, 6);
        assert_eq!(r.orphans[&Service::Records], 3);
        assert_eq!(r.orphans[&Service::Placement], 2);
        assert_eq!(r.emails_without_space, 0);
        assert_eq!(r.complete, 1);
        let line = r.violations[0].to_string();
        assert!(line.contains("lacks email"), "{line}");
    }

    #[test]
    fn a_compensable_step_sent_at_or_after_the_deadline_is_reported_and_notify_is_not() {
        let dir = tempfile::tempdir().unwrap();
        fixture(dir.path());
        let o = Connection::open(dir.path().join("orchestrator.db")).unwrap();
        o.execute_batch(
            "CREATE TABLE sagas (saga_id TEXT, space_id TEXT, status TEXT, answer_status INTEGER, deadline_at INTEGER);
             CREATE TABLE history (saga_id TEXT, at INTEGER, step TEXT, action TEXT, event TEXT);
             INSERT INTO sagas VALUES ('s-ok', 'ok', 'completed', 200, 1000), ('s-late', 'half', 'rolled_back', 504, 1000);
             INSERT INTO history VALUES ('s-ok', 900, 'routing', 'do', 'sent'), ('s-ok', 1200, 'notifier', 'do', 'sent'),
                                        ('s-late', 999, 'records', 'do', 'sent'), ('s-late', 1000, 'placement', 'do', 'sent'),
                                        ('s-late', 1100, 'records', 'undo', 'sent');",
        )
        .unwrap();
        let r = audit(dir.path()).unwrap();
        let kinds: Vec<(&str, Kind)> = r.violations.iter().map(|v| (v.space_id.as_str(), v.kind)).collect();
        assert!(kinds.contains(&("half", Kind::StepAfterDeadline)), "{kinds:?}");
        assert!(!kinds.iter().any(|(id, _)| *id == "ok"), "a late notify is the saga completing: {kinds:?}");
    }

    #[test]
    fn an_empty_dir_is_an_error_not_a_clean_audit() {
        let dir = tempfile::tempdir().unwrap();
        assert!(matches!(audit(dir.path()), Err(AuditError::Empty(_))));
    }
}
