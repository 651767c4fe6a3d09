//! The cross-service invariant of the design, checked over a data dir.
//!
//! A space the client was told succeeded (200) has exactly one record, placement, licence, route
//! and email; a space the client was told failed has none of them; a space nobody got a definite
//! answer for must be all or nothing. Owns: reading the five services' databases, the gateway's
//! record of what each client was told and the orchestrator's saga states, all read-only, and the
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
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::MissingAfterSuccess => "missing_after_success",
            Kind::LeftAfterFailure => "left_after_failure",
            Kind::Partial => "partial",
            Kind::CompensationFailed => "compensation_failed",
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

fn ids(dir: &Path, db: &str, sql: &str) -> Result<Vec<(String, Option<i64>)>, AuditError> {
    let path = dir.join(db);
    if !path.exists() {
        return Ok(Vec::new());
    }
    let conn = baton_store::open_read_only(&path)?;
    let read = |e| AuditError::Read { db: db.into(), source: e };
    let mut stmt = conn.prepare(sql).map_err(read)?;
    let rows = stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?))).map_err(read)?;
    rows.collect::<Result<_, _>>().map_err(read)
}

/// Check the invariant over `dir`.
pub fn audit(dir: &Path) -> Result<Report, AuditError> {
    if !TABLES.iter().any(|(s, _)| dir.join(format!("{}.db", s.name())).exists()) {
        return Err(AuditError::Empty(dir.display().to_string()));
    }
    let mut rows: BTreeMap<String, BTreeSet<Service>> = BTreeMap::new();
    for (service, table) in TABLES {
        for (id, _) in
            ids(dir, &format!("{}.db", service.name()), &format!("SELECT space_id, NULL FROM {table}"))?
        {
            rows.entry(id).or_default().insert(service);
        }
    }
    // What each client was told, from the gateway; the orchestrator's answer where the gateway
    // has none (a request started without it).
    let mut told: BTreeMap<String, Option<u16>> = BTreeMap::new();
    let mut in_flight: BTreeSet<String> = BTreeSet::new();
    let mut stuck: BTreeSet<String> = BTreeSet::new();
    for (id, status) in ids(dir, "orchestrator.db", "SELECT space_id, answer_status FROM sagas")? {
        told.insert(id, status.map(|s| s as u16));
    }
    for (id, _) in ids(
        dir,
        "orchestrator.db",
        "SELECT space_id, NULL FROM sagas WHERE status IN ('running', 'compensating')",
    )? {
        in_flight.insert(id);
    }
    for (id, _) in
        ids(dir, "orchestrator.db", "SELECT space_id, NULL FROM sagas WHERE status = 'compensation_failed'")?
    {
        stuck.insert(id);
    }
    for (id, status) in ids(dir, "gateway.db", "SELECT space_id, told_status FROM requests")? {
        if let Some(s) = status {
            told.insert(id, Some(s as u16));
        } else {
            told.entry(id).or_insert(None);
        }
    }
    let all: BTreeSet<String> = rows.keys().chain(told.keys()).cloned().collect();
    let mut report = Report { spaces: all.len(), in_flight: in_flight.len(), ..Default::default() };
    for id in all {
        let present: Vec<Service> = rows.get(&id).map(|s| s.iter().copied().collect()).unwrap_or_default();
        let missing: Vec<Service> = Service::ALL.into_iter().filter(|s| !present.contains(s)).collect();
        let told_status = told.get(&id).copied().flatten();
        if missing.is_empty() {
            report.complete += 1;
        }
        let kind = if stuck.contains(&id) {
            Some(Kind::CompensationFailed)
        } else if in_flight.contains(&id) {
            None
        } else {
            match told_status {
                Some(200) if !missing.is_empty() => Some(Kind::MissingAfterSuccess),
                Some(200) => None,
                Some(504) | None if !present.is_empty() && !missing.is_empty() => Some(Kind::Partial),
                Some(504) | None => None,
                Some(_) if !present.is_empty() => Some(Kind::LeftAfterFailure),
                Some(_) => None,
            }
        };
        if let Some(kind) = kind {
            report.violations.push(Violation { space_id: id, kind, told: told_status, present, missing });
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
            make(
                dir,
                db,
                &format!("CREATE TABLE t (space_id TEXT); CREATE VIEW {table} AS SELECT space_id FROM t;"),
                ids,
            );
        }
        let g = Connection::open(dir.join("gateway.db")).unwrap();
        g.execute_batch(
            "CREATE TABLE requests (space_id TEXT, told_status INTEGER);
             INSERT INTO requests VALUES ('ok', 200), ('failed', 403), ('half', NULL), ('told-ok', 200), ('clean-fail', 409);",
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
                ("half", Kind::Partial)
            ]
        );
        assert_eq!(r.spaces, 5);
        assert_eq!(r.complete, 1);
        let line = r.violations[0].to_string();
        assert!(line.contains("lacks email"), "{line}");
    }

    #[test]
    fn an_empty_dir_is_an_error_not_a_clean_audit() {
        let dir = tempfile::tempdir().unwrap();
        assert!(matches!(audit(dir.path()), Err(AuditError::Empty(_))));
    }
}
