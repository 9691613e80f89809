//! Order ids are never issued twice, whatever happened to orders' database.
//!
//! Orders' database hands out ids; the topic keeps every id it ever published. When the
//! database is new (or restored from an older copy) while the topic is not, its sequence would
//! start again at ids other services already hold sagas for, and a new order would be taken
//! for an old one. So before orders serves a request it reads what the topic holds beyond its
//! stored positions and moves its id sequence past the highest order id found there, already
//! stored, or seen by the rebuild a new database starts with ([`kafka::rebuild`]: it inserts
//! orders with their ids, which PostgreSQL's sequence does not follow). Normally the stored
//! positions are at the ends and nothing is read.

use kafka::db::DbConnection;
use kafka::settings::KafkaSettings;
use kafka::{Database, DbError, StartError};
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

/// Longest read of the unread part of the topic; a broker that does not deliver it fails the
/// start (the service is refused, not started on a guess).
const READ_TIMEOUT: Duration = Duration::from_secs(30);

/// Moves orders' id sequence past every order id on `settings.topic` that lies beyond
/// the positions stored in `db`, every id already stored, and `seen` (the highest order id a
/// rebuild read); returns the highest of them, if any.
pub async fn move_past_the_topic(
    db: &Database,
    settings: &KafkaSettings,
    seen: Option<i64>,
) -> Result<Option<i64>, StartError> {
    let topic = settings.topic.clone();
    let stored = db
        .read(move |conn| kafka::offsets::load(conn, &topic).map_err(DbError::from))
        .await?;
    let (settings_copy, started) = (settings.clone(), Instant::now());
    let highest = kafka::consumer::read_retrying("reading the order ids", move || {
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
    let Some(highest) = highest.max(stored_highest).max(seen) else {
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

/// The highest `orderId` in the messages of `settings.topic` from `stored` (each
/// partition's next offset; the beginning where none is stored) to the ends as they are now.
fn highest_order_id(
    settings: &KafkaSettings,
    stored: &BTreeMap<i32, i64>,
) -> Result<Option<i64>, String> {
    let (messages, _) = kafka::replay::read_from(settings, stored, READ_TIMEOUT)?;
    Ok(messages
        .iter()
        .filter_map(|m| order_id_of(&m.payload))
        .max())
}

/// The `orderId` of a message, read without decoding the rest (any event type, also ones
/// this version does not know).
pub(crate) fn order_id_of(payload: &[u8]) -> Option<i64> {
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
    Ok(kafka::rebuild::issue_after(conn, "orders", highest)?)
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
