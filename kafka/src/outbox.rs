//! The transactional outbox: events are written as rows in the same transaction as the state
//! change that causes them, and the [`OutboxRelay`] publishes those rows in order.
//!
//! A crash before the commit loses both the change and its events; a crash after it loses
//! nothing, because the row stays unpublished until the broker has acknowledged it. A crash
//! between the acknowledgement and marking the row can publish it twice, which consumers absorb
//! by event id.
//!
//! Each row is stamped with the saga topic's partition of its key ([`crate::routing`]), and
//! each instance's relay publishes the rows of the partitions its consumer holds, under the
//! same leases ([`crate::leases`]); rows of no partition (dead letters) go with the `relay`
//! lease. Rows are read in id order, and one key's rows get their ids in commit order (a
//! write takes its locks before it draws them), so each order's events reach its partition in
//! the order they were committed. Two relays publish one partition at once only when a holder
//! paused past its lease resumes mid-batch: its rows are then published twice, which consumers
//! absorb by event id; its marks are fenced by the lease ([`mark_as_holder`]).
//!
//! [`RelayStatus`] keeps the relay's counts for `/health` and `/metrics` alike; the backlog
//! ([`backlog`]: pending rows, age of the oldest) is read when `/metrics` is scraped.

use crate::db::DbConnection;
use crate::db::{Database, DbError, KeptConnection};
use crate::leases::{self, Membership};
use crate::metrics::Metrics;
use crate::prepared::{FEW_ROWS, PrepareOnce};
use crate::routing::Routing;
use diesel::prelude::*;
use events::Envelope;
use prometheus::IntCounter;
use rdkafka::error::{KafkaError, KafkaResult, RDKafkaErrorCode};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
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
        topic -> Nullable<Text>,
        error -> Nullable<Text>,
        headers -> Nullable<Text>,
        topic_partition -> Nullable<Integer>,
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
    /// The topic it goes to; null means the saga topic.
    pub topic: Option<String>,
    /// Why the broker refused it for good, if it did.
    pub error: Option<String>,
    /// Kafka headers, a JSON object of strings (a redriven event names its original).
    pub headers: Option<String>,
    /// The saga topic's partition it is produced to, and whose holder publishes it
    /// ([`crate::routing`]); null: the holder of the `relay` lease publishes it.
    pub topic_partition: Option<i32>,
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
    /// See [`OutboxRow::topic`].
    pub topic: Option<String>,
    /// See [`OutboxRow::headers`].
    pub headers: Option<String>,
    /// See [`OutboxRow::topic_partition`].
    pub topic_partition: Option<i32>,
}

impl From<&Envelope> for NewOutboxRow {
    fn from(event: &Envelope) -> Self {
        NewOutboxRow {
            event_id: event.event_id.to_string(),
            event_type: event.event_type().to_owned(),
            message_key: event.key(),
            payload: event.to_json(),
            created_at: chrono::Utc::now().to_rfc3339(),
            topic: None,
            headers: None,
            topic_partition: None,
        }
    }
}

/// Adds `events` to the outbox inside the caller's transaction, each stamped with the
/// partition `routing` gives its key.
pub fn enqueue(conn: &mut DbConnection, events: &[Envelope], routing: &Routing) -> QueryResult<()> {
    if events.is_empty() {
        return Ok(());
    }
    let rows: Vec<NewOutboxRow> = events
        .iter()
        .map(|event| {
            let row = NewOutboxRow::from(event);
            let topic_partition = routing.partition_of(&row.message_key);
            routing.written(topic_partition);
            NewOutboxRow {
                topic_partition,
                ..row
            }
        })
        .collect();
    let statement = diesel::insert_into(outbox::table).values(&rows);
    // SQLite inserts rows with defaults one by one (diesel's own path, which keeps them).
    match conn {
        DbConnection::Postgres(c) if rows.len() <= FEW_ROWS => statement.prepared().execute(c),
        _ => crate::on_backend!(conn, |c| statement.execute(c)).map(|_| ()),
    }
}

/// Adds a dead letter for `dead_letter_topic` to the outbox inside the caller's transaction.
pub fn enqueue_dead_letter(
    conn: &mut DbConnection,
    dead_letter_topic: &str,
    letter: &events::DeadLetter,
) -> QueryResult<()> {
    let row = NewOutboxRow {
        event_id: uuid::Uuid::now_v7().to_string(), // time-ordered, as events' ids
        event_type: "DeadLetter".into(),
        message_key: letter.key.clone().unwrap_or_default(),
        payload: letter.to_json(),
        created_at: chrono::Utc::now().to_rfc3339(),
        topic: Some(dead_letter_topic.to_owned()),
        headers: None,
        topic_partition: None,
    };
    diesel::insert_into(outbox::table)
        .values(&row)
        .execute(conn)
        .map(|_| ())
}

/// Adds `event` for the saga topic with Kafka `headers` (name, value) inside the caller's
/// transaction. Of no partition: a redriven copy is published by the `relay` lease's holder
/// (to the partition of its key all the same).
pub fn enqueue_with_headers(
    conn: &mut DbConnection,
    event: &Envelope,
    headers: &[(&str, &str)],
) -> QueryResult<()> {
    let object: serde_json::Map<String, serde_json::Value> = headers
        .iter()
        .map(|(k, v)| ((*k).to_owned(), serde_json::Value::from(*v)))
        .collect();
    let row = NewOutboxRow {
        headers: Some(serde_json::Value::Object(object).to_string()),
        ..NewOutboxRow::from(event)
    };
    diesel::insert_into(outbox::table)
        .values(&row)
        .execute(conn)
        .map(|_| ())
}

/// The stored headers as Kafka headers; a value that is not a string is skipped.
fn kafka_headers(json: &str) -> rdkafka::message::OwnedHeaders {
    let object: serde_json::Map<String, serde_json::Value> =
        serde_json::from_str(json).unwrap_or_default();
    object
        .iter()
        .filter_map(|(k, v)| v.as_str().map(|v| (k, v)))
        .fold(
            rdkafka::message::OwnedHeaders::new(),
            |headers, (key, value)| {
                headers.insert(rdkafka::message::Header {
                    key,
                    value: Some(value),
                })
            },
        )
}

/// The oldest `limit` unpublished rows, in commit order.
pub fn pending(conn: &mut DbConnection, limit: i64) -> QueryResult<Vec<OutboxRow>> {
    outbox::table
        .filter(outbox::published_at.is_null())
        .order(outbox::id)
        .limit(limit)
        .select(OutboxRow::as_select())
        .load(conn)
}

/// What one relay publishes: the rows of the saga topic's partitions it holds, and with the
/// `relay` lease the rows of no partition.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Share {
    /// The partitions whose rows it publishes.
    pub partitions: Vec<i32>,
    /// Whether it holds the `relay` lease (rows of no partition).
    pub unpartitioned: bool,
}

impl Share {
    /// Nothing to publish: another instance publishes everything.
    pub fn is_empty(&self) -> bool {
        self.partitions.is_empty() && !self.unpartitioned
    }
}

/// The oldest `limit` unpublished rows of `share` past id `after`, in commit order.
pub fn pending_of(
    conn: &mut DbConnection,
    share: &Share,
    after: i64,
    limit: i64,
) -> QueryResult<Vec<OutboxRow>> {
    let mine = outbox::topic_partition.eq_any(share.partitions.clone());
    let rows = outbox::table
        .filter(outbox::published_at.is_null())
        .filter(outbox::id.gt(after))
        .order(outbox::id)
        .limit(limit)
        .select(OutboxRow::as_select());
    if share.unpartitioned {
        rows.filter(mine.or(outbox::topic_partition.is_null()))
            .load(conn)
    } else {
        rows.filter(mine).load(conn)
    }
}

use crate::leases::leases as lease_rows;
diesel::allow_tables_to_appear_in_same_query!(outbox, lease_rows);

/// Marks rows as acknowledged by the broker, or refused for good (`error`), in one statement
/// that marks a row only while `holder` holds its lease — its partition of `topic`'s, or the
/// `relay` lease for a row of no partition: the fence of the relays. A holder that paused
/// past its lease and woke mid-batch marks nothing of that partition, and the new holder
/// publishes and marks those rows itself. One statement, so it is atomic with the lease
/// check without a lock.
pub fn mark_as_holder(
    conn: &mut DbConnection,
    holder: &str,
    topic: &str,
    ids: &[i64],
    error: Option<&str>,
) -> QueryResult<usize> {
    use diesel::sql_types::Text;
    // The row's lease, named as crate::leases::partition_lease names it.
    let lease_of_row = diesel::dsl::sql::<Text>("CASE WHEN outbox.topic_partition IS NULL THEN ")
        .bind::<Text, _>(leases::RELAY)
        .sql(" ELSE ")
        .bind::<Text, _>(format!("{topic}/"))
        .sql(" || outbox.topic_partition END");
    let holds = diesel::dsl::exists(
        lease_rows::table
            .filter(lease_rows::name.eq(lease_of_row))
            .filter(lease_rows::holder.eq(holder)),
    );
    diesel::update(outbox::table.filter(outbox::id.eq_any(ids)).filter(holds))
        .set((
            outbox::published_at.eq(chrono::Utc::now().to_rfc3339()),
            outbox::error.eq(error),
        ))
        .execute(conn)
}

/// Marks rows as acknowledged by the broker.
pub fn mark_published(conn: &mut DbConnection, ids: &[i64]) -> QueryResult<usize> {
    diesel::update(outbox::table.filter(outbox::id.eq_any(ids)))
        .set(outbox::published_at.eq(chrono::Utc::now().to_rfc3339()))
        .execute(conn)
}

/// Marks a row the broker refused for good: it is done, with the reason, so it cannot block
/// the rows behind it.
pub fn mark_refused(conn: &mut DbConnection, id: i64, error: &str) -> QueryResult<usize> {
    diesel::update(outbox::table.find(id))
        .set((
            outbox::published_at.eq(chrono::Utc::now().to_rfc3339()),
            outbox::error.eq(error),
        ))
        .execute(conn)
}

/// How many rows wait to be published.
pub fn pending_count(conn: &mut DbConnection) -> QueryResult<i64> {
    outbox::table
        .filter(outbox::published_at.is_null())
        .count()
        .get_result(conn)
}

/// The rows waiting to be published, as `/metrics` shows them.
#[derive(Debug, Clone, PartialEq)]
pub struct Backlog {
    /// How many rows are pending.
    pub pending: i64,
    /// When the oldest pending row (the next to publish) was written.
    pub oldest_created_at: Option<String>,
}

impl Backlog {
    /// Seconds since the oldest pending row was written at `now`; 0 when none is pending
    /// (or its time cannot be read).
    pub fn oldest_age_seconds(&self, now: chrono::DateTime<chrono::Utc>) -> f64 {
        self.oldest_created_at
            .as_deref()
            .and_then(|t| chrono::DateTime::parse_from_rfc3339(t).ok())
            .map_or(0.0, |t| {
                (now - t.with_timezone(&chrono::Utc))
                    .to_std()
                    .map_or(0.0, |age| age.as_secs_f64())
            })
    }
}

/// The pending row count and the oldest pending row's time, in one read.
pub fn backlog(conn: &mut DbConnection) -> QueryResult<Backlog> {
    conn.transaction(|conn| {
        let oldest = outbox::table
            .filter(outbox::published_at.is_null())
            .order(outbox::id)
            .select(outbox::created_at)
            .first::<String>(conn)
            .optional()?;
        Ok(Backlog {
            pending: pending_count(conn)?,
            oldest_created_at: oldest,
        })
    })
}

/// Rows published per round trip to the database.
const BATCH: i64 = 500;

/// Where the relay's polls start: past the rows it published a while ago.
///
/// A poll reads the oldest pending rows of the relay's share by id, and an index of pending
/// rows keeps the entries of rows marked since the last vacuum: read from the first id, every
/// poll walks all of them (measured: 3 ms a poll after 30,000 marks). Rows are visible in
/// commit order, not id order — a transaction draws its ids before it commits — so a poll
/// starts past the ids published at least [`Floor::late`] ago, not past the last ones: only a
/// row committed that much later than its id was drawn (a writer stalled mid-commit) is
/// below that, and every [`Floor::full_every`] a poll starts from the first id to find it.
/// A new share (a partition taken over, with its rows of old ids) starts from the first id too.
#[derive(Debug)]
struct Floor {
    /// How late a row may commit after its id was drawn and still be found by every poll.
    late: Duration,
    /// How often a poll reads from the first id.
    full_every: Duration,
    /// When the last poll from the first id ran.
    last_full: Option<Instant>,
    /// The share the floor is for.
    share: Share,
    /// (when, id): every row of the share up to `id` that was visible then is published.
    published: std::collections::VecDeque<(Instant, i64)>,
}

impl Floor {
    fn new(late: Duration, full_every: Duration) -> Self {
        Floor {
            late,
            full_every,
            last_full: None,
            share: Share::default(),
            published: std::collections::VecDeque::new(),
        }
    }

    /// The id a poll of `share` at `now` starts past.
    fn after(&mut self, share: &Share, now: Instant) -> i64 {
        if *share != self.share {
            self.share.clone_from(share);
            self.published.clear();
            self.last_full = None;
        }
        if self
            .last_full
            .is_none_or(|at| now.duration_since(at) >= self.full_every)
        {
            self.last_full = Some(now);
            return 0;
        }
        // The newest record old enough; the older ones are of no more use.
        let old_enough = self
            .published
            .iter()
            .rposition(|(at, _)| now.duration_since(*at) >= self.late);
        match old_enough {
            Some(i) => {
                self.published.drain(..i);
                self.published.front().map_or(0, |(_, id)| *id)
            }
            None => 0,
        }
    }

    /// Every row of the share up to `id` that a poll at `now` read is published (or refused for
    /// good): the acknowledged prefix of what it read.
    fn published_through(&mut self, now: Instant, id: i64) {
        if self.published.back().is_none_or(|(_, last)| id > *last) {
            self.published.push_back((now, id));
        }
    }
}

/// How late a row may commit after drawing its id and still be found by the next poll
/// ([`Floor`]); later ones wait for the next poll from the first id.
const LATE_COMMIT: Duration = Duration::from_secs(3);
/// How often a relay without the `relay` lease tries to take it.
const CLAIM_EVERY: Duration = Duration::from_secs(1);
/// How soon rows just published are marked when no commit wakes the relay first.
const MARK_WITHIN: Duration = Duration::from_millis(20);
/// How often a poll starts from the first id ([`Floor`]).
const FULL_POLL_EVERY: Duration = Duration::from_secs(5);

/// Makes the relay's producer; called again when the current one hits a fatal error.
pub type ProducerFactory = Box<dyn Fn() -> KafkaResult<FutureProducer> + Send + Sync>;

/// What the relay reports to `/health` and `/metrics`.
#[derive(Debug)]
pub struct RelayStatus {
    inner: Mutex<RelayState>,
    /// The relay's share of the service's [`Metrics`]: the one place its counts are kept.
    published: IntCounter,
    refused: IntCounter,
    failures: IntCounter,
    producers_recreated: IntCounter,
}

#[derive(Debug, Default)]
struct RelayState {
    /// Since when rounds have been failing without a break; `None` while they succeed.
    failing_since: Option<Instant>,
    /// Since when the current round waits for acknowledgements (sends never time out).
    waiting_since: Option<Instant>,
    last_error: Option<String>,
    last_fatal: Option<String>,
    /// What this instance publishes, as of the relay's last round.
    share: Share,
}

impl RelayStatus {
    /// A relay's status, counted in `metrics`.
    pub fn new(metrics: &Metrics) -> Self {
        RelayStatus {
            inner: Mutex::default(),
            published: metrics.relay_published.clone(),
            refused: metrics.relay_refused.clone(),
            failures: metrics.relay_failures.clone(),
            producers_recreated: metrics.producer_recreated.clone(),
        }
    }

    fn succeeded(&self, published: usize) {
        lock(&self.inner).failing_since = None;
        self.published.inc_by(published as u64);
    }

    fn failed(&self, error: &str) {
        let mut s = lock(&self.inner);
        s.failing_since.get_or_insert_with(Instant::now);
        s.last_error = Some(error.to_owned());
    }

    /// Standing by (publishing nothing) is a healthy state whatever failed before: other
    /// instances publish, so a failure from when this one had rows of its own no longer stands.
    fn publishing(&self, share: &Share) {
        let mut s = lock(&self.inner);
        s.share.clone_from(share);
        if share.is_empty() {
            s.failing_since = None;
            s.waiting_since = None;
        }
    }

    fn waiting(&self, waiting: bool) {
        lock(&self.inner).waiting_since = waiting.then(Instant::now);
    }

    /// A round failed for any reason (broker or database) and will be retried.
    fn round_failed(&self) {
        self.failures.inc();
    }

    fn refused(&self) {
        self.refused.inc();
    }

    fn recreated(&self, fatal: &str) {
        self.producers_recreated.inc();
        lock(&self.inner).last_fatal = Some(fatal.to_owned());
    }

    /// Why the relay is stuck, if it has been failing, or waiting for the broker, for longer
    /// than `after`.
    pub fn problem(&self, after: Duration) -> Option<String> {
        let s = lock(&self.inner);
        if let Some(waiting) = s.waiting_since.filter(|t| t.elapsed() > after) {
            return Some(format!(
                "outbox relay waiting {} s for the broker to acknowledge events",
                waiting.elapsed().as_secs()
            ));
        }
        let since = s.failing_since?;
        (since.elapsed() > after).then(|| {
            format!(
                "outbox relay failing for {} s: {}",
                since.elapsed().as_secs(),
                s.last_error.as_deref().unwrap_or("unknown")
            )
        })
    }

    /// The figures `/health` shows.
    pub fn snapshot(&self) -> serde_json::Value {
        let s = lock(&self.inner);
        serde_json::json!({
            "standby": s.share.is_empty(),
            "partitions": s.share.partitions,
            "unpartitioned": s.share.unpartitioned,
            "published": self.published.get(),
            "refusedByBroker": self.refused.get(),
            "failingForSeconds": s.failing_since.map(|t| t.elapsed().as_secs()),
            "waitingForSeconds": s.waiting_since.map(|t| t.elapsed().as_secs()),
            "lastError": s.last_error,
            "producersRecreated": self.producers_recreated.get(),
            "lastFatalError": s.last_fatal,
        })
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Publishes this instance's share of the outbox rows ([`Share`]) in commit order, as soon as
/// they are committed.
///
/// Stops when its token is cancelled, which the host does only after the consumer's last
/// commit and before the consumer gives up its partitions, so events committed on the way out
/// are published before the process exits.
pub struct OutboxRelay {
    /// The database whose outbox it publishes; its routing names the partitions the consumer
    /// holds, whose rows it publishes.
    db: Database,
    /// Makes the producer; used again after a fatal producer error.
    make_producer: ProducerFactory,
    /// The idempotent producer in use.
    producer: FutureProducer,
    /// The saga topic, for rows without a topic of their own.
    topic: String,
    /// Shared with `/health`; counts into the service's [`Metrics`].
    status: Arc<RelayStatus>,
    /// This instance, for the `relay` lease; released after the final drain.
    membership: Membership,
    /// Until when (ms since the epoch) this instance holds the `relay` lease, as it last
    /// wrote it.
    held_until: Option<i64>,
    /// Rows the broker acknowledged (or refused for good, with the reason) and not marked yet:
    /// the last round's, or ones whose marking failed. Marked first in the next round and never
    /// sent again (each only while its lease is still this instance's; the new holder decides
    /// about the others).
    unmarked: Vec<(i64, Option<String>)>,
    /// Where its polls start.
    floor: Floor,
    /// When it may next try to take the `relay` lease, while another instance holds it.
    next_claim: Option<Instant>,
    /// The connection of its last round, for the next (PostgreSQL): one round trip a round
    /// less than a checkout. Dropped (back to the pool) after a failed round.
    connection: KeptConnection,
}

impl OutboxRelay {
    /// A relay for `db`'s outbox publishing to `topic` through producers from `make_producer`,
    /// counting into `metrics`.
    pub fn new(
        db: Database,
        make_producer: ProducerFactory,
        topic: String,
        membership: Membership,
        metrics: &Metrics,
    ) -> KafkaResult<Self> {
        let producer = make_producer()?;
        Ok(OutboxRelay {
            db,
            make_producer,
            producer,
            topic,
            status: Arc::new(RelayStatus::new(metrics)),
            membership,
            held_until: None,
            unmarked: Vec::new(),
            floor: Floor::new(LATE_COMMIT, FULL_POLL_EVERY),
            next_claim: None,
            connection: KeptConnection::default(),
        })
    }

    /// What this instance publishes now: the partitions its consumer holds, and the rows of
    /// no partition while it holds the `relay` lease.
    async fn share(&mut self) -> Share {
        let unpartitioned = self.holds_lease().await;
        self.db.routing().set_relay_lease(unpartitioned);
        let share = Share {
            partitions: self.db.routing().held().into_iter().collect(),
            unpartitioned,
        };
        if share.is_empty() {
            // Every lease is another instance's now, and so are the rows not marked yet.
            self.unmarked.clear();
        }
        self.status.publishing(&share);
        share
    }

    /// Whether this instance holds the `relay` lease with at least half its time left,
    /// renewing it when less is left (one write per half lease time). Without it, it tries to
    /// take it once a [`CLAIM_EVERY`], not at every round: the rounds of a relay publishing its
    /// partitions come many a second, and each try is a write.
    async fn holds_lease(&mut self) -> bool {
        let half = self.membership.ttl.as_millis() as i64 / 2;
        if self
            .held_until
            .is_some_and(|until| until - leases::now_ms() > half)
        {
            return true;
        }
        if self.held_until.is_none() && self.next_claim.is_some_and(|at| Instant::now() < at) {
            return false;
        }
        self.next_claim = Some(Instant::now() + CLAIM_EVERY);
        let membership = self.membership.clone();
        let held = self
            .db
            .write(move |conn| {
                Ok::<_, DbError>((membership.hold(conn, leases::RELAY)?, Vec::new()))
            })
            .await;
        let was_held = self.held_until.is_some();
        self.held_until = match held {
            Ok(until) => until,
            Err(e) => {
                // Neither publishing nor standing by: a failure `/health` shows if it lasts.
                log::warn!("outbox relay: cannot renew its lease: {e}");
                self.status
                    .failed(&format!("cannot hold the relay lease: {e}"));
                None
            }
        };
        match (was_held, self.held_until.is_some()) {
            (false, true) => {
                log::info!("outbox relay: this instance publishes the rows of no partition")
            }
            (true, false) => log::warn!(
                "outbox relay: relay lease lost; another instance publishes the rows of no partition"
            ),
            _ => {}
        }
        self.held_until.is_some()
    }

    /// [`OutboxRelay::unmarked`] marked: [`OutboxRelay::mark_and_read`] without a read.
    async fn mark_sent(&mut self) -> Result<bool, RelayError> {
        self.mark_and_read(None)
            .await
            .map(|(all_marked, _)| all_marked)
    }

    /// Marks [`OutboxRelay::unmarked`], fenced by the rows' leases, then reads the pending rows
    /// of `next` (a share, past an id), on one connection: the relay's, kept from round to round.
    /// Each mark statement checks the leases and marks at once, so on PostgreSQL it needs no turn
    /// in the writer's transactions ([`Database::write_alone`]); against a takeover committing
    /// meanwhile it is safe either way: marked first, the new holder may send the rows again
    /// (absorbed by event id); marked after, nothing is marked. Returns whether every row was
    /// marked — if not, a lease moved, nothing is read, and the share is read again first — and
    /// the rows read. A failure is shown in the status; the rows stay to be marked.
    async fn mark_and_read(
        &mut self,
        next: Option<(Share, i64)>,
    ) -> Result<(bool, Vec<OutboxRow>), RelayError> {
        let (me, rows) = (self.membership.me.clone(), self.unmarked.clone());
        let topic = self.topic.clone();
        let expected = rows.len();
        let done = self
            .db
            .write_alone_kept(&mut self.connection, move |conn| {
                let mut marked = 0;
                if !rows.is_empty() {
                    let acknowledged: Vec<i64> = rows
                        .iter()
                        .filter(|(_, error)| error.is_none())
                        .map(|(id, _)| *id)
                        .collect();
                    marked = mark_as_holder(conn, &me, &topic, &acknowledged, None)?;
                    for (id, error) in &rows {
                        if let Some(error) = error {
                            marked += mark_as_holder(conn, &me, &topic, &[*id], Some(error))?;
                        }
                    }
                }
                let read = match next {
                    Some((share, after)) if marked == expected => {
                        pending_of(conn, &share, after, BATCH)?
                    }
                    _ => Vec::new(),
                };
                Ok::<_, DbError>((marked, read))
            })
            .await;
        let (marked, read) = match done {
            Ok(done) => done,
            Err(e) => {
                self.status.failed(&e.to_string());
                return Err(e.into());
            }
        };
        self.unmarked.clear();
        if marked < expected {
            // A lease moved while this batch was out (a rebalance, a pause past the lease):
            // the new holder owns these rows; the copies just sent are absorbed by event id.
            log::warn!(
                "outbox relay: a lease moved mid-batch; {} row(s) left to the new holder",
                expected - marked
            );
            // The relay lease too is checked again, at once.
            (self.held_until, self.next_claim) = (None, None);
            return Ok((false, Vec::new()));
        }
        Ok((true, read))
    }

    /// This relay with its polls' [`Floor`] timings shortened (tests).
    #[cfg(test)]
    fn with_floor(mut self, late: Duration, full_every: Duration) -> Self {
        self.floor = Floor::new(late, full_every);
        self
    }

    /// The status `/health` reads.
    pub fn status(&self) -> Arc<RelayStatus> {
        self.status.clone()
    }

    /// Publishes until `shutdown`, then drains what is committed for at most `drain` and
    /// exits; rows still pending then are published on the next start.
    ///
    /// It wakes when a transaction commits an event, and every second anyway, so rows left by a
    /// crash or a failed send are retried.
    pub async fn run(mut self, shutdown: CancellationToken, drain: Duration) {
        let committed = self.db.outbox_committed();
        // Another instance's commit of a row this one publishes wakes it too.
        self.db.listen_to_other_instances();
        let mut held = self.db.routing().watch_held();
        let mut failures = 0u32;
        loop {
            let share = self.share().await;
            if share.is_empty() {
                // Other instances publish; take over when the consumer takes partitions or
                // the relay lease lapses.
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_secs(1)) => continue,
                    _ = held.changed() => continue,
                    _ = shutdown.cancelled() => break,
                }
            }
            match self.publish_pending(&share, &shutdown).await {
                Ok(n) if n as i64 == BATCH => continue,
                Ok(_) => failures = 0,
                Err(RelayError::Interrupted) => break,
                Err(e) => {
                    failures += 1;
                    self.status.round_failed();
                    log::warn!("outbox relay: {e}; retrying");
                    let backoff = Duration::from_millis(100 * u64::from(failures.min(20)));
                    tokio::select! {
                        _ = tokio::time::sleep(backoff) => continue,
                        _ = shutdown.cancelled() => break,
                    }
                }
            }
            // Rows just sent are marked by the next round; soon, if no commit brings one.
            let next_round = if self.unmarked.is_empty() {
                Duration::from_secs(1)
            } else {
                MARK_WITHIN
            };
            tokio::select! {
                _ = committed.notified() => {}
                _ = held.changed() => {}
                _ = tokio::time::sleep(next_round) => {}
                _ = shutdown.cancelled() => break,
            }
        }
        // Last pass for rows committed while the service was stopping, bounded in time.
        let deadline = CancellationToken::new();
        let timer = {
            let deadline = deadline.clone();
            tokio::spawn(async move {
                tokio::time::sleep(drain).await;
                deadline.cancel();
            })
        };
        loop {
            let share = self.share().await;
            if share.is_empty() {
                break;
            }
            match self.publish_pending(&share, &deadline).await {
                Ok(n) if n as i64 == BATCH => continue,
                Ok(_) => break,
                Err(e) => {
                    log::warn!("outbox relay: final drain stopped, rows stay pending: {e}");
                    break;
                }
            }
        }
        // The last round's marks, within the drain's time: a row left unmarked is sent again by
        // the partition's next holder, and absorbed by event id.
        tokio::select! {
            marked = self.mark_sent() => if let Err(e) = marked {
                log::warn!("outbox relay: last marks failed, those rows are sent again later: {e}");
            },
            _ = deadline.cancelled() => log::warn!("outbox relay: no time left for the last marks"),
        }
        timer.abort();
        if self.held_until.is_some() {
            let membership = self.membership.clone();
            let released = self
                .db
                .write(move |conn| {
                    Ok::<_, DbError>((membership.release(conn, leases::RELAY)?, Vec::new()))
                })
                .await;
            if let Err(e) = released {
                log::warn!("outbox relay: lease not given up (it expires): {e}");
            }
        }
        log::info!("outbox relay stopped");
    }

    /// Marks what the last round published, then sends one batch of `share`'s pending rows;
    /// the ones the broker acknowledged are marked by the next round (or the last marks on the
    /// way out). Returns how many were published. Sends are pipelined; the idempotent producer
    /// keeps them in order and, with no message timeout, never leaves a gap that a resend could
    /// fill out of order.
    async fn publish_pending(
        &mut self,
        share: &Share,
        stop: &CancellationToken,
    ) -> Result<usize, RelayError> {
        // What the last round sent is marked (with the read, on the kept connection), never sent again.
        let polled = Instant::now();
        let after = self.floor.after(share, polled);
        let (all_marked, rows) = self.mark_and_read(Some((share.clone(), after))).await?;
        if !all_marked {
            // A lease moved: its rows are the new holder's to send; read the share again.
            return Ok(0);
        }
        if rows.is_empty() {
            self.status.succeeded(0);
            return Ok(0);
        }
        let mut deliveries = Vec::with_capacity(rows.len());
        for row in &rows {
            let topic = row.topic.as_deref().unwrap_or(&self.topic);
            let mut record = FutureRecord::to(topic)
                .key(&row.message_key)
                .payload(&row.payload);
            if let Some(partition) = row.topic_partition {
                record = record.partition(partition);
            }
            if let Some(headers) = row.headers.as_deref().map(kafka_headers) {
                record = record.headers(headers);
            }
            match self.producer.send_result(record) {
                Ok(delivery) => deliveries.push(Sent::Queued(delivery)),
                Err((e, _)) if is_refused_for_good(&e) => deliveries.push(Sent::Refused(e)),
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
        self.status.waiting(true);
        let mut acknowledged = Vec::with_capacity(deliveries.len());
        let mut refused = Vec::new();
        let mut failure = None;
        for (row, sent) in rows.iter().zip(deliveries) {
            let result = match sent {
                Sent::Refused(e) => Err(e),
                Sent::Queued(delivery) => tokio::select! {
                    outcome = delivery => match outcome {
                        Ok(Ok(_)) => Ok(()),
                        Ok(Err((e, _))) => Err(e),
                        Err(_) => Err(KafkaError::Canceled),
                    },
                    _ = stop.cancelled() => {
                        failure.get_or_insert(RelayError::Interrupted);
                        break;
                    }
                },
            };
            match result {
                Ok(()) if failure.is_none() => acknowledged.push(row.id),
                Ok(()) => {}
                Err(e) if failure.is_none() && is_refused_for_good(&e) => {
                    log::error!(
                        "outbox relay: the broker refuses {} {} for good ({e}); \
                         marked with the error and skipped",
                        row.event_type,
                        row.event_id
                    );
                    refused.push((row.id, e.to_string()));
                }
                Err(e) => {
                    failure.get_or_insert_with(|| {
                        RelayError::Broker(format!("event {}: {e}", row.event_id))
                    });
                }
            }
        }
        self.status.waiting(false);
        // The acknowledged (or refused) prefix of what was read is done.
        let done = acknowledged.len() + refused.len();
        if let Some(last) = done.checked_sub(1).map(|i| rows[i].id) {
            self.floor.published_through(polled, last);
        }
        let count = acknowledged.len();
        if count > 0 || !refused.is_empty() {
            for _ in &refused {
                self.status.refused();
            }
            // Marked by the next round, with its read.
            self.unmarked = acknowledged
                .into_iter()
                .map(|id| (id, None))
                .chain(refused.into_iter().map(|(id, error)| (id, Some(error))))
                .collect();
        }
        match failure {
            Some(RelayError::Interrupted) => Err(RelayError::Interrupted),
            Some(e) => {
                self.status.failed(&e.to_string());
                self.recreate_if_fatal();
                Err(e)
            }
            None => {
                self.status.succeeded(count);
                Ok(count)
            }
        }
    }

    /// An idempotent producer that hit a fatal error (unknown producer id, out-of-order
    /// sequence) fails every send from then on; only a new producer recovers. The rows it did
    /// not acknowledge are resent by the new one; consumers absorb the copies by event id.
    fn recreate_if_fatal(&mut self) {
        let Some((code, reason)) = self.producer.client().fatal_error() else {
            return;
        };
        let fatal = format!("{code:?}: {reason}");
        log::error!("outbox relay: producer fatal error {fatal}; creating a new producer");
        match (self.make_producer)() {
            Ok(producer) => {
                self.producer = producer;
                self.status.recreated(&fatal);
            }
            Err(e) => log::error!("outbox relay: cannot create a new producer: {e}"),
        }
    }
}

/// Errors that will not go away for this message (it is too large, say).
fn is_refused_for_good(e: &KafkaError) -> bool {
    matches!(
        e.rdkafka_error_code(),
        Some(
            RDKafkaErrorCode::MessageSizeTooLarge
                | RDKafkaErrorCode::InvalidMessageSize
                | RDKafkaErrorCode::InvalidMessage
                | RDKafkaErrorCode::InvalidRecord
        )
    )
}

/// A row handed to the producer, or refused by it at once.
enum Sent {
    Queued(rdkafka::producer::DeliveryFuture),
    Refused(KafkaError),
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
    /// The relay was told to stop while waiting for acknowledgements.
    #[error("stopped while waiting for the broker")]
    Interrupted,
}

#[cfg(test)]
mod tests {
    use super::*;

    const PLUMBING: crate::db::Migrations = crate::db::PLUMBING_MIGRATIONS;

    fn row(n: u32, age_seconds: i64) -> NewOutboxRow {
        NewOutboxRow {
            event_id: format!("event-{n}"),
            event_type: "OrderPlaced".into(),
            message_key: "1".into(),
            payload: "{}".into(),
            created_at: (chrono::Utc::now() - chrono::Duration::seconds(age_seconds)).to_rfc3339(),
            topic: None,
            headers: None,
            topic_partition: None,
        }
    }

    fn share(partitions: &[i32]) -> Share {
        Share {
            partitions: partitions.to_vec(),
            unpartitioned: true,
        }
    }

    #[test]
    fn a_poll_starts_past_the_rows_published_a_while_ago() {
        let (late, full) = (Duration::from_secs(3), Duration::from_secs(10));
        let mut floor = Floor::new(late, full);
        let t0 = Instant::now();
        let at = |s: u64| t0 + Duration::from_secs(s);
        let mine = share(&[0, 1]);
        assert_eq!(
            floor.after(&mine, t0),
            0,
            "the first poll reads from the first id"
        );
        floor.published_through(t0, 10);
        assert_eq!(
            floor.after(&mine, at(1)),
            0,
            "10 was published too recently"
        );
        floor.published_through(at(1), 20);
        floor.published_through(at(1), 15); // never backwards
        assert_eq!(floor.after(&mine, at(3)), 10);
        assert_eq!(floor.after(&mine, at(4)), 20);
        assert_eq!(floor.after(&mine, at(9)), 20, "nothing newer published");
        assert_eq!(floor.after(&mine, at(10)), 0, "a full poll every 10 s");
        assert_eq!(floor.after(&mine, at(11)), 20);
    }

    #[test]
    fn a_new_share_is_read_from_the_first_id() {
        let mut floor = Floor::new(Duration::from_secs(1), Duration::from_secs(60));
        let t0 = Instant::now();
        floor.after(&share(&[0]), t0);
        floor.published_through(t0, 50);
        let later = t0 + Duration::from_secs(2);
        assert_eq!(floor.after(&share(&[0]), later), 50);
        // A partition taken over: its rows may be older than anything published here.
        assert_eq!(floor.after(&share(&[0, 3]), later), 0);
        assert_eq!(
            floor.after(&share(&[0, 3]), later + Duration::from_secs(2)),
            0,
            "nothing published since the change"
        );
    }

    /// The relays' fence: a relay that lost a lease (paused past it, woken mid-batch, or the
    /// partition moved) marks none of its rows; only the holder's marks land.
    #[tokio::test]
    async fn a_row_is_marked_only_by_the_holder_of_its_lease() {
        let dir = tempfile::tempdir().unwrap();
        let db = Database::open(dir.path().join("o.db").to_str().unwrap(), PLUMBING).unwrap();
        let member = |me: &str| Membership {
            me: me.into(),
            ttl: Duration::from_secs(60),
        };
        let (a, b) = (member("a"), member("b"));
        let marked = db
            .write(move |conn| {
                let in_partition = |n, p| NewOutboxRow {
                    topic_partition: Some(p),
                    ..row(n, 0)
                };
                // Rows of no partition (the relay lease's: b's), of partition 1 (a's), of 2 (b's).
                let rows = [
                    row(1, 0),
                    in_partition(2, 1),
                    in_partition(3, 2),
                    in_partition(4, 1),
                ];
                let statement = diesel::insert_into(outbox::table).values(&rows[..]);
                crate::on_backend!(conn, |c| statement.execute(c))?;
                let ids: Vec<i64> = outbox::table
                    .order(outbox::id)
                    .select(outbox::id)
                    .load(conn)?;
                b.hold(conn, leases::RELAY)?;
                a.hold(conn, &leases::partition_lease("t", 1))?;
                b.hold(conn, &leases::partition_lease("t", 2))?;
                let by_a = mark_as_holder(conn, "a", "t", &ids, None)?;
                let other_topic = mark_as_holder(conn, "b", "u", &ids, None)?;
                let by_b = mark_as_holder(conn, "b", "t", &ids, Some("too large"))?;
                let marked: Vec<(i64, Option<String>)> = outbox::table
                    .order(outbox::id)
                    .filter(outbox::published_at.is_not_null())
                    .select((outbox::id, outbox::error))
                    .load(conn)?;
                let refused = |id: i64| (id, Some("too large".to_owned()));
                let expected = vec![
                    refused(ids[0]),
                    (ids[1], None),
                    refused(ids[2]),
                    (ids[3], None),
                ];
                Ok::<_, DbError>(((by_a, other_topic, by_b, marked == expected), Vec::new()))
            })
            .await
            .unwrap();
        assert_eq!(
            marked,
            (2, 1, 2, true),
            "a marks its partition's two rows; b the rest (of another topic's partitions, none)"
        );
    }

    /// The relay's fence: a relay that lost its lease (paused past it, woken mid-batch)
    /// marks nothing; only the holder's marks land.
    #[tokio::test]
    async fn only_the_relay_lease_holder_marks_rows() {
        let dir = tempfile::tempdir().unwrap();
        let db = Database::open(dir.path().join("o.db").to_str().unwrap(), PLUMBING).unwrap();
        let b = Membership {
            me: "b".into(),
            ttl: Duration::from_secs(60),
        };
        let marked = db
            .write(move |conn| {
                let rows = [row(1, 0), row(2, 0)];
                let statement = diesel::insert_into(outbox::table).values(&rows[..]);
                crate::on_backend!(conn, |c| statement.execute(c))?;
                let ids: Vec<i64> = outbox::table.select(outbox::id).load(conn)?;
                b.hold(conn, leases::RELAY)?;
                let stale = mark_as_holder(conn, "a", "t", &ids, None)?;
                let stale_refusal = mark_as_holder(conn, "a", "t", &ids[..1], Some("too large"))?;
                let holder = mark_as_holder(conn, "b", "t", &ids, None)?;
                Ok::<_, DbError>(((stale, stale_refusal, holder), Vec::new()))
            })
            .await
            .unwrap();
        assert_eq!(
            marked,
            (0, 0, 2),
            "the stale relay marks nothing, the holder both"
        );
    }

    #[tokio::test]
    async fn the_backlog_counts_pending_rows_and_ages_the_next_to_publish() {
        let dir = tempfile::tempdir().unwrap();
        let db = Database::open(dir.path().join("o.db").to_str().unwrap(), PLUMBING).unwrap();
        let backlog = |db: Database| async move {
            db.read(|conn| backlog(conn).map_err(DbError::from))
                .await
                .unwrap()
        };
        let empty = backlog(db.clone()).await;
        assert_eq!(
            (empty.pending, empty.oldest_created_at.as_deref()),
            (0, None)
        );
        assert_eq!(empty.oldest_age_seconds(chrono::Utc::now()), 0.0);
        let ids = db
            .write(|conn| {
                let rows = [row(1, 300), row(2, 90), row(3, 0)];
                let statement = diesel::insert_into(outbox::table).values(&rows[..]);
                crate::on_backend!(conn, |c| statement.execute(c))?;
                let ids: Vec<i64> = outbox::table
                    .select(outbox::id)
                    .order(outbox::id)
                    .load(conn)?;
                mark_published(conn, &ids[..1])?;
                Ok::<_, DbError>((ids, Vec::new()))
            })
            .await
            .unwrap();
        let pending = backlog(db.clone()).await;
        assert_eq!(pending.pending, 2);
        let age = pending.oldest_age_seconds(chrono::Utc::now());
        assert!(
            (90.0..120.0).contains(&age),
            "the 90 s old row is next: {age}"
        );
        db.read(move |conn| mark_published(conn, &ids[1..]).map_err(DbError::from))
            .await
            .unwrap();
        assert_eq!(backlog(db).await.pending, 0);
    }
}

/// The relay against rdkafka's in-process `MockCluster`, with the service's own producer.
#[cfg(test)]
mod relay_tests {
    use super::*;
    use crate::settings::KafkaSettings;
    use diesel::connection::SimpleConnection;
    use events::{Event, OrderCompleted, Service};
    use rdkafka::consumer::{BaseConsumer, Consumer};
    use rdkafka::message::Message;
    use rdkafka::mocking::MockCluster;
    use rdkafka::producer::DefaultProducerContext;
    use rdkafka::{ClientConfig, Offset, TopicPartitionList};
    use std::collections::{BTreeMap, BTreeSet};

    const TOPIC: &str = "t";

    struct Setup {
        cluster: MockCluster<'static, DefaultProducerContext>,
        db: Database,
        _dir: tempfile::TempDir,
    }

    fn setup() -> Setup {
        let cluster = MockCluster::new(1).unwrap();
        cluster.create_topic(TOPIC, 3, 1).unwrap();
        cluster.create_topic("t.DLT", 1, 1).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let db = Database::open(
            dir.path().join("r.db").to_str().unwrap(),
            crate::db::PLUMBING_MIGRATIONS,
        )
        .unwrap();
        Setup {
            cluster,
            db,
            _dir: dir,
        }
    }

    /// A relay of `db` as instance `me` with lease time `ttl`, through the service's producer.
    fn relay(s: &Setup, me: &str, ttl: Duration) -> OutboxRelay {
        relay_of(s, s.db.clone(), me, ttl)
    }

    /// [`relay`] of another handle on the database (another instance's).
    fn relay_of(s: &Setup, db: Database, me: &str, ttl: Duration) -> OutboxRelay {
        let settings = KafkaSettings::new(&s.cluster.bootstrap_servers(), TOPIC, "test");
        OutboxRelay::new(
            db,
            Box::new(move || crate::producer::create_producer(&settings)),
            TOPIC.into(),
            Membership { me: me.into(), ttl },
            &Metrics::new(),
        )
        .unwrap()
    }

    /// A running relay: its status, its stop, its task.
    struct Running {
        status: Arc<RelayStatus>,
        stop: CancellationToken,
        task: tokio::task::JoinHandle<()>,
    }

    fn start(relay: OutboxRelay) -> Running {
        let (status, stop) = (relay.status(), CancellationToken::new());
        let task = tokio::spawn(relay.run(stop.clone(), Duration::from_secs(2)));
        Running { status, stop, task }
    }

    fn completed(order_id: i64, customer_id: String) -> Envelope {
        Envelope::new(
            Service::Orders,
            Event::OrderCompleted(OrderCompleted {
                order_id,
                product_id: 1,
                quantity: 1,
                customer_id,
            }),
        )
    }

    /// Commits `events` in one write; returns their ids.
    async fn commit(db: &Database, events: Vec<Envelope>) -> Vec<String> {
        let ids = events.iter().map(|e| e.event_id.to_string()).collect();
        db.write(move |_| Ok::<_, DbError>(((), events)))
            .await
            .unwrap();
        ids
    }

    /// Waits until nothing is pending, for at most `within`.
    async fn drained(db: &Database, within: Duration) -> Result<(), i64> {
        let end = Instant::now() + within;
        loop {
            let left = db
                .read(|conn| pending_count(conn).map_err(DbError::from))
                .await
                .unwrap();
            if left == 0 {
                return Ok(());
            }
            if Instant::now() > end {
                return Err(left);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Every message of the topic as `(key, eventId)`, partition by partition, in order.
    fn read_topic(cluster: &MockCluster<'static, DefaultProducerContext>) -> Vec<(String, String)> {
        read_partitions(cluster)
            .into_iter()
            .map(|(_, key, id)| (key, id))
            .collect()
    }

    /// Every message of the topic as `(partition, key, eventId)`, partition by partition, in
    /// order.
    fn read_partitions(
        cluster: &MockCluster<'static, DefaultProducerContext>,
    ) -> Vec<(i32, String, String)> {
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", cluster.bootstrap_servers())
            .set("group.id", "reader")
            .create()
            .unwrap();
        let mut messages = Vec::new();
        for partition in 0..3 {
            let (_, high) = consumer
                .fetch_watermarks(TOPIC, partition, Duration::from_secs(5))
                .unwrap();
            if high == 0 {
                continue;
            }
            let mut tpl = TopicPartitionList::new();
            tpl.add_partition_offset(TOPIC, partition, Offset::Beginning)
                .unwrap();
            consumer.assign(&tpl).unwrap();
            let end = Instant::now() + Duration::from_secs(10);
            let mut next = 0;
            while next < high {
                assert!(
                    Instant::now() < end,
                    "partition {partition} not read to {high}"
                );
                let Some(m) = consumer.poll(Duration::from_millis(100)) else {
                    continue;
                };
                let m = m.unwrap();
                let key = String::from_utf8_lossy(m.key().unwrap_or_default()).into_owned();
                let value: serde_json::Value =
                    serde_json::from_slice(m.payload().unwrap_or_default()).unwrap();
                messages.push((
                    partition,
                    key,
                    value["eventId"].as_str().unwrap_or_default().to_owned(),
                ));
                next = m.offset() + 1;
            }
        }
        messages
    }

    /// The event ids of each key, in topic order.
    fn by_key(messages: &[(String, String)]) -> BTreeMap<String, Vec<String>> {
        let mut keys: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for (key, id) in messages {
            keys.entry(key.clone()).or_default().push(id.clone());
        }
        keys
    }

    /// Six orders' events committed interleaved, some several to a write: on the topic, each
    /// order's events are in the order they were committed, each once.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn each_orders_events_reach_the_topic_in_commit_order() {
        let s = setup();
        let mut committed: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for step in 0..8 {
            for order in 1..=6i64 {
                let n = if (order + step) % 3 == 0 { 2 } else { 1 };
                let events = (0..n)
                    .map(|i| completed(order, format!("step {step}.{i}")))
                    .collect();
                let ids = commit(&s.db, events).await;
                committed.entry(order.to_string()).or_default().extend(ids);
            }
        }
        let running = start(relay(&s, "a", Duration::from_secs(10)));
        drained(&s.db, Duration::from_secs(20)).await.unwrap();
        running.stop.cancel();
        running.task.await.unwrap();
        assert_eq!(by_key(&read_topic(&s.cluster)), committed);
    }

    /// A row the broker refuses for good (too large) is marked with the error and skipped; the
    /// rows behind it are published, in order.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_row_refused_for_good_is_marked_and_does_not_block_the_rows_behind_it() {
        let s = setup();
        let before = commit(&s.db, vec![completed(1, "c".into())]).await;
        let huge = commit(&s.db, vec![completed(1, "x".repeat(2_000_000))]).await;
        let after = commit(&s.db, vec![completed(1, "c".into())]).await;
        let running = start(relay(&s, "a", Duration::from_secs(10)));
        let left = drained(&s.db, Duration::from_secs(20)).await;
        let health = running.status.snapshot();
        running.stop.cancel();
        running.task.await.unwrap();
        assert_eq!(left, Ok(()), "rows still pending: {health}");
        assert_eq!(
            by_key(&read_topic(&s.cluster)),
            BTreeMap::from([("1".to_owned(), [before, after].concat())])
        );
        let refused =
            s.db.read(move |conn| {
                outbox::table
                    .filter(outbox::event_id.eq(&huge[0]))
                    .select(OutboxRow::as_select())
                    .first(conn)
                    .map_err(DbError::from)
            })
            .await
            .unwrap();
        assert!(refused.published_at.is_some());
        let error = refused.error.unwrap_or_default();
        assert!(error.to_lowercase().contains("too large"), "{error}");
        assert_eq!(health["refusedByBroker"], 1, "{health}");
    }

    /// The partition a row is stamped with is the one librdkafka's default partitioner gives
    /// its key: a producer sending by key and the relay sending to the stamped partition agree.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn stamped_partitions_are_the_ones_the_producer_picks_by_key() {
        let s = setup();
        let settings = KafkaSettings::new(&s.cluster.bootstrap_servers(), TOPIC, "test");
        let producer = crate::producer::create_producer(&settings).unwrap();
        for order in 1..=40 {
            let key = order.to_string();
            let sent = producer
                .send(
                    FutureRecord::to(TOPIC).key(&key).payload("{}"),
                    Duration::from_secs(5),
                )
                .await
                .unwrap();
            assert_eq!(
                sent.partition,
                crate::routing::partition_for(&key, 3),
                "key {key}"
            );
        }
    }

    /// Two instances on one database, each holding some of the topic's partitions: each
    /// publishes the rows of its own partitions — whichever instance wrote them — to those
    /// partitions, and every event reaches the topic once.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn each_instance_publishes_the_partitions_it_holds() {
        let s = setup();
        let path = s._dir.path().join("r.db");
        let other = Database::open(path.to_str().unwrap(), crate::db::PLUMBING_MIGRATIONS).unwrap();
        let (a_held, b_held) = (BTreeSet::from([0]), BTreeSet::from([1, 2]));
        for (db, held, me) in [(&s.db, &a_held, "a"), (&other, &b_held, "b")] {
            db.routing().set_partitions(3);
            db.routing().hold(held);
            for p in held {
                leases::grant(db, TOPIC, *p, me).await;
            }
        }
        let mut committed = BTreeMap::new();
        for order in 1..=24i64 {
            let writer = if order % 2 == 0 { &s.db } else { &other };
            let ids = commit(writer, vec![completed(order, "c".into())]).await;
            committed.insert(ids[0].clone(), order.to_string());
        }
        let a = start(relay(&s, "a", Duration::from_secs(10)));
        let b = start(relay_of(&s, other.clone(), "b", Duration::from_secs(10)));
        drained(&s.db, Duration::from_secs(20)).await.unwrap();
        let (a_health, b_health) = (a.status.snapshot(), b.status.snapshot());
        for running in [a, b] {
            running.stop.cancel();
            running.task.await.unwrap();
        }
        let messages = read_partitions(&s.cluster);
        let published: BTreeMap<String, String> = messages
            .iter()
            .map(|(_, key, id)| (id.clone(), key.clone()))
            .collect();
        assert_eq!(published, committed, "each event once");
        assert_eq!(messages.len(), committed.len(), "no copies");
        for (partition, key, _) in &messages {
            assert_eq!(
                *partition,
                crate::routing::partition_for(key, 3),
                "key {key}"
            );
        }
        let in_partition_0 = messages.iter().filter(|(p, _, _)| *p == 0).count();
        assert!(in_partition_0 > 0 && in_partition_0 < messages.len());
        assert_eq!(a_health["published"], in_partition_0, "{a_health}");
        assert_eq!(a_health["partitions"], serde_json::json!([0]));
        assert_eq!(
            b_health["published"],
            messages.len() - in_partition_0,
            "{b_health}"
        );
        assert_eq!(b_health["partitions"], serde_json::json!([1, 2]));
    }

    /// A row that commits long after its id was drawn (a writer stalled mid-commit) lies below
    /// where the polls start; a poll from the first id publishes it all the same.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_row_committed_late_below_the_floor_is_published() {
        let s = setup();
        let insert = |db: &Database, id: i64, event: Envelope| {
            let row = NewOutboxRow::from(&event);
            let db = db.clone();
            async move {
                db.write(move |conn| {
                    let statement =
                        diesel::insert_into(outbox::table).values((outbox::id.eq(id), row));
                    crate::on_backend!(conn, |c| statement.execute(c))?;
                    Ok::<_, DbError>(((), Vec::new()))
                })
                .await
                .unwrap();
                db.wake_relay();
            }
        };
        let relay = relay(&s, "a", Duration::from_secs(10))
            .with_floor(Duration::from_millis(100), Duration::from_secs(1));
        let running = start(relay);
        let (early, late) = (completed(1, "early".into()), completed(2, "late".into()));
        let ids = [early.event_id.to_string(), late.event_id.to_string()];
        insert(&s.db, 1000, early).await;
        drained(&s.db, Duration::from_secs(10)).await.unwrap();
        // Polls now start past 1000; id 500 commits only now.
        tokio::time::sleep(Duration::from_millis(300)).await;
        insert(&s.db, 500, late).await;
        let left = drained(&s.db, Duration::from_secs(5)).await;
        running.stop.cancel();
        running.task.await.unwrap();
        assert_eq!(left, Ok(()), "the late row stayed pending");
        let published: Vec<String> = read_topic(&s.cluster)
            .into_iter()
            .map(|(_, id)| id)
            .collect();
        assert_eq!(published.len(), 2);
        assert!(ids.iter().all(|id| published.contains(id)), "{published:?}");
    }

    /// Two instances' relays on one database: one publishes, the other stands by
    /// (`"standby": true`). A graceful stop of the publisher hands over at once (well within
    /// the 10 s lease); a crashed publisher's lease (1 s here) lapses and the other takes over.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn one_relay_publishes_the_other_stands_by_and_takes_over() {
        let s = setup();
        let long = Duration::from_secs(10);
        let a = start(relay(&s, "a", long));
        commit(&s.db, vec![completed(1, "c".into())]).await;
        drained(&s.db, Duration::from_secs(10)).await.unwrap();
        let b = start(relay(&s, "b", long));
        let standing_by = async {
            while b.status.snapshot()["standby"] != true {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        };
        tokio::time::timeout(Duration::from_secs(5), standing_by)
            .await
            .expect("b stands by");
        assert_eq!(a.status.snapshot()["standby"], false);
        commit(&s.db, vec![completed(2, "c".into())]).await;
        drained(&s.db, Duration::from_secs(10)).await.unwrap();
        assert_eq!(b.status.snapshot()["published"], 0, "only a publishes");

        // A graceful stop gives the lease up: b publishes long before it would have lapsed.
        a.stop.cancel();
        a.task.await.unwrap();
        let stopped = Instant::now();
        commit(&s.db, vec![completed(3, "c".into())]).await;
        drained(&s.db, Duration::from_secs(4)).await.unwrap();
        assert!(stopped.elapsed() < Duration::from_secs(4));
        assert_eq!(b.status.snapshot()["standby"], false);
        assert_eq!(b.status.snapshot()["published"], 1);
        b.stop.cancel();
        b.task.await.unwrap();

        // A crash (the task dropped, nothing released): the lease lapses, then c publishes.
        let short = Duration::from_secs(1);
        let d = start(relay(&s, "d", short));
        commit(&s.db, vec![completed(4, "c".into())]).await;
        drained(&s.db, Duration::from_secs(10)).await.unwrap();
        let c = start(relay(&s, "c", short));
        d.task.abort();
        let _ = d.task.await;
        commit(&s.db, vec![completed(5, "c".into())]).await;
        drained(&s.db, Duration::from_secs(5)).await.unwrap();
        assert_eq!(c.status.snapshot()["published"], 1);
        c.stop.cancel();
        c.task.await.unwrap();
        let keys = by_key(&read_topic(&s.cluster));
        assert!(
            keys.values().all(|ids| ids.len() == 1),
            "each once: {keys:?}"
        );
        assert_eq!(keys.len(), 5);
    }

    /// The producer has no message timeout: an event committed while the broker is down waits
    /// for it — the round neither fails nor gives the message up — and is published once it is
    /// back, before the one committed after it. (Four seconds down, not the five minutes of
    /// librdkafka's default timeout; any timeout up to four seconds fails this.)
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_event_waits_out_a_broker_outage_without_timing_out() {
        let s = setup();
        let running = start(relay(&s, "a", Duration::from_secs(10)));
        let first = commit(&s.db, vec![completed(1, "c".into())]).await;
        drained(&s.db, Duration::from_secs(10)).await.unwrap();
        s.cluster.broker_down(1).unwrap();
        let during = commit(&s.db, vec![completed(1, "c".into())]).await;
        tokio::time::sleep(Duration::from_secs(4)).await;
        let waiting = running.status.snapshot();
        let after = commit(&s.db, vec![completed(1, "c".into())]).await;
        s.cluster.broker_up(1).unwrap();
        drained(&s.db, Duration::from_secs(20)).await.unwrap();
        let health = running.status.snapshot();
        running.stop.cancel();
        running.task.await.unwrap();
        assert!(
            waiting["waitingForSeconds"].as_u64() >= Some(3),
            "the relay waited for the broker: {waiting}"
        );
        assert!(health["lastError"].is_null(), "a round failed: {health}");
        assert_eq!(
            by_key(&read_topic(&s.cluster)),
            BTreeMap::from([("1".to_owned(), [first, during, after].concat())])
        );
    }

    /// The broker answers the first produce request with a sequence desynchronisation, which
    /// makes the idempotent producer fail for good (a fatal error): the relay makes a new
    /// producer, the status `/health` shows says so, and every row reaches the topic in commit
    /// order. (Without the recreation every later round fails and nothing drains.) Rows the old
    /// producer had sent but not seen acknowledged are sent again: copies the consumers absorb
    /// by event id, so the check is on first copies.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_fatal_producer_error_recreates_the_producer_and_shows_in_health() {
        use rdkafka::types::{RDKafkaApiKey, RDKafkaRespErr};
        let s = setup();
        s.cluster.request_errors(
            RDKafkaApiKey::Produce,
            &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_OUT_OF_ORDER_SEQUENCE_NUMBER],
        );
        let mut committed: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for order in 1..=3i64 {
            let ids = commit(&s.db, vec![completed(order, "c".into())]).await;
            committed.insert(order.to_string(), ids);
        }
        let running = start(relay(&s, "a", Duration::from_secs(10)));
        let left = drained(&s.db, Duration::from_secs(20)).await;
        let health = running.status.snapshot();
        running.stop.cancel();
        running.task.await.unwrap();
        assert_eq!(left, Ok(()), "rows still pending: {health}");
        assert_eq!(health["producersRecreated"], 1, "{health}");
        let fatal = health["lastFatalError"].as_str().unwrap_or_default();
        assert!(fatal.contains("OutOfOrderSequence"), "{health}");
        let mut first_copies = by_key(&read_topic(&s.cluster));
        for ids in first_copies.values_mut() {
            let mut seen = std::collections::HashSet::new();
            ids.retain(|id| seen.insert(id.clone()));
        }
        assert_eq!(first_copies, committed);
    }

    /// Marking fails once after the broker acknowledged a batch (the database refuses the
    /// update): the next round marks those rows and sends nothing again, so each event is on
    /// the topic once. (Before, a failed mark left the rows pending and the whole batch was
    /// sent again.)
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_failed_mark_is_retried_without_sending_the_batch_again() {
        let s = setup();
        s.db.write(|conn| {
            conn.batch_execute(
                "CREATE TABLE refuse_marks (x INTEGER); INSERT INTO refuse_marks VALUES (1); \
                 CREATE TRIGGER refuse_mark BEFORE UPDATE OF published_at ON outbox \
                 WHEN EXISTS (SELECT 1 FROM refuse_marks) \
                 BEGIN SELECT RAISE(ABORT, 'marking refused by the test'); END;",
            )?;
            Ok::<_, DbError>(((), Vec::new()))
        })
        .await
        .unwrap();
        let mut committed: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for order in 1..=3i64 {
            let ids = commit(&s.db, vec![completed(order, "c".into())]).await;
            committed.insert(order.to_string(), ids);
        }
        let running = start(relay(&s, "a", Duration::from_secs(10)));
        let refused = async {
            while !running.status.snapshot()["lastError"]
                .as_str()
                .is_some_and(|e| e.contains("marking refused"))
            {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        };
        tokio::time::timeout(Duration::from_secs(10), refused)
            .await
            .expect("the mark failed");
        // Several rounds go by while marking is refused.
        tokio::time::sleep(Duration::from_millis(500)).await;
        s.db.write(|conn| {
            conn.batch_execute("DELETE FROM refuse_marks")?;
            Ok::<_, DbError>(((), Vec::new()))
        })
        .await
        .unwrap();
        let left = drained(&s.db, Duration::from_secs(10)).await;
        running.stop.cancel();
        running.task.await.unwrap();
        assert_eq!(left, Ok(()));
        assert_eq!(
            by_key(&read_topic(&s.cluster)),
            committed,
            "each event once"
        );
    }
    /// A relay whose marks fail (the database refuses them) loses its lease to another
    /// instance: it stops sending and stands by, and `/health` no longer calls it failing.
    /// (Before, the failure from when it held the lease stood forever: an instance paused past
    /// its lease answered 503 until restarted.)
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_failing_relay_that_loses_its_lease_stands_by_healthy() {
        let s = setup();
        s.db.write(|conn| {
            conn.batch_execute(
                "CREATE TRIGGER refuse_mark BEFORE UPDATE OF published_at ON outbox \
                 BEGIN SELECT RAISE(ABORT, 'marking refused by the test'); END;",
            )?;
            Ok::<_, DbError>(((), Vec::new()))
        })
        .await
        .unwrap();
        commit(&s.db, vec![completed(1, "c".into())]).await;
        let running = start(relay(&s, "a", Duration::from_secs(2)));
        let failing = async {
            while !running.status.snapshot()["lastError"]
                .as_str()
                .is_some_and(|e| e.contains("marking refused"))
            {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        };
        tokio::time::timeout(Duration::from_secs(10), failing)
            .await
            .expect("the relay reports its failing marks");
        // Another instance takes the lease (as after a pause past it).
        s.db.write(|conn| {
            conn.batch_execute(&format!(
                "UPDATE leases SET holder = 'b', expires_at = {} WHERE name = '{}'",
                leases::now_ms() + 60_000,
                leases::RELAY
            ))?;
            Ok::<_, DbError>(((), Vec::new()))
        })
        .await
        .unwrap();
        let healthy = async {
            loop {
                let health = running.status.snapshot();
                if health["standby"] == true && running.status.problem(Duration::ZERO).is_none() {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        };
        let stood_by = tokio::time::timeout(Duration::from_secs(10), healthy).await;
        let health = running.status.snapshot();
        running.stop.cancel();
        running.task.await.unwrap();
        assert!(
            stood_by.is_ok(),
            "still failing while standing by: {health} {:?}",
            running.status.problem(Duration::ZERO)
        );
    }
}
