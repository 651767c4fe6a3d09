//! The PostgreSQL backend: every component in a schema of its own in one database, so that a
//! service still owns its data while its state outlives any one machine.
//!
//! It uses the `postgres` crate, the blocking face of `tokio-postgres` by the same
//! maintainers: the store runs every statement on the component's own database thread (as it
//! does for SQLite), so a transaction never spans an `.await` and concurrent handlers share one
//! commit. One connection per thread: no pool is needed, and the connection is opened again
//! when it is lost.

use std::collections::HashMap;
use std::error::Error;
use std::str::FromStr;
use std::time::Duration;

use bytes::BytesMut;
use postgres::error::SqlState;
use postgres::types::{IsNull, ToSql, Type, to_sql_checked};
use postgres::{Client, NoTls, Statement};

use crate::StoreError;
use crate::sql::{Row, Value, to_postgres};

/// How long a connection attempt may take before it counts as failed (an outage).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// How long sent data may stay unacknowledged before the connection counts as lost: a
/// primary that vanished (its machine died) fails the statements waiting on it within this.
const USER_TIMEOUT: Duration = Duration::from_secs(10);

pub(crate) struct PgConn {
    client: Client,
    config: postgres::Config,
    schema: String,
    /// Each statement prepared once per connection, by its text in the portable subset.
    prepared: HashMap<String, Statement>,
    read_only: bool,
    open_tx: bool,
    /// Transaction control not sent yet: it rides with the next simple query (the `BEGIN`
    /// with the first member's `SAVEPOINT`, a member's `RELEASE` with the next one's), so
    /// that a handler's transaction costs two round trips of control, not four.
    pending: String,
}

/// The connection settings of `url`, with the store's timeouts where the URL sets none; the
/// error says what is wrong with it (never the password).
pub(crate) fn config(url: &str) -> Result<postgres::Config, OpenError> {
    let mut config = postgres::Config::from_str(url).map_err(OpenError::BadUrl)?;
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
    config: &postgres::Config,
    schema: &str,
    migrations: &[&str],
    read_only: bool,
) -> Result<Option<PgConn>, OpenError> {
    let mut client = config.connect(NoTls)?;
    if read_only {
        let exists: bool = client
            .query_one(
                "SELECT EXISTS (SELECT 1 FROM information_schema.schemata WHERE schema_name = $1)",
                &[&schema],
            )?
            .get(0);
        if !exists {
            return Ok(None);
        }
    } else {
        migrate(&mut client, schema, migrations)?;
    }
    client.batch_execute(&session(schema))?;
    Ok(Some(PgConn {
        client,
        config: config.clone(),
        schema: schema.to_owned(),
        prepared: HashMap::new(),
        read_only,
        open_tx: false,
        pending: String::new(),
    }))
}

/// The prefix of the advisory lock's key, with the schema's name, that migrations (and
/// [`crate::Tx::create_if_missing`]) hold.
pub(crate) const SCHEMA_LOCK: &str = "baton schema ";

/// Apply the migrations the schema lacks, counted in a table of its own as SQLite counts them
/// in `user_version`. Instances starting together wait for each other on an advisory lock.
fn migrate(client: &mut Client, schema: &str, all: &[&str]) -> Result<(), OpenError> {
    let mut tx = client.transaction()?;
    tx.execute("SELECT pg_advisory_xact_lock(hashtext($1 || $2))", &[&SCHEMA_LOCK, &schema])?;
    tx.batch_execute(&format!(
        "CREATE SCHEMA IF NOT EXISTS {s};
         SET LOCAL search_path TO {s};
         CREATE TABLE IF NOT EXISTS schema_version (version BIGINT NOT NULL);",
        s = quoted(schema)
    ))?;
    let done: Option<i64> = tx.query_opt("SELECT version FROM schema_version", &[])?.map(|r| r.get(0));
    let applied = crate::migrations_to_apply(done.unwrap_or(0), all.len())?;
    for (i, sql) in all.iter().enumerate().skip(applied) {
        tracing::debug!(migration = i + 1, schema, "applying migration");
        tx.batch_execute(&to_postgres(sql)).map_err(|source| OpenError::Migration { n: i + 1, source })?;
    }
    let version = all.len() as i64;
    match done {
        None => tx.execute("INSERT INTO schema_version (version) VALUES ($1)", &[&version]),
        Some(v) if v != version => tx.execute("UPDATE schema_version SET version = $1", &[&version]),
        Some(_) => Ok(0),
    }?;
    Ok(tx.commit()?)
}

/// Why a store could not be opened: the cause under [`crate::StoreError::Open`], or why
/// [`crate::Location::check`] refused a database URL.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    /// The URL does not parse: the user must fix it.
    #[error("the database URL is not a PostgreSQL URL ({0}): expected postgres://user@host:port/db")]
    BadUrl(#[source] postgres::Error),
    /// The server could not be reached, or refused a statement of the opening.
    #[error("{}", describe(.0))]
    Driver(#[from] postgres::Error),
    /// A migration failed: the schema stays at the version before it.
    #[error("migration {n} failed: {}", describe(.source))]
    Migration {
        n: usize,
        #[source]
        source: postgres::Error,
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
pub(crate) fn describe(e: &postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => format!("{} ({})", db.message(), db.code().code()),
        None => e.source().map_or_else(|| e.to_string(), |s| format!("{e}: {s}")),
    }
}

/// Whether this is an outage rather than a fault of the statement: the connection is lost or
/// cannot be made, the server is shutting down or out of resources, or the transaction lost a
/// conflict with another instance's (serialization failure, deadlock). The same work goes
/// through when tried again.
pub(crate) fn is_outage(e: &postgres::Error) -> bool {
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
            SqlState::LOCK_NOT_AVAILABLE,
            // This session was ended for idling in a transaction: it was frozen (see [`SESSION`]).
            SqlState::IDLE_IN_TRANSACTION_SESSION_TIMEOUT,
        ]
        .contains(code)
}

/// The server's disk is full (or its quota spent).
pub(crate) fn is_disk_full(e: &postgres::Error) -> bool {
    e.code().is_some_and(|c| [SqlState::DISK_FULL, SqlState::INSUFFICIENT_RESOURCES].contains(c))
}

/// A serialization failure or a deadlock: another transaction won, and this one can run again.
pub(crate) fn is_conflict(e: &postgres::Error) -> bool {
    e.code()
        .is_some_and(|c| [SqlState::T_R_SERIALIZATION_FAILURE, SqlState::T_R_DEADLOCK_DETECTED].contains(c))
}

impl PgConn {
    fn statement(&mut self, sql: &str) -> Result<Statement, postgres::Error> {
        if let Some(s) = self.prepared.get(sql) {
            return Ok(s.clone());
        }
        let s = self.client.prepare(&to_postgres(sql))?;
        self.prepared.insert(sql.to_owned(), s.clone());
        Ok(s)
    }

    /// Send the transaction control held back, before a statement that cannot carry it.
    fn flush(&mut self) -> Result<(), StoreError> {
        if !self.pending.is_empty() {
            let pending = std::mem::take(&mut self.pending);
            self.client.batch_execute(&pending)?;
        }
        Ok(())
    }

    pub(crate) fn execute(&mut self, sql: &str, values: Vec<Value>) -> Result<usize, StoreError> {
        self.flush()?;
        let stmt = self.statement(sql)?;
        let params: Vec<&(dyn ToSql + Sync)> = values.iter().map(|v| v as &(dyn ToSql + Sync)).collect();
        Ok(self.client.execute(&stmt, &params)? as usize)
    }

    pub(crate) fn query(&mut self, sql: &str, values: Vec<Value>) -> Result<Vec<Row>, StoreError> {
        self.flush()?;
        let stmt = self.statement(sql)?;
        let params: Vec<&(dyn ToSql + Sync)> = values.iter().map(|v| v as &(dyn ToSql + Sync)).collect();
        self.client.query(&stmt, &params)?.iter().map(row).collect()
    }

    pub(crate) fn batch(&mut self, sql: &str) -> Result<(), StoreError> {
        let text = sql.trim();
        let ends = text.eq_ignore_ascii_case("COMMIT") || text.eq_ignore_ascii_case("ROLLBACK");
        if ends {
            self.open_tx = false;
            // A savepoint's release is implied by the end of its transaction; a transaction
            // that never ran a statement needs no round trip to end.
            let never_begun = self.pending.starts_with("BEGIN");
            self.pending.clear();
            if never_begun {
                return Ok(());
            }
        }
        let sql = to_postgres(sql);
        if self.pending.is_empty() {
            return Ok(self.client.batch_execute(&sql)?);
        }
        let mut pending = std::mem::take(&mut self.pending);
        pending.push_str(&sql);
        Ok(self.client.batch_execute(&pending)?)
    }

    /// Begin a transaction with the next statement (see `pending`).
    pub(crate) fn begin(&mut self, relaxed: bool) -> Result<(), StoreError> {
        let sql = if self.read_only {
            "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY; "
        } else if relaxed {
            "BEGIN ISOLATION LEVEL READ COMMITTED; "
        } else {
            "BEGIN ISOLATION LEVEL SERIALIZABLE; "
        };
        self.pending.clear();
        self.pending.push_str(sql);
        self.open_tx = true;
        Ok(())
    }

    /// Send `control` (a savepoint's `RELEASE`) with the next statement: a `COMMIT` implies
    /// a release, and the next member's `SAVEPOINT` carries it.
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
        let mut client = self.config.connect(NoTls)?;
        client.batch_execute(&session(&self.schema))?;
        tracing::info!(schema = %self.schema, "reconnected to PostgreSQL");
        self.client = client;
        self.prepared.clear();
        self.open_tx = false;
        self.pending.clear();
        Ok(())
    }
}

/// A row of PostgreSQL as the store's values: the types the portable subset produces.
fn row(r: &postgres::Row) -> Result<Row, StoreError> {
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
