//! Parking a message the service cannot apply: a local record, the dead letter (queued in the
//! outbox for `<topic>.DLT`) and the consumer's position past it commit in one transaction.
//! So a parked message is parked once, and the relay publishes its dead letter like any
//! event. A dead letter is bounded in size ([`events::DeadLetter`]), so it always fits; were
//! the broker to refuse it anyway, the relay marks it refused and the local record remains.

use crate::db::{DbConnection, DbError};
use crate::offsets::{self, ConsumedAt};
use crate::outbox;
use diesel::prelude::*;
use events::DeadLetter;

diesel::table! {
    /// Every message this service parked.
    dead_letters (id) {
        id -> BigInt,
        kind -> Text,
        reason -> Text,
        topic -> Text,
        partition -> Integer,
        #[sql_name = "offset"]
        offset_ -> BigInt,
        message_key -> Nullable<Text>,
        payload_bytes -> BigInt,
        payload_sha256 -> Text,
        parked_at -> Text,
    }
}

/// Records `letter`, queues it for `dead_letter_topic` and moves the position past the
/// message, inside the caller's transaction.
pub fn park(
    conn: &mut DbConnection,
    letter: &DeadLetter,
    dead_letter_topic: &str,
    at: &ConsumedAt,
) -> Result<(), DbError> {
    offsets::store(conn, at)?;
    diesel::insert_into(dead_letters::table)
        .values((
            dead_letters::kind.eq(format!("{:?}", letter.kind)),
            dead_letters::reason.eq(&letter.reason),
            dead_letters::topic.eq(&letter.topic),
            dead_letters::partition.eq(letter.partition),
            dead_letters::offset_.eq(letter.offset),
            dead_letters::message_key.eq(letter.key.as_deref()),
            dead_letters::payload_bytes.eq(letter.payload_bytes as i64),
            dead_letters::payload_sha256.eq(&letter.payload_sha256),
            dead_letters::parked_at.eq(&letter.parked_at),
        ))
        .execute(conn)?;
    outbox::enqueue_dead_letter(conn, dead_letter_topic, letter)?;
    Ok(())
}

/// A parked message as `GET /dead-letters` shows it.
#[derive(Debug, Clone, Queryable, Selectable, serde::Serialize)]
#[diesel(table_name = dead_letters)]
#[serde(rename_all = "camelCase")]
pub struct ParkedRow {
    /// Local id (page cursor).
    pub id: i64,
    /// `Undecodable`, `Rejected` or `HandlerPanicked`.
    pub kind: String,
    /// Why.
    pub reason: String,
    /// Where it was read.
    pub topic: String,
    /// Its partition.
    pub partition: i32,
    /// Its offset.
    #[serde(rename = "offset")]
    pub offset_: i64,
    /// Its key.
    pub message_key: Option<String>,
    /// Its size.
    pub payload_bytes: i64,
    /// Its SHA-256.
    pub payload_sha256: String,
    /// When it was parked.
    pub parked_at: String,
}

/// One page of this service's parked messages, newest last.
pub fn list(conn: &mut DbConnection, page: crate::http::Page) -> QueryResult<Vec<ParkedRow>> {
    dead_letters::table
        .filter(dead_letters::id.gt(page.after))
        .order(dead_letters::id)
        .limit(page.limit)
        .select(ParkedRow::as_select())
        .load(conn)
}

/// How many messages this service has parked.
pub fn count(conn: &mut DbConnection) -> QueryResult<i64> {
    dead_letters::table.count().get_result(conn)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Database;
    use events::ParkedFrom;

    const NONE: crate::db::Migrations = crate::db::PLUMBING_MIGRATIONS;

    #[tokio::test]
    async fn parking_records_queues_and_moves_the_position_together() {
        let dir = tempfile::tempdir().unwrap();
        let db = Database::open(dir.path().join("p.db").to_str().unwrap(), NONE).unwrap();
        let from = ParkedFrom {
            consumer_group: "orders".into(),
            topic: "eventTopic".into(),
            partition: 1,
            offset: 7,
            key: Some("poison-1".into()),
        };
        let letter = DeadLetter::undecodable(from, &[0u8; 200_000], "not a JSON object");
        crate::leases::grant(&db, "eventTopic", 1, "me").await;
        let at = ConsumedAt {
            topic: "eventTopic".into(),
            partition: 1,
            next_offset: 8,
            holder: "me".into(),
        };
        let (rows, positions, parked) = db
            .write(move |conn| {
                park(conn, &letter, "eventTopic.DLT", &at)?;
                let rows = outbox::pending(conn, 10)?;
                let positions = offsets::load(conn, "eventTopic")?;
                Ok::<_, crate::DbError>(((rows, positions, count(conn)?), Vec::new()))
            })
            .await
            .unwrap();
        assert_eq!(parked, 1);
        assert_eq!(positions.get(&1), Some(&8));
        assert_eq!(rows.len(), 1);
        assert_eq!(rows[0].topic.as_deref(), Some("eventTopic.DLT"));
        assert_eq!(rows[0].message_key, "poison-1");
        assert!(
            rows[0].payload.len() < 16 * 1024,
            "{} bytes",
            rows[0].payload.len()
        );
    }
}
