//! Rebuilding a service's database from the topic, the same way for the three services: into
//! an empty database, every event from offset 0 to the topic's end now, each through the
//! service's [`Rebuild::apply_read_back`]; then the consumer's positions stored at those ends
//! (with the partitions' leases), so the service started on the database reads on from there
//! and re-decides nothing. Nothing is published: a rebuild writes no outbox row.
//!
//! What every service does alike lives here:
//! - [`rebuild_if_new`]: at start, an empty database beside a topic that holds events (the
//!   database lost, deleted or replaced) is rebuilt before anything is served; another
//!   instance rebuilding the same database at the same moment waits and finds it rebuilt.
//! - A rebuild is one transaction: killed halfway, it leaves the database empty, and the next
//!   start rebuilds it again.
//! - Events the service parked (its EventParked notes) stay unapplied, as they were live; a
//!   redrive's copy is applied, and a copy redriven for another service is not (the original
//!   was applied). An event id read twice (a relay's resend) is applied once.
//! - The ids of the events the service's consumer [`Reactor::wants`] are recorded as processed
//!   (with the event's own timestamp, so retention ages them as it would have), so one
//!   re-delivered later at a new offset is still a duplicate: a rebuilt products must not
//!   reserve twice for a repeated OrderPlaced, a rebuilt delivery must not answer a repeated
//!   OrderCancelRequested with a new CancelRefused.
//! - `--rebuild` ([`main`]): the same rebuild by hand into an empty database, then exit.
//!
//! What the topic no longer holds (past Kafka's retention) cannot come back. Nor can what
//! the lost database had decided but not yet published (its outbox went with it): an event
//! the service never answered on the topic stays unanswered (no new event for an old saga),
//! and the saga timeout settles such an order as cancelled, which the rebuilt services then
//! agree on (a cancel before any decision voids the order).

use crate::db::{DbConnection, Migrations};
use crate::inbox::Reactor;
use crate::offsets::{self, ConsumedAt};
use crate::{Database, DbError, KafkaSettings, StartError};
use diesel::prelude::*;
use events::{Decoded, Envelope, Event, Service};
use std::collections::HashSet;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

/// Longest wait for the broker to deliver the whole topic.
const READ_WITHIN: Duration = Duration::from_secs(120);

/// A service's part of a rebuild: how one event read back changes its database. Its
/// [`Reactor::wants`] says which events' ids the live consumer would have recorded.
pub trait Rebuild: Reactor {
    /// The service rebuilt (whose EventParked notes and redrive copies count).
    fn service(&self) -> Service;

    /// Whether the database holds none of the service's state (only then is it rebuilt).
    fn is_empty(&self, conn: &mut DbConnection) -> QueryResult<bool>;

    /// Applies one event read back: the service's own events as facts, the others' through
    /// its rules with their caused events dropped (they are on the topic already).
    fn apply_read_back(&self, conn: &mut DbConnection, event: &Envelope) -> QueryResult<()>;

    /// An id of the service's numbering that the message carries, read from any message (also
    /// of types this version does not know); the highest is [`Rebuilt::highest_id`].
    fn id_of(&self, _payload: &[u8]) -> Option<i64> {
        None
    }

    /// Runs once after the last event, in the transaction that stores the positions.
    fn finish(&self, _conn: &mut DbConnection) -> QueryResult<()> {
        Ok(())
    }
}

/// Why a rebuild did not run or stopped.
#[derive(Debug, thiserror::Error)]
pub enum RebuildError {
    /// The database already holds the service's state.
    #[error("the database is not empty: a rebuild starts from an empty one")]
    NotEmpty,
    /// The topic could not be read to its end.
    #[error("reading the topic: {0}")]
    Topic(String),
    /// The database failed.
    #[error(transparent)]
    Db(#[from] DbError),
}

impl From<diesel::result::Error> for RebuildError {
    fn from(e: diesel::result::Error) -> Self {
        RebuildError::Db(DbError::Query(e))
    }
}

/// What a rebuild read and applied.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rebuilt {
    /// Messages read from the topic.
    pub read: usize,
    /// Events applied (the rest: not events, of types this version does not know, parked
    /// here, or redriven for another service).
    pub applied: usize,
    /// The highest [`Rebuild::id_of`] of any message read, applied or not.
    pub highest_id: Option<i64>,
}

/// At start: rebuilds a new, empty database beside a topic that holds events before anything
/// is served, and logs a warning saying so (the topic is created first if missing). Returns
/// what was rebuilt, if anything.
pub async fn rebuild_if_new<R: Rebuild>(
    db: &Database,
    settings: &KafkaSettings,
    rules: Arc<R>,
) -> Result<Option<Rebuilt>, StartError> {
    crate::host::connect(settings, db).await?;
    let checking = rules.clone();
    let is_empty = move || {
        let rules = checking.clone();
        db.read(move |conn| rules.is_empty(conn).map_err(DbError::from))
    };
    if !is_empty().await? {
        return Ok(None);
    }
    let broker = |reason: String| StartError::Broker {
        brokers: settings.brokers.clone(),
        reason,
    };
    let probing = settings.clone();
    let holds_events = crate::consumer::read_retrying("reading the topic's ends", move || {
        let probe = crate::consumer::create_probe(&probing).map_err(|e| e.to_string())?;
        let partitions = crate::consumer::partitions_of(&probe, &probing.topic)?;
        let marks = crate::consumer::watermarks(&probe, &probing.topic, &partitions)?;
        Ok::<_, String>(marks.values().any(|(low, high)| high > low))
    })
    .await
    .map_err(broker)?;
    if !holds_events {
        return Ok(None);
    }
    let service = rules.service();
    log::warn!(
        "the {service} database is new but {} holds events: rebuilding it from the topic first",
        settings.topic
    );
    match rebuild(db, settings, rules).await {
        Ok(done) => {
            log::warn!(
                "{service} rebuilt from {}: {} messages read, {} events applied",
                settings.topic,
                done.read,
                done.applied
            );
            Ok(Some(done))
        }
        Err(RebuildError::NotEmpty) => {
            log::warn!("another instance rebuilt the {service} database first");
            Ok(None)
        }
        Err(e) if !is_empty().await? => {
            log::warn!("another instance rebuilt the {service} database first ({e})");
            Ok(None)
        }
        Err(RebuildError::Topic(reason)) => Err(broker(reason)),
        Err(RebuildError::Db(e)) => Err(e.into()),
    }
}

/// Rebuilds the empty `db` from `settings.topic` as instance `settings.instance` (it takes the
/// partitions' leases to store its positions).
pub async fn rebuild<R: Rebuild>(
    db: &Database,
    settings: &KafkaSettings,
    rules: Arc<R>,
) -> Result<Rebuilt, RebuildError> {
    let checking = rules.clone();
    let empty = db
        .read(move |conn| checking.is_empty(conn).map_err(DbError::from))
        .await?;
    if !empty {
        return Err(RebuildError::NotEmpty);
    }
    let reading = settings.clone();
    let (messages, ends) =
        tokio::task::spawn_blocking(move || crate::replay::read_from_start(&reading, READ_WITHIN))
            .await
            .map_err(|e| RebuildError::Topic(e.to_string()))?
            .map_err(RebuildError::Topic)?;
    let read = messages.len();
    let highest_id = messages
        .iter()
        .filter_map(|m| rules.id_of(&m.payload))
        .max();
    let events = to_apply(&messages, rules.service(), &settings.group_id);
    let applied = events.len();
    let (membership, topic) = (
        crate::leases::Membership {
            me: settings.instance.clone(),
            ttl: settings.session_timeout,
        },
        settings.topic.clone(),
    );
    // One transaction, so the database is either still empty or rebuilt with its positions:
    // a rebuild killed halfway leaves nothing for the next start to mistake for a database
    // that needs none. Another instance rebuilding the same database waits for the lock and
    // then finds it done.
    db.write(move |conn| {
        crate::db::lock_patiently(conn, crate::db::Lock::Once("rebuild"))?;
        if !rules.is_empty(conn)? {
            return Err(RebuildError::NotEmpty);
        }
        for event in &events {
            if rules.wants(event) {
                record_processed(conn, event)?;
            }
            rules.apply_read_back(conn, event)?;
        }
        rules.finish(conn)?;
        let partitions: Vec<i32> = ends.keys().copied().collect();
        membership.balance(conn, &topic, &partitions)?;
        for (partition, next_offset) in ends {
            let at = ConsumedAt {
                topic: topic.clone(),
                partition,
                next_offset,
                holder: membership.me.clone(),
            };
            offsets::store(conn, &at)?;
        }
        Ok::<_, RebuildError>(((), Vec::new()))
    })
    .await?;
    Ok(Rebuilt {
        read,
        applied,
        highest_id,
    })
}

/// The events of `messages` that `service` (consumer group `group`) applied live: decoded,
/// not a copy redriven for another group, not parked by it, each event id once (the first).
pub fn to_apply(
    messages: &[crate::replay::Replayed],
    service: Service,
    group: &str,
) -> Vec<Envelope> {
    let redrive_for = events::dead_letter::REDRIVE_FOR_HEADER;
    let events: Vec<Envelope> = messages
        .iter()
        // A copy redriven for another service: this one applied the original, as it did live.
        .filter(|m| m.header(redrive_for).is_none_or(|g| g == group))
        .filter_map(|m| match events::decode(&m.payload) {
            Ok(Decoded::Known(event)) => Some(*event),
            _ => None,
        })
        .collect();
    let parked_here: HashSet<uuid::Uuid> = events
        .iter()
        .filter_map(|e| match &e.event {
            Event::EventParked(note) if note.service == service => Some(note.parked_event_id),
            _ => None,
        })
        .collect();
    // A relay that resends a batch it could not mark puts the same event on the topic twice:
    // applied live once (the consumers' inbox, the outbox row), so read back once.
    let mut seen = HashSet::new();
    events
        .into_iter()
        .filter(|e| !parked_here.contains(&e.event_id) && seen.insert(e.event_id))
        .collect()
}

/// Records `event`'s id as processed when it was published, as the live consumer did then.
fn record_processed(conn: &mut DbConnection, event: &Envelope) -> QueryResult<()> {
    use crate::inbox::processed_events as done;
    let statement = diesel::insert_into(done::table)
        .values((
            done::event_id.eq(event.event_id.to_string()),
            done::event_type.eq(event.event_type()),
            done::processed_at.eq(event.timestamp.to_rfc3339()),
        ))
        .on_conflict_do_nothing();
    crate::on_backend!(conn, |c| statement.execute(c)).map(|_| ())
}

/// Makes the next id `table`'s `id` column issues greater than `highest` (rows a rebuild
/// inserted with their ids: PostgreSQL's sequence does not follow them); whether it had to
/// move. Never moves a sequence back.
pub fn issue_after(conn: &mut DbConnection, table: &str, highest: i64) -> QueryResult<bool> {
    use diesel::sql_types::{BigInt, Text};
    let moved = match conn {
        // AUTOINCREMENT takes the next id after sqlite_sequence's (its row appears with the
        // first insert).
        DbConnection::Sqlite(c) => {
            let updated = diesel::sql_query(
                "UPDATE sqlite_sequence SET seq = ?1 WHERE name = ?2 AND seq < ?1",
            )
            .bind::<BigInt, _>(highest)
            .bind::<Text, _>(table)
            .execute(c)?;
            let inserted = diesel::sql_query(
                "INSERT INTO sqlite_sequence (name, seq) SELECT ?2, ?1 \
                 WHERE NOT EXISTS (SELECT 1 FROM sqlite_sequence WHERE name = ?2)",
            )
            .bind::<BigInt, _>(highest)
            .bind::<Text, _>(table)
            .execute(c)?;
            updated + inserted > 0
        }
        // Only forward: ids the sequence already handed out past `highest` stay used.
        DbConnection::Postgres(c) => diesel::sql_query(
            "SELECT setval(pg_get_serial_sequence($2, 'id'), $1) \
             WHERE $1 > COALESCE(pg_sequence_last_value(pg_get_serial_sequence($2, 'id')::regclass), 0)",
        )
        .bind::<BigInt, _>(highest)
        .bind::<Text, _>(table)
        .execute(c)?
            > 0,
    };
    Ok(moved)
}

/// `<service> --rebuild`: rebuilds the empty database of the service's `DATABASE_URL` from
/// the topic and exits; the service started on it afterwards reads on from the topic's end.
pub async fn main<R: Rebuild>(
    settings: Result<crate::ServiceSettings, crate::ConfigError>,
    migrations: Migrations,
    rules: Arc<R>,
) -> ExitCode {
    crate::init_logging();
    let service = rules.service();
    let settings = match settings {
        Ok(settings) => settings,
        Err(e) => {
            log::error!("{service} --rebuild: {e}");
            return ExitCode::FAILURE;
        }
    };
    let db = match Database::open(&settings.database_url, migrations) {
        Ok(db) => db,
        Err(e) => {
            log::error!("{service} --rebuild: cannot open the database: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rebuild(&db, &settings.kafka, rules).await {
        Ok(done) => {
            log::info!(
                "{service} --rebuild: {} messages read, {} events applied; start {service} on \
                 this database to go on from the topic's end",
                done.read,
                done.applied
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            log::error!("{service} --rebuild: {e}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::replay::Replayed;
    use events::{DeadLetterNote, OrderCompleted};

    fn completed(order_id: i64) -> Envelope {
        Envelope::new(
            Service::Orders,
            Event::OrderCompleted(OrderCompleted {
                order_id,
                product_id: 1,
                quantity: 1,
                customer_id: "c".into(),
            }),
        )
    }

    fn message(event: &Envelope, headers: &[(&str, &str)]) -> Replayed {
        Replayed {
            partition: 0,
            offset: 0,
            payload: event.to_json().into_bytes(),
            headers: headers
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
        }
    }

    fn parked_by(service: Service, parked: &Envelope) -> Envelope {
        Envelope::new(
            service,
            Event::EventParked(DeadLetterNote {
                order_id: 1,
                service,
                dead_letter_id: 1,
                parked_event_type: parked.event_type().into(),
                parked_event_id: parked.event_id,
                state_message: "x".into(),
                redrive_event_id: None,
            }),
        )
    }

    /// What a service applied live is what it reads back: an event once however often the
    /// relay sent it, not what it parked (what another service parked, yes), not a copy
    /// redriven for another group (one redriven for it, yes), and no message that is not an
    /// event.
    #[test]
    fn a_rebuild_applies_what_the_service_applied_live() {
        let (once, parked_here, parked_there) = (completed(1), completed(2), completed(3));
        let (redrive_here, redrive_there) = (completed(4), completed(5));
        let for_group = |g| [(events::dead_letter::REDRIVE_FOR_HEADER, g)];
        let messages = vec![
            message(&once, &[]),
            message(&once, &[]),
            message(&parked_here, &[]),
            message(&parked_by(Service::Products, &parked_here), &[]),
            message(&parked_there, &[]),
            message(&parked_by(Service::Delivery, &parked_there), &[]),
            message(&redrive_here, &for_group("products")),
            message(&redrive_there, &for_group("delivery")),
            Replayed {
                payload: b"not json".to_vec(),
                ..message(&once, &[])
            },
        ];
        let ids: Vec<_> = to_apply(&messages, Service::Products, "products")
            .iter()
            .map(|e| e.event.order_id())
            .collect();
        assert_eq!(ids, [Some(1), Some(1), Some(3), Some(1), Some(4)]);
    }
}
