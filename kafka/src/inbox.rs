//! The idempotent consumer: an event's effect, the events it causes and the record that it was
//! processed commit in one transaction, so a redelivered event finds its id and does nothing.

use crate::db::{Database, DbError};
use crate::offsets::{self, ConsumedAt};
use diesel::prelude::*;
use diesel::sqlite::SqliteConnection;
use events::Envelope;

diesel::table! {
    /// Event ids already applied by this service.
    processed_events (event_id) {
        event_id -> Text,
        event_type -> Text,
        processed_at -> Text,
    }
}

/// A service's reaction to the events it consumes: load state, run the pure saga rule, store
/// the new state. It runs inside the transaction [`apply_once`] opens.
pub trait Reactor: Send + Sync + 'static {
    /// Whether the service acts on this event at all; others are skipped without touching the
    /// database.
    fn wants(&self, event: &Envelope) -> bool;

    /// Applies `event` using `conn` and returns the events it causes.
    fn react(
        &self,
        conn: &mut SqliteConnection,
        event: &Envelope,
    ) -> Result<Vec<Envelope>, ReactError>;
}

/// Why an event could not be applied.
#[derive(Debug, thiserror::Error)]
pub enum ReactError {
    /// The database failed; maybe transiently.
    #[error(transparent)]
    Db(#[from] DbError),
    /// The event contradicts what the service knows; retrying cannot help.
    #[error("{0}")]
    Rejected(String),
}

impl From<diesel::result::Error> for ReactError {
    fn from(e: diesel::result::Error) -> Self {
        ReactError::Db(DbError::Query(e))
    }
}

impl ReactError {
    /// True when retrying the same event may succeed: every database failure that is not
    /// about the event itself (see [`DbError::is_transient`]).
    pub fn is_transient(&self) -> bool {
        matches!(self, ReactError::Db(e) if e.is_transient())
    }
}

/// What [`apply_once`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Applied {
    /// The effect committed, causing this many events.
    Done(usize),
    /// The event id was already recorded; nothing happened.
    Duplicate,
}

/// Applies `event` exactly once: its effect, its caused events (into the outbox) and its id
/// (into `processed_events`) commit together or not at all.
pub async fn apply_once<R: Reactor + ?Sized>(
    db: &Database,
    reactor: std::sync::Arc<R>,
    event: Envelope,
) -> Result<Applied, ReactError> {
    apply_once_at(db, reactor, event, None).await
}

/// [`apply_once`], also recording the consumer's position after the event in the same
/// transaction (a duplicate moves the position too).
pub async fn apply_once_at<R: Reactor + ?Sized>(
    db: &Database,
    reactor: std::sync::Arc<R>,
    event: Envelope,
    at: Option<ConsumedAt>,
) -> Result<Applied, ReactError> {
    db.write(move |conn| {
        if let Some(at) = &at {
            offsets::store(conn, at)?;
        }
        let id = event.event_id.to_string();
        if already_processed(conn, &id)? {
            return Ok((Applied::Duplicate, Vec::new()));
        }
        let caused = reactor.react(conn, &event)?;
        diesel::insert_into(processed_events::table)
            .values((
                processed_events::event_id.eq(&id),
                processed_events::event_type.eq(event.event_type()),
                processed_events::processed_at.eq(chrono::Utc::now().to_rfc3339()),
            ))
            .execute(conn)?;
        Ok((Applied::Done(caused.len()), caused))
    })
    .await
}

fn already_processed(conn: &mut SqliteConnection, id: &str) -> QueryResult<bool> {
    diesel::select(diesel::dsl::exists(
        processed_events::table.filter(processed_events::event_id.eq(id)),
    ))
    .get_result(conn)
}
