//! The I/O shell the three 12st Mall services share, so each service is only its saga rules,
//! its tables and its HTTP handlers.
//!
//! - [`db`]: the SQLite or PostgreSQL pool and [`Database::write`], the only way to change
//!   state: one writer per database, the caused events into the outbox in the same transaction.
//! - [`group_commit`]: the writer thread; writes queued together commit together, each in its
//!   own savepoint.
//! - [`leases`]: which instance of a service consumes which partition and runs the relay,
//!   decided in the service's database; the lease fences stale commits.
//! - [`outbox`]: the outbox table and the [`OutboxRelay`] that publishes it in order.
//! - [`inbox`]: exactly-once application of consumed events ([`Reactor`], [`apply_once`]).
//! - [`consumer`]: the consumer loop: its leased partitions assigned, positions from the database,
//!   a watchdog, and the status `/health` reports.
//! - [`offsets`]: the consumer's position, committed with each event's effect.
//! - [`parking`]: dead letters, committed with the position past the parked message.
//! - [`prepared`]: statements each connection prepares once (diesel re-parses most writes).
//! - [`rebuild`]: a new database beside a topic that holds events is rebuilt from the topic
//!   before the service serves (and `--rebuild` by hand).
//! - [`producer`], [`admin`]: the idempotent producer and topic creation.
//! - [`idempotency`]: `Idempotency-Key`: a retried request acted on once.
//! - [`identity`]: the cluster the stored positions belong to; another one is refused.
//! - [`http`], [`host`]: JSON errors, `/health`, `/metrics`, and starting/stopping a whole
//!   service.
//! - [`metrics`]: each service's Prometheus registry and the HTTP middleware that counts
//!   requests.
//! - [`retention`]: the background task that deletes dedup state and settled history once
//!   no event can need it, so the databases stop growing.
//! - [`access`]: the hosts, web origins and media types a service accepts.
//! - [`auth`]: bearer tokens with roles, stored hashed; 401 and 403.
//! - [`connections`]: at most `HTTP_MAX_CONNECTIONS_PER_ADDRESS` connections per client address.
//! - [`settings`]: env-var configuration.

pub mod access;
pub mod admin;
pub mod admission;
pub mod auth;
pub mod connections;
pub mod consumer;
pub mod db;
pub mod group_commit;
pub mod host;
pub mod http;
pub mod idempotency;
pub mod identity;
pub mod inbox;
pub mod leases;
pub mod metrics;
pub mod offsets;
pub mod outbox;
pub mod parking;
pub mod prepared;
pub mod producer;
pub mod rebuild;
pub mod replay;
pub mod retention;
pub mod routing;
pub mod settings;

pub use db::{Database, DbError};
pub use host::{ServiceHost, StartError, run_service, shutdown_signal};
pub use inbox::{Applied, ReactError, Reactor, apply_once, apply_once_at};
pub use metrics::Metrics;
pub use outbox::OutboxRelay;
pub use retention::{Deleted, PruneRule, Retention};
pub use settings::{
    ConfigError, KafkaSettings, RetentionSettings, ServiceSettings, env_flag, env_or,
};

/// Initialises logging from `RUST_LOG` (default `info`).
pub fn init_logging() {
    let _ = env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info"))
        .try_init();
}
