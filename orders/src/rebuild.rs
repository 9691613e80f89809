//! Rebuilding orders' read model from the topic: into an empty database, every event from
//! offset 0 to the topic's end now, through the same rules that built it — products' and
//! delivery's events through [`saga::react`] (their caused events are already on the topic and
//! are not published again), orders' own decisions through [`saga::replay_own`], ProductChanged
//! into the catalog replica, and every saga event into its order's history. The consumer's
//! positions are stored at the end, so the service started on the database reads on from there.
//!
//! Events orders parked are left out, as they were live (a redrive's copy is applied).
//! What the topic does not hold cannot come back: an order's `createdAt` becomes its
//! OrderPlaced's timestamp and `updatedAt` the rebuild's; events that arrived together keep
//! their topic order in the history.

use crate::{saga, store};
use events::{Decoded, Envelope, Event, Service};
use kafka::db::DbConnection;
use kafka::offsets::{self, ConsumedAt};
use kafka::{Database, DbError, KafkaSettings};
use std::time::Duration;

/// Events applied per transaction.
const BATCH: usize = 500;

/// Why a rebuild did not run or stopped.
#[derive(Debug, thiserror::Error)]
pub enum RebuildError {
    /// The database already holds orders, history or a catalog.
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
    /// Events applied (the rest: not events, of types this version does not know, or
    /// redriven for another service).
    pub applied: usize,
    /// The highest `orderId` of any message read, applied or not: no new order may take it
    /// ([`crate::ids`]).
    pub highest_order_id: Option<i64>,
}

/// At start: a new, empty database beside a topic that holds events (orders' database lost,
/// deleted or replaced) is rebuilt from the topic before anything is served, so the old orders
/// come back as the other services know them and their ids are not issued again. Returns
/// what was rebuilt, if anything. Another instance rebuilding the same database at the same
/// moment is not an error: whichever finishes first wins, the other starts on its result.
pub async fn rebuild_if_new(
    db: &Database,
    settings: &KafkaSettings,
) -> Result<Option<Rebuilt>, kafka::StartError> {
    let is_empty = || db.read(|conn| store::is_empty(conn).map_err(DbError::from));
    if !is_empty().await? {
        return Ok(None);
    }
    let broker = |reason: String| kafka::StartError::Broker {
        brokers: settings.brokers.clone(),
        reason,
    };
    let probing = settings.clone();
    let holds_events = kafka::consumer::read_retrying("reading the topic's ends", move || {
        let probe = kafka::consumer::create_probe(&probing).map_err(|e| e.to_string())?;
        let partitions = kafka::consumer::partitions_of(&probe, &probing.topic)?;
        let marks = kafka::consumer::watermarks(&probe, &probing.topic, &partitions)?;
        Ok::<_, String>(marks.values().any(|(low, high)| high > low))
    })
    .await
    .map_err(broker)?;
    if !holds_events {
        return Ok(None);
    }
    log::warn!(
        "the database is new but {} holds events: rebuilding orders from the topic first",
        settings.topic
    );
    match rebuild(db, settings).await {
        Ok(done) => {
            log::warn!(
                "rebuilt from {}: {} messages read, {} events applied",
                settings.topic,
                done.read,
                done.applied
            );
            Ok(Some(done))
        }
        Err(RebuildError::NotEmpty) => Ok(None),
        Err(e) if !is_empty().await? => {
            log::warn!("another instance rebuilt the database first ({e})");
            Ok(None)
        }
        Err(RebuildError::Topic(reason)) => Err(broker(reason)),
        Err(RebuildError::Db(e)) => Err(e.into()),
    }
}

/// Rebuilds orders' read model in the empty `db` from `settings.topic`, as instance
/// `settings.instance` (it takes the partitions' leases to store its positions).
pub async fn rebuild(db: &Database, settings: &KafkaSettings) -> Result<Rebuilt, RebuildError> {
    let empty = db
        .read(|conn| store::is_empty(conn).map_err(DbError::from))
        .await?;
    if !empty {
        return Err(RebuildError::NotEmpty);
    }
    let reading = settings.clone();
    let (messages, ends) = tokio::task::spawn_blocking(move || {
        kafka::replay::read_from_start(&reading, Duration::from_secs(120))
    })
    .await
    .map_err(|e| RebuildError::Topic(e.to_string()))?
    .map_err(RebuildError::Topic)?;
    let read = messages.len();
    let highest_order_id = messages
        .iter()
        .filter_map(|m| crate::ids::order_id_of(&m.payload))
        .max();
    let redrive_for = events::dead_letter::REDRIVE_FOR_HEADER;
    let events: Vec<Envelope> = messages
        .iter()
        // A copy redriven for another service: orders applied the original, as it did live.
        .filter(|m| m.header(redrive_for).is_none_or(|group| group == "orders"))
        .filter_map(|m| match events::decode(&m.payload) {
            Ok(Decoded::Known(event)) => Some(*event),
            _ => None,
        })
        .collect();
    // What orders parked stays unapplied, as it did live; a redrive's copy (another id) is
    // applied like any event.
    let parked_here: std::collections::HashSet<uuid::Uuid> = events
        .iter()
        .filter_map(|e| match &e.event {
            Event::EventParked(note) if note.service == Service::Orders => {
                Some(note.parked_event_id)
            }
            _ => None,
        })
        .collect();
    let events: Vec<Envelope> = events
        .into_iter()
        .filter(|e| !parked_here.contains(&e.event_id))
        .collect();
    let applied = events.len();
    for chunk in events.chunks(BATCH) {
        let chunk = chunk.to_vec();
        db.write(move |conn| {
            for event in &chunk {
                apply(conn, event)?;
            }
            Ok::<_, RebuildError>(((), Vec::new()))
        })
        .await?;
    }
    let (membership, topic) = (
        kafka::leases::Membership {
            me: settings.instance.clone(),
            ttl: settings.session_timeout,
        },
        settings.topic.clone(),
    );
    db.write(move |conn| {
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
        highest_order_id,
    })
}

/// Applies one event read back from the topic.
fn apply(conn: &mut DbConnection, event: &Envelope) -> Result<(), RebuildError> {
    if let Event::ProductChanged(p) = &event.event {
        store::upsert_product(conn, p)?;
        return Ok(());
    }
    let Some(order_id) = event.event.order_id() else {
        return Ok(());
    };
    if let (Service::Orders, Event::OrderPlaced(placed)) = (event.source, &event.event)
        && store::order(conn, order_id)?.is_none()
    {
        let created_at = event.timestamp.to_rfc3339();
        store::insert_order_with_id(conn, &saga::placed_order(placed), &created_at)?;
    }
    let Some(stored) = store::order(conn, order_id)? else {
        return Ok(()); // an event of an order never placed here: nothing to rebuild
    };
    store::record_history(conn, order_id, event)?;
    let after = if event.source == Service::Orders {
        saga::replay_own(stored.order.clone(), event)
    } else {
        saga::react(stored.order.clone(), event).0
    };
    if after != stored.order {
        store::save_order(conn, &after)?;
    }
    Ok(())
}
