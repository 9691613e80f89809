//! Order ids are never issued twice, whatever happened to orders' database.
//!
//! Orders' database hands out ids; the topic keeps every id it ever published. When the
//! database is new (or restored from an older copy) while the topic is not, its sequence would
//! start again at ids other services already hold sagas for, and a new order would be taken
//! for an old one. So before orders serves a request it reads what the topic holds beyond its
//! stored positions (all of it, for a new database) and moves its id sequence past the highest
//! order id found there or already stored (a rebuild inserts orders with their ids, which
//! PostgreSQL's sequence does not follow). Normally the stored positions are at the ends and
//! nothing is read.

use kafka::consumer::{create_probe, partitions_of, watermarks};
use kafka::db::DbConnection;
use kafka::settings::KafkaSettings;
use kafka::{Database, DbError, StartError};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::{Offset, TopicPartitionList};
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

/// Longest wait for the broker's answers while reading; a broker that stops answering
/// fails the start (the service is refused, not started on a guess).
const READ_TIMEOUT: Duration = Duration::from_secs(30);

/// Moves orders' id sequence past every order id on `settings.topic` that lies beyond
/// the positions stored in `db` (all of it with `from_start`: after a rebuild, whose
/// positions are at the end but which keeps only the orders whose OrderPlaced it read);
/// returns the highest order id, if any.
pub async fn move_past_the_topic(
    db: &Database,
    settings: &KafkaSettings,
    from_start: bool,
) -> Result<Option<i64>, StartError> {
    let topic = settings.topic.clone();
    let stored = if from_start {
        BTreeMap::new()
    } else {
        db.read(move |conn| kafka::offsets::load(conn, &topic).map_err(DbError::from))
            .await?
    };
    let (settings_copy, started) = (settings.clone(), Instant::now());
    let highest = read_retrying("reading the order ids", move || {
        highest_order_id(&settings_copy, &stored)
    })
    .await
    .map_err(|reason| StartError::Broker {
        brokers: settings.brokers.clone(),
        reason: format!("cannot read the order ids on {}: {reason}", settings.topic),
    })?;
    // The orders already here too: a rebuild inserts them with their ids, which PostgreSQL's
    // sequence does not follow.
    let stored_highest = db
        .read(|conn| highest_stored(conn).map_err(DbError::from))
        .await?;
    let Some(highest) = highest.max(stored_highest) else {
        return Ok(None);
    };
    let moved = db
        .write(move |conn| Ok::<_, DbError>((issue_after(conn, highest)?, Vec::new())))
        .await?;
    if moved {
        log::warn!(
            "order ids up to {highest} are on {} or rebuilt from it but were not issued by \
             this database's sequence (a new, restored or rebuilt database): new orders are \
             numbered after them (checked in {} ms)",
            settings.topic,
            started.elapsed().as_millis()
        );
    }
    Ok(Some(highest))
}

/// How long a start-up read of the topic is retried: right after a partition leader moved,
/// a broker can take seconds to serve the partitions' ends (the host's identity check waits
/// the same way).
const RETRY_FOR: Duration = Duration::from_secs(30);

/// Runs `read` on a blocking thread until it succeeds or [`RETRY_FOR`] has passed.
pub(crate) async fn read_retrying<T, F>(what: &str, read: F) -> Result<T, String>
where
    T: Send + 'static,
    F: Fn() -> Result<T, String> + Clone + Send + 'static,
{
    let started = Instant::now();
    loop {
        let attempt = read.clone();
        let result = tokio::task::spawn_blocking(attempt)
            .await
            .map_err(|e| e.to_string())
            .and_then(|r| r);
        match result {
            Ok(value) => return Ok(value),
            Err(reason) if started.elapsed() > RETRY_FOR => return Err(reason),
            Err(reason) => {
                log::info!("{what}: {reason}; retrying");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
    }
}

/// The highest `orderId` in the messages of `settings.topic` from `stored` (each
/// partition's next offset; the beginning where none is stored) to the ends as they are now.
fn highest_order_id(
    settings: &KafkaSettings,
    stored: &BTreeMap<i32, i64>,
) -> Result<Option<i64>, String> {
    let probe = create_probe(settings).map_err(|e| e.to_string())?;
    let topic = &settings.topic;
    let partitions = match partitions_of(&probe, topic) {
        Ok(partitions) => partitions,
        // A topic that does not exist holds no ids.
        Err(_) if topic_is_missing(&probe, topic)? => return Ok(None),
        Err(e) => return Err(e),
    };
    let ends = watermarks(&probe, topic, &partitions)?;
    let mut assignment = TopicPartitionList::new();
    let mut left = BTreeMap::new();
    for (&partition, &(low, high)) in &ends {
        let from = stored.get(&partition).copied().unwrap_or(low).max(low);
        if from < high {
            assignment
                .add_partition_offset(topic, partition, Offset::Offset(from))
                .map_err(|e| e.to_string())?;
            left.insert(partition, high);
        }
    }
    if left.is_empty() {
        return Ok(None);
    }
    let reader = kafka::replay::reader(settings, "id-scan").map_err(|e| e.to_string())?;
    reader.assign(&assignment).map_err(|e| e.to_string())?;
    let mut highest = None;
    let mut quiet_since = Instant::now();
    while !left.is_empty() {
        let Some(message) = reader.poll(Duration::from_millis(200)) else {
            if quiet_since.elapsed() > READ_TIMEOUT {
                return Err(format!(
                    "no message for {READ_TIMEOUT:?} while reading {left:?}"
                ));
            }
            continue;
        };
        let message = message.map_err(|e| e.to_string())?;
        quiet_since = Instant::now();
        if let Some(id) = message.payload().and_then(order_id_of) {
            highest = highest.max(Some(id));
        }
        let partition = message.partition();
        if left
            .get(&partition)
            .is_some_and(|&end| message.offset() + 1 >= end)
        {
            left.remove(&partition);
        }
    }
    Ok(highest)
}

/// Whether the broker answers and says `topic` does not exist.
fn topic_is_missing(probe: &BaseConsumer, topic: &str) -> Result<bool, String> {
    let metadata = probe
        .fetch_metadata(None, Duration::from_secs(5))
        .map_err(|e| format!("metadata: {e}"))?;
    Ok(!metadata.topics().iter().any(|t| t.name() == topic))
}

/// The `orderId` of a message, read without decoding the rest (any event type, also ones
/// this version does not know).
fn order_id_of(payload: &[u8]) -> Option<i64> {
    #[derive(serde::Deserialize)]
    struct OrderIdOnly {
        #[serde(rename = "orderId")]
        order_id: Option<i64>,
    }
    serde_json::from_slice::<OrderIdOnly>(payload)
        .ok()?
        .order_id
}

/// The highest order id in the database, if any.
fn highest_stored(conn: &mut DbConnection) -> diesel::QueryResult<Option<i64>> {
    use diesel::prelude::*;
    crate::store::schema::orders::table
        .select(diesel::dsl::max(crate::store::schema::orders::id))
        .first(conn)
}

/// Makes the next order id greater than `highest`; whether the sequence had to move.
pub fn issue_after(conn: &mut DbConnection, highest: i64) -> Result<bool, DbError> {
    use diesel::RunQueryDsl;
    use diesel::sql_types::BigInt;
    let moved = match conn {
        // AUTOINCREMENT takes the next id after sqlite_sequence's (its row appears with the
        // first order).
        DbConnection::Sqlite(c) => {
            let updated = diesel::sql_query(
                "UPDATE sqlite_sequence SET seq = ?1 WHERE name = 'orders' AND seq < ?1",
            )
            .bind::<BigInt, _>(highest)
            .execute(c)?;
            let inserted = diesel::sql_query(
                "INSERT INTO sqlite_sequence (name, seq) SELECT 'orders', ?1 \
                 WHERE NOT EXISTS (SELECT 1 FROM sqlite_sequence WHERE name = 'orders')",
            )
            .bind::<BigInt, _>(highest)
            .execute(c)?;
            updated + inserted > 0
        }
        // Only forward: ids the sequence already handed out past `highest` stay used.
        DbConnection::Postgres(c) => diesel::sql_query(
            "SELECT setval(pg_get_serial_sequence('orders', 'id'), $1) \
             WHERE $1 > COALESCE(pg_sequence_last_value(pg_get_serial_sequence('orders', 'id')::regclass), 0)",
        )
        .bind::<BigInt, _>(highest)
        .execute(c)?
            > 0,
    };
    Ok(moved)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::startup::MIGRATIONS;

    #[test]
    fn the_order_id_is_read_from_any_event_and_only_there() {
        assert_eq!(
            order_id_of(br#"{"eventType":"SomethingNew","orderId":42,"x":[1]}"#),
            Some(42)
        );
        assert_eq!(
            order_id_of(br#"{"eventType":"ProductChanged","productId":7}"#),
            None
        );
        assert_eq!(order_id_of(b"not json"), None);
    }

    /// After `issue_after(n)` the next order gets `n + 1`, on a new database and on one that
    /// already issued ids; a lower `n` never moves the sequence back.
    #[tokio::test]
    async fn new_orders_are_numbered_after_the_highest_id_seen() {
        let dir = tempfile::tempdir().unwrap();
        let db = Database::open(dir.path().join("o.db").to_str().unwrap(), MIGRATIONS).unwrap();
        let next = |db: &Database, floor: Option<i64>| {
            let db = db.clone();
            async move {
                db.write(move |conn| {
                    if let Some(floor) = floor {
                        issue_after(conn, floor)?;
                    }
                    let new = crate::store::NewOrder::fixture(
                        "OrderPlaced",
                        "2026-01-01T00:00:00Z".into(),
                    );
                    let order = crate::store::insert_order(conn, &new)?;
                    Ok::<_, DbError>((order.order.id, Vec::new()))
                })
                .await
                .unwrap()
            }
        };
        assert_eq!(
            next(&db, Some(3)).await,
            4,
            "a new database starts after the topic"
        );
        assert_eq!(next(&db, None).await, 5);
        assert_eq!(next(&db, Some(2)).await, 6, "never back");
        assert_eq!(next(&db, Some(10)).await, 11);
    }
}
