//! SQLite storage of every component: one database file each, and the inbox, outbox and
//! tombstone tables that make its message handling exactly-once in effect.
//!
//! Owns: opening `<data-dir>/<component>.db` (WAL, migrations by `user_version`), the dedicated
//! thread that runs every statement off the async workers ([`Db::call`]), the [`inbox`],
//! [`outbox`] and [`tombstone`] tables, the outbox [`relay`] (its loop, and the feed that hands
//! it the rows of each commit), and what the process can tell of the database's health
//! ([`StoreHealth`]: thread alive, last commit through). Must not touch: business tables (each
//! component migrates its own through [`Db::open`]) or AMQP: the relay reaches the broker only
//! through its [`relay::Publish`] trait, which `baton-amqp` implements.

use std::cell::RefCell;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock, mpsc};
use std::time::Duration;

use baton_protocol::Outgoing;

use rusqlite::{Connection, OpenFlags, Transaction, TransactionBehavior};

pub mod inbox;
pub mod outbox;
pub mod relay;
pub mod retention;
pub mod tombstone;

use relay::Wake;

/// Storage errors, by what the caller does next.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// SQLite failed: an outage (disk full, locked, I/O) when [`StoreError::is_transient`] says
    /// so, otherwise a failure of this statement (a constraint, a bug).
    #[error("database error: {0}")]
    Sqlite(#[from] rusqlite::Error),
    /// The database thread is gone: the component is shutting down, crashed, or its database
    /// file was removed under it.
    #[error("the database thread of {0} has stopped")]
    Closed(String),
    /// A stored value could not be decoded: a bug or a foreign write, never retried blindly.
    #[error("stored data in {table} is unreadable: {cause}")]
    Corrupt { table: &'static str, cause: String },
    #[error("cannot open the database {path}: {cause}")]
    Open { path: String, cause: String },
    /// The shared transaction of a group commit failed: none of its members took effect.
    #[error("committing a group of transactions failed: {0}")]
    Commit(#[source] Arc<rusqlite::Error>),
}

impl StoreError {
    /// Whether this is an outage of the store rather than a fault of the work: the same work
    /// succeeds once the disk has room, the lock is free or the I/O error has passed, so it is
    /// retried in place and never counted against a message.
    pub fn is_transient(&self) -> bool {
        match self {
            StoreError::Sqlite(e) => is_outage(e),
            StoreError::Commit(e) => is_outage(e),
            StoreError::Closed(_) => true,
            StoreError::Corrupt { .. } | StoreError::Open { .. } => false,
        }
    }
}

/// SQLite's codes for a store that cannot work right now, whatever the statement.
fn is_outage(e: &rusqlite::Error) -> bool {
    use rusqlite::ErrorCode::*;
    matches!(
        e.sqlite_error_code(),
        Some(
            DiskFull
                | DatabaseBusy
                | DatabaseLocked
                | SystemIoFailure
                | CannotOpen
                | ReadOnly
                | OutOfMemory
                | FileLockingProtocolFailed
        )
    )
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
    fn committed(&self, outcome: Result<(), &rusqlite::Error>, member: MemberOutage) {
        let mut state = self.0.unwritable.lock().expect("store health");
        match (outcome, member) {
            (Ok(()), None) => *state = None,
            (Ok(()), Some((_, why))) => *state = Some(format!("writes fail: {why}")),
            (Err(e), _) if is_outage(e) => *state = Some(format!("commits fail: {e}")),
            (Err(_), _) => {}
        }
    }
}

/// Work for the database thread: a job with the connection to itself, or a member of a group
/// commit, which runs in a savepoint of the shared transaction and returns what to do once
/// that transaction committed (or failed).
enum Job {
    Alone(Box<dyn FnOnce(&mut Connection) + Send>),
    Member(Member),
}

/// A member of a group commit: given the shared transaction (or why there is none), it runs
/// in a savepoint and returns how to tell its caller the group's fate, and the outage it met.
type Member =
    Box<dyn FnOnce(Result<&Transaction<'_>, Arc<rusqlite::Error>>) -> (Finish, MemberOutage) + Send>;

/// Hands a group member its result once the group's fate is known.
type Finish = Box<dyn FnOnce(Result<(), &Arc<rusqlite::Error>>) + Send>;

/// Members committed together at most (a bound on how long the first one waits).
pub const GROUP_MAX: usize = 128;

/// How often the checkpointer moves the WAL into the database file (off the writer's thread).
const CHECKPOINT_EVERY: Duration = Duration::from_millis(200);

/// A component's database. Cheap to clone; all clones feed one thread, which owns the
/// connection and runs the jobs in order, so a transaction never spans an `.await` and writes
/// never contend for the lock.
#[derive(Clone)]
pub struct Db {
    tx: mpsc::Sender<Job>,
    path: PathBuf,
    /// The instance this process is: its relay publishes the outbox rows written under this name.
    pub(crate) owner: Arc<str>,
    /// The relay that gets the rows of each committed transaction handed to it.
    feed: Arc<OnceLock<Wake>>,
    /// Other instances' outbox rows this one watches, to take over those left unpublished.
    pub(crate) watch: Arc<std::sync::Mutex<outbox::Watch>>,
    health: StoreHealth,
}

/// Marks the database thread stopped when dropped.
struct Stopped(StoreHealth);

impl Drop for Stopped {
    fn drop(&mut self) {
        self.0.0.stopped.store(true, Ordering::Release);
    }
}

/// Why a member of a group failed for an outage, if it did: a full disk can fail a statement
/// (a page that cannot be allocated) before it fails a commit.
type MemberOutage = Option<(rusqlite::ffi::Error, String)>;

/// A transaction of [`Db::transaction`]: rusqlite's [`Transaction`], which it derefs to (SQL
/// reads as usual), and what the store keeps of it: the instance that owns the outbox rows it
/// adds ([`outbox::push`]), and those rows, handed to the relay once the group committed.
pub struct Tx<'a> {
    tx: &'a Transaction<'a>,
    owner: &'a str,
    pushed: RefCell<Vec<(i64, Outgoing)>>,
}

impl<'a> std::ops::Deref for Tx<'a> {
    type Target = Transaction<'a>;

    fn deref(&self) -> &Transaction<'a> {
        self.tx
    }
}

impl Tx<'_> {
    /// The instance whose relay publishes the outbox rows of this transaction.
    pub(crate) fn owner(&self) -> &str {
        self.owner
    }

    /// Note a row [`outbox::push`] wrote, for the relay's feed once it is committed.
    pub(crate) fn pushed(&self, seq: i64, msg: &Outgoing) {
        self.pushed.borrow_mut().push((seq, msg.clone()));
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
        -- The instance whose relay publishes the row (instances of a component share the file).
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

fn configure(conn: &Connection) -> rusqlite::Result<()> {
    // First, so that instances opening one file together wait for each other's locks.
    conn.busy_timeout(std::time::Duration::from_secs(5))?;
    conn.pragma_update(None, "journal_mode", "WAL")?;
    // WAL + NORMAL: a committed transaction survives a process crash; a power loss may lose the
    // last ones (docs/reliability.md).
    conn.pragma_update(None, "synchronous", "NORMAL")?;
    conn.pragma_update(None, "foreign_keys", "ON")?;
    // Checkpoints (and their fsync) run on the checkpointer's own connection, not in the middle
    // of a commit; this high mark only bounds the WAL should the checkpointer fall behind.
    conn.pragma_update(None, "wal_autocheckpoint", 20_000)?;
    Ok(())
}

/// Copy the WAL into the database now and then, on a connection of its own, so that the
/// writer's commits never wait for a checkpoint's fsync. PASSIVE: it never blocks the writer;
/// the writer restarts the WAL from the top once a checkpoint has caught up. Stops when the
/// database is dropped (`alive` hangs up).
fn checkpointer(path: PathBuf, alive: mpsc::Receiver<()>) {
    let Ok(conn) = Connection::open(&path) else { return };
    let _ = conn.busy_timeout(Duration::from_secs(1));
    loop {
        match alive.recv_timeout(CHECKPOINT_EVERY) {
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            _ => return,
        }
        if let Err(e) = conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |_| Ok(())) {
            tracing::debug!(error = %e, path = %path.display(), "checkpoint skipped");
        }
    }
}

/// The database thread: runs jobs in order; members that queue up behind each other share
/// one transaction (group commit), each in its own savepoint, so one member's failure undoes
/// only its own work, and each hears back only after the shared commit.
///
/// It stops when its file is removed or replaced under it: what it wrote from then on would
/// go to a file nobody opens again. Its callers then get [`StoreError::Closed`], and
/// [`StoreHealth`] says it stopped.
fn serve(
    mut conn: Connection,
    rx: mpsc::Receiver<Job>,
    path: &Path,
    file: Option<FileId>,
    health: &StoreHealth,
) {
    let mut next = None;
    loop {
        let job = match next.take() {
            Some(job) => job,
            None => match rx.recv() {
                Ok(job) => job,
                Err(_) => return,
            },
        };
        if file.is_some() && FileId::of(path) != file {
            tracing::error!(
                path = %path.display(),
                "the database file was removed or replaced while open; its thread stops so that \
                 nothing is written where nobody reads; restart the component"
            );
            // Before the job is dropped, which tells its caller.
            health.0.stopped.store(true, Ordering::Release);
            return;
        }
        match job {
            Job::Alone(f) => f(&mut conn),
            Job::Member(first) => {
                let tx = match conn.transaction_with_behavior(TransactionBehavior::Immediate) {
                    Ok(tx) => tx,
                    Err(e) => {
                        health.committed(Err(&e), None);
                        // Nothing ran: this member hears why; the queue goes on.
                        let e = Arc::new(e);
                        first(Err(Arc::clone(&e))).0(Err(&e));
                        continue;
                    }
                };
                let mut group = Group::default();
                group.run(&tx, first);
                // SQLite rolls the whole transaction back by itself on some errors of a
                // statement (a full disk, I/O): then the group is lost, and no member may run
                // after it (it would run outside any transaction).
                let mut lost = tx.is_autocommit();
                while !lost && group.finishes.len() < GROUP_MAX {
                    match rx.try_recv() {
                        Ok(Job::Member(f)) => {
                            group.run(&tx, f);
                            lost = tx.is_autocommit();
                        }
                        Ok(alone) => {
                            next = Some(alone);
                            break;
                        }
                        Err(_) => break,
                    }
                }
                let outcome = if lost {
                    drop(tx);
                    Err(Arc::new(rolled_back(group.outage.as_ref())))
                } else {
                    tx.commit().map_err(Arc::new)
                };
                health.committed(outcome.as_ref().map(|_| ()).map_err(|e| &**e), group.outage);
                for finish in group.finishes {
                    finish(outcome.as_ref().map(|_| ()));
                }
            }
        }
    }
}

/// The members of the group committing now: how to tell each one its fate, and the last
/// outage one of them met.
#[derive(Default)]
struct Group {
    finishes: Vec<Finish>,
    outage: MemberOutage,
}

impl Group {
    fn run(&mut self, tx: &Transaction<'_>, member: Member) {
        let (finish, outage) = in_savepoint(tx, member);
        self.finishes.push(finish);
        if outage.is_some() {
            self.outage = outage;
        }
    }
}

/// Why a group's transaction is gone when SQLite rolled it back on a member's error: that
/// error (the outage a member met), for every member.
fn rolled_back(outage: Option<&(rusqlite::ffi::Error, String)>) -> rusqlite::Error {
    let (code, why) = outage.cloned().unwrap_or_else(|| {
        (rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_ABORT), "a member's statement failed".into())
    });
    rusqlite::Error::SqliteFailure(code, Some(format!("SQLite rolled the group's transaction back ({why})")))
}

/// Which file a path names (device and inode), to notice it was removed or replaced.
#[derive(PartialEq, Eq, Clone, Copy)]
struct FileId(u64, u64);

impl FileId {
    #[cfg(unix)]
    fn of(path: &Path) -> Option<FileId> {
        use std::os::unix::fs::MetadataExt;
        std::fs::metadata(path).ok().map(|m| FileId(m.dev(), m.ino()))
    }

    #[cfg(not(unix))]
    fn of(_: &Path) -> Option<FileId> {
        None
    }
}

fn in_savepoint(tx: &Transaction<'_>, f: Member) -> (Finish, MemberOutage) {
    match tx.prepare_cached("SAVEPOINT member").and_then(|mut s| s.execute([])) {
        Ok(_) => f(Ok(tx)),
        // Cannot isolate it: it does not run, and hears why.
        Err(e) => f(Err(Arc::new(e))),
    }
}

/// Apply the migrations `conn` lacks; the error says why it cannot be opened.
fn migrate(conn: &mut Connection, component: &[&str]) -> Result<(), String> {
    let all: Vec<&str> = BASE_MIGRATIONS.iter().chain(component).copied().collect();
    // Immediate: it writes after reading, and a deferred one could not wait for another
    // instance migrating the same file (the upgrade to a write lock fails at once).
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate).map_err(|e| e.to_string())?;
    let done = tx.query_row("PRAGMA user_version", [], |r| r.get::<_, i64>(0)).map_err(|e| e.to_string())?;
    let done = usize::try_from(done).unwrap_or(usize::MAX);
    if done > all.len() {
        // Its tables are not the ones this build knows: reading or writing them could lose data.
        return Err(format!(
            "its schema is at version {done}, this build knows {} versions: it was written by another \
             build of Baton; run that build, or start this one on an empty data dir",
            all.len()
        ));
    }
    apply_missing(&tx, &all, done).map_err(|e| e.to_string())?;
    tx.commit().map_err(|e| e.to_string())
}

/// Apply `all` but the first `done`, and record the version.
fn apply_missing(tx: &Transaction<'_>, all: &[&str], done: usize) -> rusqlite::Result<()> {
    for (i, sql) in all.iter().enumerate().skip(done) {
        tracing::debug!(migration = i + 1, "applying migration");
        tx.execute_batch(sql)?;
    }
    // Written only when it changes: opening an up-to-date database writes nothing, so a
    // component restarted while its disk is full starts (and waits for room like the others).
    if done != all.len() {
        tx.pragma_update(None, "user_version", all.len() as i64)?;
    }
    Ok(())
}

impl Db {
    /// Open (creating it and its folder if needed) and migrate a component's database: the base
    /// tables, then `migrations` of the component, each applied once, in order.
    pub fn open(path: &Path, migrations: &'static [&'static str]) -> Result<Db, StoreError> {
        Db::open_as(path, migrations, DEFAULT_OWNER)
    }

    /// [`Db::open_as`] from async code: opening migrates and may wait on another instance's
    /// lock, so it runs on a blocking thread, not on an async worker.
    pub async fn open_async(
        path: PathBuf,
        migrations: &'static [&'static str],
        owner: String,
    ) -> Result<Db, StoreError> {
        let display = path.display().to_string();
        tokio::task::spawn_blocking(move || Db::open_as(&path, migrations, &owner))
            .await
            .map_err(|e| StoreError::Open { path: display, cause: e.to_string() })?
    }

    /// [`Db::open`] for instance `owner` of a component: the outbox rows it writes are published
    /// by its own relay, so several instances can share one database without sending every
    /// message once per instance. Keep the name stable across restarts.
    pub fn open_as(path: &Path, migrations: &'static [&'static str], owner: &str) -> Result<Db, StoreError> {
        let err = |cause: String| StoreError::Open { path: path.display().to_string(), cause };
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(|e| err(e.to_string()))?;
        }
        let mut conn = Connection::open(path).map_err(|e| err(e.to_string()))?;
        configure(&conn).map_err(|e| err(e.to_string()))?;
        migrate(&mut conn, migrations).map_err(err)?;
        let (tx, rx) = mpsc::channel::<Job>();
        let (alive, watch) = mpsc::channel::<()>();
        let name = path.file_stem().map_or_else(|| "db".into(), |s| s.to_string_lossy().into_owned());
        let health = StoreHealth::default();
        let (h, db_path, file) = (health.clone(), path.to_owned(), FileId::of(path));
        std::thread::Builder::new()
            .name(format!("db-{name}"))
            .spawn(move || {
                // Runs until every `Db` clone is dropped; the checkpointer stops with it. The
                // guard marks it stopped however it ends, a panic included.
                let _alive = alive;
                let _stopped = Stopped(h.clone());
                serve(conn, rx, &db_path, file, &h);
            })
            .map_err(|e| err(e.to_string()))?;
        let cp_path = path.to_owned();
        std::thread::Builder::new()
            .name(format!("ckpt-{name}"))
            .spawn(move || checkpointer(cp_path, watch))
            .map_err(|e| err(e.to_string()))?;
        Ok(Db {
            tx,
            path: path.to_owned(),
            owner: owner.into(),
            feed: Arc::default(),
            watch: Arc::default(),
            health,
        })
    }

    /// Run `f` on the database thread and return its result.
    pub async fn call<R, F>(&self, f: F) -> Result<R, StoreError>
    where
        R: Send + 'static,
        F: FnOnce(&mut Connection) -> Result<R, StoreError> + Send + 'static,
    {
        let (done, wait) = tokio::sync::oneshot::channel();
        let job = Job::Alone(Box::new(move |conn| {
            let _ = done.send(f(conn));
        }));
        let closed = || StoreError::Closed(self.path.display().to_string());
        self.tx.send(job).map_err(|_| closed())?;
        wait.await.map_err(|_| closed())?
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
        let (done, wait) = tokio::sync::oneshot::channel::<Result<R, StoreError>>();
        let feed = Arc::clone(&self.feed);
        let owner = Arc::clone(&self.owner);
        let job = Job::Member(Box::new(move |tx: Result<&Transaction<'_>, Arc<rusqlite::Error>>| {
            let tx = match tx {
                Ok(tx) => tx,
                Err(why) => {
                    let e = StoreError::Commit(why);
                    let finish: Finish = Box::new(move |_| {
                        let _ = done.send(Err(e));
                    });
                    return (finish, None);
                }
            };
            let member = Tx { tx, owner: &owner, pushed: RefCell::default() };
            let result = f(&member);
            let outage = match &result {
                Err(e @ StoreError::Sqlite(rusqlite::Error::SqliteFailure(code, _))) if e.is_transient() => {
                    Some((*code, e.to_string()))
                }
                _ => None,
            };
            let closing = if result.is_ok() { "RELEASE member" } else { "ROLLBACK TO member" };
            let closed = tx.prepare_cached(closing).and_then(|mut s| s.execute([])).and_then(|_| {
                if result.is_err() {
                    tx.prepare_cached("RELEASE member")?.execute([])?;
                }
                Ok(())
            });
            let pushed = member.pushed.into_inner();
            let finish: Finish = match (result, closed) {
                (Ok(r), Ok(())) => Box::new(move |committed: Result<(), &Arc<rusqlite::Error>>| {
                    if committed.is_ok()
                        && let Some(wake) = feed.get()
                    {
                        wake.hand(pushed);
                    }
                    let _ = done.send(committed.map(|()| r).map_err(|e| StoreError::Commit(Arc::clone(e))));
                }),
                (Err(e), _) => Box::new(move |_| {
                    let _ = done.send(Err(e));
                }),
                (Ok(_), Err(e)) => {
                    let e = Arc::new(e);
                    Box::new(move |_| {
                        let _ = done.send(Err(StoreError::Commit(e)));
                    })
                }
            };
            (finish, outage)
        }));
        let closed = || StoreError::Closed(self.path.display().to_string());
        self.tx.send(job).map_err(|_| closed())?;
        wait.await.map_err(|_| closed())?
    }

    /// Hand the outbox rows of every committed [`Db::transaction`] to this relay, which then
    /// need not read them back: one database round trip less per message. Set once.
    pub fn feed(&self, wake: Wake) {
        let _ = self.feed.set(wake);
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The readiness of this database: its thread running, its last commit through.
    pub fn health(&self) -> StoreHealth {
        self.health.clone()
    }
}

/// Sum one number over the component databases of `dir` that answer `sql`, read-only (a table
/// lives in some of them only: `sagas` in the orchestrator's, `requests` in the gateway's);
/// `None` when none does.
pub fn sum_over(dir: &Path, sql: &str) -> Option<i64> {
    baton_protocol::Component::ALL
        .iter()
        .map(|c| dir.join(format!("{c}.db")))
        .filter(|path| path.exists())
        .filter_map(|path| open_read_only(&path).ok()?.query_row(sql, [], |r| r.get::<_, i64>(0)).ok())
        .fold(None, |total, n| Some(total.unwrap_or(0) + n))
}

/// Open a component's database read-only, for audits, reports and queries from other processes.
/// WAL lets these read while the owner writes.
pub fn open_read_only(path: &Path) -> Result<Connection, StoreError> {
    let conn =
        Connection::open_with_flags(path, OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX)
            .map_err(|e| StoreError::Open { path: path.display().to_string(), cause: e.to_string() })?;
    conn.busy_timeout(std::time::Duration::from_secs(5))?;
    Ok(conn)
}

/// Whether the database has the table `name`: a reader of a table that only some runs create
/// (the fault plan's `faults`) asks first.
pub fn has_table(conn: &Connection, name: &str) -> rusqlite::Result<bool> {
    conn.query_row(
        "SELECT EXISTS (SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?1)",
        [name],
        |r| r.get(0),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

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

    const EXTRA: &[&str] = &["CREATE TABLE things (id INTEGER PRIMARY KEY, name TEXT)"];

    /// A message for the outbox, its body `n`.
    pub(crate) fn message(n: u32) -> Outgoing {
        Outgoing::new("x", "k", "t", uuid::Uuid::nil(), "test", baton_protocol::TraceParent::new_root(), &n)
    }

    #[tokio::test]
    async fn opens_migrates_once_and_runs_jobs_off_the_runtime() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/records.db");
        let db = Db::open(&path, EXTRA).unwrap();
        db.call(|c| Ok(c.execute("INSERT INTO things (name) VALUES ('a')", [])?)).await.unwrap();
        let thread = db.call(|_| Ok(std::thread::current().name().map(String::from))).await.unwrap();
        assert_eq!(thread.as_deref(), Some("db-records"));
        drop(db);
        // Reopening applies nothing twice and keeps the data.
        let db = Db::open(&path, EXTRA).unwrap();
        let (n, version): (i64, i64) = db
            .call(|c| {
                let n = c.query_row("SELECT COUNT(*) FROM things", [], |r| r.get(0))?;
                let v = c.query_row("PRAGMA user_version", [], |r| r.get(0))?;
                Ok((n, v))
            })
            .await
            .unwrap();
        assert_eq!((n, version), (1, 2));
        let mode: String =
            db.call(|c| Ok(c.query_row("PRAGMA journal_mode", [], |r| r.get(0))?)).await.unwrap();
        assert_eq!(mode, "wal");
        let ro = open_read_only(&path).unwrap();
        assert!(ro.execute("INSERT INTO things (name) VALUES ('b')", []).is_err(), "read-only");
    }

    #[test]
    fn a_database_of_a_build_with_more_migrations_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("records.db");
        drop(Db::open(&path, EXTRA).unwrap());
        let Err(e) = Db::open(&path, &[]) else { panic!("opened a database of another build") };
        assert!(e.to_string().contains("schema is at version 2, this build knows 1"), "{e}");
    }

    #[tokio::test]
    async fn each_instance_publishes_its_own_rows_and_takes_over_a_gone_ones() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("svc.db");
        let a = Db::open_as(&path, &[], "a").unwrap();
        let b = Db::open_as(&path, &[], "b").unwrap();
        a.transaction(|tx| outbox::push(tx, &message(1))).await.unwrap();
        b.transaction(|tx| outbox::push(tx, &message(2))).await.unwrap();
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

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_group_commit_keeps_every_member_but_the_one_that_failed() {
        let dir = tempfile::tempdir().unwrap();
        let db = Db::open(&dir.path().join("g.db"), EXTRA).unwrap();
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
                        outbox::push(tx, &message(i))?;
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
            .call(|c| {
                let mut s = c.prepare("SELECT name FROM things ORDER BY id")?;
                Ok(s.query_map([], |r| r.get(0))?.collect::<Result<_, _>>()?)
            })
            .await
            .unwrap();
        assert_eq!(names.len(), 19);
        assert!(!names.contains(&"t7".to_owned()));
        // The relay was handed exactly the committed rows, in order, and they are the outbox's.
        let fed: Vec<i64> = wake.take_fed().into_iter().map(|(seq, _)| seq).collect();
        let stored: Vec<i64> = db
            .call(|c| {
                let mut s = c.prepare("SELECT seq FROM outbox ORDER BY seq")?;
                Ok(s.query_map([], |r| r.get(0))?.collect::<Result<_, _>>()?)
            })
            .await
            .unwrap();
        assert_eq!(fed, stored);
        assert_eq!(fed.len(), 19);
        // A member may not commit on its own, and a plain call afterwards runs as before.
        let n: i64 =
            db.call(|c| Ok(c.query_row("SELECT COUNT(*) FROM things", [], |r| r.get(0))?)).await.unwrap();
        assert_eq!(n, 19);
    }

    #[tokio::test]
    async fn a_full_disk_is_an_outage_said_by_the_health_until_a_commit_goes_through() {
        let dir = tempfile::tempdir().unwrap();
        let db = Db::open(&dir.path().join("full.db"), EXTRA).unwrap();
        let health = db.health();
        // Cap the file at its current size, as a full disk does: the next write fails.
        db.call(|c| {
            let pages: i64 = c.query_row("PRAGMA page_count", [], |r| r.get(0))?;
            c.query_row(&format!("PRAGMA max_page_count = {pages}"), [], |_| Ok(()))?;
            Ok(())
        })
        .await
        .unwrap();
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
        db.call(|c| Ok(c.query_row("PRAGMA max_page_count = 1000000", [], |_| Ok(()))?)).await.unwrap();
        assert!(write(&db).await.is_ok());
        assert_eq!(health.writable(), Ok(()));
        assert_eq!(health.thread_alive(), Ok(()));
        // A broken rule is not an outage: it is not retried in place.
        let e = db
            .transaction(|tx| {
                tx.execute("INSERT INTO things (id, name) VALUES (1, 'a')", [])?;
                tx.execute("INSERT INTO things (id, name) VALUES (1, 'b')", [])?;
                Ok(())
            })
            .await
            .unwrap_err();
        assert!(!e.is_transient(), "{e}");
    }

    #[tokio::test]
    async fn the_database_thread_stops_when_its_file_is_removed_under_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("gone.db");
        let db = Db::open(&path, EXTRA).unwrap();
        assert_eq!(db.health().thread_alive(), Ok(()));
        std::fs::remove_file(&path).unwrap();
        let e =
            db.call(|c| Ok(c.execute("INSERT INTO things (name) VALUES ('lost')", [])?)).await.unwrap_err();
        assert!(matches!(e, StoreError::Closed(_)), "{e}");
        assert!(e.is_transient());
        assert!(db.health().thread_alive().is_err());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn no_member_runs_outside_the_group_after_a_full_disk_rolled_it_back() {
        let dir = tempfile::tempdir().unwrap();
        let db = Db::open(&dir.path().join("g.db"), EXTRA).unwrap();
        db.call(|c| {
            let pages: i64 = c.query_row("PRAGMA page_count", [], |r| r.get(0))?;
            c.query_row(&format!("PRAGMA max_page_count = {pages}"), [], |_| Ok(()))?;
            Ok(())
        })
        .await
        .unwrap();
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
        let names: Vec<String> = db
            .call(|c| {
                let mut s = c.prepare("SELECT name FROM things")?;
                Ok(s.query_map([], |r| r.get(0))?.collect::<Result<_, _>>()?)
            })
            .await
            .unwrap();
        assert!(small.is_ok(), "{small:?}");
        assert_eq!(names, vec!["small".to_owned()]);
    }
}
