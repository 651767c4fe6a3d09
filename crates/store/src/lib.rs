//! The storage port of every component: one API, two backends. SQLite (a file per component
//! in the data dir) is the embedded default; PostgreSQL (a schema per component in one
//! database) lets the state outlive any one machine and be shared by several instances.
//!
//! Owns: opening a component's store at a [`Location`] and migrating it (versions counted the
//! same way on both backends), the dedicated thread that runs every statement off the async
//! workers ([`Db::call`], [`Db::transaction`] with its group commit), the SQL values that cross
//! the port ([`sql`]), the [`inbox`], [`outbox`] and [`tombstone`] tables that make message
//! handling exactly-once in effect and their read model ([`StoreCounts`]), the outbox
//! [`relay`], and what the process can tell of the store's health ([`StoreHealth`]). Must not
//! touch: business tables (each component migrates its own through [`Db::open`] and owns
//! their read model) or AMQP: the relay reaches the broker only through its
//! [`relay::Publish`] trait, which `baton-amqp` implements.

use std::cell::RefCell;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock, mpsc};

pub mod counts;
pub mod inbox;
pub mod outbox;
pub mod relay;
pub mod retention;
pub mod room;
pub mod scratch;
pub mod sql;
pub mod tombstone;

mod conn;
mod pg;
mod sqlite;

pub use conn::{Prefetched, Tx};
pub use counts::StoreCounts;
pub use pg::OpenError;
pub use sql::{FromValue, OptionalExtension, Param, Params, Row, Value};

use baton_metrics::{Stage, Stopwatch};
use conn::Conn;
use relay::Wake;

/// The error under a [`StoreError`] that has no type of its own here (a decoder's, a URL
/// parser's, or a sentence): kept as the error's `source`, and shown in its message too.
pub type Cause = Box<dyn std::error::Error + Send + Sync + 'static>;

/// A [`Cause`] that can be cloned, for errors that are cloned (a failure kept and returned to
/// every caller until the next attempt).
pub type SharedCause = Arc<dyn std::error::Error + Send + Sync + 'static>;

/// Storage errors, by what the caller does next.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// SQLite failed: an outage (disk full, locked, I/O) when [`StoreError::is_transient`] says
    /// so, otherwise a failure of this statement (a constraint, a bug).
    #[error("database error: {0}")]
    Sqlite(#[from] rusqlite::Error),
    /// PostgreSQL failed: an outage (connection lost, server restarting, a conflict with
    /// another instance's transaction) when [`StoreError::is_transient`] says so, otherwise a
    /// failure of this statement.
    #[error("database error: {}", pg::describe(.0))]
    Postgres(#[from] tokio_postgres::Error),
    /// A query that must return a row returned none.
    #[error("the query returned no row")]
    NoRows,
    /// A column or a parameter is not of the type the code expects: a bug, or a foreign write.
    #[error("unexpected SQL type: {0}")]
    Type(String),
    /// The database thread is gone: the component is shutting down, crashed, or its database
    /// file was removed under it.
    #[error("the database thread of {0} has stopped")]
    Closed(String),
    /// A stored value could not be decoded: a bug or a foreign write, never retried blindly.
    #[error("stored data in {table} is unreadable: {cause}")]
    Corrupt {
        table: &'static str,
        #[source]
        cause: Cause,
    },
    /// The store could not be opened (a bad database URL, a file that cannot be created, a
    /// schema written by another build).
    #[error("cannot open the store {path}: {cause}")]
    Open {
        path: String,
        #[source]
        cause: Cause,
    },
    /// The shared transaction of a group commit failed: none of its members took effect.
    #[error("committing a group of transactions failed: {0}")]
    Commit(#[source] Arc<StoreError>),
    /// The database rolled the group's transaction back on a member's error (SQLite does on a
    /// full disk): none of its members took effect.
    #[error("the database rolled the group's transaction back ({why})")]
    RolledBack { why: String, outage: bool, disk_full: bool },
    /// Another member of the same group commit failed a write, which aborted the transaction
    /// they shared (PostgreSQL) before this one's work was known to be done: none of this
    /// one's work took effect. Like a conflict, it is over: a second try goes through.
    #[error("another transaction of the same group commit failed and undid this one; try it again")]
    Neighbour,
}

impl StoreError {
    /// Whether this is an outage of the store rather than a fault of the work: the same work
    /// succeeds once the disk has room, the lock is free, the connection is back or the
    /// conflicting transaction is done, so it is retried in place and never counted against a
    /// message.
    pub fn is_transient(&self) -> bool {
        match self {
            StoreError::Sqlite(e) => sqlite::is_outage(e),
            StoreError::Postgres(e) => pg::is_outage(e),
            StoreError::Commit(e) => e.is_transient(),
            StoreError::RolledBack { outage, .. } => *outage,
            StoreError::Closed(_) | StoreError::Neighbour => true,
            StoreError::NoRows
            | StoreError::Type(_)
            | StoreError::Corrupt { .. }
            | StoreError::Open { .. } => false,
        }
    }
}

impl StoreError {
    /// Whether the disk under the store is full: the work is refused with a 507 at the door,
    /// and the store gives its reserve back ([`room::Room`]) for the work in flight.
    pub fn is_disk_full(&self) -> bool {
        match self {
            StoreError::Sqlite(e) => sqlite::is_disk_full(e),
            StoreError::Postgres(e) => pg::is_disk_full(e),
            StoreError::Commit(e) => e.is_disk_full(),
            StoreError::RolledBack { disk_full, .. } => *disk_full,
            _ => false,
        }
    }

    /// Whether another instance's transaction conflicted with this one (a serialization
    /// failure or a deadlock on PostgreSQL), or another member of its group commit undid it
    /// ([`StoreError::Neighbour`]): a transient error that needs no pause, since the other
    /// transaction is done and a second try reads its work.
    pub fn is_conflict(&self) -> bool {
        match self {
            StoreError::Postgres(e) => pg::is_conflict(e),
            StoreError::Commit(e) => e.is_conflict(),
            StoreError::Neighbour => true,
            _ => false,
        }
    }
}

/// Where the components keep their state: the same for every component of a deployment.
#[derive(Clone, PartialEq, Eq)]
pub enum Location {
    /// A SQLite file per component in this directory (`<dir>/<component>.db`).
    Dir(PathBuf),
    /// A schema per component in this PostgreSQL database (`postgres://user@host:port/db`).
    Postgres(String),
}

impl Location {
    /// PostgreSQL when `database_url` is given, the data dir's SQLite files otherwise.
    pub fn new(data_dir: &Path, database_url: Option<&str>) -> Location {
        match database_url {
            Some(url) if !url.trim().is_empty() => Location::Postgres(url.trim().to_owned()),
            _ => Location::Dir(data_dir.to_owned()),
        }
    }

    /// Check a database URL before anything starts: the reason is a sentence for the user.
    pub fn check(&self) -> Result<(), OpenError> {
        match self {
            Location::Dir(_) => Ok(()),
            Location::Postgres(url) => pg::config(url).map(|_| ()),
        }
    }

    /// The SQLite file of `component`, when the store is a data dir.
    pub fn sqlite_file(&self, component: &str) -> Option<PathBuf> {
        match self {
            Location::Dir(dir) => Some(dir.join(format!("{component}.db"))),
            Location::Postgres(_) => None,
        }
    }

    /// What to name in messages and logs: the directory, or the URL without its password.
    fn name_of(&self, component: &str) -> String {
        match self {
            Location::Dir(dir) => dir.join(format!("{component}.db")).display().to_string(),
            Location::Postgres(_) => format!("{self} schema {component}"),
        }
    }
}

impl fmt::Display for Location {
    /// The data dir, or the database URL with its password hidden.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Location::Dir(dir) => write!(f, "{}", dir.display()),
            Location::Postgres(url) => match url::Url::parse(url) {
                Ok(mut u) if u.password().is_some() => {
                    let _ = u.set_password(Some("***"));
                    write!(f, "{u}")
                }
                Ok(u) => write!(f, "{u}"),
                Err(_) => write!(f, "(a PostgreSQL URL that does not parse)"),
            },
        }
    }
}

impl fmt::Debug for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// How many of `all` migrations are done, given the recorded version; an error when the store
/// was written by a build that knows more of them.
fn migrations_to_apply(done: i64, all: usize) -> Result<usize, NewerSchema> {
    let done = usize::try_from(done).unwrap_or(usize::MAX);
    if done > all {
        // Its tables are not the ones this build knows: reading or writing them could lose data.
        return Err(NewerSchema { done, all });
    }
    Ok(done)
}

/// A store written by a build that knows more migrations than this one: its tables are not
/// the ones this build knows, so it is refused (the cause under [`StoreError::Open`]).
#[derive(Debug, thiserror::Error)]
#[error(
    "its schema is at version {done}, this build knows {all} versions: it was written by another \
     build of Baton; run that build, or start this one on an empty store"
)]
pub struct NewerSchema {
    pub done: usize,
    pub all: usize,
}

/// What a process can tell of its database without a query: the readiness checks. Holds no
/// handle on the database, so keeping it does not keep the database thread running.
#[derive(Clone, Debug, Default)]
pub struct StoreHealth(Arc<HealthInner>);

#[derive(Debug, Default)]
struct HealthInner {
    stopped: AtomicBool,
    /// Why the last commit failed for an outage; cleared by the next commit.
    unwritable: Mutex<Option<String>>,
}

impl StoreHealth {
    /// Whether the database thread still runs (it stops with the last `Db` clone, on a panic,
    /// or when its file was removed).
    pub fn thread_alive(&self) -> Result<(), String> {
        if self.0.stopped.load(Ordering::Acquire) {
            Err("the database thread has stopped".into())
        } else {
            Ok(())
        }
    }

    /// Whether the last group commit went through; the reason of its outage if not.
    pub fn writable(&self) -> Result<(), String> {
        match &*self.0.unwritable.lock().expect("store health") {
            None => Ok(()),
            Some(why) => Err(why.clone()),
        }
    }

    /// Register `component`'s checks of this database on `health`: "database thread alive"
    /// (liveness) and "store writable" (readiness).
    pub fn register(&self, health: &baton_health::Health, component: &str) {
        let h = self.clone();
        health.probe(component, "database thread alive", baton_health::Kind::Live, move || {
            std::future::ready(h.thread_alive())
        });
        let h = self.clone();
        health.probe(component, "store writable", baton_health::Kind::Ready, move || {
            std::future::ready(h.writable())
        });
    }

    /// A group's fate: writable again when it committed and none of its members met an
    /// outage; unwritable, with the reason, when it or one of them did.
    fn committed(&self, outcome: Result<(), &StoreError>, member: &MemberOutage) {
        let mut state = self.0.unwritable.lock().expect("store health");
        match (outcome, member) {
            (Ok(()), None) => *state = None,
            (Ok(()), Some(why)) => *state = Some(format!("writes fail: {why}")),
            (Err(e), _) if e.is_transient() => *state = Some(format!("commits fail: {e}")),
            (Err(_), _) => {}
        }
    }
}

/// A member of a group commit, or a job run alone: given the transaction (or why there is
/// none), it runs and returns how to tell its caller the transaction's fate, and the outage it
/// met.
type Member = Box<dyn FnOnce(Result<&Tx<'_>, Arc<StoreError>>) -> Ran + Send>;

/// What running a member left: how to tell its caller, the outage it met, and whether it
/// could not close its savepoint (the transaction can no longer be trusted: the group is lost).
struct Ran {
    finish: Finish,
    outage: MemberOutage,
    broken: bool,
}

/// Work for the database thread, in its own transaction or sharing one with the others queued.
struct Job {
    member: Member,
    /// Run in a transaction of its own ([`Db::call`]), not in a group.
    alone: bool,
    /// Its isolation on PostgreSQL: the relay's bookkeeping of its own rows runs alone at READ
    /// COMMITTED (see [`Db::relaxed`]); on SQLite, where one writer at a time is the rule, every
    /// job is alike.
    level: Level,
}

/// How a component's transactions are isolated from other instances' on PostgreSQL (SQLite
/// runs one writer at a time, so there they are serial whatever this says).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Isolation {
    /// `READ COMMITTED`, each transaction first taking its component's lock (an advisory lock
    /// on the schema, held to its end): one writer at a time across instances, as on SQLite,
    /// so every invariant holds and no transaction ever conflicts. Each statement reads what
    /// is committed when it runs, so a member that joins a group commit late still reads the
    /// other instances' last commits. Reads and the relay's bookkeeping take no lock.
    #[default]
    Exclusive,
    /// `SERIALIZABLE`: instances write at once and every invariant holds, at the price of
    /// conflicts between transactions that touch nearby rows (predicate locks on index pages),
    /// retried: about one per saga with two instances ([`Isolation::Exclusive`] has none).
    Serializable,
    /// `REPEATABLE READ`: two transactions that write the same row conflict, and nothing else
    /// does; only for invariants that each live in one row every transaction writes, or in a
    /// unique key. A group commit's snapshot is taken by its first member, so a later member
    /// that writes a row another instance changed meanwhile conflicts.
    Snapshot,
}

/// The isolation level a job's transaction begins with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Level {
    Isolated(Isolation),
    /// READ COMMITTED: the relay's bookkeeping and the scheduling reads ([`Db::relaxed`]).
    Relaxed,
}

/// Hands a group member its result once the group's fate is known.
type Finish = Box<dyn FnOnce(Result<(), &Arc<StoreError>>) + Send>;

/// Why a member of a group failed for an outage, if it did: a full disk can fail a statement
/// (a page that cannot be allocated) before it fails a commit.
type MemberOutage = Option<Outage>;

/// An outage a member met: its sentence, and whether it was a full disk (so that the group's
/// [`StoreError::RolledBack`] says so without its text being read).
#[derive(Clone, Debug)]
struct Outage {
    why: String,
    disk_full: bool,
}

impl std::fmt::Display for Outage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.why)
    }
}

/// Members committed together at most (a bound on how long the first one waits).
pub const GROUP_MAX: usize = 128;

/// A component's store. Cheap to clone; all clones feed one thread, which owns the connection
/// and runs the jobs in order, so a transaction never spans an `.await` and writes never
/// contend for the lock within a process.
#[derive(Clone)]
pub struct Db {
    tx: mpsc::Sender<Job>,
    /// What to call this store in errors: its file, or its schema.
    name: Arc<str>,
    /// The component it is the store of, for the metrics.
    pub(crate) component: Arc<str>,
    /// The instance this process is: its relay publishes the outbox rows written under this name.
    pub(crate) owner: Arc<str>,
    /// The relay that gets the rows of each committed transaction handed to it.
    feed: Arc<OnceLock<Wake>>,
    /// Other instances' outbox rows this one watches, to take over those left unpublished.
    pub(crate) watch: Arc<std::sync::Mutex<outbox::Watch>>,
    health: StoreHealth,
    /// The reserve on the data dir's disk (SQLite stores a component writes).
    room: Option<Arc<room::Room>>,
    /// How its transactions are isolated on PostgreSQL ([`Db::isolated`]).
    isolation: Isolation,
}

/// Marks the database thread stopped when dropped.
struct Stopped(StoreHealth);

impl Drop for Stopped {
    fn drop(&mut self) {
        self.0.0.stopped.store(true, Ordering::Release);
    }
}

/// The instance name a process writes its outbox rows under when it has no other.
pub const DEFAULT_OWNER: &str = "main";

/// The tables every component has.
const BASE_MIGRATIONS: &[&str] = &["CREATE TABLE inbox (
        message_id TEXT PRIMARY KEY,
        received_at INTEGER NOT NULL,
        replies TEXT NOT NULL
    );
    CREATE TABLE outbox (
        seq INTEGER PRIMARY KEY AUTOINCREMENT,
        message TEXT NOT NULL,
        -- The instance whose relay publishes the row (instances of a component share the store).
        owner TEXT NOT NULL,
        created_at INTEGER NOT NULL,
        attempts INTEGER NOT NULL DEFAULT 0,
        last_error TEXT
    );
    CREATE TABLE outbox_parked (
        seq INTEGER PRIMARY KEY,
        message TEXT NOT NULL,
        reason TEXT NOT NULL,
        parked_at INTEGER NOT NULL
    );
    CREATE TABLE relay_stats (
        id INTEGER PRIMARY KEY CHECK (id = 1),
        published INTEGER NOT NULL
    );
    INSERT INTO relay_stats (id, published) VALUES (1, 0);
    CREATE TABLE tombstones (
        saga_id TEXT NOT NULL,
        step TEXT NOT NULL,
        created_at INTEGER NOT NULL,
        PRIMARY KEY (saga_id, step)
    );"];

/// Milliseconds since the epoch: the time stamps of every table.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64)
}

/// The database thread: runs jobs in order; members that queue up behind each other share
/// one transaction (group commit), each in its own savepoint, so one member's failure undoes
/// only its own work, and each hears back only after the shared commit.
///
/// It stops when its SQLite file is removed or replaced under it: what it wrote from then on
/// would go to a file nobody opens again. Its callers then get [`StoreError::Closed`], and
/// [`StoreHealth`] says it stopped. A lost PostgreSQL connection is opened again before the
/// next job; the jobs meanwhile fail as outages, retried by their callers.
fn serve(conn: Conn, rx: mpsc::Receiver<Job>, name: &str, owner: &str, health: &StoreHealth) {
    let mut next = None;
    loop {
        let job = match next.take() {
            Some(job) => job,
            None => match rx.recv() {
                Ok(job) => job,
                Err(_) => return,
            },
        };
        baton_crash::stall_point!(baton_crash::DB_THREAD);
        if conn.gone() {
            tracing::error!(
                store = %name,
                "the database file was removed or replaced while open; its thread stops so that \
                 nothing is written where nobody reads; restart the component"
            );
            // Before the job is dropped, which tells its caller.
            health.0.stopped.store(true, Ordering::Release);
            return;
        }
        let on_its_own = job.alone || (job.level == Level::Relaxed && conn.is_postgres());
        if let Err(e) = conn.ensure_open().and_then(|()| conn.begin(job.level)) {
            health.committed(Err(&e), &None);
            // Nothing ran: this member hears why; the queue goes on.
            let e = Arc::new(e);
            ((job.member)(Err(Arc::clone(&e))).finish)(Err(&e));
            continue;
        }
        let mut group = Group::default();
        group.run(&conn, owner, job.member);
        // SQLite rolls the whole transaction back by itself on some errors of a statement (a
        // full disk, I/O), and a PostgreSQL connection can be lost: then the group is lost, and
        // no member may run after it (it would run outside any transaction).
        let mut lost = group.broken || !conn.in_transaction();
        while !on_its_own && !lost && group.finishes.len() < GROUP_MAX {
            match rx.try_recv() {
                Ok(Job { member, alone: false, level }) if level == job.level || !conn.is_postgres() => {
                    group.run(&conn, owner, member);
                    lost = group.broken || !conn.in_transaction();
                }
                Ok(alone) => {
                    next = Some(alone);
                    break;
                }
                Err(_) => break,
            }
        }
        let outcome = if lost {
            // A transaction left open (aborted) would fail every job after it.
            if conn.in_transaction() {
                let _ = conn.batch("ROLLBACK");
            }
            let outage = group.outage.clone();
            Err(Arc::new(StoreError::RolledBack {
                outage: outage.is_some(),
                disk_full: outage.as_ref().is_some_and(|o| o.disk_full),
                why: outage.map_or_else(|| "a member's statement failed".into(), |o| o.why),
            }))
        } else {
            let committed = conn.batch("COMMIT");
            // The last members' writes are read with the `COMMIT`: one that failed aborted the
            // transaction, which the `COMMIT` then rolled back. Its member hears why; the
            // others are tried again.
            if let Some((culprit, e)) = conn.take_culprit() {
                group.failed(culprit, e, group.finishes.len() as u32 + 1);
            }
            committed.map_err(|e| {
                if conn.in_transaction() {
                    let _ = conn.batch("ROLLBACK");
                }
                Arc::new(e)
            })
        };
        // A group undone by its own member's failed write says nothing of the store.
        let health_outcome = match &outcome {
            Err(e) if matches!(**e, StoreError::Neighbour) => Ok(()),
            other => other.as_ref().map(|_| ()).map_err(|e| &**e),
        };
        health.committed(health_outcome, &group.outage);
        for finish in group.finishes {
            finish(outcome.as_ref().map(|_| ()));
        }
    }
}

/// The members of the group committing now: how to tell each one its fate, and the last
/// outage one of them met.
#[derive(Default)]
struct Group {
    finishes: Vec<Finish>,
    outage: MemberOutage,
    /// A savepoint could not be set or closed: the transaction may be aborted, and a commit
    /// would not say so (PostgreSQL answers COMMIT with a rollback).
    broken: bool,
}

impl Group {
    /// Run `member` in a savepoint of its own. On PostgreSQL its writes' answers are read
    /// with the next member's first answer, or the `COMMIT`: if one of them failed, the
    /// members from it to the one that found it are undone ([`Group::failed`]).
    fn run(&mut self, conn: &Conn, owner: &str, member: Member) {
        let ran = match conn.savepoint() {
            Ok(()) => {
                let tx = Tx { conn, owner, pushed: RefCell::default(), committed: RefCell::default() };
                member(Ok(&tx))
            }
            // Cannot isolate it: it does not run, and hears why. On PostgreSQL the savepoint
            // carries the transaction's BEGIN: a lost server shows here first.
            Err(e) => {
                self.broken = true;
                if e.is_transient() {
                    self.outage = Some(Outage { why: e.to_string(), disk_full: e.is_disk_full() });
                }
                member(Err(Arc::new(e)))
            }
        };
        self.finishes.push(ran.finish);
        self.broken |= ran.broken;
        if ran.outage.is_some() {
            self.outage = ran.outage;
        }
        // The member that found an earlier one's failure rolled back to that one's savepoint
        // (the latest the aborted transaction kept) and told its own caller.
        if let Some((culprit, e)) = conn.take_culprit() {
            let found_by = self.finishes.len() as u32;
            self.failed(culprit, e, found_by);
        }
    }

    /// Member `culprit` (from 1) failed a write, which undid it and the members after it up to
    /// `found_by` (excluded: it knows): each hears it now, `culprit` with the write's error,
    /// the others as [`StoreError::Neighbour`], and the group goes on without them.
    fn failed(&mut self, culprit: u32, e: StoreError, found_by: u32) {
        if e.is_transient() {
            self.outage = Some(Outage { why: e.to_string(), disk_full: e.is_disk_full() });
        }
        let mut why = Some(Arc::new(e));
        let neighbour = Arc::new(StoreError::Neighbour);
        for member in culprit..found_by {
            let Some(finish) = (member as usize).checked_sub(1).and_then(|i| self.finishes.get_mut(i)) else {
                continue;
            };
            let finish = std::mem::replace(finish, Box::new(|_| {}));
            match why.take() {
                Some(own) => finish(Err(&own)),
                None => finish(Err(&neighbour)),
            }
        }
    }
}

impl Db {
    /// Open (creating it if needed) and migrate `component`'s store at `location`, for
    /// instance `owner`: the base tables, then `migrations` of the component, each applied
    /// once, in order. The outbox rows an instance writes are published by its own relay, so
    /// several instances can share one store without sending every message once per instance;
    /// keep the name stable across restarts.
    ///
    /// It connects and migrates on the database thread, and may wait on another instance's
    /// lock: call it from async code as `open(..).await`.
    pub async fn open(
        location: &Location,
        component: &str,
        migrations: &'static [&'static str],
        owner: &str,
    ) -> Result<Db, StoreError> {
        let all: Vec<&'static str> = BASE_MIGRATIONS.iter().chain(migrations).copied().collect();
        let room = match location {
            Location::Dir(dir) => Some(Arc::new(room::Room::keep(dir, component))),
            Location::Postgres(_) => None,
        };
        Db::start(location, component, owner, room, move |location, component| match location {
            Location::Dir(dir) => {
                Ok(Some(Conn::Sqlite(sqlite::open(&dir.join(format!("{component}.db")), &all)?)))
            }
            Location::Postgres(url) => {
                let config = pg::config(url)?;
                Ok(pg::open(&config, component, &all, false)?.map(|c| Conn::Postgres(RefCell::new(c))))
            }
        })
        .await?
        .ok_or_else(|| StoreError::Open { path: location.name_of(component), cause: "not created".into() })
    }

    /// Open `component`'s store at `location` to read it (audits, reports, another component's
    /// queries), never migrating or writing it: WAL (SQLite) and MVCC (PostgreSQL) let it read
    /// while the owner writes. `None` when that component has no store there yet.
    pub async fn reader(location: &Location, component: &str) -> Result<Option<Db>, StoreError> {
        Db::start(location, component, DEFAULT_OWNER, None, |location, component| match location {
            Location::Dir(dir) => {
                Ok(sqlite::open_reader(&dir.join(format!("{component}.db")))?.map(Conn::Sqlite))
            }
            Location::Postgres(url) => {
                let config = pg::config(url)?;
                Ok(pg::open(&config, component, &[], true)?.map(|c| Conn::Postgres(RefCell::new(c))))
            }
        })
        .await
    }

    /// Start the database thread on the connection `connect` makes there.
    async fn start(
        location: &Location,
        component: &str,
        owner: &str,
        room: Option<Arc<room::Room>>,
        connect: impl FnOnce(&Location, &str) -> Result<Option<Conn>, Cause> + Send + 'static,
    ) -> Result<Option<Db>, StoreError> {
        let name: Arc<str> = location.name_of(component).into();
        let component_name: Arc<str> = component.into();
        let err = |cause: Cause| StoreError::Open { path: name.to_string(), cause };
        let (tx, rx) = mpsc::channel::<Job>();
        let (opened, open) = tokio::sync::oneshot::channel();
        let health = StoreHealth::default();
        let (h, thread_name, thread_owner) = (health.clone(), Arc::clone(&name), owner.to_owned());
        let (location, component) = (location.clone(), component.to_owned());
        let thread_room = room.clone();
        std::thread::Builder::new()
            .name(format!("db-{component}"))
            .spawn(move || {
                // The guard marks it stopped however it ends, a panic included.
                let _stopped = Stopped(h.clone());
                let conn = match connect(&location, &component) {
                    Ok(Some(conn)) => conn,
                    other => {
                        let _ = opened.send(other.map(|_| false));
                        return;
                    }
                };
                // Runs until every `Db` clone is dropped; the checkpointer stops with it.
                let (_alive, watch) = mpsc::channel::<()>();
                if let Conn::Sqlite(c) = &conn {
                    let path = c.path().to_owned();
                    let _ = std::thread::Builder::new()
                        .name(format!("ckpt-{component}"))
                        .spawn(move || sqlite::checkpointer(path, watch, thread_room));
                }
                let _ = opened.send(Ok(true));
                serve(conn, rx, &thread_name, &thread_owner, &h);
            })
            .map_err(|e| err(e.into()))?;
        match open.await.map_err(|_| err("the database thread failed while opening".into()))? {
            Ok(true) => {}
            Ok(false) => return Ok(None),
            Err(cause) => return Err(err(cause)),
        }
        Ok(Some(Db {
            tx,
            name,
            component: component_name,
            owner: owner.into(),
            feed: Arc::default(),
            watch: Arc::default(),
            health,
            room,
            isolation: Isolation::default(),
        }))
    }

    /// This store with its transactions isolated as `isolation` says on PostgreSQL (the
    /// default is [`Isolation::Exclusive`]); the relay's bookkeeping stays at READ COMMITTED.
    pub fn isolated(mut self, isolation: Isolation) -> Db {
        self.isolation = isolation;
        self
    }

    /// Run `f` on the database thread, in a transaction of its own, and return its result once
    /// committed (`f`'s error rolls its work back).
    pub async fn call<R, F>(&self, f: F) -> Result<R, StoreError>
    where
        R: Send + 'static,
        F: FnOnce(&Tx<'_>) -> Result<R, StoreError> + Send + 'static,
    {
        self.submit(f, true).await
    }

    /// Run `f` in a transaction and return its result once it is committed: what a message
    /// handler uses, so that it acks only after its changes are durable.
    ///
    /// Calls that queue up while the database is busy share one transaction and one commit
    /// (group commit), each in a savepoint of its own: an `Err` from `f` undoes only its own
    /// changes. `f` must not commit; it returns, and the commit happens for the group.
    pub async fn transaction<R, F>(&self, f: F) -> Result<R, StoreError>
    where
        R: Send + 'static,
        F: FnOnce(&Tx<'_>) -> Result<R, StoreError> + Send + 'static,
    {
        self.submit(f, false).await
    }

    /// [`Db::transaction`] for a caller with no delivery to hold and hand back (an HTTP
    /// request): an outage that passes at once (on PostgreSQL, a conflict with another
    /// instance's transaction; on SQLite, a lock) is tried again here, a few times over about a
    /// second, before it is the caller's.
    pub async fn transaction_retrying<R, F>(&self, f: F) -> Result<R, StoreError>
    where
        R: Send + 'static,
        F: Fn(&Tx<'_>) -> Result<R, StoreError> + Clone + Send + 'static,
    {
        use backon::BackoffBuilder;
        let mut waits = backon::ExponentialBuilder::default()
            .with_min_delay(std::time::Duration::from_millis(5))
            .with_max_delay(std::time::Duration::from_millis(200))
            .with_max_times(8)
            .with_jitter()
            .build();
        loop {
            match self.transaction(f.clone()).await {
                Err(e) if e.is_transient() && !matches!(e, StoreError::Closed(_)) => match waits.next() {
                    Some(wait) => {
                        if e.is_conflict() {
                            baton_metrics::store_conflict_retried(&self.component);
                        }
                        tracing::debug!(store = %self.name, error = %e, "an outage of the store; trying again");
                        tokio::time::sleep(wait).await;
                    }
                    None => return Err(e),
                },
                done => return done,
            }
        }
    }

    /// [`Db::call`] for a read that only schedules work, such as which sagas' timers are due:
    /// on PostgreSQL at READ COMMITTED, outside the serialization checks, since a read over
    /// many rows would otherwise make every other instance's commit that touches one of them
    /// conflict. Each piece of work it finds must be checked again in the transaction that
    /// does it.
    pub async fn read_committed<R, F>(&self, f: F) -> Result<R, StoreError>
    where
        R: Send + 'static,
        F: FnOnce(&Tx<'_>) -> Result<R, StoreError> + Send + 'static,
    {
        self.relaxed(true, f).await
    }

    /// [`Db::transaction`] for the relay's bookkeeping of its own outbox rows (what to publish,
    /// what was confirmed). On PostgreSQL it runs on its own at READ COMMITTED: its scan of
    /// every instance's rows and its one shared counter would otherwise make every handler's
    /// SERIALIZABLE commit conflict with another instance's relay, and what it reads and writes
    /// is safe at that level (its own rows, row locks on the counter and on rows taken over).
    /// `alone`: in a transaction of its own on SQLite too (a read of what is committed, as
    /// [`Db::call`]); otherwise a member of the group commit there.
    pub(crate) async fn relaxed<R, F>(&self, alone: bool, f: F) -> Result<R, StoreError>
    where
        R: Send + 'static,
        F: FnOnce(&Tx<'_>) -> Result<R, StoreError> + Send + 'static,
    {
        self.send(f, alone, Level::Relaxed).await
    }

    async fn submit<R, F>(&self, f: F, alone: bool) -> Result<R, StoreError>
    where
        R: Send + 'static,
        F: FnOnce(&Tx<'_>) -> Result<R, StoreError> + Send + 'static,
    {
        self.send(f, alone, Level::Isolated(self.isolation)).await
    }

    async fn send<R, F>(&self, f: F, alone: bool, level: Level) -> Result<R, StoreError>
    where
        R: Send + 'static,
        F: FnOnce(&Tx<'_>) -> Result<R, StoreError> + Send + 'static,
    {
        // A handler's transaction (group commit) is timed stage by stage; the relay's
        // bookkeeping and the reads are not part of a hop's stages.
        let timed = !alone && level != Level::Relaxed;
        let mut watch = if timed { Stopwatch::start() } else { Stopwatch::default() };
        let component = Arc::clone(&self.component);
        let (done, wait) = tokio::sync::oneshot::channel::<(Result<R, StoreError>, Stopwatch)>();
        let feed = Arc::clone(&self.feed);
        // The caller's span on the database thread too: what `f` logs carries its fields (the
        // message, the trace id).
        let span = tracing::Span::current();
        let member: Member = Box::new(move |tx: Result<&Tx<'_>, Arc<StoreError>>| {
            let tx = match tx {
                Ok(tx) => tx,
                Err(why) => {
                    let e = StoreError::Commit(why);
                    let finish: Finish = Box::new(move |_| {
                        let _ = done.send((Err(e), Stopwatch::default()));
                    });
                    return Ran { finish, outage: None, broken: false };
                }
            };
            watch.lap(&component, Stage::Handoff);
            let mut result = span.in_scope(|| f(tx));
            // An earlier member's write failed under it (PostgreSQL): whatever `f` made of the
            // errors that followed, nothing of it took effect, and it is tried again.
            if tx.conn.has_culprit() {
                result = Err(StoreError::Neighbour);
            }
            // Its writes still unread are read with the next member's first answer or the
            // `COMMIT` (PostgreSQL): one round trip less a member. If one fails, the group
            // tells it then ([`Group::failed`]).
            let outage = match &result {
                Err(e) if e.is_transient() && !matches!(e, StoreError::Neighbour) => {
                    Some(Outage { why: e.to_string(), disk_full: e.is_disk_full() })
                }
                _ => None,
            };
            let closed = if result.is_ok() {
                tx.conn.release()
            } else {
                // Writes still unread are undone with the rest of it.
                let _ = tx.conn.settle();
                tx.conn.execute("ROLLBACK TO member", Vec::new()).and_then(|_| tx.conn.release())
            };
            watch.lap(&component, Stage::Run);
            let pushed = tx.pushed.take();
            let after_commit = tx.committed.take();
            let broken = closed.is_err();
            let finish: Finish = match (result, closed) {
                (Ok(r), Ok(())) => Box::new(move |committed: Result<(), &Arc<StoreError>>| {
                    watch.lap(&component, Stage::Commit);
                    if committed.is_ok()
                        && let Some(wake) = feed.get()
                    {
                        // Every insert of a committed transaction answered with its `seq`; a
                        // row without one would be found by the relay's read, as a gap.
                        wake.hand(pushed.into_iter().filter_map(|(seq, m)| Some((*seq.get()?, m))).collect());
                    }
                    if committed.is_ok() {
                        after_commit.into_iter().for_each(|f| f());
                    }
                    let result = committed.map(|()| r).map_err(|e| StoreError::Commit(Arc::clone(e)));
                    let _ = done.send((result, watch));
                }),
                (Err(e), _) => Box::new(move |_| {
                    let _ = done.send((Err(e), Stopwatch::default()));
                }),
                (Ok(_), Err(e)) => {
                    let e = Arc::new(e);
                    Box::new(move |_| {
                        let _ = done.send((Err(StoreError::Commit(e)), Stopwatch::default()));
                    })
                }
            };
            Ran { finish, outage, broken }
        });
        let closed = || StoreError::Closed(self.name.to_string());
        self.tx.send(Job { member, alone, level }).map_err(|_| closed())?;
        let (result, resumed) = wait.await.map_err(|_| closed())?;
        resumed.record(&self.component, Stage::Resume);
        if let Err(e) = &result
            && e.is_disk_full()
            && let Some(room) = &self.room
        {
            room.release();
        }
        result
    }

    /// Why this store should take no new work, if its disk is (nearly) full: see
    /// [`room::Room::short`]. `None` on PostgreSQL, whose server answers for its own disk.
    pub fn out_of_room(&self) -> Option<String> {
        self.room.as_ref()?.short()
    }

    /// Hand the outbox rows of every committed [`Db::transaction`] to this relay, which then
    /// need not read them back: one database round trip less per message. Set once.
    pub fn feed(&self, wake: Wake) {
        let _ = self.feed.set(wake);
    }

    /// The store's name in messages: its file, or its schema.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The readiness of this database: its thread running, its last commit through.
    pub fn health(&self) -> StoreHealth {
        self.health.clone()
    }
}

#[cfg(test)]
pub(crate) mod testing {
    use super::*;

    /// A fresh store of each backend: a SQLite data dir, and a PostgreSQL database of its own
    /// on the tests' server (dropped afterwards).
    pub(crate) struct Stores {
        dir: tempfile::TempDir,
        pg: scratch::ScratchDatabase,
    }

    impl Stores {
        pub(crate) fn new() -> Stores {
            let pg = scratch::ScratchDatabase::create(&scratch::test_server(), "baton_store")
                .expect("the tests' PostgreSQL server (scripts/test.sh starts it)");
            Stores { dir: tempfile::tempdir().unwrap(), pg }
        }

        pub(crate) fn each(&self) -> [Location; 2] {
            [Location::Dir(self.dir.path().to_owned()), self.pg.location().clone()]
        }
    }
}

#[cfg(test)]
mod tests {
    use super::testing::Stores;
    use super::*;
    use baton_protocol::Outgoing;
    use std::time::Duration;

    /// The database thread, busy until [`Held::release`]: commands sent meanwhile queue up.
    struct Held {
        release: std::sync::mpsc::Sender<()>,
        busy: tokio::task::JoinHandle<Result<(), StoreError>>,
    }

    impl Held {
        async fn release(self) {
            self.release.send(()).unwrap();
            self.busy.await.unwrap().unwrap();
        }
    }

    async fn hold_thread(db: &Db) -> Held {
        let (release, hold) = std::sync::mpsc::channel::<()>();
        let d = db.clone();
        let busy = tokio::spawn(async move {
            d.call(move |_| {
                hold.recv().ok();
                Ok(())
            })
            .await
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        Held { release, busy }
    }

    const EXTRA: &[&str] = &["CREATE TABLE things (id INTEGER PRIMARY KEY AUTOINCREMENT, name TEXT)"];

    /// A message for the outbox, its body `n`.
    pub(crate) fn message(n: u32) -> Outgoing {
        Outgoing::new("x", "k", "t", uuid::Uuid::nil(), "test", baton_protocol::TraceParent::new_root(), &n)
    }

    async fn count(db: &Db, sql: &'static str) -> i64 {
        db.call(move |c| c.query_row(sql, (), |r| r.get(0))).await.unwrap()
    }

    #[tokio::test]
    async fn opens_migrates_once_and_runs_jobs_off_the_runtime_on_both_backends() {
        let stores = Stores::new();
        for at in stores.each() {
            let db = Db::open(&at, "records", EXTRA, DEFAULT_OWNER).await.unwrap();
            db.call(|c| c.execute("INSERT INTO things (name) VALUES ('a')", ())).await.unwrap();
            let thread = db.call(|_| Ok(std::thread::current().name().map(String::from))).await.unwrap();
            assert_eq!(thread.as_deref(), Some("db-records"));
            drop(db);
            // Reopening applies nothing twice and keeps the data.
            let db = Db::open(&at, "records", EXTRA, DEFAULT_OWNER).await.unwrap();
            assert_eq!(count(&db, "SELECT COUNT(*) FROM things").await, 1, "{at}");
            // A reader reads, and cannot write.
            let ro = Db::reader(&at, "records").await.unwrap().expect("the store exists");
            assert_eq!(count(&ro, "SELECT COUNT(*) FROM things").await, 1);
            assert!(
                ro.call(|c| c.execute("INSERT INTO things (name) VALUES ('b')", ())).await.is_err(),
                "read-only"
            );
            assert!(Db::reader(&at, "nobody").await.unwrap().is_none(), "no store, no reader");
        }
        let Location::Dir(dir) = &stores.each()[0] else { unreachable!() };
        let db = Db::open(&Location::Dir(dir.clone()), "records", EXTRA, DEFAULT_OWNER).await.unwrap();
        let (version, mode, page): (i64, String, i64) = db
            .call(|c| {
                let v = c.query_row("PRAGMA user_version", (), |r| r.get(0))?;
                let page = c.query_row("PRAGMA page_size", (), |r| r.get(0))?;
                Ok((v, c.query_row("PRAGMA journal_mode", (), |r| r.get(0))?, page))
            })
            .await
            .unwrap();
        assert_eq!((version, mode.as_str()), (2, "wal"));
        assert_eq!(page, 2048, "a new file's pages: half SQLite's default, half the bytes a commit writes");
    }

    #[tokio::test]
    async fn a_store_of_a_build_with_more_migrations_is_refused_on_both_backends() {
        let stores = Stores::new();
        for at in stores.each() {
            drop(Db::open(&at, "records", EXTRA, DEFAULT_OWNER).await.unwrap());
            let Err(e) = Db::open(&at, "records", &[], DEFAULT_OWNER).await else {
                panic!("opened a store of another build")
            };
            assert!(e.to_string().contains("schema is at version 2, this build knows 1"), "{e}");
        }
    }

    #[tokio::test]
    async fn an_answer_is_sent_and_kept_for_a_duplicate_on_both_backends() {
        let stores = Stores::new();
        for at in stores.each() {
            let db = Db::open(&at, "svc", &[], DEFAULT_OWNER).await.unwrap();
            let (answered, silent) = (uuid::Uuid::new_v4(), uuid::Uuid::new_v4());
            db.transaction(move |tx| {
                inbox::answer(tx, answered, vec![message(1), message(2)])?;
                inbox::record(tx, silent)
            })
            .await
            .unwrap();
            let sent: Vec<Outgoing> = db.pending(0, 10).await.unwrap().into_iter().map(|(_, m)| m).collect();
            assert_eq!(sent.len(), 2);
            assert!(sent.iter().all(|m| m.created_at_ms.is_some()), "stamped with the commit time");
            let (kept, none) = db
                .transaction(move |tx| Ok((inbox::seen(tx, answered)?, inbox::seen(tx, silent)?)))
                .await
                .unwrap();
            assert_eq!(kept, Some(sent), "the inbox keeps the replies as they were sent");
            assert_eq!(none, Some(Vec::new()));
        }
    }

    #[tokio::test]
    async fn each_instance_publishes_its_own_rows_and_takes_over_a_gone_ones_on_both_backends() {
        let stores = Stores::new();
        for at in stores.each() {
            let a = Db::open(&at, "svc", &[], "a").await.unwrap();
            let b = Db::open(&at, "svc", &[], "b").await.unwrap();
            a.transaction(|tx| outbox::push(tx, message(1))).await.unwrap();
            b.transaction(|tx| outbox::push(tx, message(2))).await.unwrap();
            let seqs = |rows: Vec<(i64, Outgoing)>| rows.into_iter().map(|(s, _)| s).collect::<Vec<_>>();
            b.take_over_after(Duration::from_millis(100));
            assert_eq!(seqs(a.pending(0, 10).await.unwrap()), vec![1]);
            assert_eq!(seqs(b.pending(0, 10).await.unwrap()), vec![2]);
            // `a` is gone and `b` has seen its row wait past the take-over delay: `b` publishes it too.
            let watched = std::time::Instant::now();
            loop {
                let rows = seqs(b.pending(0, 10).await.unwrap());
                if rows == vec![1, 2] {
                    break;
                }
                assert_eq!(rows, vec![2], "nothing else meanwhile");
                assert!(watched.elapsed() < Duration::from_secs(5), "taken over within the delay");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_group_commit_keeps_every_member_but_the_one_that_failed_on_both_backends() {
        let stores = Stores::new();
        for at in stores.each() {
            let db = Db::open(&at, "g", EXTRA, DEFAULT_OWNER).await.unwrap();
            let wake = relay::Wake::default();
            db.feed(wake.clone());
            // Hold the thread so that the members below queue up and share one transaction.
            let held = hold_thread(&db).await;
            let members: Vec<_> = (0..20)
                .map(|i| {
                    let db = db.clone();
                    async move {
                        db.transaction(move |tx| {
                            tx.execute("INSERT INTO things (name) VALUES (?1)", [format!("t{i}")])?;
                            outbox::push(tx, message(i))?;
                            if i == 7 {
                                return Err(StoreError::Corrupt {
                                    table: "things",
                                    cause: "member 7 fails".into(),
                                });
                            }
                            Ok(i)
                        })
                        .await
                    }
                })
                .collect();
            let all = tokio::spawn(futures_util::future::join_all(members));
            tokio::time::sleep(Duration::from_millis(50)).await;
            held.release().await;
            let results = tokio::time::timeout(Duration::from_secs(10), all).await.unwrap().unwrap();
            for (i, r) in results.iter().enumerate() {
                assert_eq!(r.is_ok(), i != 7, "member {i}: {r:?}");
            }
            let names: Vec<String> = db
                .call(|c| c.query_map("SELECT name FROM things ORDER BY id", (), |r| r.get(0)))
                .await
                .unwrap();
            assert_eq!(names.len(), 19, "{at}");
            assert!(!names.contains(&"t7".to_owned()));
            // The relay was handed exactly the committed rows, in order, and they are the outbox's.
            let fed: Vec<i64> = wake.take_fed().into_iter().map(|(seq, _)| seq).collect();
            let stored: Vec<i64> = db
                .call(|c| c.query_map("SELECT seq FROM outbox ORDER BY seq", (), |r| r.get(0)))
                .await
                .unwrap();
            assert_eq!(fed, stored);
            assert_eq!(fed.len(), 19);
        }
    }

    #[tokio::test]
    async fn a_failed_pipelined_write_fails_its_member_and_the_ones_it_undid_go_again_on_both_backends() {
        let stores = Stores::new();
        for at in stores.each() {
            let db = Db::open(&at, "undone", EXTRA, DEFAULT_OWNER).await.unwrap();
            db.transaction(|tx| tx.write("INSERT INTO things (id, name) VALUES (1, 'first')", ()))
                .await
                .unwrap();
            // One group each, queued behind the held thread: member `bad` writes a key taken;
            // in the first, the member after it reads before it writes.
            async fn group(
                db: &Db,
                ids: std::ops::RangeInclusive<i64>,
                bad: i64,
                reads: i64,
            ) -> Vec<Result<(), StoreError>> {
                let held = hold_thread(db).await;
                let members: Vec<_> = ids
                    .map(|i| {
                        let db = db.clone();
                        async move {
                            db.transaction(move |tx| {
                                if i == reads {
                                    tx.query_row("SELECT COUNT(*) FROM things", (), |r| r.get::<i64>(0))?;
                                }
                                let id = if i == bad { 1 } else { i };
                                tx.write("INSERT INTO things (id, name) VALUES (?1, 'x')", [id])
                            })
                            .await
                        }
                    })
                    .collect();
                let all = tokio::spawn(futures_util::future::join_all(members));
                tokio::time::sleep(Duration::from_millis(50)).await;
                held.release().await;
                tokio::time::timeout(Duration::from_secs(10), all).await.unwrap().unwrap()
            }
            let ids = |db: &Db| {
                let db = db.clone();
                async move {
                    db.call(|c| c.query_map("SELECT id FROM things ORDER BY id", (), |r| r.get::<i64>(0)))
                        .await
                        .unwrap()
                }
            };
            let said = |r: &Result<(), StoreError>| match r {
                Ok(()) => "ok",
                Err(e) if e.to_string().to_lowercase().contains("unique") => "its own",
                Err(e) if e.is_conflict() && e.to_string().contains("try it again") => "again",
                Err(_) => "other",
            };
            let postgres = matches!(at, Location::Postgres(_));
            // On PostgreSQL 4's write is read with 5's read: 4 fails, 5 was undone with it and
            // goes again, 2, 3 and 6 commit. On SQLite each write runs at once: 4 fails alone.
            let first: Vec<_> = group(&db, 2..=6, 4, 5).await.iter().map(said).collect();
            let five_again = if postgres { "again" } else { "ok" };
            assert_eq!(first, ["ok", "ok", "its own", five_again, "ok"], "{at}");
            if postgres {
                assert_eq!(ids(&db).await, [1, 2, 3, 6], "{at}");
                db.transaction(|tx| tx.write("INSERT INTO things (id, name) VALUES (5, 'x')", ()))
                    .await
                    .unwrap();
            }
            assert_eq!(ids(&db).await, [1, 2, 3, 5, 6], "{at}");
            // Writes only: on PostgreSQL 8's is read with the `COMMIT`, which undid all three.
            let second: Vec<_> = group(&db, 7..=9, 8, 0).await.iter().map(said).collect();
            let others = if postgres { "again" } else { "ok" };
            assert_eq!(second, [others, "its own", others], "{at}");
            let left: Vec<i64> = if postgres { vec![1, 2, 3, 5, 6] } else { vec![1, 2, 3, 5, 6, 7, 9] };
            assert_eq!(ids(&db).await, left, "{at}");
            // The store is as writable as before.
            db.transaction(|tx| tx.write("INSERT INTO things (id, name) VALUES (10, 'x')", ()))
                .await
                .unwrap();
            assert!(db.health().writable().is_ok(), "{at}");
        }
    }

    #[tokio::test]
    async fn a_lone_transaction_reads_ahead_and_commits_with_its_writes_on_both_backends() {
        let stores = Stores::new();
        for at in stores.each() {
            let db = Db::open(&at, "lone", EXTRA, DEFAULT_OWNER).await.unwrap();
            let wake = relay::Wake::default();
            db.feed(wake.clone());
            db.transaction(|tx| tx.write("INSERT INTO things (id, name) VALUES (1, 'a')", ())).await.unwrap();
            // Alone in its group, its writes go unread until the commit (PostgreSQL): the one
            // that fails fails the transaction with its own error, and none of it stays.
            let e = db
                .transaction(|tx| {
                    outbox::push(tx, message(1))?;
                    tx.write("INSERT INTO things (id, name) VALUES (1, 'b')", ())
                })
                .await
                .unwrap_err();
            assert!(e.to_string().to_lowercase().contains("unique"), "{at}: {e}");
            assert_eq!(count(&db, "SELECT COUNT(*) FROM outbox").await, 0, "{at}");
            assert!(wake.take_fed().is_empty(), "{at}: nothing fed of a transaction rolled back");
            // Reads sent ahead see what the statements before them wrote, not those after.
            let (one, two) = db
                .transaction(|tx| {
                    let one = tx.prefetch("SELECT name FROM things WHERE id = ?1", [1])?;
                    let two = tx.prefetch("SELECT name FROM things WHERE id = ?1", [2])?;
                    tx.write("INSERT INTO things (id, name) VALUES (2, 'c')", ())?;
                    outbox::push(tx, message(2))?;
                    let one: Option<String> = one.first(tx)?.map(|r| r.get(0)).transpose()?;
                    Ok((one, two.first(tx)?.is_some()))
                })
                .await
                .unwrap();
            assert_eq!((one.as_deref(), two), (Some("a"), false), "{at}");
            assert_eq!(count(&db, "SELECT COUNT(*) FROM things").await, 2, "{at}");
            // The relay is handed the row with the `seq` the database gave it.
            let fed: Vec<i64> = wake.take_fed().into_iter().map(|(seq, _)| seq).collect();
            let stored: Vec<i64> = db
                .call(|c| c.query_map("SELECT seq FROM outbox ORDER BY seq", (), |r| r.get(0)))
                .await
                .unwrap();
            assert_eq!((fed.len(), fed), (1, stored), "{at}");
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_instances_never_lose_an_update_on_postgres() {
        for isolation in [Isolation::Exclusive, Isolation::Serializable, Isolation::Snapshot] {
            let retries = two_instances_add_to_one_counter(isolation).await;
            if isolation == Isolation::Exclusive {
                assert_eq!(retries, 0, "one writer at a time never conflicts");
            }
        }
    }

    /// Two instances (two connections) add to one counter at once: one of a conflicting pair
    /// fails as an outage, and is retried, as the handlers do, or (exclusive) waits for the
    /// other's commit and reads it. Returns the retries.
    async fn two_instances_add_to_one_counter(isolation: Isolation) -> u32 {
        let stores = Stores::new();
        let at = stores.each()[1].clone();
        let migrations: &'static [&'static str] = &[
            "CREATE TABLE counter (id INTEGER PRIMARY KEY, n INTEGER NOT NULL); INSERT INTO counter VALUES (1, 0)",
        ];
        let a = Db::open(&at, "c", migrations, "a").await.unwrap().isolated(isolation);
        let b = Db::open(&at, "c", migrations, "b").await.unwrap().isolated(isolation);
        let add = |db: Db| async move {
            let mut retries = 0;
            for _ in 0..100 {
                loop {
                    let r = db
                        .transaction(|tx| {
                            let n: i64 =
                                tx.query_row("SELECT n FROM counter WHERE id = 1", (), |r| r.get(0))?;
                            tx.execute("UPDATE counter SET n = ?1 WHERE id = 1", [n + 1])
                        })
                        .await;
                    match r {
                        Ok(_) => break,
                        // A conflict with the other instance, to run again (and transient, so
                        // that callers who only know outages retry it too).
                        Err(e) if e.is_conflict() && e.is_transient() => retries += 1,
                        Err(e) => panic!("{e}"),
                    }
                }
            }
            retries
        };
        let (ra, rb) = tokio::join!(tokio::spawn(add(a.clone())), tokio::spawn(add(b)));
        let (ra, rb) = (ra.unwrap(), rb.unwrap());
        assert_eq!(
            count(&a, "SELECT n FROM counter").await,
            200,
            "{isolation:?}: no update lost ({ra} + {rb} retries)"
        );
        ra + rb
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn two_instances_racing_for_keys_take_each_once_under_both_isolations() {
        for isolation in [Isolation::Snapshot, Isolation::Exclusive] {
            let conflicts = two_instances_take_the_same_keys(isolation).await;
            if isolation == Isolation::Exclusive {
                assert_eq!(conflicts, 0, "one writer at a time never conflicts");
            }
        }
    }

    /// Both instances check that a key is free, then take it, as an inbox or a start of a saga
    /// does; under snapshot isolation the one that loses the race hits the unique key, a
    /// conflict, and its second try sees the winner's row. Each key ends up taken once, and
    /// each try is told which. Returns the conflicts.
    async fn two_instances_take_the_same_keys(isolation: Isolation) -> u32 {
        let stores = Stores::new();
        let at = stores.each()[1].clone();
        let migrations: &'static [&'static str] =
            &["CREATE TABLE taken (k INTEGER PRIMARY KEY, by_whom TEXT NOT NULL)"];
        let a = Db::open(&at, "k", migrations, "a").await.unwrap().isolated(isolation);
        let b = Db::open(&at, "k", migrations, "b").await.unwrap().isolated(isolation);
        let take = |db: Db, me: &'static str| async move {
            let (mut won, mut conflicts) = (0, 0);
            for k in 0..200_i64 {
                loop {
                    let r = db
                        .transaction(move |tx| {
                            let by: Option<String> = tx
                                .query_row("SELECT by_whom FROM taken WHERE k = ?1", [k], |r| r.get(0))
                                .optional()?;
                            if by.is_some() {
                                return Ok(false);
                            }
                            tx.execute(
                                "INSERT INTO taken (k, by_whom) VALUES (?1, ?2)",
                                crate::params![k, me],
                            )?;
                            Ok(true)
                        })
                        .await;
                    match r {
                        Ok(true) => won += 1,
                        Ok(false) => {}
                        Err(e) if e.is_conflict() && e.is_transient() => {
                            conflicts += 1;
                            continue;
                        }
                        Err(e) => panic!("{e}"),
                    }
                    break;
                }
            }
            (won, conflicts)
        };
        let (ra, rb) = tokio::join!(tokio::spawn(take(a.clone(), "a")), tokio::spawn(take(b, "b")));
        let ((wa, ca), (wb, cb)) = (ra.unwrap(), rb.unwrap());
        assert_eq!(
            wa + wb,
            200,
            "{isolation:?}: each key taken once: a {wa}, b {wb} ({ca} + {cb} conflicts)"
        );
        assert_eq!(count(&a, "SELECT COUNT(*) FROM taken").await, 200);
        ca + cb
    }

    #[tokio::test]
    async fn a_lost_postgres_connection_is_an_outage_then_opened_again() {
        let stores = Stores::new();
        let at = stores.each()[1].clone();
        let db = Db::open(&at, "records", EXTRA, DEFAULT_OWNER).await.unwrap();
        let pid: i64 = db
            .call(|c| c.query_row("SELECT CAST(pg_backend_pid() AS INTEGER)", (), |r| r.get(0)))
            .await
            .unwrap();
        // Another session kills this one's backend, as a restarting server or a failover does.
        let killer = Db::open(&at, "killer", &[], DEFAULT_OWNER).await.unwrap();
        killer
            .call(move |c| c.query_row("SELECT pg_terminate_backend(?1)", [pid], |_| Ok(())))
            .await
            .unwrap();
        let e = db.call(|c| c.execute("INSERT INTO things (name) VALUES ('a')", ())).await.unwrap_err();
        assert!(e.is_transient(), "a lost connection is an outage: {e}");
        // The next job finds the connection opened again.
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            match db.call(|c| c.execute("INSERT INTO things (name) VALUES ('b')", ())).await {
                Ok(_) => break,
                Err(e) => assert!(e.is_transient() && std::time::Instant::now() < deadline, "{e}"),
            }
        }
        assert_eq!(count(&db, "SELECT COUNT(*) FROM things").await, 1);
        assert_eq!(db.health().thread_alive(), Ok(()));
    }

    /// Cap a SQLite file at its current size, as a full disk does: the next write fails.
    async fn fill(db: &Db) {
        db.call(|c| {
            let pages: i64 = c.sqlite().query_row("PRAGMA page_count", [], |r| r.get(0))?;
            c.sqlite().query_row(&format!("PRAGMA max_page_count = {pages}"), [], |_| Ok(()))?;
            Ok(())
        })
        .await
        .unwrap();
    }

    async fn sqlite(name: &str) -> (tempfile::TempDir, Db) {
        let dir = tempfile::tempdir().unwrap();
        let db = Db::open(&Location::Dir(dir.path().to_owned()), name, EXTRA, DEFAULT_OWNER).await.unwrap();
        (dir, db)
    }

    #[tokio::test]
    async fn a_full_disk_is_an_outage_said_by_the_health_until_a_commit_goes_through() {
        let (_dir, db) = sqlite("full").await;
        let health = db.health();
        fill(&db).await;
        let big = "x".repeat(64 * 1024);
        let write = |db: &Db| {
            let big = big.clone();
            let db = db.clone();
            async move {
                db.transaction(move |tx| {
                    tx.execute("INSERT INTO things (name) VALUES (?1)", [big])?;
                    Ok(())
                })
                .await
            }
        };
        let e = write(&db).await.unwrap_err();
        assert!(e.is_transient(), "a full disk is an outage: {e}");
        let why = health.writable().expect_err(&format!("unwritable after {e:?}"));
        assert!(why.contains("full"), "{why}");
        db.call(|c| Ok(c.sqlite().query_row("PRAGMA max_page_count = 1000000", [], |_| Ok(()))?))
            .await
            .unwrap();
        assert!(write(&db).await.is_ok());
        assert_eq!(health.writable(), Ok(()));
        assert_eq!(health.thread_alive(), Ok(()));
        // A broken rule is not an outage: it is not retried in place.
        let e = db
            .transaction(|tx| {
                tx.execute("INSERT INTO things (id, name) VALUES (1, 'a')", ())?;
                tx.execute("INSERT INTO things (id, name) VALUES (1, 'b')", ())?;
                Ok(())
            })
            .await
            .unwrap_err();
        assert!(!e.is_transient(), "{e}");
    }

    #[tokio::test]
    async fn the_database_thread_stops_when_its_file_is_removed_under_it() {
        let (dir, db) = sqlite("gone").await;
        assert_eq!(db.health().thread_alive(), Ok(()));
        std::fs::remove_file(dir.path().join("gone.db")).unwrap();
        let e = db.call(|c| c.execute("INSERT INTO things (name) VALUES ('lost')", ())).await.unwrap_err();
        assert!(matches!(e, StoreError::Closed(_)), "{e}");
        assert!(e.is_transient());
        assert!(db.health().thread_alive().is_err());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn no_member_runs_outside_the_group_after_a_full_disk_rolled_it_back() {
        let (_dir, db) = sqlite("g").await;
        fill(&db).await;
        // Hold the thread so that the members below share one transaction.
        let held = hold_thread(&db).await;
        let member = |name: String| {
            let db = db.clone();
            tokio::spawn(async move {
                db.transaction(move |tx| {
                    tx.execute("INSERT INTO things (name) VALUES (?1)", [name])?;
                    Ok(())
                })
                .await
            })
        };
        let big = member("x".repeat(64 * 1024));
        tokio::time::sleep(Duration::from_millis(20)).await;
        let small = member("small".into());
        tokio::time::sleep(Duration::from_millis(20)).await;
        held.release().await;
        let (big, small) = (big.await.unwrap(), small.await.unwrap());
        assert!(big.as_ref().is_err_and(StoreError::is_transient), "{big:?}");
        // The small one (it fits) was not run in the lost transaction, where it would have been
        // committed on its own and then told it failed: it ran in a group of its own.
        let names: Vec<String> =
            db.call(|c| c.query_map("SELECT name FROM things", (), |r| r.get(0))).await.unwrap();
        assert!(small.is_ok(), "{small:?}");
        assert_eq!(names, vec!["small".to_owned()]);
    }
}
