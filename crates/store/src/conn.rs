//! One connection of either backend, and [`Tx`], the transaction the components write through.
//!
//! Both backends run their statements on the component's database thread, synchronously, so a
//! transaction never spans an `.await` and the group commit works the same on both.

use std::cell::RefCell;
use std::rc::Rc;
use std::sync::{Arc, OnceLock};

use baton_protocol::Outgoing;

use crate::sql::{Params, Row, Value};
use crate::{StoreError, pg, sqlite};

/// A connection of one backend. One per database thread, never moved around: the size of the
/// larger variant costs nothing.
#[allow(clippy::large_enum_variant)]
pub(crate) enum Conn {
    Sqlite(sqlite::SqliteConn),
    Postgres(RefCell<pg::PgConn>),
}

impl Conn {
    pub(crate) fn execute(&self, sql: &str, values: Vec<Value>) -> Result<usize, StoreError> {
        match self {
            Conn::Sqlite(c) => c.execute(sql, values),
            Conn::Postgres(c) => c.borrow_mut().execute(sql, values),
        }
    }

    pub(crate) fn query(&self, sql: &str, values: Vec<Value>) -> Result<Vec<Row>, StoreError> {
        match self {
            Conn::Sqlite(c) => c.query(sql, values),
            Conn::Postgres(c) => c.borrow_mut().query(sql, values),
        }
    }

    /// [`Conn::execute`] whose count nobody reads: on PostgreSQL sent without waiting for
    /// its answer (read with the next one needed, or by [`Conn::settle`]).
    pub(crate) fn write(&self, sql: &str, values: Vec<Value>) -> Result<(), StoreError> {
        match self {
            Conn::Sqlite(c) => c.execute(sql, values).map(|_| ()),
            Conn::Postgres(c) => c.borrow_mut().write(sql, values),
        }
    }

    /// A query whose rows are read later ([`Prefetched::rows`]): on PostgreSQL sent without
    /// waiting, its answer read with the next one needed.
    pub(crate) fn prefetch(&self, sql: &str, values: Vec<Value>) -> Result<Prefetched, StoreError> {
        match self {
            Conn::Sqlite(c) => Ok(Prefetched(Fetch::Read(c.query(sql, values)?))),
            Conn::Postgres(c) => {
                let slot = Rc::default();
                c.borrow_mut().send_query(sql, values, Rc::clone(&slot))?;
                Ok(Prefetched(Fetch::Sent(slot)))
            }
        }
    }

    /// An `INSERT … RETURNING` of one integer, put in `slot`: on PostgreSQL sent without
    /// waiting, like [`Conn::write`], and `slot` filled once its answer is read.
    pub(crate) fn insert_returning(
        &self,
        sql: &str,
        values: Vec<Value>,
        slot: &Arc<OnceLock<i64>>,
    ) -> Result<(), StoreError> {
        match self {
            Conn::Sqlite(c) => {
                let _ = slot.set(first(c.query(sql, values)?)?.get(0)?);
                Ok(())
            }
            Conn::Postgres(c) => c.borrow_mut().write_returning(sql, values, Arc::clone(slot)),
        }
    }

    /// The answers of the writes not read yet: the first error among them (PostgreSQL).
    pub(crate) fn settle(&self) -> Result<(), StoreError> {
        match self {
            Conn::Sqlite(_) => Ok(()),
            Conn::Postgres(c) => c.borrow_mut().settle(),
        }
    }

    /// The member of the group whose write failed, found as a later one read its answers,
    /// with the write's error (PostgreSQL, where such a failure aborts the transaction).
    pub(crate) fn take_culprit(&self) -> Option<(u32, StoreError)> {
        match self {
            Conn::Sqlite(_) => None,
            Conn::Postgres(c) => c.borrow_mut().take_culprit(),
        }
    }

    /// Whether an earlier member's failed write aborted the transaction under the running one.
    pub(crate) fn has_culprit(&self) -> bool {
        match self {
            Conn::Sqlite(_) => false,
            Conn::Postgres(c) => c.borrow().has_culprit(),
        }
    }

    /// Statements without parameters, one after the other (migrations, transaction control).
    pub(crate) fn batch(&self, sql: &str) -> Result<(), StoreError> {
        match self {
            Conn::Sqlite(c) => c.batch(sql),
            Conn::Postgres(c) => c.borrow_mut().batch(sql),
        }
    }

    /// Start a transaction: one that writes takes the write lock at once on SQLite (so that
    /// instances sharing a file wait for each other instead of failing), and is isolated at
    /// `level` on PostgreSQL, where instances on several machines write the same rows: a
    /// conflict fails one of them, an outage retried in place, never a lost update.
    pub(crate) fn begin(&self, level: crate::Level) -> Result<(), StoreError> {
        match self {
            Conn::Sqlite(c) => c.begin(),
            Conn::Postgres(c) => c.borrow_mut().begin(level),
        }
    }

    /// Isolate the next member of a group commit: on PostgreSQL the statement goes out ahead
    /// of the member's first request, with the transaction control held back (the `BEGIN`,
    /// the last member's `RELEASE`); if it fails, that request fails with its error.
    pub(crate) fn savepoint(&self) -> Result<(), StoreError> {
        match self {
            Conn::Sqlite(c) => c.execute("SAVEPOINT member", Vec::new()).map(|_| ()),
            Conn::Postgres(c) => {
                c.borrow_mut().next_member();
                Ok(())
            }
        }
    }

    /// Close the member's savepoint, its work kept: at once on SQLite (no round trip), with the
    /// next statement on PostgreSQL (the next `SAVEPOINT`, or implied by the `COMMIT`).
    pub(crate) fn release(&self) -> Result<(), StoreError> {
        match self {
            Conn::Sqlite(c) => c.execute("RELEASE member", Vec::new()).map(|_| ()),
            Conn::Postgres(c) => {
                c.borrow_mut().defer("RELEASE member");
                Ok(())
            }
        }
    }

    pub(crate) fn is_postgres(&self) -> bool {
        matches!(self, Conn::Postgres(_))
    }

    /// Whether the transaction begun is still open: SQLite rolls it back by itself on some
    /// errors (a full disk), and a PostgreSQL connection can be lost.
    pub(crate) fn in_transaction(&self) -> bool {
        match self {
            Conn::Sqlite(c) => c.in_transaction(),
            Conn::Postgres(c) => c.borrow().in_transaction(),
        }
    }

    /// Reopen a connection that was lost (PostgreSQL), before the next job.
    pub(crate) fn ensure_open(&self) -> Result<(), StoreError> {
        match self {
            Conn::Sqlite(_) => Ok(()),
            Conn::Postgres(c) => c.borrow_mut().ensure_open(),
        }
    }

    /// Whether the database is gone for good: the SQLite file removed or replaced under it.
    pub(crate) fn gone(&self) -> bool {
        match self {
            Conn::Sqlite(c) => c.gone(),
            Conn::Postgres(_) => false,
        }
    }

    pub(crate) fn has_table(&self, name: &str) -> Result<bool, StoreError> {
        let sql = match self {
            Conn::Sqlite(_) => {
                "SELECT EXISTS (SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?1)"
            }
            Conn::Postgres(_) => {
                "SELECT EXISTS (SELECT 1 FROM information_schema.tables \
                 WHERE table_schema = current_schema() AND table_name = ?1)"
            }
        };
        first(self.query(sql, vec![Value::Text(name.to_owned())])?)?.get(0)
    }

    pub(crate) fn has_column(&self, table: &str, column: &str) -> Result<bool, StoreError> {
        let sql = match self {
            Conn::Sqlite(_) => "SELECT COUNT(*) > 0 FROM pragma_table_info(?1) WHERE name = ?2",
            Conn::Postgres(_) => {
                "SELECT EXISTS (SELECT 1 FROM information_schema.columns \
                 WHERE table_schema = current_schema() AND table_name = ?1 AND column_name = ?2)"
            }
        };
        first(self.query(sql, vec![Value::Text(table.to_owned()), Value::Text(column.to_owned())])?)?.get(0)
    }
}

fn first(rows: Vec<Row>) -> Result<Row, StoreError> {
    rows.into_iter().next().ok_or(StoreError::NoRows)
}

/// A transaction of [`crate::Db::transaction`] or [`crate::Db::call`], on either backend: the
/// SQL of the portable subset ([`crate::sql`]), and what the store keeps of it: the instance
/// that owns the outbox rows it adds ([`crate::outbox::push`]), and those rows, handed to the
/// relay once the transaction committed.
pub struct Tx<'a> {
    pub(crate) conn: &'a Conn,
    pub(crate) owner: &'a str,
    /// The outbox rows added, each with its `seq` once the database has answered.
    pub(crate) pushed: RefCell<Vec<(Seq, Outgoing)>>,
    /// What to run once this transaction is committed ([`Tx::on_commit`]).
    pub(crate) committed: RefCell<Vec<AfterCommit>>,
}

/// The rows of a query sent ahead of the statements after it ([`Tx::prefetch`]).
pub struct Prefetched(Fetch);

enum Fetch {
    Read(Vec<Row>),
    /// Sent on PostgreSQL, its rows here once the answer is read.
    Sent(Rc<RefCell<Option<Vec<tokio_postgres::Row>>>>),
}

impl Prefetched {
    /// Its rows: read already if a later statement waited for its answer, otherwise read now.
    pub fn rows(self, tx: &Tx<'_>) -> Result<Vec<Row>, StoreError> {
        match self.0 {
            Fetch::Read(rows) => Ok(rows),
            Fetch::Sent(slot) => {
                if slot.borrow().is_none() {
                    tx.conn.settle()?;
                }
                let rows = slot.borrow_mut().take().ok_or(StoreError::NoRows)?;
                rows.iter().map(pg::row).collect()
            }
        }
    }

    /// Its first row, if any.
    pub fn first(self, tx: &Tx<'_>) -> Result<Option<Row>, StoreError> {
        Ok(self.rows(tx)?.into_iter().next())
    }
}

/// An outbox row's `seq`, set once the database has answered its insert.
pub(crate) type Seq = Arc<OnceLock<i64>>;

/// Work run once a transaction is committed: never for one rolled back or tried again.
pub(crate) type AfterCommit = Box<dyn FnOnce() + Send>;

impl Tx<'_> {
    /// Run one statement; the rows it changed.
    pub fn execute(&self, sql: &str, params: impl Params) -> Result<usize, StoreError> {
        self.conn.execute(sql, params.values())
    }

    /// Run a write whose count nobody reads and whose error the caller only passes on. On
    /// PostgreSQL it is sent without waiting (pipelined), and its answer read with the next
    /// one needed: the member's own next read, or else the next member's first answer or the
    /// `COMMIT`. Its error is never lost: it fails its member, and the group's members it
    /// undid with it are tried again ([`StoreError::Neighbour`]). Use [`Tx::execute`] where an
    /// error must be seen at this statement.
    pub fn write(&self, sql: &str, params: impl Params) -> Result<(), StoreError> {
        self.conn.write(sql, params.values())
    }

    /// The first row of a query, mapped by `f`; [`StoreError::NoRows`] when there is none (see
    /// [`crate::OptionalExtension::optional`]).
    pub fn query_row<T>(
        &self,
        sql: &str,
        params: impl Params,
        f: impl FnOnce(&Row) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        f(&first(self.conn.query(sql, params.values())?)?)
    }

    /// Every row of a query, each mapped by `f`.
    pub fn query_map<T>(
        &self,
        sql: &str,
        params: impl Params,
        f: impl FnMut(&Row) -> Result<T, StoreError>,
    ) -> Result<Vec<T>, StoreError> {
        self.conn.query(sql, params.values())?.iter().map(f).collect()
    }

    /// Send a query now and read its rows later ([`Prefetched::rows`]): on PostgreSQL its
    /// answer comes back with the next one the handler waits for, so two reads that do not
    /// depend on each other cost one round trip. On SQLite it runs at once.
    pub fn prefetch(&self, sql: &str, params: impl Params) -> Result<Prefetched, StoreError> {
        self.conn.prefetch(sql, params.values())
    }

    /// Statements without parameters, separated by `;`.
    pub fn execute_batch(&self, sql: &str) -> Result<(), StoreError> {
        self.conn.batch(sql)
    }

    /// [`Tx::execute_batch`] whose errors the caller only passes on: on PostgreSQL sent
    /// without waiting, like [`Tx::write`].
    pub(crate) fn write_batch(&self, sql: &str) -> Result<(), StoreError> {
        match self.conn {
            Conn::Sqlite(c) => c.batch(sql),
            Conn::Postgres(c) => {
                c.borrow_mut().write_batch(sql);
                Ok(())
            }
        }
    }

    /// Run `ddl` (statements that create what is missing: `CREATE TABLE IF NOT EXISTS`...) for
    /// a table outside the numbered migrations, one that only some runs need, under the guard
    /// the migrations take. On PostgreSQL, `IF NOT EXISTS` does not keep two instances creating
    /// the table at the same moment from failing ("relation already exists", a duplicate key in
    /// `pg_type`): the schema's advisory lock, held to the end of the transaction, makes the
    /// second wait and then find it. SQLite's write lock already serializes them.
    pub fn create_if_missing(&self, ddl: &str) -> Result<(), StoreError> {
        if let Conn::Postgres(_) = self.conn {
            self.conn.query(
                &format!("SELECT 1 FROM (SELECT pg_advisory_xact_lock(hashtext('{}' || current_schema()))) AS held", crate::pg::SCHEMA_LOCK),
                Vec::new(),
            )?;
        }
        self.conn.batch(ddl)
    }

    /// Whether the component's store has the table `name`: a reader of a table that only some
    /// runs create (the fault plan's `faults`) asks first.
    pub fn has_table(&self, name: &str) -> Result<bool, StoreError> {
        self.conn.has_table(name)
    }

    /// Whether `table` has `column` (a reader of stores written by older builds asks first).
    pub fn has_column(&self, table: &str, column: &str) -> Result<bool, StoreError> {
        self.conn.has_column(table, column)
    }

    pub(crate) fn is_postgres(&self) -> bool {
        self.conn.is_postgres()
    }

    /// The instance whose relay publishes the outbox rows of this transaction.
    pub(crate) fn owner(&self) -> &str {
        self.owner
    }

    /// Run `f` once this transaction is committed, and not at all if it is rolled back (a
    /// conflict retried runs it once, for the try that committed): what metrics count.
    pub fn on_commit(&self, f: impl FnOnce() + Send + 'static) {
        self.committed.borrow_mut().push(Box::new(f));
    }

    /// Add the outbox row `msg` with `insert` (an `INSERT … RETURNING seq`), for the relay's
    /// feed once it is committed. On PostgreSQL its answer is read with the member's others:
    /// the relay needs the `seq` only after the commit.
    pub(crate) fn push_row(
        &self,
        insert: &str,
        params: impl Params,
        msg: Outgoing,
    ) -> Result<(), StoreError> {
        let seq = Seq::default();
        self.conn.insert_returning(insert, params.values(), &seq)?;
        self.pushed.borrow_mut().push((seq, msg));
        Ok(())
    }

    /// The SQLite connection under this transaction, for the tests of SQLite's own behaviour
    /// (a full disk, made with its pragmas).
    #[cfg(test)]
    pub(crate) fn sqlite(&self) -> &rusqlite::Connection {
        match self.conn {
            Conn::Sqlite(c) => &c.conn,
            Conn::Postgres(_) => panic!("not a SQLite store"),
        }
    }
}
