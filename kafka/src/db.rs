//! A service's SQLite database: a connection pool, migrations run at start-up, and the one way
//! to change state — [`Database::write`] — which commits the events the change causes into the
//! outbox in the same transaction and then wakes the [`OutboxRelay`](crate::OutboxRelay).

use crate::outbox;
use diesel::connection::SimpleConnection;
use diesel::r2d2::{ConnectionManager, CustomizeConnection};
use diesel::sqlite::SqliteConnection;
use diesel_migrations::{EmbeddedMigrations, MigrationHarness, embed_migrations};
use events::Envelope;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{Notify, watch};
use tokio_util::sync::CancellationToken;

/// The outbox and inbox tables, present in every service database.
const PLUMBING_MIGRATIONS: EmbeddedMigrations = embed_migrations!("migrations");

/// A pooled SQLite connection pool.
pub type Pool = r2d2::Pool<ConnectionManager<SqliteConnection>>;

/// A database operation failed.
#[derive(Debug, thiserror::Error)]
pub enum DbError {
    /// No connection could be had in time.
    #[error("database connection pool: {0}")]
    Pool(#[from] r2d2::Error),
    /// A statement failed.
    #[error("database query: {0}")]
    Query(#[from] diesel::result::Error),
    /// Opening the database or migrating it failed.
    #[error("database set-up: {0}")]
    Setup(String),
    /// The blocking task running the statement died.
    #[error("database task: {0}")]
    Task(String),
}

impl DbError {
    /// True unless the failure is about the data being written: a busy or locked database, a
    /// full disk, an I/O error, a read-only or missing file, an exhausted pool all go away
    /// once the environment is fixed, so an event that meets them is retried (and `/health`
    /// shows it), never parked — parking would lose its effect. A constraint violation is
    /// about the data and a panicked task is a bug; both would repeat.
    pub fn is_transient(&self) -> bool {
        use diesel::result::{DatabaseErrorKind as Kind, Error};
        match self {
            DbError::Query(Error::DatabaseError(
                Kind::UniqueViolation
                | Kind::ForeignKeyViolation
                | Kind::NotNullViolation
                | Kind::CheckViolation,
                _,
            )) => false,
            DbError::Task(_) => false,
            DbError::Pool(_) | DbError::Query(_) | DbError::Setup(_) => true,
        }
    }
}

/// Per-connection settings: WAL so readers never block the writer, and a busy timeout so a
/// writer waits for the lock instead of failing at once.
#[derive(Debug)]
struct SqlitePragmas;

impl CustomizeConnection<SqliteConnection, diesel::r2d2::Error> for SqlitePragmas {
    fn on_acquire(&self, conn: &mut SqliteConnection) -> Result<(), diesel::r2d2::Error> {
        conn.batch_execute(
            "PRAGMA busy_timeout = 10000; PRAGMA journal_mode = WAL; \
             PRAGMA synchronous = NORMAL; PRAGMA foreign_keys = ON;",
        )
        .map_err(diesel::r2d2::Error::QueryError)
    }
}

/// A service's database plus the signal that tells its outbox relay a new event was committed.
#[derive(Clone)]
pub struct Database {
    pool: Pool,
    outbox_committed: Arc<Notify>,
    /// Counts committed writes; live views (the dashboard's event stream) wait on it.
    commits: Arc<watch::Sender<u64>>,
}

impl Database {
    /// Opens (creating if needed) the SQLite file at `url` and runs the plumbing migrations and
    /// then the service's own.
    pub fn open(url: &str, migrations: EmbeddedMigrations) -> Result<Self, DbError> {
        let path = url.strip_prefix("sqlite://").unwrap_or(url);
        if let Some(dir) = std::path::Path::new(path).parent()
            && !dir.as_os_str().is_empty()
        {
            std::fs::create_dir_all(dir).map_err(|e| {
                DbError::Setup(format!("cannot create directory {}: {e}", dir.display()))
            })?;
        }
        let pool = r2d2::Pool::builder()
            .max_size(8)
            .connection_timeout(Duration::from_secs(10))
            .connection_customizer(Box::new(SqlitePragmas))
            .build(ConnectionManager::<SqliteConnection>::new(path))
            .map_err(|e| DbError::Setup(format!("cannot open {path}: {e}")))?;
        let mut conn = pool.get()?;
        for source in [PLUMBING_MIGRATIONS, migrations] {
            conn.run_pending_migrations(source)
                .map_err(|e| DbError::Setup(format!("migrating {path}: {e}")))?;
        }
        Ok(Database {
            pool,
            outbox_committed: Arc::new(Notify::new()),
            commits: Arc::new(watch::Sender::new(0)),
        })
    }

    /// Runs a read on a blocking thread.
    pub async fn read<T, E, F>(&self, f: F) -> Result<T, E>
    where
        F: FnOnce(&mut SqliteConnection) -> Result<T, E> + Send + 'static,
        T: Send + 'static,
        E: From<DbError> + Send + 'static,
    {
        let pool = self.pool.clone();
        tokio::task::spawn_blocking(move || {
            let mut conn = pool.get().map_err(DbError::from)?;
            f(&mut conn)
        })
        .await
        .map_err(|e| E::from(DbError::Task(e.to_string())))?
    }

    /// Changes state and commits the events the change causes into the outbox, in one
    /// transaction; then wakes the relay. `f` returns its result and the events to publish.
    ///
    /// The transaction takes the write lock up front (`BEGIN IMMEDIATE`) so two writers never
    /// deadlock upgrading a read lock.
    pub async fn write<T, E, F>(&self, f: F) -> Result<T, E>
    where
        F: FnOnce(&mut SqliteConnection) -> Result<(T, Vec<Envelope>), E> + Send + 'static,
        T: Send + 'static,
        E: From<DbError> + From<diesel::result::Error> + Send + 'static,
    {
        let pool = self.pool.clone();
        let (value, published) = tokio::task::spawn_blocking(move || {
            let mut conn = pool.get().map_err(DbError::from)?;
            conn.immediate_transaction(|conn| {
                let (value, events) = f(conn)?;
                outbox::enqueue(conn, &events)?;
                Ok::<_, E>((value, !events.is_empty()))
            })
        })
        .await
        .map_err(|e| E::from(DbError::Task(e.to_string())))??;
        if published {
            self.outbox_committed.notify_one();
        }
        self.commits.send_modify(|n| *n = n.wrapping_add(1));
        Ok(value)
    }

    /// Changes whenever a write commits: a live view re-reads what it shows after
    /// `changed()`, instead of polling.
    pub fn commits(&self) -> watch::Receiver<u64> {
        self.commits.subscribe()
    }

    /// Answers when the database can run a statement (for `/health`).
    pub async fn ping(&self) -> Result<(), DbError> {
        self.read(|conn| conn.batch_execute("SELECT 1").map_err(DbError::from))
            .await
    }

    /// Copies the write-ahead log into the database and empties it, waiting (busy timeout) for
    /// readers of older snapshots to finish. SQLite's automatic checkpoints never wait, so
    /// under steady load, with a reader always open somewhere, they never reach the end of
    /// the log and it grows without bound (measured: 2.5 GB after a minute of overload).
    pub async fn checkpoint(&self) -> Result<(), DbError> {
        self.read(|conn| {
            conn.batch_execute("PRAGMA wal_checkpoint(TRUNCATE)")
                .map_err(DbError::from)
        })
        .await
    }

    /// Runs [`Database::checkpoint`] every `every` until `stop`.
    pub async fn checkpoint_every(self, every: Duration, stop: CancellationToken) {
        loop {
            tokio::select! {
                _ = tokio::time::sleep(every) => {}
                _ = stop.cancelled() => return,
            }
            if let Err(e) = self.checkpoint().await {
                log::warn!("write-ahead log checkpoint: {e}");
            }
        }
    }

    /// Tells the relay that rows were committed outside [`Database::write`]'s event list
    /// (dead letters).
    pub(crate) fn wake_relay(&self) {
        self.outbox_committed.notify_one();
    }

    /// Fires whenever a transaction committed at least one outbox row.
    pub(crate) fn outbox_committed(&self) -> Arc<Notify> {
        self.outbox_committed.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use diesel::result::{DatabaseErrorKind as Kind, Error};

    fn query(kind: Kind, message: &str) -> DbError {
        DbError::Query(Error::DatabaseError(kind, Box::new(message.to_owned())))
    }

    #[test]
    fn environment_failures_are_retried_and_data_failures_are_not() {
        for message in [
            "database is locked",
            "database or disk is full",
            "disk I/O error",
            "attempt to write a readonly database",
            "unable to open database file",
        ] {
            assert!(query(Kind::Unknown, message).is_transient(), "{message}");
        }
        for kind in [
            Kind::UniqueViolation,
            Kind::CheckViolation,
            Kind::NotNullViolation,
            Kind::ForeignKeyViolation,
        ] {
            assert!(!query(kind, "constraint failed").is_transient(), "{kind:?}");
        }
        assert!(!DbError::Task("panicked".into()).is_transient());
    }

    #[tokio::test]
    async fn a_checkpoint_empties_the_write_ahead_log() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("wal.db");
        let db = Database::open(path.to_str().unwrap(), PLUMBING_MIGRATIONS).unwrap();
        for i in 0..200 {
            db.write(move |conn| {
                conn.batch_execute(&format!(
                    "INSERT INTO processed_events VALUES ('{i}', 'T', '{}')",
                    "x".repeat(2000)
                ))?;
                Ok::<_, DbError>(((), Vec::new()))
            })
            .await
            .unwrap();
        }
        let wal = dir.path().join("wal.db-wal");
        assert!(std::fs::metadata(&wal).unwrap().len() > 0);
        db.checkpoint().await.unwrap();
        assert_eq!(std::fs::metadata(&wal).unwrap().len(), 0, "log emptied");
    }

    #[test]
    fn a_read_only_database_is_retried_not_parked() {
        // A real SQLite error, not a hand-made one: writing to a database opened read-only.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ro.db");
        drop(Database::open(path.to_str().unwrap(), PLUMBING_MIGRATIONS).unwrap());
        let mut conn = <SqliteConnection as diesel::Connection>::establish(&format!(
            "file:{}?mode=ro",
            path.display()
        ))
        .unwrap();
        let err = DbError::from(
            conn.batch_execute("INSERT INTO processed_events VALUES ('x', 'y', 'z')")
                .unwrap_err(),
        );
        assert!(err.to_string().contains("readonly"), "{err}");
        assert!(err.is_transient());
    }
}
