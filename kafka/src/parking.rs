//! Parking a message the service cannot apply: a local record, the dead letter (queued in the
//! outbox for `<topic>.DLT`) and the consumer's position past it commit in one transaction.
//! So a parked message is parked once, and the relay publishes its dead letter like any
//! event. A dead letter is bounded in size ([`events::DeadLetter`]), so it always fits; were
//! the broker to refuse it anyway, the relay marks it refused and the local record remains.
//!
//! A parked saga event is announced on the saga topic (`EventParked`, keyed by its order), so
//! orders can say which orders wait on one. An administrator then redrives it (a copy with a
//! new event id and headers naming the original and this service, which alone applies it) or
//! discards it with a reason; each is recorded here and announced the same way.

use crate::db::{DbConnection, DbError};
use crate::offsets::{self, ConsumedAt};
use crate::outbox;
use diesel::prelude::*;
use events::dead_letter::{REDRIVE_FOR_HEADER, REDRIVE_OF_HEADER};
use events::{DeadLetter, DeadLetterNote, Decoded, Envelope, Event, Service};

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
        payload -> Nullable<Text>,
        event_type -> Nullable<Text>,
        event_id -> Nullable<Text>,
        order_id -> Nullable<BigInt>,
        status -> Text,
        resolution -> Nullable<Text>,
    }
}

/// A dead letter waiting for an administrator.
pub const PARKED: &str = "parked";
/// A dead letter sent back to its service.
pub const REDRIVEN: &str = "redriven";
/// A dead letter given up.
pub const DISCARDED: &str = "discarded";

/// Records `letter`, queues it for `dead_letter_topic` and moves the position past the
/// message, inside the caller's transaction. `event` is the parked message when it decoded
/// (kept, so it can be redriven); when it belongs to an order, the `EventParked` to publish
/// with this write is returned.
pub fn park(
    conn: &mut DbConnection,
    letter: &DeadLetter,
    dead_letter_topic: &str,
    at: &ConsumedAt,
    event: Option<&Envelope>,
) -> Result<Option<Envelope>, DbError> {
    offsets::store(conn, at)?;
    let id: i64 = diesel::insert_into(dead_letters::table)
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
            dead_letters::payload.eq(event.map(Envelope::to_json)),
            dead_letters::event_type.eq(event.map(Envelope::event_type)),
            dead_letters::event_id.eq(event.map(|e| e.event_id.to_string())),
            dead_letters::order_id.eq(event.and_then(|e| e.event.order_id())),
        ))
        .returning(dead_letters::id)
        .get_result(conn)?;
    outbox::enqueue_dead_letter(conn, dead_letter_topic, letter)?;
    let note = event.and_then(|event| {
        let note = note(&letter.consumer_group, id, event, letter.reason.clone())?;
        Some(Envelope::new(note.service, Event::EventParked(note)).caused_by(event))
    });
    Ok(note)
}

/// The note about dead letter `id` of `group` holding `event`; none for an event of no order
/// or a group that is not a service of the mall.
fn note(group: &str, id: i64, event: &Envelope, message: String) -> Option<DeadLetterNote> {
    Some(DeadLetterNote {
        order_id: event.event.order_id()?,
        service: Service::parse(group)?,
        dead_letter_id: id,
        parked_event_type: event.event_type().to_owned(),
        parked_event_id: event.event_id,
        state_message: message,
        redrive_event_id: None,
    })
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
    /// The parked event's type, when it decoded.
    pub event_type: Option<String>,
    /// The parked event's id, when it decoded.
    pub event_id: Option<String>,
    /// The parked event's order, when it has one.
    pub order_id: Option<i64>,
    /// `parked`, `redriven` or `discarded`.
    pub status: String,
    /// What the redrive did, or why it was discarded, and when.
    pub resolution: Option<String>,
}

/// One parked message with the event itself, as `GET /dead-letters/{id}` shows it.
#[derive(Debug, Clone, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ParkedMessage {
    /// Its record.
    #[serde(flatten)]
    pub row: ParkedRow,
    /// The parked event, when it decoded (an undecodable message is not kept; its preview
    /// is on the dead-letter topic).
    pub payload: Option<serde_json::Value>,
}

/// One page of this service's parked messages, newest last; only those in `status` if given.
pub fn list(
    conn: &mut DbConnection,
    page: crate::http::Page,
    status: Option<&str>,
) -> QueryResult<Vec<ParkedRow>> {
    let mut query = dead_letters::table
        .filter(dead_letters::id.gt(page.after))
        .order(dead_letters::id)
        .limit(page.limit)
        .select(ParkedRow::as_select())
        .into_boxed();
    if let Some(status) = status {
        query = query.filter(dead_letters::status.eq(status.to_owned()));
    }
    query.load(conn)
}

/// Dead letter `id` with its event, if there is one.
pub fn get(conn: &mut DbConnection, id: i64) -> QueryResult<Option<ParkedMessage>> {
    let found: Option<(ParkedRow, Option<String>)> = dead_letters::table
        .find(id)
        .select((ParkedRow::as_select(), dead_letters::payload))
        .first(conn)
        .optional()?;
    Ok(found.map(|(row, payload)| ParkedMessage {
        row,
        payload: payload.and_then(|p| serde_json::from_str::<serde_json::Value>(&p).ok()),
    }))
}

/// How many messages this service has parked.
pub fn count(conn: &mut DbConnection) -> QueryResult<i64> {
    dead_letters::table.count().get_result(conn)
}

/// How many parked messages wait for an administrator (neither redriven nor discarded).
pub fn count_open(conn: &mut DbConnection) -> QueryResult<i64> {
    dead_letters::table
        .filter(dead_letters::status.eq(PARKED))
        .count()
        .get_result(conn)
}

/// Why a redrive or a discard was refused.
#[derive(Debug, thiserror::Error)]
pub enum ResolveError {
    /// No dead letter has this id.
    #[error("dead letter {0} does not exist")]
    NotFound(i64),
    /// Its state does not allow it (already redriven or discarded; nothing to redrive).
    #[error("{0}")]
    Conflict(String),
    /// The database failed.
    #[error(transparent)]
    Db(#[from] DbError),
}

impl From<diesel::result::Error> for ResolveError {
    fn from(e: diesel::result::Error) -> Self {
        ResolveError::Db(DbError::Query(e))
    }
}

/// What a redrive or a discard did.
#[derive(Debug, Clone, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Resolved {
    /// The dead letter.
    pub id: i64,
    /// `redriven` or `discarded`.
    pub status: &'static str,
    /// What was done, or why.
    pub resolution: String,
    /// A redrive's new event id.
    pub redrive_event_id: Option<String>,
}

/// Sends dead letter `id` of `group` back: its event, with a new event id, to the saga topic
/// (through the outbox, in this transaction) with headers naming the original
/// ([`REDRIVE_OF_HEADER`]) and `group` ([`REDRIVE_FOR_HEADER`], the only service that applies
/// it: the others applied the original). Returns what it did and the `DeadLetterRedriven` to
/// publish with this write.
pub fn redrive(
    conn: &mut DbConnection,
    group: &str,
    id: i64,
) -> Result<(Resolved, Option<Envelope>), ResolveError> {
    let (row, payload) = open_letter(conn, id)?;
    let Some(payload) = payload else {
        return Err(ResolveError::Conflict(format!(
            "dead letter {id} is not an event of this contract ({}): it can only be discarded",
            row.kind
        )));
    };
    let mut original = match events::decode(payload.as_bytes()) {
        Ok(Decoded::Known(event)) => *event,
        other => {
            return Err(ResolveError::Conflict(format!(
                "dead letter {id} no longer decodes ({other:?}): it can only be discarded"
            )));
        }
    };
    let original_id = original.event_id.to_string();
    let copy_id = uuid::Uuid::now_v7();
    let resolution = format!("redriven as event {copy_id}");
    let parked = original.clone();
    original.event_id = copy_id;
    outbox::enqueue_with_headers(
        conn,
        &original,
        &[
            (REDRIVE_OF_HEADER, &original_id),
            (REDRIVE_FOR_HEADER, group),
        ],
    )?;
    resolve(conn, id, REDRIVEN, &resolution)?;
    let announced = note(group, id, &parked, resolution.clone()).map(|mut note| {
        note.redrive_event_id = Some(copy_id);
        Envelope::new(note.service, Event::DeadLetterRedriven(note))
    });
    let done = Resolved {
        id,
        status: REDRIVEN,
        resolution,
        redrive_event_id: Some(copy_id.to_string()),
    };
    Ok((done, announced))
}

/// Gives dead letter `id` of `group` up for `reason`. Returns what it did and the
/// `DeadLetterDiscarded` to publish with this write.
pub fn discard(
    conn: &mut DbConnection,
    group: &str,
    id: i64,
    reason: &str,
) -> Result<(Resolved, Option<Envelope>), ResolveError> {
    let (_, payload) = open_letter(conn, id)?;
    let resolution = format!("discarded: {reason}");
    resolve(conn, id, DISCARDED, &resolution)?;
    let parked = payload.and_then(|p| match events::decode(p.as_bytes()) {
        Ok(Decoded::Known(event)) => Some(*event),
        _ => None,
    });
    let announced = parked
        .and_then(|parked| note(group, id, &parked, resolution.clone()))
        .map(|note| Envelope::new(note.service, Event::DeadLetterDiscarded(note)));
    let done = Resolved {
        id,
        status: DISCARDED,
        resolution,
        redrive_event_id: None,
    };
    Ok((done, announced))
}

/// Dead letter `id` and its kept event, if it is still waiting.
fn open_letter(
    conn: &mut DbConnection,
    id: i64,
) -> Result<(ParkedRow, Option<String>), ResolveError> {
    // Two instances resolving one letter at once take turns; the second finds it resolved.
    crate::db::lock(conn, crate::db::Lock::DeadLetter(id))?;
    let (row, payload): (ParkedRow, Option<String>) = dead_letters::table
        .find(id)
        .select((ParkedRow::as_select(), dead_letters::payload))
        .first(conn)
        .optional()?
        .ok_or(ResolveError::NotFound(id))?;
    if row.status != PARKED {
        return Err(ResolveError::Conflict(format!(
            "dead letter {id} was already {}: {}",
            row.status,
            row.resolution.as_deref().unwrap_or("")
        )));
    }
    Ok((row, payload))
}

fn resolve(conn: &mut DbConnection, id: i64, status: &str, resolution: &str) -> QueryResult<()> {
    diesel::update(dead_letters::table.find(id))
        .set((
            dead_letters::status.eq(status),
            dead_letters::resolution.eq(format!(
                "{resolution} at {}",
                chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
            )),
        ))
        .execute(conn)
        .map(|_| ())
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
                park(conn, &letter, "eventTopic.DLT", &at, None)?;
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

    fn open_db(dir: &tempfile::TempDir) -> Database {
        Database::open(dir.path().join("p.db").to_str().unwrap(), NONE).unwrap()
    }

    fn request(order_id: i64) -> Envelope {
        Envelope::new(
            Service::Orders,
            Event::OrderCancelRequested(events::OrderCancelRequested {
                order_id,
                product_id: 1,
                quantity: 1,
                customer_id: "c".into(),
                state_message: "asked".into(),
            }),
        )
        .initiated_by(Service::Orders)
    }

    async fn park_in(db: &Database, offset: i64, event: Option<Envelope>) -> Option<Envelope> {
        let from = ParkedFrom {
            consumer_group: "delivery".into(),
            topic: "eventTopic".into(),
            partition: 0,
            offset,
            key: Some("5".into()),
        };
        let payload = event.as_ref().map(Envelope::to_json).unwrap_or("{".into());
        let letter = DeadLetter::rejected(from, payload.as_bytes(), "refused");
        let at = ConsumedAt {
            topic: "eventTopic".into(),
            partition: 0,
            next_offset: offset + 1,
            holder: "me".into(),
        };
        db.write(move |conn| {
            let note = park(conn, &letter, "eventTopic.DLT", &at, event.as_ref())?;
            Ok::<_, DbError>((note, Vec::new()))
        })
        .await
        .unwrap()
    }

    /// A parked saga event is kept and announced to its order; a redrive queues a copy with a
    /// new id and headers naming the original and the parking service, once; a discard needs
    /// an open letter too; a message that never decoded can only be discarded.
    #[tokio::test]
    async fn a_parked_event_is_announced_redriven_once_or_discarded() {
        let dir = tempfile::tempdir().unwrap();
        let db = open_db(&dir);
        crate::leases::grant(&db, "eventTopic", 0, "me").await;
        let original = request(5);
        let note = park_in(&db, 3, Some(original.clone()))
            .await
            .expect("a note");
        let Event::EventParked(parked) = &note.event else {
            panic!("{note:?}")
        };
        assert_eq!((parked.order_id, parked.service), (5, Service::Delivery));
        assert_eq!(parked.parked_event_id, original.event_id);
        assert_eq!(parked.parked_event_type, "OrderCancelRequested");
        assert_eq!(note.causation_id, Some(original.event_id));
        let id = parked.dead_letter_id;

        let (done, announced) = db
            .write(move |conn| Ok::<_, ResolveError>((redrive(conn, "delivery", id)?, Vec::new())))
            .await
            .unwrap();
        assert_eq!(done.status, REDRIVEN);
        let copy_id = done.redrive_event_id.clone().unwrap();
        assert_ne!(copy_id, original.event_id.to_string());
        let Some(Event::DeadLetterRedriven(redriven)) = announced.map(|e| e.event) else {
            panic!("no DeadLetterRedriven")
        };
        assert_eq!(
            redriven.redrive_event_id.map(|u| u.to_string()),
            Some(copy_id.clone())
        );
        let rows = db
            .read(|conn| outbox::pending(conn, 10).map_err(DbError::from))
            .await
            .unwrap();
        let copy = rows
            .iter()
            .find(|r| r.event_id == copy_id)
            .expect("the copy");
        assert_eq!(copy.topic, None, "to the saga topic");
        let headers: serde_json::Value =
            serde_json::from_str(copy.headers.as_deref().unwrap()).unwrap();
        assert_eq!(headers[REDRIVE_OF_HEADER], original.event_id.to_string());
        assert_eq!(headers[REDRIVE_FOR_HEADER], "delivery");
        let Ok(Decoded::Known(sent)) = events::decode(copy.payload.as_bytes()) else {
            panic!("{}", copy.payload)
        };
        assert_eq!(
            (sent.event.clone(), sent.causation_id, sent.initiator),
            (
                original.event.clone(),
                original.causation_id,
                original.initiator
            ),
            "the same event, another id"
        );

        let again = db
            .write(move |conn| Ok::<_, ResolveError>((redrive(conn, "delivery", id)?, Vec::new())))
            .await;
        assert!(matches!(again, Err(ResolveError::Conflict(_))), "{again:?}");
        let discarded = db
            .write(move |conn| {
                Ok::<_, ResolveError>((discard(conn, "delivery", id, "no")?, Vec::new()))
            })
            .await;
        assert!(matches!(discarded, Err(ResolveError::Conflict(_))));
        let missing = db
            .write(|conn| Ok::<_, ResolveError>((redrive(conn, "delivery", 99)?, Vec::new())))
            .await;
        assert!(matches!(missing, Err(ResolveError::NotFound(99))));

        assert!(park_in(&db, 4, None).await.is_none(), "no order, no note");
        let poison = db
            .read(|conn| {
                let page = crate::http::Page {
                    after: 0,
                    limit: 10,
                };
                list(conn, page, Some(PARKED)).map_err(DbError::from)
            })
            .await
            .unwrap();
        assert_eq!(poison.len(), 1);
        let poison = poison[0].id;
        let refused = db
            .write(move |conn| {
                Ok::<_, ResolveError>((redrive(conn, "delivery", poison)?, Vec::new()))
            })
            .await;
        assert!(
            matches!(refused, Err(ResolveError::Conflict(_))),
            "{refused:?}"
        );
        let (done, announced) = db
            .write(move |conn| {
                Ok::<_, ResolveError>((discard(conn, "delivery", poison, "poison")?, Vec::new()))
            })
            .await
            .unwrap();
        assert!(done.resolution.starts_with("discarded: poison"));
        assert!(announced.is_none());
        let open = db
            .read(|conn| count_open(conn).map_err(DbError::from))
            .await
            .unwrap();
        assert_eq!(open, 0);
    }
}
