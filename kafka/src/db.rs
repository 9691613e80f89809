//! A service's database — an embedded SQLite file or a PostgreSQL database — a connection
//! pool, migrations run at start-up, and the one way to change state — [`Database::write`] —
//! which commits the events the change causes into the outbox in the same transaction and then
//! wakes the [`OutboxRelay`](crate::OutboxRelay).
//!
//! Within an instance every write goes through the writer threads ([`crate::group_commit`]):
//! one on SQLite; on PostgreSQL `PG_WRITERS` (default 3), which take the writes the first
//! leaves waiting. Across those threads and the instances of a service on PostgreSQL, a write
//! locks what it decides on before it reads it ([`lock`]: one order's saga state, one
//! product's stock, one `Idempotency-Key`; [`Lock`] lists them all), so writes about different
//! orders and products commit in parallel
//! while two decisions about one order are made one after the other, each on the other's
//! result. A consumer's write also takes its partition's lease in shared mode
//! ([`crate::leases::fence`]); a takeover waits for it. SQLite has one writer by design
//! (`BEGIN IMMEDIATE`), so there [`lock`] does nothing.

use crate::outbox;
use crate::routing::Routing;
use crate::settings::{PgLimits, SqliteSync};
use diesel::Connection;
use diesel::connection::{AnsiTransactionManager, SimpleConnection, TransactionManager};
use diesel::pg::PgConnection;
use diesel::sqlite::SqliteConnection;
use diesel_migrations::{EmbeddedMigrations, MigrationHarness, embed_migrations};
use events::Envelope;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore, watch};
use tokio_util::sync::CancellationToken;

/// A connection to either backend. Queries written once with diesel's DSL run on both; the
/// few that differ (upserts) go through [`on_backend!`](crate::on_backend).
#[derive(diesel::MultiConnection)]
pub enum DbConnection {
    /// An embedded SQLite file: one instance per service (the default).
    Sqlite(SqliteConnection),
    /// A PostgreSQL database shared by all instances of one service.
    Postgres(PgConnection),
}

/// Runs `$body` with `$c` bound to the concrete connection inside a [`DbConnection`], for the
/// statements diesel cannot build for both backends at once (`ON CONFLICT`).
#[macro_export]
macro_rules! on_backend {
    ($conn:expr, |$c:ident| $body:expr) => {
        match $conn {
            $crate::db::DbConnection::Sqlite($c) => $body,
            $crate::db::DbConnection::Postgres($c) => $body,
        }
    };
}

/// A service's migrations, one set per backend (the SQL differs: identity columns, booleans,
/// SQLite's table rebuilds).
pub struct Migrations {
    /// Applied to an SQLite file.
    pub sqlite: EmbeddedMigrations,
    /// Applied to a PostgreSQL database.
    pub postgres: EmbeddedMigrations,
}

/// The outbox, inbox, offsets, dead-letter and lease tables, present in every service
/// database. Tests of the plumbing alone pass them as the service's set too: nothing more to
/// apply.
pub const PLUMBING_MIGRATIONS: Migrations = Migrations {
    sqlite: embed_migrations!("migrations/sqlite"),
    postgres: embed_migrations!("migrations/postgres"),
};

/// Where a service keeps its state, from `DATABASE_URL`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Backend {
    /// `postgres://…` or `postgresql://…`.
    Postgres(String),
    /// A file path, or `sqlite://` followed by one.
    Sqlite(String),
}

impl Backend {
    /// Reads a `DATABASE_URL`.
    pub fn from_url(url: &str) -> Self {
        if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            Backend::Postgres(url.to_owned())
        } else {
            Backend::Sqlite(url.strip_prefix("sqlite://").unwrap_or(url).to_owned())
        }
    }
}

/// The write-ahead log file SQLite keeps when a checkpoint starts it over: reused, not
/// truncated, so a commit overwrites blocks the file has and its fsync need not also journal
/// a new file size (a truncated log grows again with every commit).
const WAL_KEPT_BYTES: u64 = 64 * 1024 * 1024;

/// The advisory lock migrations take: two instances starting at once on one database would
/// both migrate; the second waits and then finds nothing pending.
pub const MIGRATION_LOCK: i64 = 0x6d61_6c6c; // "mall"

/// What a PostgreSQL write locks before it reads what it decides on ([`lock`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lock<'a> {
    /// One order's saga state (the order in orders, its reservation in products, its delivery
    /// in delivery).
    Order(i64),
    /// One product's stock and counters.
    Product(i64),
    /// One `Idempotency-Key` in its scope.
    Key(&'a str),
    /// One lease, by name ([`crate::leases`]).
    Lease(&'a str),
    /// One dead letter being redriven or discarded.
    DeadLetter(i64),
    /// A decision made once for the service, at start-up: record the broker's identity, seed
    /// the catalog. Two instances starting at once take turns, the second seeing it made.
    Once(&'a str),
}

impl Lock<'_> {
    /// The statement taking the lock.
    fn sql(&self, shared: bool) -> String {
        format!("SELECT {}", self.call(shared))
    }

    /// The call taking the lock, with its two 32-bit halves: a namespace, and the id folded or
    /// the name hashed by the server.
    fn call(&self, shared: bool) -> String {
        let function = if shared {
            "pg_advisory_xact_lock_shared"
        } else {
            "pg_advisory_xact_lock"
        };
        let quoted = |name: &str| name.replace('\'', "''");
        match self {
            Lock::Order(id) => format!("{function}(1, {})", fold(*id)),
            Lock::Product(id) => format!("{function}(2, {})", fold(*id)),
            Lock::Key(name) => format!("{function}(3, hashtext('{}'))", quoted(name)),
            Lock::Lease(name) => format!("{function}(4, hashtext('{}'))", quoted(name)),
            Lock::DeadLetter(id) => format!("{function}(5, {})", fold(*id)),
            Lock::Once(name) => format!("{function}(6, hashtext('{}'))", quoted(name)),
        }
    }
}

/// An id as the second half of an advisory lock: two ids that fold alike only wait for each
/// other.
fn fold(id: i64) -> i32 {
    (id ^ (id >> 32)) as i32
}

/// Locks `what` until the end of the write's transaction (PostgreSQL; SQLite's writer is
/// alone anyway). Take it before reading what the write decides on: under READ COMMITTED the
/// statements after it see whatever the previous holder committed. Lock orders before
/// products; a deadlock left is retried (transient), never parked.
pub fn lock(conn: &mut DbConnection, what: Lock<'_>) -> diesel::QueryResult<()> {
    match conn {
        DbConnection::Sqlite(_) => Ok(()),
        DbConnection::Postgres(c) => c.batch_execute(&what.sql(false)),
    }
}

/// Runs `f` on `conn` and counts the statements it sent: on PostgreSQL each is a round
/// trip, so tests of the shells' hot paths pin how many they take.
pub fn counting_statements<T>(
    conn: &mut DbConnection,
    f: impl FnOnce(&mut DbConnection) -> T,
) -> (T, usize) {
    use diesel::connection::InstrumentationEvent;
    let (result, started) = watching(conn, f, |e| {
        matches!(e, InstrumentationEvent::StartQuery { .. }).then_some(())
    });
    (result, started.len())
}

/// Runs `f` on `conn` and returns, with its result, what `pick` took from each of the
/// connection's instrumentation events (for tests of what reached the database).
pub fn watching<C, T, S>(
    conn: &mut C,
    f: impl FnOnce(&mut C) -> T,
    pick: impl Fn(&diesel::connection::InstrumentationEvent<'_>) -> Option<S> + Send + 'static,
) -> (T, Vec<S>)
where
    C: Connection,
    S: Send + 'static,
{
    use diesel::connection::{Instrumentation, InstrumentationEvent};
    use std::sync::Mutex;
    let seen = Arc::new(Mutex::new(Vec::new()));
    let sink = seen.clone();
    conn.set_instrumentation(move |e: InstrumentationEvent<'_>| {
        if let Some(s) = pick(&e) {
            sink.lock().expect("not poisoned").push(s);
        }
    });
    let result = f(conn);
    conn.set_instrumentation(None::<Box<dyn Instrumentation>>);
    let seen = std::mem::take(&mut *seen.lock().expect("not poisoned"));
    (result, seen)
}

/// [`lock`], waiting as long as the holder takes: the transaction's lock and statement
/// timeouts are lifted (for its remaining statements too). For a start-up decision that may
/// wait for another instance's long one (a rebuild from the topic); a holder that stops
/// answering loses its session, and the lock, to `idle_in_transaction_session_timeout`.
pub fn lock_patiently(conn: &mut DbConnection, what: Lock<'_>) -> diesel::QueryResult<()> {
    match conn {
        DbConnection::Sqlite(_) => Ok(()),
        DbConnection::Postgres(c) => c.batch_execute(&format!(
            "SET LOCAL lock_timeout = 0; SET LOCAL statement_timeout = 0; {}",
            what.sql(false)
        )),
    }
}

/// [`lock`] on each of `orders` ([`Lock::Order`]), in ascending order, with one statement: a
/// consumer's batch takes the orders it is about to react to in one round trip.
pub fn lock_orders(
    conn: &mut DbConnection,
    orders: impl IntoIterator<Item = i64>,
) -> diesel::QueryResult<()> {
    match conn {
        DbConnection::Sqlite(_) => Ok(()),
        DbConnection::Postgres(c) => lock_orders_on(c, orders),
    }
}

/// [`lock_orders`] on a PostgreSQL connection.
pub(crate) fn lock_orders_on(
    c: &mut PgConnection,
    orders: impl IntoIterator<Item = i64>,
) -> diesel::QueryResult<()> {
    lock_each_on(c, 1, orders)
}

/// [`lock`] on each of `products` ([`Lock::Product`]), in ascending order, with one
/// statement: a consumer's batch takes the products it decides on in one round trip, after
/// its orders (every writer that takes both takes them in that order).
pub fn lock_products(
    conn: &mut DbConnection,
    products: impl IntoIterator<Item = i64>,
) -> diesel::QueryResult<()> {
    match conn {
        DbConnection::Sqlite(_) => Ok(()),
        DbConnection::Postgres(c) => lock_each_on(c, 2, products),
    }
}

/// Exclusive advisory locks on `ids` folded, in `namespace` (as [`Lock::sql`] numbers them),
/// ascending so that two writers never wait for each other in a circle.
fn lock_each_on(
    c: &mut PgConnection,
    namespace: i32,
    ids: impl IntoIterator<Item = i64>,
) -> diesel::QueryResult<()> {
    let keys: std::collections::BTreeSet<i32> = ids.into_iter().map(fold).collect();
    match keys.len() {
        0 => Ok(()),
        1 => c.batch_execute(&format!(
            "SELECT pg_advisory_xact_lock({namespace}, {})",
            keys.first().copied().unwrap_or_default()
        )),
        _ => {
            let list = keys
                .iter()
                .map(i32::to_string)
                .collect::<Vec<_>>()
                .join(",");
            c.batch_execute(&format!(
                "SELECT count(pg_advisory_xact_lock({namespace}, k)) \
                 FROM (SELECT k FROM unnest(ARRAY[{list}]::int4[]) AS k ORDER BY k) AS ascending"
            ))
        }
    }
}

/// [`lock`] in shared mode: many holders at once, none while someone holds it exclusively.
pub fn lock_shared(conn: &mut DbConnection, what: Lock<'_>) -> diesel::QueryResult<()> {
    match conn {
        DbConnection::Sqlite(_) => Ok(()),
        DbConnection::Postgres(c) => c.batch_execute(&what.sql(true)),
    }
}

/// Takes the locks of the leases `names` shared, in the order given, in one statement
/// (PostgreSQL; nothing to take on SQLite, whose writes are serialized): [`Lock::Lease`] each.
pub fn lock_leases_shared(conn: &mut DbConnection, names: &[String]) -> diesel::QueryResult<()> {
    match conn {
        DbConnection::Postgres(c) => lock_leases_shared_on(c, names),
        DbConnection::Sqlite(_) => Ok(()),
    }
}

/// [`lock_leases_shared`] on a PostgreSQL connection.
pub(crate) fn lock_leases_shared_on(
    c: &mut PgConnection,
    names: &[String],
) -> diesel::QueryResult<()> {
    let locks: Vec<String> = names
        .iter()
        .map(|name| Lock::Lease(name).call(true))
        .collect();
    // The target list is evaluated left to right: the locks are taken in the order given.
    c.batch_execute(&format!("SELECT {}", locks.join(", ")))
}

/// The channel every PostgreSQL write notifies on commit, so live views on any instance wake
/// for commits made by the others.
const COMMITS_CHANNEL: &str = "mall_commits";
/// Connections per service instance for reads (and so at most that many blocking threads
/// reading at once); the pool has one more for each writer thread, and [`KEPT_CONNECTIONS`].
const READ_CONNECTIONS: u32 = 7;
/// Connections kept out of the pool between uses ([`KeptConnection`]): the outbox relay's.
const KEPT_CONNECTIONS: u32 = 1;

/// Opens connections of the configured backend. diesel's own manager would try each backend
/// in turn, and SQLite accepts any string as a file name: a PostgreSQL URL with the server
/// down would silently become a new SQLite file.
#[derive(Debug)]
pub(crate) struct Manager(Backend, PgLimits, SqliteSync);

impl r2d2::ManageConnection for Manager {
    type Connection = DbConnection;
    type Error = diesel::r2d2::Error;

    fn connect(&self) -> Result<DbConnection, Self::Error> {
        use diesel::r2d2::Error;
        match &self.0 {
            Backend::Sqlite(path) => {
                let mut conn = SqliteConnection::establish(path).map_err(Error::ConnectionError)?;
                // WAL so readers never block the writer, and a busy timeout so a writer waits
                // for the lock instead of failing at once. `synchronous` FULL by default: a
                // commit is fsynced before it is acknowledged or published (see SqliteSync);
                // the group commit shares one fsync among the writes queued together.
                // Temporary files in memory: the group commit's savepoints journal pages to
                // one per transaction (measured: an open, writes and a close each time on disk).
                conn.batch_execute(&format!(
                    "PRAGMA busy_timeout = 10000; PRAGMA journal_mode = WAL; \
                     PRAGMA synchronous = {}; PRAGMA foreign_keys = ON; \
                     PRAGMA temp_store = MEMORY; PRAGMA journal_size_limit = {WAL_KEPT_BYTES};",
                    self.2.pragma()
                ))
                .map_err(Error::QueryError)?;
                Ok(DbConnection::Sqlite(conn))
            }
            Backend::Postgres(url) => {
                // Every wait bounded (see PgLimits): a stalled sibling holding a lock
                // costs a retry, not a hang.
                let mut conn = PgConnection::establish(&self.1.with_keepalives(url))
                    .map_err(Error::ConnectionError)?;
                conn.batch_execute(&self.1.session_sql())
                    .map_err(Error::QueryError)?;
                Ok(DbConnection::Postgres(conn))
            }
        }
    }

    fn is_valid(&self, conn: &mut DbConnection) -> Result<(), Self::Error> {
        conn.batch_execute("SELECT 1")
            .map_err(diesel::r2d2::Error::QueryError)
    }

    fn has_broken(&self, conn: &mut DbConnection) -> bool {
        diesel::r2d2::R2D2Connection::is_broken(conn)
    }
}

/// A pool of connections to one service database.
pub(crate) type Pool = r2d2::Pool<Manager>;

/// A connection its user keeps from one use to the next ([`Database::write_alone_kept`]);
/// empty at first and after a failure.
#[derive(Default)]
pub struct KeptConnection(Option<r2d2::PooledConnection<Manager>>);

/// Which of a database's commits are announced to the other instances ([`COMMITS_CHANNEL`]),
/// and how: with this process's own tag, which its listener skips.
#[derive(Debug)]
pub(crate) struct Notices {
    /// Every commit (a service with live views); else only the commits that wrote a row
    /// another instance publishes ([`Routing::take_foreign`]).
    every: AtomicBool,
    /// Where the writes mark a row another instance publishes.
    routing: Arc<Routing>,
    /// This process's tag: the payload of its notifications.
    origin: String,
}

impl Notices {
    fn new(routing: Arc<Routing>) -> Self {
        Notices {
            every: AtomicBool::new(true),
            routing,
            origin: uuid::Uuid::new_v4().simple().to_string(),
        }
    }

    /// Whether every commit is announced (else only those [`Routing::take_foreign`] names).
    fn every(&self) -> bool {
        self.every.load(Ordering::Relaxed)
    }
}

/// Runs `f` in a write transaction: `BEGIN IMMEDIATE` on SQLite (the database's one writer),
/// `BEGIN` on PostgreSQL, where `f` takes the [`lock`]s it needs (module docs) and the commit
/// is announced to the other instances when `notices` say so ([`Database::commits`]).
pub(crate) fn write_transaction<T, E, F>(
    conn: &mut DbConnection,
    notices: Option<&Notices>,
    f: F,
) -> Result<T, E>
where
    F: FnOnce(&mut DbConnection) -> Result<T, E>,
    E: From<diesel::result::Error>,
{
    // Announced whatever it writes: the NOTIFY goes with the BEGIN, in one round trip (a
    // notification is delivered at commit, and dropped with a rollback).
    let announced = notices.filter(|n| n.every());
    match conn {
        DbConnection::Sqlite(c) => {
            AnsiTransactionManager::begin_transaction_sql(c, "BEGIN IMMEDIATE")?
        }
        DbConnection::Postgres(c) => match announced {
            Some(notices) => AnsiTransactionManager::begin_transaction_sql(
                c,
                &format!("BEGIN; NOTIFY {COMMITS_CHANNEL}, '{}'", notices.origin),
            )?,
            None => AnsiTransactionManager::begin_transaction(c)?,
        },
    }
    if let Some(notices) = notices {
        // A mark left by a transaction that rolled back is not this one's.
        notices.routing.take_foreign();
    }
    let result = f(conn).and_then(|value| {
        if let DbConnection::Postgres(c) = conn
            && announced.is_none()
            && let Some(notices) = notices.filter(|n| n.routing.take_foreign())
        {
            // Delivered at commit, to every instance listening (see Database::commits).
            c.batch_execute(&format!("NOTIFY {COMMITS_CHANNEL}, '{}'", notices.origin))?;
        }
        Ok(value)
    });
    match result {
        Ok(value) => {
            <DbConnection as Connection>::TransactionManager::commit_transaction(conn)?;
            Ok(value)
        }
        Err(e) => {
            <DbConnection as Connection>::TransactionManager::rollback_transaction(conn)?;
            Err(e)
        }
    }
}

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
    /// The blocking task running the statement died, or the write panicked.
    #[error("database task: {0}")]
    Task(String),
    /// The transaction this write shared with others (group commit) did not commit, for a
    /// reason not of this write's making; nothing of it was kept.
    #[error("database write not committed: {0}")]
    Batch(String),
    /// This instance no longer holds the lease guarding the commit
    /// ([`crate::leases::fence`]): another instance took over.
    #[error("lease {0} is held by another instance")]
    NotHolder(String),
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
                | Kind::CheckViolation
                | Kind::RestrictViolation
                | Kind::ExclusionViolation,
                _,
            )) => false,
            DbError::Query(Error::DatabaseError(Kind::Unknown, info))
                if is_data_exception(info.message()) =>
            {
                false
            }
            DbError::Task(_) => false,
            DbError::Pool(_)
            | DbError::Query(_)
            | DbError::Setup(_)
            | DbError::NotHolder(_)
            | DbError::Batch(_) => true,
        }
    }
}

/// Whether a PostgreSQL error message is one of SQLSTATE class 22 (data exception: the value
/// itself is wrong, so every retry fails alike). diesel does not expose the SQLSTATE of the
/// errors it does not classify, so the server's (English) primary messages of that class
/// are matched instead; the services refuse NULs before writing, so this is the backstop.
/// Lock and statement timeouts (55P03, 57014), serialization failures (40001) and lost
/// connections do not match: they are retried.
fn is_data_exception(message: &str) -> bool {
    const CLASS_22: [&str; 9] = [
        "invalid byte sequence for encoding",
        "character with byte sequence",
        "unsupported Unicode escape sequence",
        "invalid input syntax",
        "out of range",
        "value too long for type",
        "division by zero",
        "invalid input value",
        "null character not permitted",
    ];
    CLASS_22.iter().any(|m| message.contains(m))
}

/// A service's database plus the signal that tells its outbox relay a new event was committed.
#[derive(Clone)]
pub struct Database {
    backend: Backend,
    pool: Pool,
    /// One per pooled connection left to reads: a read waits here, as a future, before it
    /// takes a blocking thread. Without it an overloaded service parks a thread per waiting
    /// request in the pool (tokio allows 512; measured: 538 threads and 110 MiB RSS at 1,000
    /// orders/s offered).
    connections: Arc<Semaphore>,
    /// The writer threads ([`crate::group_commit`]): every write goes through them, and the
    /// writes waiting together commit together. Declared after `pool`: the last clone drops
    /// the pool handle first, then stops the threads, which hold the others.
    writes: Arc<crate::group_commit::Writer>,
    outbox_committed: Arc<Notify>,
    /// Counts committed writes; live views (the dashboard's event stream) wait on it.
    commits: Arc<watch::Sender<u64>>,
    /// Starts, once, the listener that counts other instances' commits (PostgreSQL).
    listening: Arc<std::sync::Once>,
    /// What the service does with the events it writes ([`Database::with_write_hook`]).
    hook: Option<Arc<dyn WriteHook>>,
    /// The bounds of every PostgreSQL connection (the commit listener's too).
    limits: PgLimits,
    /// Which PostgreSQL commits the writer announces ([`Database::without_commit_notices`]),
    /// and where this instance's outbox rows go ([`Database::routing`]).
    notices: Arc<Notices>,
}

/// Work to do once a write has committed (and never if it did not).
pub type AfterCommit = Box<dyn FnOnce() + Send>;

/// How the events of a write enter its transaction: the service's [`WriteHook`], then the
/// outbox. The writer records the events of every write of a transaction at once, just before
/// the commit ([`crate::group_commit`]): a statement per table for the lot, not per write.
#[derive(Clone)]
pub(crate) struct Recorder {
    hook: Option<Arc<dyn WriteHook>>,
    routing: Arc<Routing>,
}

impl Recorder {
    /// Records `events` (never empty) in the open transaction; what it returns runs after the
    /// commit, once.
    pub(crate) fn record(
        &self,
        conn: &mut DbConnection,
        events: &[Envelope],
    ) -> diesel::QueryResult<Option<AfterCommit>> {
        let after = match &self.hook {
            Some(hook) => hook.writing(conn, events)?,
            None => None,
        };
        outbox::enqueue(conn, events, &self.routing)?;
        Ok(after)
    }

    /// Whether `other` records as this one does (clones of one database share both parts), so
    /// their writes' events may be recorded together.
    pub(crate) fn same_as(&self, other: &Recorder) -> bool {
        let hooks = match (&self.hook, &other.hook) {
            (None, None) => true,
            (Some(a), Some(b)) => Arc::ptr_eq(a, b),
            _ => false,
        };
        hooks && Arc::ptr_eq(&self.routing, &other.routing)
    }
}

/// What a service does with every event it writes, so it need not read its own events back
/// from the topic: orders keeps each order's history with the events that change it.
pub trait WriteHook: Send + Sync + 'static {
    /// Runs in the write's transaction just before `events` (never empty) enter the outbox:
    /// the events of every write of a group commit at once, in their order; an error rolls
    /// them back. What it returns runs after the commit, once.
    fn writing(
        &self,
        conn: &mut DbConnection,
        events: &[Envelope],
    ) -> diesel::QueryResult<Option<AfterCommit>>;
}

impl Database {
    /// Opens the database at `url` (a PostgreSQL URL, or an SQLite file created if needed)
    /// and runs the plumbing migrations and then the service's own.
    pub fn open(url: &str, migrations: Migrations) -> Result<Self, DbError> {
        let limits = match Backend::from_url(url) {
            Backend::Postgres(_) => {
                PgLimits::from_env().map_err(|e| DbError::Setup(e.to_string()))?
            }
            Backend::Sqlite(_) => PgLimits::default(),
        };
        Self::open_with(url, migrations, limits)
    }

    /// [`Database::open`] with the PostgreSQL `limits` given rather than read from the
    /// environment (ignored on SQLite).
    pub fn open_with(url: &str, migrations: Migrations, limits: PgLimits) -> Result<Self, DbError> {
        let backend = Backend::from_url(url);
        if let Backend::Sqlite(path) = &backend
            && let Some(dir) = std::path::Path::new(path).parent()
            && !dir.as_os_str().is_empty()
        {
            std::fs::create_dir_all(dir).map_err(|e| {
                DbError::Setup(format!("cannot create directory {}: {e}", dir.display()))
            })?;
        }
        let sync = match backend {
            Backend::Sqlite(_) => {
                SqliteSync::from_env().map_err(|e| DbError::Setup(e.to_string()))?
            }
            Backend::Postgres(_) => SqliteSync::default(),
        };
        let shown = redacted(url);
        // SQLite has one writer at a time whatever its connections do.
        let writers = match backend {
            Backend::Sqlite(_) => 1,
            Backend::Postgres(_) => limits.writers,
        };
        let pool = r2d2::Pool::builder()
            .max_size(READ_CONNECTIONS + writers as u32 + KEPT_CONNECTIONS)
            .connection_timeout(Duration::from_secs(10))
            .build(Manager(backend.clone(), limits, sync))
            .map_err(|e| DbError::Setup(format!("cannot open {shown}: {e}")))?;
        let mut conn = pool.get()?;
        for set in [PLUMBING_MIGRATIONS, migrations] {
            let source = match backend {
                Backend::Sqlite(_) => set.sqlite,
                Backend::Postgres(_) => set.postgres,
            };
            // Two instances starting at once on one PostgreSQL database would both migrate:
            // the migration lock makes the second wait and then find nothing pending. A
            // migration may take long, and so may that wait: neither is bounded.
            if let Backend::Postgres(_) = backend {
                conn.batch_execute("SET lock_timeout = 0; SET statement_timeout = 0;")?;
            }
            write_transaction(&mut conn, None, |conn| {
                if let DbConnection::Postgres(c) = conn {
                    c.batch_execute(&format!("SELECT pg_advisory_xact_lock({MIGRATION_LOCK})"))?;
                }
                conn.run_pending_migrations(source)
                    .map(|_| ())
                    .map_err(|e| DbError::Setup(format!("migrating {shown}: {e}")))
            })?;
        }
        if let Backend::Postgres(_) = backend {
            conn.batch_execute(&limits.session_sql())?;
        }
        let notices = Arc::new(Notices::new(Arc::new(Routing::default())));
        let writes =
            crate::group_commit::start("db-writer", writers, pool.clone(), notices.clone())
                .map(Arc::new)
                .map_err(|e| DbError::Setup(format!("cannot start the writer thread: {e}")))?;
        Ok(Database {
            backend,
            pool,
            writes,
            connections: Arc::new(Semaphore::new(READ_CONNECTIONS as usize)),
            outbox_committed: Arc::new(Notify::new()),
            commits: Arc::new(watch::Sender::new(0)),
            listening: Arc::new(std::sync::Once::new()),
            hook: None,
            limits,
            notices,
        })
    }

    /// This database with its PostgreSQL commits not announced (`NOTIFY`, a statement per
    /// transaction) unless they wrote a row another instance publishes: for a service with no
    /// live views, whose [`Database::commits`] then counts this instance's commits and those.
    /// Applies to the clones too.
    pub fn without_commit_notices(self) -> Self {
        self.notices.every.store(false, Ordering::Relaxed);
        self
    }

    /// Where this instance's outbox rows go and which it publishes ([`crate::routing`]).
    pub fn routing(&self) -> &Arc<Routing> {
        &self.notices.routing
    }

    /// This database with `hook` run on the events of every write; set before the first
    /// write (clones made earlier do not have it).
    pub fn with_write_hook(mut self, hook: Arc<dyn WriteHook>) -> Self {
        self.hook = Some(hook);
        self
    }

    /// Runs a read whose statements all see one snapshot: a read-only REPEATABLE READ
    /// transaction on PostgreSQL (under READ COMMITTED each statement would see the commits
    /// made between them), a read transaction on SQLite (WAL: one snapshot until it ends). A
    /// view assembled from several tables (stock and its reservations) then never mixes two
    /// moments.
    pub async fn read_snapshot<T, E, F>(&self, f: F) -> Result<T, E>
    where
        F: FnOnce(&mut DbConnection) -> Result<T, E> + Send + 'static,
        T: Send + 'static,
        E: From<DbError> + From<diesel::result::Error> + Send + 'static,
    {
        self.read(move |conn| {
            conn.transaction(|conn| {
                if let DbConnection::Postgres(c) = conn {
                    // First statement of the transaction: the snapshot is taken at the next.
                    c.batch_execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")?;
                }
                f(conn)
            })
        })
        .await
    }

    /// Runs `f` on a pooled connection of its own, outside the writer, on PostgreSQL: for a
    /// statement that decides and writes by itself (the relay's fenced mark), which needs no
    /// turn in the writer's transactions. On SQLite, the database's one writer, it goes
    /// through [`Database::write`].
    pub async fn write_alone<T, E, F>(&self, f: F) -> Result<T, E>
    where
        F: FnOnce(&mut DbConnection) -> Result<T, E> + Send + 'static,
        T: Send + 'static,
        E: From<DbError> + From<diesel::result::Error> + Send + 'static,
    {
        match self.backend {
            Backend::Postgres(_) => self.read(f).await,
            Backend::Sqlite(_) => self.write(|conn| Ok((f(conn)?, Vec::new()))).await,
        }
    }

    /// [`Database::write_alone`] on the connection `kept` holds, which keeps it after `f`
    /// succeeds: a checkout tests its connection with a statement of its own, a round trip
    /// on PostgreSQL, which a caller running one statement or two each time (the relay's
    /// round) would pay as often as its own. After a failure the connection goes back to the
    /// pool, which tests it before handing it out again.
    pub async fn write_alone_kept<T, E, F>(&self, kept: &mut KeptConnection, f: F) -> Result<T, E>
    where
        F: FnOnce(&mut DbConnection) -> Result<T, E> + Send + 'static,
        T: Send + 'static,
        E: From<DbError> + From<diesel::result::Error> + Send + 'static,
    {
        if let Backend::Sqlite(_) = self.backend {
            return self.write_alone(f).await;
        }
        let (pool, held) = (self.pool.clone(), kept.0.take());
        let permit = self.connection().await?;
        let (result, back) = tokio::task::spawn_blocking(move || {
            let _permit = permit;
            let mut conn = match held {
                Some(conn) => conn,
                None => match pool.get() {
                    Ok(conn) => conn,
                    Err(e) => return (Err(E::from(DbError::from(e))), None),
                },
            };
            let result = f(&mut conn);
            let back = result.is_ok().then_some(conn);
            (result, back)
        })
        .await
        .map_err(|e| E::from(DbError::Task(e.to_string())))?;
        kept.0 = back;
        result
    }

    /// Runs a read on a blocking thread.
    pub async fn read<T, E, F>(&self, f: F) -> Result<T, E>
    where
        F: FnOnce(&mut DbConnection) -> Result<T, E> + Send + 'static,
        T: Send + 'static,
        E: From<DbError> + Send + 'static,
    {
        let pool = self.pool.clone();
        let permit = self.connection().await?;
        tokio::task::spawn_blocking(move || {
            let _permit = permit; // dropped last: after the connection is back in the pool
            let mut conn = pool.get().map_err(DbError::from)?;
            f(&mut conn)
        })
        .await
        .map_err(|e| E::from(DbError::Task(e.to_string())))?
    }

    /// Changes state and commits the events the change causes into the outbox, in one
    /// transaction; then wakes the relay. `f` returns its result and the events to publish;
    /// the service's [`WriteHook`], if any, sees those events in the same transaction.
    ///
    /// The writer thread runs it in a savepoint of the transaction it shares with the writes
    /// queued at the same moment ([`crate::group_commit`]), records the events of them all
    /// before the commit, and answers after it. On PostgreSQL `f` takes a [`lock`] on what it
    /// decides on before reading it. `f` does not see its events in the outbox or the hook's
    /// tables: they are written after it.
    pub async fn write<T, E, F>(&self, f: F) -> Result<T, E>
    where
        F: FnOnce(&mut DbConnection) -> Result<(T, Vec<Envelope>), E> + Send + 'static,
        T: Send + 'static,
        E: From<DbError> + From<diesel::result::Error> + Send + 'static,
    {
        let (reply, answer) = tokio::sync::oneshot::channel();
        let job = crate::group_commit::Job {
            work: f,
            recorder: Recorder {
                hook: self.hook.clone(),
                routing: self.routing().clone(),
            },
            reply,
        };
        // No answer (a panic in the writer, logged there): whether it committed is unknown.
        // Transient, so a consumer retries rather than parks; the retry finds out by its id.
        let unanswered = || DbError::Batch("the database writer dropped this write".into());
        self.writes.send(Box::new(job)).map_err(|_| unanswered())?;
        let (value, published) = answer.await.map_err(|_| unanswered())??;
        if published {
            self.outbox_committed.notify_one();
        }
        self.commits.send_modify(|n| *n = n.wrapping_add(1));
        Ok(value)
    }

    /// A turn on one of the pool's connections; held by the blocking work until it is done,
    /// also when the caller stops waiting for it.
    async fn connection(&self) -> Result<OwnedSemaphorePermit, DbError> {
        self.connections
            .clone()
            .acquire_owned()
            .await
            .map_err(|e| DbError::Task(e.to_string()))
    }

    /// Changes whenever a write commits — on PostgreSQL also a write of another instance
    /// (LISTEN/NOTIFY) — so a live view re-reads what it shows after `changed()`, instead of
    /// polling its tables.
    pub fn commits(&self) -> watch::Receiver<u64> {
        self.listen_to_other_instances();
        self.commits.subscribe()
    }

    /// Starts, once, the listener for the commits other instances announce (PostgreSQL): each
    /// counts in [`Database::commits`] and wakes the relay, which may publish what it wrote.
    pub(crate) fn listen_to_other_instances(&self) {
        if let Backend::Postgres(url) = &self.backend {
            let url = self.limits.with_keepalives(url);
            let heard = Heard {
                commits: self.commits.clone(),
                relay: self.outbox_committed.clone(),
                origin: self.notices.origin.clone(),
            };
            self.listening.call_once(move || {
                std::thread::Builder::new()
                    .name("commit-listener".into())
                    .spawn(move || listen_for_commits(&url, &heard))
                    .map(|_| ())
                    .unwrap_or_else(|e| log::warn!("no commit listener: {e}"));
            });
        }
    }

    /// Answers when the database can run a statement (for `/health`).
    pub async fn ping(&self) -> Result<(), DbError> {
        self.read(|conn| conn.batch_execute("SELECT 1").map_err(DbError::from))
            .await
    }

    /// Copies the write-ahead log into the database and starts it over, waiting (busy timeout)
    /// for readers of older snapshots to finish. SQLite's automatic checkpoints never wait, so
    /// under steady load, with a reader always open somewhere, they never reach the end of
    /// the log and it grows without bound (measured: 2.5 GB after a minute of overload).
    /// RESTART, not TRUNCATE: the file is kept (at most [`WAL_KEPT_BYTES`]) and overwritten
    /// from its start, so a commit's fsync writes blocks the file already has; a truncated
    /// file grows with every commit, and each fsync then also journals its new size (see the
    /// README's durability figures). PostgreSQL manages its own log: nothing to do there.
    pub async fn checkpoint(&self) -> Result<(), DbError> {
        if matches!(self.backend, Backend::Postgres(_)) {
            return Ok(());
        }
        self.read(|conn| {
            conn.batch_execute("PRAGMA wal_checkpoint(RESTART)")
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

/// Where the listener passes on another instance's commit.
struct Heard {
    /// Counted here, for live views.
    commits: Arc<watch::Sender<u64>>,
    /// The relay, woken.
    relay: Arc<Notify>,
    /// This process's own tag, skipped: its commits were counted when they were made.
    origin: String,
}

/// How often the listener looks for notifications: a commit of another instance reaches the
/// relay and live views within this.
const LISTEN_EVERY: Duration = Duration::from_millis(20);

/// Passes on the commits other instances announce on [`COMMITS_CHANNEL`], for the life of the
/// process; reconnects after a lost connection. Checking for a notification reads only what
/// the server already sent, so the poll costs no query.
fn listen_for_commits(url: &str, heard: &Heard) {
    let mut failures = 0u32;
    loop {
        let listening: Result<std::convert::Infallible, String> = PgConnection::establish(url)
            .map_err(|e| e.to_string())
            .and_then(|mut conn| {
                conn.batch_execute(&format!("LISTEN {COMMITS_CHANNEL}"))
                    .map_err(|e| e.to_string())?;
                failures = 0;
                loop {
                    let mut woke = false;
                    for notification in conn.notifications_iter() {
                        let notification = notification.map_err(|e| e.to_string())?;
                        woke |= notification.payload != heard.origin;
                    }
                    if woke {
                        heard.commits.send_modify(|n| *n = n.wrapping_add(1));
                        heard.relay.notify_one();
                    }
                    std::thread::sleep(LISTEN_EVERY);
                }
            });
        let Err(e) = listening;
        failures += 1;
        log::warn!("commit listener: {e}; reconnecting");
        std::thread::sleep(Duration::from_millis(500 * u64::from(failures.min(20))));
    }
}

/// `url` without its password, for messages.
fn redacted(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            let userinfo = &url[scheme + 3..at];
            let user = userinfo.split(':').next().unwrap_or_default();
            format!("{}{user}:***{}", &url[..scheme + 3], &url[at..])
        }
        _ => url.to_owned(),
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
            // PostgreSQL: timeouts (55P03, 57014, 25P03), serialization (40001), lost server.
            "canceling statement due to lock timeout",
            "canceling statement due to statement timeout",
            "terminating connection due to idle-in-transaction timeout",
            "could not serialize access due to concurrent update",
            "server closed the connection unexpectedly",
        ] {
            assert!(query(Kind::Unknown, message).is_transient(), "{message}");
        }
        for kind in [Kind::ClosedConnection, Kind::SerializationFailure] {
            assert!(query(kind, "lost").is_transient(), "{kind:?}");
        }
        // PostgreSQL class 22: the value is wrong, every retry fails alike.
        for message in [
            "invalid byte sequence for encoding \"UTF8\": 0x00",
            "invalid input syntax for type bigint: \"x\"",
            "value \"99999999999\" is out of range for type integer",
            "value too long for type character varying(5)",
        ] {
            assert!(!query(Kind::Unknown, message).is_transient(), "{message}");
        }
        for kind in [
            Kind::UniqueViolation,
            Kind::CheckViolation,
            Kind::NotNullViolation,
            Kind::ForeignKeyViolation,
            Kind::RestrictViolation,
            Kind::ExclusionViolation,
        ] {
            assert!(!query(kind, "constraint failed").is_transient(), "{kind:?}");
        }
        assert!(!DbError::Task("panicked".into()).is_transient());
    }

    /// A checkpoint starts the write-ahead log over: the writes after it reuse the file from
    /// its start (it does not grow by what they wrote), and the file is kept, not truncated,
    /// so their fsyncs overwrite blocks it has.
    #[tokio::test]
    async fn a_checkpoint_starts_the_write_ahead_log_over_in_the_same_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("wal.db");
        let db = Database::open(path.to_str().unwrap(), PLUMBING_MIGRATIONS).unwrap();
        let write_rows = |from: usize| {
            let db = db.clone();
            async move {
                // Few enough to stay under SQLite's own checkpoint (1,000 pages).
                for i in from..from + 40 {
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
            }
        };
        let wal = dir.path().join("wal.db-wal");
        let size = || std::fs::metadata(&wal).unwrap().len();
        write_rows(0).await;
        let written = size();
        assert!(written > 200_000, "40 rows are in the log: {written}");
        db.checkpoint().await.unwrap();
        assert_eq!(size(), written, "the file is kept for reuse");
        write_rows(40).await;
        assert!(
            size() <= written + 64 * 1024,
            "the log started over: {} after a checkpoint and as much again, {written} before",
            size()
        );
        let rows = db
            .read(|conn| {
                use diesel::{QueryDsl, RunQueryDsl};
                crate::inbox::processed_events::table
                    .count()
                    .get_result::<i64>(conn)
                    .map_err(DbError::from)
            })
            .await
            .unwrap();
        assert_eq!(rows, 80, "nothing of the log was lost");
    }

    /// What the API acknowledges survives a power cut: every SQLite connection, the writer's
    /// and the readers', commits with `synchronous = FULL` (2) unless told otherwise.
    #[tokio::test]
    async fn every_sqlite_connection_fsyncs_its_commits() {
        #[derive(diesel::QueryableByName)]
        struct Synchronous {
            #[diesel(sql_type = diesel::sql_types::BigInt)]
            synchronous: i64,
        }
        fn level(conn: &mut DbConnection) -> Result<i64, DbError> {
            let DbConnection::Sqlite(c) = conn else {
                unreachable!("an SQLite file")
            };
            let row: Synchronous =
                diesel::RunQueryDsl::get_result(diesel::sql_query("PRAGMA synchronous"), c)?;
            Ok(row.synchronous)
        }
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sync.db");
        let db = Database::open(path.to_str().unwrap(), PLUMBING_MIGRATIONS).unwrap();
        let written = db
            .write(|conn| Ok::<_, DbError>((level(conn)?, Vec::new())))
            .await
            .unwrap();
        let read = db.read(level).await.unwrap();
        assert_eq!((written, read), (2, 2), "synchronous = FULL is 2");
    }

    /// Records each written event's id in `processed_events` (in the transaction) and counts
    /// after-commit calls.
    struct Recording(Arc<std::sync::atomic::AtomicUsize>);

    impl WriteHook for Recording {
        fn writing(
            &self,
            conn: &mut DbConnection,
            events: &[Envelope],
        ) -> diesel::QueryResult<Option<AfterCommit>> {
            for e in events {
                if e.event.order_id() == Some(666) {
                    return Err(diesel::result::Error::RollbackTransaction);
                }
                conn.batch_execute(&format!(
                    "INSERT INTO processed_events VALUES ('{}', 'seen', 'now')",
                    e.event_id
                ))?;
            }
            let committed = self.0.clone();
            Ok(Some(Box::new(move || {
                committed.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            })))
        }
    }

    #[tokio::test]
    async fn the_write_hook_commits_with_the_write_and_its_sequel_runs_after_commits_only() {
        use diesel::prelude::*;
        use events::{Event, OrderCompleted, Service};
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("hook.db");
        let after_commits = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let db = Database::open(path.to_str().unwrap(), PLUMBING_MIGRATIONS)
            .unwrap()
            .with_write_hook(Arc::new(Recording(after_commits.clone())));
        let event = |order_id| {
            let e = OrderCompleted {
                order_id,
                product_id: 1,
                quantity: 1,
                customer_id: "c".into(),
            };
            Envelope::new(Service::Orders, Event::OrderCompleted(e))
        };
        let write = |events: Vec<Envelope>| db.write(move |_| Ok::<_, DbError>(((), events)));
        let counts = || {
            db.read(|conn| {
                let seen = crate::inbox::processed_events::table
                    .count()
                    .get_result::<i64>(conn)?;
                let queued = outbox::pending_count(conn)?;
                Ok::<_, DbError>((seen, queued))
            })
        };
        let calls = || after_commits.load(std::sync::atomic::Ordering::SeqCst);

        let first = event(1);
        write(vec![first.clone()]).await.unwrap();
        assert_eq!((counts().await.unwrap(), calls()), ((1, 1), 1));

        // No events: the hook is not asked.
        write(Vec::new()).await.unwrap();
        assert_eq!(calls(), 1);

        // The hook fails: the write rolls back, outbox included.
        assert!(write(vec![event(2), event(666)]).await.is_err());
        assert_eq!((counts().await.unwrap(), calls()), ((1, 1), 1));

        // The hook ran, then the outbox refused the event (its id is already there): the
        // hook's rows roll back with the write and its sequel never runs.
        assert!(write(vec![event(3), first]).await.is_err());
        assert_eq!((counts().await.unwrap(), calls()), ((1, 1), 1));
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
