//! Throw-away PostgreSQL databases: one per test, per comparison run or per bench row, created
//! from a server URL and dropped when done, so that runs never see each other's rows.

use crate::{Location, StoreError};

/// A database created for one run, dropped (with whatever is still connected to it) on drop.
pub struct ScratchDatabase {
    server: String,
    name: String,
    location: Location,
}

/// The PostgreSQL server the tests use unless `BATON_TEST_DATABASE_URL` names another: the one
/// `scripts/test.sh` makes sure runs, with trust auth for `postgres`.
pub const TEST_SERVER: &str = "postgres://postgres@127.0.0.1:5432/postgres";

/// The tests' PostgreSQL server.
pub fn test_server() -> String {
    std::env::var("BATON_TEST_DATABASE_URL").unwrap_or_else(|_| TEST_SERVER.to_owned())
}

impl ScratchDatabase {
    /// Create a database named `<prefix>_<random>` on the server of `url` (any database of it:
    /// the user needs the right to create databases).
    pub fn create(url: &str, prefix: &str) -> Result<ScratchDatabase, StoreError> {
        let name = format!("{prefix}_{}", uuid::Uuid::new_v4().simple()).to_ascii_lowercase();
        let mut db_url = url::Url::parse(url)
            .map_err(|e| StoreError::Open { path: "(database URL)".into(), cause: e.into() })?;
        db_url.set_path(&format!("/{name}"));
        admin(url, format!("CREATE DATABASE \"{name}\""))?;
        Ok(ScratchDatabase { server: url.to_owned(), name, location: Location::Postgres(db_url.to_string()) })
    }

    /// Where the components of this run keep their state.
    pub fn location(&self) -> &Location {
        &self.location
    }

    pub fn url(&self) -> &str {
        match &self.location {
            Location::Postgres(url) => url,
            Location::Dir(_) => unreachable!("a scratch database is PostgreSQL"),
        }
    }
}

impl Drop for ScratchDatabase {
    fn drop(&mut self) {
        if let Err(e) = admin(&self.server, format!("DROP DATABASE IF EXISTS \"{}\" WITH (FORCE)", self.name))
        {
            tracing::warn!(database = %self.name, error = %e, "could not drop a scratch database");
        }
    }
}

/// Run one statement on the server, from a thread of its own: the blocking driver must not run
/// on an async worker, and this may be called from one.
fn admin(url: &str, sql: String) -> Result<(), StoreError> {
    let config = crate::pg::config(url)
        .map_err(|cause| StoreError::Open { path: "(database URL)".into(), cause: cause.into() })?;
    std::thread::spawn(move || -> Result<(), StoreError> {
        let mut client = postgres::Config::from(config).connect(postgres::NoTls)?;
        client.batch_execute(&sql)?;
        Ok(())
    })
    .join()
    .map_err(|_| StoreError::Closed("a scratch database's admin thread".into()))?
}
