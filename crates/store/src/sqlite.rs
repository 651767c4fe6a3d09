//! The SQLite backend: one file per component in the data dir (WAL, migrations counted by
//! `user_version`), the embedded default with nothing to install.

use std::path::{Path, PathBuf};
use std::sync::{Arc, mpsc};
use std::time::Duration;

use rusqlite::types::{ToSqlOutput, ValueRef};
use rusqlite::{Connection, OpenFlags};

use crate::room::Room;
use crate::sql::{Row, Value};
use crate::{Cause, StoreError};

/// How often the checkpointer moves the WAL into the database file (off the writer's thread).
const CHECKPOINT_EVERY: Duration = Duration::from_millis(200);

/// The page size of a new database file. A commit writes each page it changed whole, to the WAL
/// and again at the checkpoint: with half SQLite's default of 4096 a saga writes 0.24 MB of
/// disk instead of 0.39 MB. 1024 writes less still, but a saga's row no longer fits in a page
/// and SQLite's own work grows. A file made before keeps its pages.
const PAGE_SIZE: i64 = 2048;

/// Statements each connection keeps prepared: every statement of a component's hot path.
const STATEMENT_CACHE: usize = 128;

pub(crate) struct SqliteConn {
    pub(crate) conn: Connection,
    path: PathBuf,
    /// The file opened, to notice it was removed or replaced (`None` where that cannot be told).
    file: Option<FileId>,
    read_only: bool,
}

impl rusqlite::ToSql for Value {
    fn to_sql(&self) -> rusqlite::Result<ToSqlOutput<'_>> {
        Ok(match self {
            Value::Null => ToSqlOutput::Borrowed(ValueRef::Null),
            Value::Integer(n) => ToSqlOutput::Borrowed(ValueRef::Integer(*n)),
            Value::Real(x) => ToSqlOutput::Borrowed(ValueRef::Real(*x)),
            Value::Text(s) => ToSqlOutput::Borrowed(ValueRef::Text(s.as_bytes())),
        })
    }
}

fn row(r: &rusqlite::Row<'_>, n: usize) -> rusqlite::Result<Row> {
    (0..n)
        .map(|i| {
            Ok(match r.get_ref(i)? {
                ValueRef::Null => Value::Null,
                ValueRef::Integer(n) => Value::Integer(n),
                ValueRef::Real(x) => Value::Real(x),
                ValueRef::Text(t) | ValueRef::Blob(t) => Value::Text(String::from_utf8_lossy(t).into_owned()),
            })
        })
        .collect::<rusqlite::Result<_>>()
        .map(Row)
}

impl SqliteConn {
    pub(crate) fn execute(&self, sql: &str, values: Vec<Value>) -> Result<usize, StoreError> {
        Ok(self.conn.prepare_cached(sql)?.execute(rusqlite::params_from_iter(values.iter()))?)
    }

    pub(crate) fn query(&self, sql: &str, values: Vec<Value>) -> Result<Vec<Row>, StoreError> {
        let mut stmt = self.conn.prepare_cached(sql)?;
        let n = stmt.column_count();
        let rows = stmt.query_map(rusqlite::params_from_iter(values.iter()), |r| row(r, n))?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    pub(crate) fn batch(&self, sql: &str) -> Result<(), StoreError> {
        Ok(self.conn.execute_batch(sql)?)
    }

    pub(crate) fn begin(&self) -> Result<(), StoreError> {
        // Immediate: the write lock at once, waited for (busy timeout) rather than failed on
        // when the transaction later wants to write.
        let sql = if self.read_only { "BEGIN" } else { "BEGIN IMMEDIATE" };
        self.execute(sql, Vec::new()).map(|_| ())
    }

    pub(crate) fn in_transaction(&self) -> bool {
        !self.conn.is_autocommit()
    }

    pub(crate) fn gone(&self) -> bool {
        self.file.is_some() && FileId::of(&self.path) != self.file
    }

    pub(crate) fn path(&self) -> &Path {
        &self.path
    }
}

/// Open (creating it and its folder if needed) and migrate a component's database file.
pub(crate) fn open(path: &Path, migrations: &[&str]) -> Result<SqliteConn, Cause> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let mut conn = Connection::open(path)?;
    configure(&conn)?;
    migrate(&mut conn, migrations)?;
    conn.set_prepared_statement_cache_capacity(STATEMENT_CACHE);
    Ok(SqliteConn { conn, path: path.to_owned(), file: FileId::of(path), read_only: false })
}

/// Open a component's database read-only, for audits, reports and queries from other
/// processes: WAL lets these read while the owner writes. `None` when there is no such file.
pub(crate) fn open_reader(path: &Path) -> Result<Option<SqliteConn>, Cause> {
    if !path.exists() {
        return Ok(None);
    }
    let conn = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )?;
    conn.busy_timeout(Duration::from_secs(5))?;
    Ok(Some(SqliteConn { conn, path: path.to_owned(), file: None, read_only: true }))
}

fn configure(conn: &Connection) -> rusqlite::Result<()> {
    // First, so that instances opening one file together wait for each other's locks.
    conn.busy_timeout(Duration::from_secs(5))?;
    // Only a new file takes it (before its first table), and it must come before WAL.
    conn.pragma_update(None, "page_size", PAGE_SIZE)?;
    conn.pragma_update(None, "journal_mode", "WAL")?;
    // WAL + NORMAL: a committed transaction survives a process crash; a power loss may lose the
    // last ones (docs/reliability.md).
    conn.pragma_update(None, "synchronous", "NORMAL")?;
    conn.pragma_update(None, "foreign_keys", "ON")?;
    // Checkpoints (and their fsync) run on the checkpointer's own connection, not in the middle
    // of a commit; this high mark only bounds the WAL should the checkpointer fall behind.
    conn.pragma_update(None, "wal_autocheckpoint", 20_000)?;
    // One plan per statement, whatever its parameters: otherwise a statement whose plan might
    // depend on them (a `LIMIT ?`, an equality on a column no index covers) is compiled again
    // each time it is taken from the cache, which clears its parameters. That was two
    // statements of the hot path (the relay's read of the outbox, the orchestrator's step
    // timing), five compilations a saga and 5 % of its instructions.
    conn.set_db_config(rusqlite::config::DbConfig::SQLITE_DBCONFIG_ENABLE_QPSG, true)?;
    Ok(())
}

/// Copy the WAL into the database now and then, on a connection of its own, so that the
/// writer's commits never wait for a checkpoint's fsync. PASSIVE: it never blocks the writer;
/// the writer restarts the WAL from the top once a checkpoint has caught up. Stops when the
/// database is dropped (`alive` hangs up).
pub(crate) fn checkpointer(path: PathBuf, alive: mpsc::Receiver<()>, room: Option<Arc<Room>>) {
    let Ok(conn) = Connection::open(&path) else { return };
    let _ = conn.busy_timeout(Duration::from_secs(1));
    loop {
        match alive.recv_timeout(CHECKPOINT_EVERY) {
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            _ => return,
        }
        // The disk reserve given back on a full disk is made again here once there is room.
        if let Some(room) = &room {
            room.renew();
        }
        if let Err(e) = conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |_| Ok(())) {
            tracing::debug!(error = %e, path = %path.display(), "checkpoint skipped");
        }
    }
}

/// Apply the migrations `conn` lacks; the error says why it cannot be opened.
fn migrate(conn: &mut Connection, all: &[&str]) -> Result<(), Cause> {
    // Immediate: it writes after reading, and a deferred one could not wait for another
    // instance migrating the same file (the upgrade to a write lock fails at once).
    let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
    let done = tx.query_row("PRAGMA user_version", [], |r| r.get::<_, i64>(0))?;
    let done = crate::migrations_to_apply(done, all.len())?;
    for (i, sql) in all.iter().enumerate().skip(done) {
        tracing::debug!(migration = i + 1, "applying migration");
        tx.execute_batch(sql).map_err(|source| crate::OpenError::SqliteMigration { n: i + 1, source })?;
    }
    // Written only when it changes: opening an up-to-date database writes nothing, so a
    // component restarted while its disk is full starts (and waits for room like the others).
    if done != all.len() {
        tx.pragma_update(None, "user_version", all.len() as i64)?;
    }
    Ok(tx.commit()?)
}

/// SQLite's code for a full disk.
pub(crate) fn is_disk_full(e: &rusqlite::Error) -> bool {
    e.sqlite_error_code() == Some(rusqlite::ErrorCode::DiskFull)
}

/// SQLite's codes for a store that cannot work right now, whatever the statement.
pub(crate) fn is_outage(e: &rusqlite::Error) -> bool {
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

#[cfg(test)]
mod tests {
    use super::*;
    use rusqlite::StatementStatus;

    #[test]
    fn a_cached_statement_keeps_its_plan_whatever_its_parameters() {
        let dir = tempfile::tempdir().unwrap();
        let db =
            open(&dir.path().join("t.db"), &["CREATE TABLE t (id INTEGER PRIMARY KEY, k TEXT, n INTEGER)"])
                .unwrap();
        // A LIMIT and an equality on a column without an index: both made SQLite compile the
        // statement again whenever its parameters changed.
        let sql = "SELECT id FROM t WHERE k = ?1 AND id > ?2 ORDER BY id LIMIT ?3";
        for (k, after, limit) in [("a", 0, 10), ("b", 5, 100), ("a", 1, 0)] {
            db.query(sql, vec![Value::Text(k.into()), Value::Integer(after), Value::Integer(limit)]).unwrap();
        }
        let stmt = db.conn.prepare_cached(sql).unwrap();
        assert_eq!(stmt.get_status(StatementStatus::RePrepare), 0, "compiled once");
    }
}
