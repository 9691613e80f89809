//! The transactional outbox: events are written as rows in the same transaction as the state
//! change that causes them, and the [`OutboxRelay`] publishes those rows in order.
//!
//! A crash before the commit loses both the change and its events; a crash after it loses
//! nothing, because the row stays unpublished until the broker has acknowledged it. A crash
//! between the acknowledgement and marking the row can publish it twice, which consumers absorb
//! by event id.

use crate::db::{Database, DbError};
use diesel::prelude::*;
use diesel::sqlite::SqliteConnection;
use events::Envelope;
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use std::time::Duration;
use tokio_util::sync::CancellationToken;

diesel::table! {
    /// Events waiting to be, or already, published.
    outbox (id) {
        id -> BigInt,
        event_id -> Text,
        event_type -> Text,
        message_key -> Text,
        payload -> Text,
        created_at -> Text,
        published_at -> Nullable<Text>,
    }
}

/// An outbox row as stored.
#[derive(Debug, Clone, Queryable, Selectable)]
#[diesel(table_name = outbox)]
pub struct OutboxRow {
    /// Commit order; the relay publishes in this order.
    pub id: i64,
    /// The event's `eventId`.
    pub event_id: String,
    /// The event's `eventType`, for people reading the table.
    pub event_type: String,
    /// The Kafka key.
    pub message_key: String,
    /// The JSON published as the message value.
    pub payload: String,
    /// When the row was written.
    pub created_at: String,
    /// When the broker acknowledged it; null while pending.
    pub published_at: Option<String>,
}

/// The insert form of [`OutboxRow`].
#[derive(Debug, Insertable)]
#[diesel(table_name = outbox)]
pub struct NewOutboxRow {
    /// See [`OutboxRow::event_id`].
    pub event_id: String,
    /// See [`OutboxRow::event_type`].
    pub event_type: String,
    /// See [`OutboxRow::message_key`].
    pub message_key: String,
    /// See [`OutboxRow::payload`].
    pub payload: String,
    /// See [`OutboxRow::created_at`].
    pub created_at: String,
}

impl From<&Envelope> for NewOutboxRow {
    fn from(event: &Envelope) -> Self {
        NewOutboxRow {
            event_id: event.event_id.to_string(),
            event_type: event.event_type().to_owned(),
            message_key: event.key(),
            payload: event.to_json(),
            created_at: chrono::Utc::now().to_rfc3339(),
        }
    }
}

/// Adds `events` to the outbox inside the caller's transaction.
pub fn enqueue(conn: &mut SqliteConnection, events: &[Envelope]) -> QueryResult<()> {
    if events.is_empty() {
        return Ok(());
    }
    let rows: Vec<NewOutboxRow> = events.iter().map(NewOutboxRow::from).collect();
    diesel::insert_into(outbox::table)
        .values(&rows)
        .execute(conn)
        .map(|_| ())
}

/// The oldest `limit` unpublished rows, in commit order.
pub fn pending(conn: &mut SqliteConnection, limit: i64) -> QueryResult<Vec<OutboxRow>> {
    outbox::table
        .filter(outbox::published_at.is_null())
        .order(outbox::id)
        .limit(limit)
        .select(OutboxRow::as_select())
        .load(conn)
}

/// Marks rows as acknowledged by the broker.
pub fn mark_published(conn: &mut SqliteConnection, ids: &[i64]) -> QueryResult<usize> {
    diesel::update(outbox::table.filter(outbox::id.eq_any(ids)))
        .set(outbox::published_at.eq(chrono::Utc::now().to_rfc3339()))
        .execute(conn)
}

/// Rows published per round trip to the database.
const BATCH: i64 = 500;

/// Publishes outbox rows to the topic in commit order, as soon as they are committed.
pub struct OutboxRelay {
    db: Database,
    producer: FutureProducer,
    topic: String,
}

impl OutboxRelay {
    /// A relay for `db`'s outbox publishing to `topic` through an idempotent producer.
    pub fn new(db: Database, producer: FutureProducer, topic: String) -> Self {
        OutboxRelay {
            db,
            producer,
            topic,
        }
    }

    /// Publishes until `shutdown`, then drains what is already committed and flushes.
    ///
    /// It wakes when a transaction commits an event, and every second anyway, so rows left by a
    /// crash or a failed send are retried.
    pub async fn run(self, shutdown: CancellationToken) {
        let committed = self.db.outbox_committed();
        let mut failures = 0u32;
        loop {
            match self.publish_pending().await {
                Ok(n) if n as i64 == BATCH => continue,
                Ok(_) => failures = 0,
                Err(e) => {
                    failures += 1;
                    log::warn!("outbox relay: {e}; retrying");
                    let backoff = Duration::from_millis(100 * u64::from(failures.min(20)));
                    tokio::select! {
                        _ = tokio::time::sleep(backoff) => continue,
                        _ = shutdown.cancelled() => break,
                    }
                }
            }
            tokio::select! {
                _ = committed.notified() => {}
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                _ = shutdown.cancelled() => break,
            }
        }
        // Last pass for rows committed while the service was stopping.
        if let Err(e) = self.publish_pending().await {
            log::warn!("outbox relay: final drain failed, rows stay pending for next start: {e}");
        }
        if let Err(e) = self.producer.flush(Duration::from_secs(5)) {
            log::warn!("outbox relay: flush on shutdown: {e}");
        }
        log::info!("outbox relay stopped");
    }

    /// Sends one batch of pending rows and marks those the broker acknowledged; returns how many
    /// were published. Sends are pipelined; the idempotent producer keeps them in order.
    pub async fn publish_pending(&self) -> Result<usize, RelayError> {
        let rows = self
            .db
            .read(|conn| pending(conn, BATCH).map_err(DbError::from))
            .await?;
        if rows.is_empty() {
            return Ok(0);
        }
        let mut deliveries = Vec::with_capacity(rows.len());
        for row in &rows {
            let record = FutureRecord::to(&self.topic)
                .key(&row.message_key)
                .payload(&row.payload);
            match self.producer.send_result(record) {
                Ok(delivery) => deliveries.push(delivery),
                Err((e, _)) => {
                    log::warn!(
                        "outbox relay: producer queue refused event {}: {e}",
                        row.event_id
                    );
                    break;
                }
            }
        }
        // Only the acknowledged prefix counts: a later row must not be marked before an
        // earlier one, or a retry would reorder them.
        let mut acknowledged = Vec::with_capacity(deliveries.len());
        let mut failure = None;
        for (row, delivery) in rows.iter().zip(deliveries) {
            match delivery.await {
                Ok(Ok(_)) if failure.is_none() => acknowledged.push(row.id),
                Ok(Ok(_)) => {}
                Ok(Err((e, _))) => {
                    failure.get_or_insert_with(|| format!("event {}: {e}", row.event_id));
                }
                Err(_) => {
                    failure
                        .get_or_insert_with(|| format!("event {}: send cancelled", row.event_id));
                }
            }
        }
        let count = acknowledged.len();
        if count > 0 {
            self.db
                .read(move |conn| mark_published(conn, &acknowledged).map_err(DbError::from))
                .await?;
        }
        match failure {
            Some(reason) => Err(RelayError::Broker(reason)),
            None => Ok(count),
        }
    }
}

/// Why a relay round did not publish everything.
#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    /// Reading or marking rows failed.
    #[error(transparent)]
    Db(#[from] DbError),
    /// The broker did not acknowledge a message.
    #[error("broker did not acknowledge {0}")]
    Broker(String),
}
