//! The cross-service invariant of the design, checked over the components' stores (a data dir's
//! SQLite files, or a PostgreSQL database's schemas).
//!
//! A space the client was told succeeded (200) has exactly one record, placement, licence, route
//! and email (and, in hybrid mode, a search entry: a store of the search index makes an audit
//! expect one, since its follow-ups must converge too); a space the client was told failed has none of them; a space nobody got a definite
//! answer for must be all or nothing; a saga starts no compensable step once its client's
//! deadline passed. A space that breaks it is an inconsistency. A client told 504 whose space
//! ended consistent (nothing, or all five) is not one: it is uncertain, counted apart, since
//! what the client was left not knowing is real but nothing needs repair. Owns: the findings
//! in those two classes, from what the components' read models say: which spaces each service
//! holds ([`baton_services::read`]), what the gateway told each client
//! ([`baton_gateway::read`]) and the orchestrator's saga states ([`baton_orchestrator::Sagas`]).
//! Must not touch: anything that writes, or any component's tables (it names none).

use baton_store::Location;
use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use baton_gateway::read::Requests;
use baton_orchestrator::Sagas;
use baton_protocol::{Mode, Service};
use baton_services::read::Holdings;
use baton_workflow::SagaStatus;
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
    /// Told 504 (no outcome in time), and the space was completed afterwards: consistent, but
    /// the client believes it may not exist. Uncertain.
    TimedOutButCompleted,
    /// Told 504, and nothing of the space exists: consistent, but the client cannot know.
    /// Uncertain.
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

    /// Whether this breaks the invariant, or only leaves a client not knowing.
    pub fn class(self) -> Class {
        match self {
            Kind::TimedOutButCompleted | Kind::TimedOutNothing => Class::Uncertain,
            Kind::MissingAfterSuccess
            | Kind::LeftAfterFailure
            | Kind::Partial
            | Kind::CompensationFailed
            | Kind::DefinitionMissing
            | Kind::StepAfterDeadline => Class::Inconsistent,
        }
    }
}

/// The two classes of finding: only an inconsistency fails an audit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Class {
    /// Partial state, or state that contradicts what the client was told: something to repair.
    Inconsistent,
    /// The client was told 504 and the space ended consistent (nothing, or complete): the
    /// client does not know which, but nothing is wrong in the stores.
    Uncertain,
}

impl Class {
    pub fn as_str(self) -> &'static str {
        match self {
            Class::Inconsistent => "inconsistent",
            Class::Uncertain => "uncertain",
        }
    }
}

/// One finding: a space, what is wrong or unknown about it, and the rows it has.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Finding {
    pub space_id: String,
    pub kind: Kind,
    pub told: Option<u16>,
    pub present: Vec<Service>,
    pub missing: Vec<Service>,
}

impl fmt::Display for Finding {
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
        Service::Search => "search entry",
    }
}

/// The audit of one data dir.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Report {
    pub spaces: usize,
    pub complete: usize,
    pub in_flight: usize,
    /// Spaces that break the invariant (partial, or contradicting what their client was told):
    /// each fails the audit.
    pub inconsistencies: Vec<Finding>,
    /// Spaces whose client was told 504 and that ended consistent (nothing, or complete): the
    /// client does not know, but nothing is wrong. They do not fail the audit.
    pub uncertain: Vec<Finding>,
    /// Rows left behind by spaces that did not complete, per service (emails included).
    pub orphans: BTreeMap<Service, usize>,
    /// Emails sent for spaces whose record does not exist.
    pub emails_without_space: usize,
}

impl Report {
    /// No inconsistency (uncertain spaces may remain): the audit passes.
    pub fn is_consistent(&self) -> bool {
        self.inconsistencies.is_empty()
    }

    /// Findings of both classes counted by kind (a kind belongs to one class: [`Kind::class`]).
    pub fn by_kind(&self) -> BTreeMap<Kind, usize> {
        let mut m = BTreeMap::new();
        for v in self.inconsistencies.iter().chain(&self.uncertain) {
            *m.entry(v.kind).or_default() += 1;
        }
        m
    }
}

#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    #[error(
        "{0} has no Baton stores (records, ...); point --data-dir (or --database-url) at the store of a run"
    )]
    Empty(String),
    #[error(transparent)]
    Store(#[from] baton_store::StoreError),
    #[error("reading the store of {db}: {source}")]
    Read { db: String, source: baton_store::StoreError },
}

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
    /// The services a complete space has a row in ([`Mode::services`]).
    pub expected: &'static [Service],
}

impl SpaceRows {
    pub fn is_complete(&self) -> bool {
        self.expected.iter().all(|s| self.present.contains(s))
    }
}

/// The mode the stores at `at` were written in, as far as a complete space goes: hybrid when
/// the search index has a store (only hybrid mode runs it), otherwise one whose spaces have
/// the five rows of the flow.
pub async fn mode_of(at: &Location) -> Result<Mode, AuditError> {
    let search = Holdings::at(at, Service::Search).exists().await;
    let search = search.map_err(|source| AuditError::Read { db: Service::Search.name().into(), source })?;
    Ok(if search { Mode::Hybrid } else { Mode::Workflow })
}

/// Read every space at `at`: which services hold a row for it, and what its client was told,
/// through each component's read model.
pub async fn scan(at: &Location) -> Result<Vec<SpaceRows>, AuditError> {
    let read = |db: &str| {
        let db = db.to_owned();
        move |source| AuditError::Read { db, source }
    };
    let mut any = false;
    for service in Service::ALL {
        any |= Holdings::at(at, service).exists().await.map_err(read(service.name()))?;
    }
    if !any {
        return Err(AuditError::Empty(at.to_string()));
    }
    let expected = mode_of(at).await?.services();
    let mut spaces: BTreeMap<String, SpaceRows> = BTreeMap::new();
    for &service in expected {
        for held in Holdings::at(at, service).all().await.map_err(read(service.name()))? {
            let s = space(&mut spaces, held.space_id, expected);
            s.present.insert(service);
            s.saga_id.get_or_insert(held.saga_id);
            s.oldest_ms = Some(s.oldest_ms.map_or(held.at_ms, |o| o.min(held.at_ms)));
        }
    }
    // What each client was told: the gateway's record first, the orchestrator's answer where
    // the gateway has none (a saga started without it).
    let sagas = Sagas::at(at);
    for saga in sagas.answers().await.map_err(read("orchestrator"))? {
        let s = space(&mut spaces, saga.space_id, expected);
        s.told = saga.answer_status;
        s.in_flight = saga.status.is_in_flight();
        s.compensation_failed = saga.status == SagaStatus::CompensationFailed;
        s.definition_missing = saga.status == SagaStatus::DefinitionMissing;
    }
    for (id, n) in sagas.steps_after_deadline().await.map_err(read("orchestrator"))? {
        space(&mut spaces, id, expected).steps_after_deadline = n;
    }
    for request in Requests::at(at).told().await.map_err(read("gateway"))? {
        let s = space(&mut spaces, request.space_id, expected);
        if let Some(t) = request.status {
            s.told = Some(t);
        }
    }
    Ok(spaces.into_values().collect())
}

fn space<'a>(
    spaces: &'a mut BTreeMap<String, SpaceRows>,
    id: String,
    expected: &'static [Service],
) -> &'a mut SpaceRows {
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
        expected,
    })
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

/// Check the invariant over `at`.
pub async fn audit(at: &Location) -> Result<Report, AuditError> {
    let spaces = scan(at).await?;
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
            let missing = s.expected.iter().copied().filter(|x| !s.present.contains(x)).collect();
            let finding = Finding {
                space_id: s.space_id,
                kind,
                told: s.told,
                present: s.present.into_iter().collect(),
                missing,
            };
            match kind.class() {
                Class::Inconsistent => report.inconsistencies.push(finding),
                Class::Uncertain => report.uncertain.push(finding),
            }
        }
    }
    for list in [&mut report.inconsistencies, &mut report.uncertain] {
        list.sort_by(|a, b| (a.kind, &a.space_id).cmp(&(b.kind, &b.space_id)));
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;
    use baton_store::scratch::{ScratchDatabase, test_server};

    async fn fixture(at: &Location) {
        // ok: everything; failed: told 403 and a record left; half: no answer, record + placement;
        // late: told 504, nothing; late-done: told 504, everything; late-half: told 504, a record.
        let present: [&[&str]; 5] = [
            &["ok", "failed", "half", "told-ok", "late-done", "late-half"],
            &["ok", "half", "told-ok", "late-done"],
            &["ok", "told-ok", "late-done"],
            &["ok", "told-ok", "late-done"],
            &["ok", "late-done"],
        ];
        for (service, ids) in Service::ALL.into_iter().zip(present) {
            for id in ids {
                baton_services::fixture::hold(at, service, id, &format!("s-{id}")).await.unwrap();
            }
        }
        let told = [
            ("ok", Some(200)),
            ("failed", Some(403)),
            ("half", None),
            ("told-ok", Some(200)),
            ("clean-fail", Some(409)),
            ("late", Some(504)),
            ("late-done", Some(504)),
            ("late-half", Some(504)),
        ];
        for (id, status) in told {
            baton_gateway::fixture::took(at, id, &format!("s-{id}"), status).await.unwrap();
        }
    }

    /// A fresh SQLite data dir and a fresh PostgreSQL database.
    fn stores() -> (tempfile::TempDir, ScratchDatabase, [Location; 2]) {
        let dir = tempfile::tempdir().unwrap();
        let pg =
            ScratchDatabase::create(&test_server(), "baton_audit").expect("the tests' PostgreSQL server");
        let each = [Location::Dir(dir.path().to_owned()), pg.location().clone()];
        (dir, pg, each)
    }

    #[tokio::test]
    async fn finds_each_inconsistency_and_each_uncertain_504_apart_on_both_backends() {
        let (_dir, _pg, each) = stores();
        for at in each {
            fixture(&at).await;
            let r = audit(&at).await.unwrap();
            let ids = |v: &[Finding]| v.iter().map(|v| (v.space_id.clone(), v.kind)).collect::<Vec<_>>();
            let got = ids(&r.inconsistencies);
            let want = [
                ("told-ok", Kind::MissingAfterSuccess),
                ("failed", Kind::LeftAfterFailure),
                ("half", Kind::Partial),
                ("late-half", Kind::Partial),
            ];
            assert_eq!(got, want.map(|(id, k)| (id.to_owned(), k)), "{at}");
            // Told 504 and consistent (nothing, or all five): uncertain, not inconsistent.
            let got = ids(&r.uncertain);
            let want = [("late-done", Kind::TimedOutButCompleted), ("late", Kind::TimedOutNothing)];
            assert_eq!(got, want.map(|(id, k)| (id.to_owned(), k)), "{at}");
            assert!(!r.is_consistent());
            assert_eq!(r.spaces, 8);
            assert_eq!(r.orphans[&Service::Records], 4);
            assert_eq!(r.orphans[&Service::Placement], 2);
            assert_eq!(r.emails_without_space, 0);
            assert_eq!(r.complete, 2);
            let line = r.inconsistencies[0].to_string();
            assert!(line.contains("lacks email"), "{line}");
        }
    }

    #[tokio::test]
    async fn a_compensable_step_sent_at_or_after_the_deadline_is_reported_and_notify_is_not() {
        let (_dir, _pg, each) = stores();
        for at in each {
            fixture(&at).await;
            use baton_orchestrator::testing::saga;
            use baton_workflow::SagaStatus::{Completed, RolledBack};
            let ok = [(900, "routing", "do", "sent"), (1200, "notifier", "do", "sent")];
            saga(&at, "s-ok", "ok", Completed, Some(200), 1000, &ok).await.unwrap();
            let late = [
                (999, "records", "do", "sent"),
                (1000, "placement", "do", "sent"),
                (1100, "records", "undo", "sent"),
            ];
            saga(&at, "s-late", "half", RolledBack, Some(504), 1000, &late).await.unwrap();
            let r = audit(&at).await.unwrap();
            let kinds: Vec<(&str, Kind)> =
                r.inconsistencies.iter().map(|v| (v.space_id.as_str(), v.kind)).collect();
            assert!(kinds.contains(&("half", Kind::StepAfterDeadline)), "{at}: {kinds:?}");
            assert!(
                !kinds.iter().any(|(id, _)| *id == "ok"),
                "a late notify is the saga completing: {kinds:?}"
            );
        }
    }

    #[test]
    fn a_504_is_uncertain_only_when_the_space_ended_all_or_nothing() {
        let rows = |told: Option<u16>, present: &[Service]| SpaceRows {
            space_id: "s".into(),
            saga_id: None,
            present: present.iter().copied().collect(),
            told,
            oldest_ms: None,
            in_flight: false,
            compensation_failed: false,
            definition_missing: false,
            steps_after_deadline: 0,
            expected: &Service::ALL,
        };
        let class = |s: &SpaceRows| judge(s).map(Kind::class);
        assert_eq!(class(&rows(Some(504), &[])), Some(Class::Uncertain));
        assert_eq!(class(&rows(Some(504), &Service::ALL)), Some(Class::Uncertain));
        assert_eq!(class(&rows(Some(504), &[Service::Records])), Some(Class::Inconsistent));
        assert_eq!(class(&rows(Some(409), &[Service::Records])), Some(Class::Inconsistent));
        assert_eq!(class(&rows(Some(200), &[])), Some(Class::Inconsistent));
        assert_eq!(class(&rows(Some(409), &[])), None);
        // A 504 whose saga broke the deadline rule is inconsistent even when it ended empty.
        let late = SpaceRows { steps_after_deadline: 1, ..rows(Some(504), &[]) };
        assert_eq!(class(&late), Some(Class::Inconsistent));
    }

    #[tokio::test]
    async fn with_a_search_index_a_space_told_200_needs_its_search_entry_too() {
        let (_dir, _pg, each) = stores();
        for at in each {
            fixture(&at).await;
            baton_services::fixture::hold(&at, Service::Search, "ok", "s-ok").await.unwrap();
            let r = audit(&at).await.unwrap();
            assert!(!r.inconsistencies.iter().any(|f| f.space_id == "ok"), "{at}: ok is complete");
            // late-done has the five rows of the flow but was never indexed.
            let late =
                r.uncertain.iter().chain(&r.inconsistencies).find(|f| f.space_id == "late-done").unwrap();
            assert_eq!(late.kind, Kind::Partial, "{at}");
            assert_eq!(late.missing, [Service::Search]);
            assert!(late.to_string().contains("lacks search entry"), "{late}");
        }
    }

    #[tokio::test]
    async fn an_empty_store_is_an_error_not_a_clean_audit() {
        let (_dir, _pg, each) = stores();
        for at in each {
            assert!(matches!(audit(&at).await, Err(AuditError::Empty(_))), "{at}");
        }
    }
}
