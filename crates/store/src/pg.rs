//! The PostgreSQL backend: every component in a schema of its own in one database, so that a
//! service still owns its data while its state outlives any one machine.
//!
//! It uses `tokio-postgres` on a runtime of the component's own database thread, which blocks
//! on each answer it needs: the store runs every statement there (as it does for SQLite), so a
//! transaction never spans an `.await` of the caller and concurrent handlers share one commit.
//! What that gains over a blocking client is pipelining: a write whose answer nobody reads
//! ([`crate::Tx::write`]), a read sent ahead ([`crate::Tx::prefetch`]) and the transaction
//! control are sent at once and read with the next answer that is needed, so a handler's
//! statements share round trips. One connection per thread: no pool is needed, and the
//! connection is opened again when it is lost.

use std::cell::RefCell;
use std::collections::HashMap;
use std::error::Error;
use std::future::Future;
use std::pin::Pin;
use std::rc::Rc;
use std::str::FromStr;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use bytes::BytesMut;
use futures_util::TryStreamExt;
use futures_util::future::{MaybeDone, maybe_done};
use tokio_postgres::error::SqlState;
use tokio_postgres::types::{IsNull, ToSql, Type, to_sql_checked};
use tokio_postgres::{Client, NoTls, Statement};

use crate::sql::{Row, Value, to_postgres};
use crate::{Isolation, Level, StoreError};

/// How long a connection attempt may take before it counts as failed (an outage).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// How long sent data may stay unacknowledged before the connection counts as lost: a
/// primary that vanished (its machine died) fails the statements waiting on it within this.
const USER_TIMEOUT: Duration = Duration::from_secs(10);

/// A request sent whose answer is not read yet.
type Unread = MaybeDone<Pin<Box<dyn Future<Output = Result<(), tokio_postgres::Error>>>>>;

pub(crate) struct PgConn {
    /// Drives the connection's I/O while the thread waits for an answer.
    rt: tokio::runtime::Runtime,
    client: Arc<Client>,
    config: tokio_postgres::Config,
    schema: String,
    /// Each statement prepared once per connection, by its text in the portable subset.
    prepared: HashMap<String, Statement>,
    read_only: bool,
    open_tx: bool,
    /// Transaction control not sent yet: it goes out with the next request (the `BEGIN` and
    /// the first member's `SAVEPOINT` ahead of its first statement, a member's `RELEASE` with
    /// the next one's `SAVEPOINT`), so that it costs no round trip of its own.
    pending: String,
    /// Requests sent whose answers nobody has read yet, in order, each with the group member
    /// that sent it: writes ([`PgConn::write`]), reads sent ahead ([`crate::Tx::prefetch`]),
    /// outbox inserts and transaction control. Read before the next answer that is needed, by
    /// the next member's first one, or with the `COMMIT`.
    unread: Vec<(u32, Unread)>,
    /// The member of the group commit running now, from 1; 0 once the group ends.
    member: u32,
    /// A request of an earlier member that failed, found as a later answer was read: it
    /// aborted the transaction, so nothing its member or those after it sent took effect
    /// ([`PgConn::take_culprit`]).
    culprit: Option<(u32, tokio_postgres::Error)>,
}

/// The connection settings of `url`, with the store's timeouts where the URL sets none; the
/// error says what is wrong with it (never the password).
pub(crate) fn config(url: &str) -> Result<tokio_postgres::Config, OpenError> {
    let mut config = tokio_postgres::Config::from_str(url).map_err(OpenError::BadUrl)?;
    if config.get_connect_timeout().is_none() {
        config.connect_timeout(CONNECT_TIMEOUT);
    }
    config.tcp_user_timeout(USER_TIMEOUT);
    config.keepalives_idle(Duration::from_secs(5));
    if config.get_application_name().is_none() {
        config.application_name("baton");
    }
    Ok(config)
}

/// Set on every session. A process frozen in the middle of a transaction (SIGSTOP, a VM
/// stall) would hold its row locks for as long as it is frozen, and stall every other instance
/// that touches those rows: the server ends such a session after a few idle seconds, which
/// frees its locks and rolls its work back (the frozen instance finds its connection gone when
/// it wakes, and its deliveries were redelivered to the others). A lock still waited for after
/// `lock_timeout` fails the statement, which is retried, rather than hold the database thread.
const SESSION: &str = "SET idle_in_transaction_session_timeout = '5s'; SET lock_timeout = '10s'";

/// The statements that set up a session of `schema`.
fn session(schema: &str) -> String {
    format!("{SESSION}; SET search_path TO {}", quoted(schema))
}

/// A schema name is a component's name: plain lower-case words, quoted all the same.
fn quoted(schema: &str) -> String {
    format!("\"{}\"", schema.replace('"', "\"\""))
}

/// Connect to `schema` of the database, creating and migrating it first (unless `read_only`).
/// `None` for a reader whose schema does not exist yet.
pub(crate) fn open(
    config: &tokio_postgres::Config,
    schema: &str,
    migrations: &[&str],
    read_only: bool,
) -> Result<Option<PgConn>, OpenError> {
    let rt =
        tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(OpenError::Runtime)?;
    let opened = rt.block_on(async {
        let mut client = connect(config).await?;
        if read_only {
            let exists: bool = client
                .query_one(
                    "SELECT EXISTS (SELECT 1 FROM information_schema.schemata WHERE schema_name = $1)",
                    &[&schema],
                )
                .await?
                .get(0);
            if !exists {
                return Ok(None);
            }
        } else {
            migrate(&mut client, schema, migrations).await?;
        }
        client.batch_execute(&session(schema)).await?;
        Ok::<_, OpenError>(Some(client))
    })?;
    Ok(opened.map(|client| PgConn {
        rt,
        client: Arc::new(client),
        config: config.clone(),
        schema: schema.to_owned(),
        prepared: HashMap::new(),
        read_only,
        open_tx: false,
        pending: String::new(),
        unread: Vec::new(),
        member: 0,
        culprit: None,
    }))
}

/// Connect, the connection's I/O driven by the current runtime (the database thread's).
async fn connect(config: &tokio_postgres::Config) -> Result<Client, tokio_postgres::Error> {
    let (client, connection) = config.connect(NoTls).await?;
    // Ends when the client is dropped or the server goes: the client then says it is closed.
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            tracing::debug!(error = %e, "a PostgreSQL connection ended");
        }
    });
    Ok(client)
}

/// The prefix of the advisory lock's key, with the schema's name, that migrations (and
/// [`crate::Tx::create_if_missing`]) hold.
pub(crate) const SCHEMA_LOCK: &str = "baton schema ";

/// Apply the migrations the schema lacks, counted in a table of its own as SQLite counts them
/// in `user_version`. Instances starting together wait for each other on an advisory lock.
async fn migrate(client: &mut Client, schema: &str, all: &[&str]) -> Result<(), OpenError> {
    let tx = client.transaction().await?;
    tx.execute("SELECT pg_advisory_xact_lock(hashtext($1 || $2))", &[&SCHEMA_LOCK, &schema]).await?;
    tx.batch_execute(&format!(
        "CREATE SCHEMA IF NOT EXISTS {s};
         SET LOCAL search_path TO {s};
         CREATE TABLE IF NOT EXISTS schema_version (version BIGINT NOT NULL);",
        s = quoted(schema)
    ))
    .await?;
    let done: Option<i64> = tx.query_opt("SELECT version FROM schema_version", &[]).await?.map(|r| r.get(0));
    let applied = crate::migrations_to_apply(done.unwrap_or(0), all.len())?;
    for (i, sql) in all.iter().enumerate().skip(applied) {
        tracing::debug!(migration = i + 1, schema, "applying migration");
        tx.batch_execute(&to_postgres(sql))
            .await
            .map_err(|source| OpenError::Migration { n: i + 1, source })?;
    }
    let version = all.len() as i64;
    match done {
        None => tx.execute("INSERT INTO schema_version (version) VALUES ($1)", &[&version]).await,
        Some(v) if v != version => tx.execute("UPDATE schema_version SET version = $1", &[&version]).await,
        Some(_) => Ok(0),
    }?;
    Ok(tx.commit().await?)
}

/// Why a store could not be opened: the cause under [`crate::StoreError::Open`], or why
/// [`crate::Location::check`] refused a database URL.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    /// The URL does not parse: the user must fix it.
    #[error("the database URL is not a PostgreSQL URL ({0}): expected postgres://user@host:port/db")]
    BadUrl(#[source] tokio_postgres::Error),
    /// The server could not be reached, or refused a statement of the opening.
    #[error("{}", describe(.0))]
    Driver(#[from] tokio_postgres::Error),
    /// The database thread could not start the runtime its connection runs on.
    #[error("cannot start the database thread's runtime (out of threads or file descriptors?): {0}")]
    Runtime(#[source] std::io::Error),
    /// A migration failed: the schema stays at the version before it.
    #[error("migration {n} failed: {}", describe(.source))]
    Migration {
        n: usize,
        #[source]
        source: tokio_postgres::Error,
    },
    /// A migration of a SQLite store failed: the file stays at the version before it.
    #[error("migration {n} failed: {source}")]
    SqliteMigration {
        n: usize,
        #[source]
        source: rusqlite::Error,
    },
    /// The schema was written by a build that knows more migrations.
    #[error(transparent)]
    NewerSchema(#[from] crate::NewerSchema),
}

/// A driver error as a sentence, with the server's message and code when it sent one.
pub(crate) fn describe(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => format!("{} ({})", db.message(), db.code().code()),
        None => e.source().map_or_else(|| e.to_string(), |s| format!("{e}: {s}")),
    }
}

/// Whether this is an outage rather than a fault of the statement: the connection is lost or
/// cannot be made, the server is shutting down or out of resources, or the transaction lost a
/// conflict with another instance's (serialization failure, deadlock). The same work goes
/// through when tried again.
pub(crate) fn is_outage(e: &tokio_postgres::Error) -> bool {
    if e.is_closed() {
        return true;
    }
    let Some(code) = e.code() else {
        // No server error: the I/O of the connection failed.
        return true;
    };
    let class = &code.code()[..2];
    matches!(class, "08" | "53" | "57" | "58")
        || [
            SqlState::T_R_SERIALIZATION_FAILURE,
            SqlState::T_R_DEADLOCK_DETECTED,
            SqlState::UNIQUE_VIOLATION,
            SqlState::LOCK_NOT_AVAILABLE,
            // This session was ended for idling in a transaction: it was frozen (see [`SESSION`]).
            SqlState::IDLE_IN_TRANSACTION_SESSION_TIMEOUT,
        ]
        .contains(code)
}

/// The server's disk is full (or its quota spent).
pub(crate) fn is_disk_full(e: &tokio_postgres::Error) -> bool {
    e.code().is_some_and(|c| [SqlState::DISK_FULL, SqlState::INSUFFICIENT_RESOURCES].contains(c))
}

/// A serialization failure, a deadlock, or a key another transaction inserted first: that
/// one won, and this one can run again, when it sees the winner's row (every insert of a
/// unique key is checked first, so only a race between instances reaches the constraint).
pub(crate) fn is_conflict(e: &tokio_postgres::Error) -> bool {
    e.code().is_some_and(|c| {
        [SqlState::T_R_SERIALIZATION_FAILURE, SqlState::T_R_DEADLOCK_DETECTED, SqlState::UNIQUE_VIOLATION]
            .contains(c)
    })
}

impl PgConn {
    fn statement(&mut self, sql: &str) -> Result<Statement, StoreError> {
        if let Some(s) = self.prepared.get(sql) {
            return Ok(s.clone());
        }
        self.send_control();
        let (client, text) = (Arc::clone(&self.client), to_postgres(sql));
        let s = self.answer(async move { client.prepare(&text).await })?;
        self.prepared.insert(sql.to_owned(), s.clone());
        Ok(s)
    }

    /// Queue `request` on the connection without waiting for its answer: the connection
    /// writes it with the next request whose answer the thread waits for.
    fn send(&mut self, request: Pin<Box<dyn Future<Output = Result<(), tokio_postgres::Error>>>>) {
        let mut request = maybe_done(request);
        // Polled once: that is when the driver queues a request (see tokio-postgres' docs).
        self.rt.block_on(std::future::poll_fn(|cx| {
            let _ = Pin::new(&mut request).poll(cx);
            std::task::Poll::Ready(())
        }));
        self.unread.push((self.member, request));
    }

    /// Send `request` behind the unread ones, then read every answer in order: one round trip
    /// for them all. The first error among them is the answer; the ones after it only say
    /// that the transaction is aborted. When that first error is an earlier member's (or
    /// the `COMMIT` reads it), it is kept as the culprit and the answer is
    /// [`StoreError::Neighbour`].
    fn answer<T>(
        &mut self,
        request: impl Future<Output = Result<T, tokio_postgres::Error>>,
    ) -> Result<T, StoreError> {
        let unread = std::mem::take(&mut self.unread);
        let (result, failed) = self.rt.block_on(async move {
            let mut request = std::pin::pin!(request);
            let first = std::future::poll_fn(|cx| std::task::Poll::Ready(request.as_mut().poll(cx))).await;
            let mut failed = None;
            for (member, mut earlier) in unread {
                (&mut earlier).await;
                if let Some(Err(e)) = Pin::new(&mut earlier).take_output() {
                    failed.get_or_insert((member, e));
                }
            }
            let result = match first {
                std::task::Poll::Ready(r) => r,
                std::task::Poll::Pending => request.await,
            };
            (result, failed)
        });
        match failed {
            Some((member, e)) if member != self.member => {
                self.culprit.get_or_insert((member, e));
                Err(StoreError::Neighbour)
            }
            Some((_, e)) => Err(e.into()),
            None => Ok(result?),
        }
    }

    /// The member whose request failed and aborted the transaction, found while another
    /// member (or the `COMMIT`) read its answers, with that request's error.
    pub(crate) fn take_culprit(&mut self) -> Option<(u32, StoreError)> {
        self.culprit.take().map(|(member, e)| (member, e.into()))
    }

    /// Whether an earlier member's failure has aborted the transaction under this one.
    pub(crate) fn has_culprit(&self) -> bool {
        self.culprit.is_some()
    }

    /// The next member of the group begins: its `SAVEPOINT` goes out with its first request.
    pub(crate) fn next_member(&mut self) {
        self.member += 1;
        self.defer("SAVEPOINT member");
    }

    /// Send the transaction control held back (see `pending`) ahead of the next request.
    fn send_control(&mut self) {
        if !self.pending.is_empty() {
            let (client, control) = (Arc::clone(&self.client), std::mem::take(&mut self.pending));
            self.send(Box::pin(async move { client.batch_execute(&control).await }));
        }
    }

    /// Read the answers still unread: the first error among them (a read sent ahead whose rows
    /// are wanted now, or a member that failed and must undo its work before it ends).
    pub(crate) fn settle(&mut self) -> Result<(), StoreError> {
        if self.unread.is_empty() {
            return Ok(());
        }
        self.answer(std::future::ready(Ok(())))
    }

    /// The statement of `sql`, prepared once, with the control held back sent ahead of it, and
    /// the client to run it on.
    fn ready(&mut self, sql: &str) -> Result<(Statement, Arc<Client>), StoreError> {
        let stmt = self.statement(sql)?;
        self.send_control();
        Ok((stmt, Arc::clone(&self.client)))
    }

    pub(crate) fn execute(&mut self, sql: &str, values: Vec<Value>) -> Result<usize, StoreError> {
        let (stmt, client) = self.ready(sql)?;
        let n = self.answer(async move { client.execute_raw(&stmt, &values).await })?;
        Ok(n as usize)
    }

    /// [`PgConn::execute`] without reading its answer now (see `unread`).
    pub(crate) fn write(&mut self, sql: &str, values: Vec<Value>) -> Result<(), StoreError> {
        let (stmt, client) = self.ready(sql)?;
        self.send(Box::pin(async move { client.execute_raw(&stmt, &values).await.map(|_| ()) }));
        Ok(())
    }

    /// An `INSERT … RETURNING` of one integer without reading its answer now: `slot` holds the
    /// integer once the answer is read (see `unread`), and stays empty if no row came back.
    pub(crate) fn write_returning(
        &mut self,
        sql: &str,
        values: Vec<Value>,
        slot: Arc<OnceLock<i64>>,
    ) -> Result<(), StoreError> {
        let (stmt, client) = self.ready(sql)?;
        self.send(Box::pin(async move {
            let rows = client.query_raw(&stmt, &values).await?.try_collect::<Vec<_>>().await?;
            if let Some(r) = rows.first() {
                let _ = slot.set(r.try_get(0)?);
            }
            Ok(())
        }));
        Ok(())
    }

    /// [`PgConn::query`] without reading its answer now: `slot` holds the rows once read
    /// (see `unread`).
    pub(crate) fn send_query(
        &mut self,
        sql: &str,
        values: Vec<Value>,
        slot: Rc<RefCell<Option<Vec<tokio_postgres::Row>>>>,
    ) -> Result<(), StoreError> {
        let (stmt, client) = self.ready(sql)?;
        self.send(Box::pin(async move {
            let rows = client.query_raw(&stmt, &values).await?.try_collect::<Vec<_>>().await?;
            *slot.borrow_mut() = Some(rows);
            Ok(())
        }));
        Ok(())
    }

    pub(crate) fn query(&mut self, sql: &str, values: Vec<Value>) -> Result<Vec<Row>, StoreError> {
        let (stmt, client) = self.ready(sql)?;
        let rows = self
            .answer(async move { client.query_raw(&stmt, &values).await?.try_collect::<Vec<_>>().await })?;
        rows.iter().map(row).collect()
    }

    pub(crate) fn batch(&mut self, sql: &str) -> Result<(), StoreError> {
        let text = sql.trim();
        let ends = text.eq_ignore_ascii_case("COMMIT") || text.eq_ignore_ascii_case("ROLLBACK");
        if ends {
            self.open_tx = false;
            // Read as the group's, not as its last member's: any error among them aborted
            // the whole transaction.
            self.member = 0;
            // A savepoint's release is implied by the end of its transaction; a transaction
            // that never sent anything needs no round trip to end.
            let never_begun = self.pending.starts_with("BEGIN");
            self.pending.clear();
            if never_begun && self.unread.is_empty() {
                return Ok(());
            }
            if text.eq_ignore_ascii_case("ROLLBACK") {
                // What failed before is undone with the rest.
                let _ = self.settle();
            }
        }
        let mut control = std::mem::take(&mut self.pending);
        control.push_str(&to_postgres(sql));
        let client = Arc::clone(&self.client);
        self.answer(async move { client.batch_execute(&control).await })
    }

    /// [`PgConn::batch`] without reading its answer now (see `unread`): never a transaction's
    /// control, which the thread must see answered.
    pub(crate) fn write_batch(&mut self, sql: &str) {
        let mut text = std::mem::take(&mut self.pending);
        text.push_str(&to_postgres(sql));
        let client = Arc::clone(&self.client);
        self.send(Box::pin(async move { client.batch_execute(&text).await }));
    }

    /// Begin a transaction with the next statement (see `pending`).
    pub(crate) fn begin(&mut self, level: Level) -> Result<(), StoreError> {
        let sql = match level {
            _ if self.read_only => "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY; ",
            Level::Relaxed => "BEGIN ISOLATION LEVEL READ COMMITTED; ",
            Level::Isolated(Isolation::Snapshot) => "BEGIN ISOLATION LEVEL REPEATABLE READ; ",
            Level::Isolated(Isolation::Serializable) => "BEGIN ISOLATION LEVEL SERIALIZABLE; ",
            // The two-key form: apart from the migrations' one-key lock ([`SCHEMA_LOCK`]).
            Level::Isolated(Isolation::Exclusive) => {
                "BEGIN ISOLATION LEVEL READ COMMITTED; \
                 SELECT pg_advisory_xact_lock(hashtext('baton writer'), hashtext(current_schema())); "
            }
        };
        self.pending.clear();
        self.pending.push_str(sql);
        self.open_tx = true;
        self.member = 0;
        self.culprit = None;
        Ok(())
    }

    /// Send `control` (a member's `SAVEPOINT`, its `RELEASE`) with the next request: a
    /// `COMMIT` implies a release, and a member that runs no statement needs neither.
    pub(crate) fn defer(&mut self, control: &str) {
        self.pending.push_str(control);
        self.pending.push_str("; ");
    }

    pub(crate) fn in_transaction(&self) -> bool {
        self.open_tx && !self.client.is_closed()
    }

    /// Connect again after the connection was lost (the server restarted, the network failed).
    pub(crate) fn ensure_open(&mut self) -> Result<(), StoreError> {
        if !self.client.is_closed() {
            return Ok(());
        }
        let (config, setup) = (self.config.clone(), session(&self.schema));
        let client = self.rt.block_on(async move {
            let client = connect(&config).await?;
            client.batch_execute(&setup).await?;
            Ok::<_, tokio_postgres::Error>(client)
        })?;
        tracing::info!(schema = %self.schema, "reconnected to PostgreSQL");
        self.client = Arc::new(client);
        self.prepared.clear();
        self.open_tx = false;
        self.pending.clear();
        self.unread.clear();
        self.culprit = None;
        Ok(())
    }
}

/// A row of PostgreSQL as the store's values: the types the portable subset produces.
pub(crate) fn row(r: &tokio_postgres::Row) -> Result<Row, StoreError> {
    (0..r.len())
        .map(|i| {
            let ty = r.columns()[i].type_();
            let v = match *ty {
                Type::INT8 => r.try_get::<_, Option<i64>>(i)?.map(Value::Integer),
                Type::INT4 => r.try_get::<_, Option<i32>>(i)?.map(|n| Value::Integer(n.into())),
                Type::INT2 => r.try_get::<_, Option<i16>>(i)?.map(|n| Value::Integer(n.into())),
                Type::BOOL => r.try_get::<_, Option<bool>>(i)?.map(|b| Value::Integer(b.into())),
                Type::FLOAT8 => r.try_get::<_, Option<f64>>(i)?.map(Value::Real),
                Type::FLOAT4 => r.try_get::<_, Option<f32>>(i)?.map(|x| Value::Real(x.into())),
                Type::TEXT | Type::VARCHAR | Type::BPCHAR | Type::NAME | Type::UNKNOWN => {
                    r.try_get::<_, Option<String>>(i)?.map(Value::Text)
                }
                _ => {
                    return Err(StoreError::Type(format!(
                        "column `{}` is of type {ty}, which the store does not read: cast it to INTEGER or TEXT",
                        r.columns()[i].name()
                    )));
                }
            };
            Ok(v.unwrap_or(Value::Null))
        })
        .collect::<Result<_, _>>()
        .map(Row)
}

impl ToSql for Value {
    fn to_sql(&self, ty: &Type, out: &mut BytesMut) -> Result<IsNull, Box<dyn Error + Sync + Send>> {
        match (self, ty) {
            (Value::Null, _) => Ok(IsNull::Yes),
            (Value::Integer(n), &Type::INT8) => n.to_sql(ty, out),
            (Value::Integer(n), &Type::INT4) => i32::try_from(*n)?.to_sql(ty, out),
            (Value::Integer(n), &Type::INT2) => i16::try_from(*n)?.to_sql(ty, out),
            (Value::Integer(n), &Type::BOOL) => (*n != 0).to_sql(ty, out),
            (Value::Integer(n), &Type::FLOAT8) => (*n as f64).to_sql(ty, out),
            (Value::Real(x), &Type::FLOAT8) => x.to_sql(ty, out),
            (Value::Real(x), &Type::FLOAT4) => (*x as f32).to_sql(ty, out),
            (Value::Integer(n), _) if is_text(ty) => n.to_string().as_str().to_sql(ty, out),
            (Value::Text(s), _) if is_text(ty) => s.as_str().to_sql(ty, out),
            (v, ty) => Err(format!("a parameter {v:?} cannot be sent as {ty}").into()),
        }
    }

    fn accepts(_: &Type) -> bool {
        true
    }

    to_sql_checked!();
}

fn is_text(ty: &Type) -> bool {
    matches!(*ty, Type::TEXT | Type::VARCHAR | Type::BPCHAR | Type::NAME | Type::UNKNOWN)
}
