//! The idempotent consumer: an event's effect, the events it causes and the record that it was
//! processed commit in one transaction, so a redelivered event finds its id and does nothing.

use crate::db::DbConnection;
use crate::db::{Database, DbError};
use crate::offsets::{self, ConsumedAt};
use diesel::prelude::*;
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
    fn react(&self, conn: &mut DbConnection, event: &Envelope)
    -> Result<Vec<Envelope>, ReactError>;

    /// Applies `events` in order, in the caller's transaction, and returns what each caused:
    /// the same as [`Reactor::react`] on each in turn. A consumer's batch on PostgreSQL comes
    /// this way; a reactor that can decide a batch with fewer statements (round trips, and
    /// time holding its locks) than one event at a time overrides it.
    fn react_all(
        &self,
        conn: &mut DbConnection,
        events: &[&Envelope],
    ) -> Result<Vec<Vec<Envelope>>, ReactError> {
        events.iter().map(|event| self.react(conn, event)).collect()
    }
}

/// The orders `events` concern, each once, ascending: what a [`Reactor::react_all`] reads.
pub fn orders_of(events: &[&Envelope]) -> Vec<i64> {
    let ids: std::collections::BTreeSet<i64> =
        events.iter().filter_map(|e| e.event.order_id()).collect();
    ids.into_iter().collect()
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
        apply_in(conn, &*reactor, &event)
    })
    .await
}

/// Applies `event` inside the caller's transaction unless its id was already processed:
/// the effect, the id, and the caused events returned for the outbox. Batches call it once
/// per event in one transaction; an event sees the effects of those before it.
pub fn apply_in<R: Reactor + ?Sized>(
    conn: &mut DbConnection,
    reactor: &R,
    event: &Envelope,
) -> Result<(Applied, Vec<Envelope>), ReactError> {
    // The order first: another instance's write about it (a PATCH) waits, or is waited for.
    crate::db::lock_orders(conn, event.event.order_id())?;
    // The id goes in first, in one statement that is also the duplicate check; a reaction
    // that fails rolls it back with everything else.
    if !record_processed(conn, event)? {
        return Ok((Applied::Duplicate, Vec::new()));
    }
    let caused = reactor.react(conn, event)?;
    Ok((Applied::Done(caused.len()), caused))
}

/// [`apply_in`] for each of `events`, in order, in the caller's transaction: the consumer's
/// fetched batch. Each event sees the effects of those before it; one that repeats an id
/// (of this batch or of an earlier one) is a duplicate.
///
/// On PostgreSQL the ids go in first with one statement (`INSERT … ON CONFLICT DO NOTHING
/// RETURNING`), which says which are new: a statement per event would be a round trip per
/// event. What commits is the same as [`apply_in`] per event — the batch is one transaction,
/// so a reaction that fails rolls every id back with it. SQLite answers in-process: one
/// statement per event costs no round trip there.
pub fn apply_all_in<R: Reactor + ?Sized>(
    conn: &mut DbConnection,
    reactor: &R,
    events: &[Envelope],
) -> Result<Vec<(Applied, Vec<Envelope>)>, ReactError> {
    let DbConnection::Postgres(pg) = conn else {
        return events
            .iter()
            .map(|event| apply_in(conn, reactor, event))
            .collect();
    };
    // The orders the batch is about, in one statement, before anything is read: another
    // instance's write about one of them (a PATCH) waits, or is waited for.
    crate::db::lock_orders_on(pg, events.iter().filter_map(|e| e.event.order_id()))?;
    let now = chrono::Utc::now().to_rfc3339();
    let rows: Vec<_> = events
        .iter()
        .map(|e| {
            (
                processed_events::event_id.eq(e.event_id.to_string()),
                processed_events::event_type.eq(e.event_type()),
                processed_events::processed_at.eq(now.clone()),
            )
        })
        .collect();
    // An id twice in one statement is inserted once and returned once.
    let mut new: std::collections::HashSet<String> = diesel::insert_into(processed_events::table)
        .values(rows)
        .on_conflict_do_nothing()
        .returning(processed_events::event_id)
        .get_results::<String>(pg)?
        .into_iter()
        .collect();
    // Its first occurrence applies; a repeat finds the id taken.
    let first: Vec<bool> = events
        .iter()
        .map(|event| new.remove(&event.event_id.to_string()))
        .collect();
    let applied: Vec<&Envelope> = events
        .iter()
        .zip(&first)
        .filter_map(|(event, first)| first.then_some(event))
        .collect();
    let caused = reactor.react_all(conn, &applied)?;
    if caused.len() != applied.len() {
        return Err(ReactError::Rejected(
            "the reactor answered for another number of events than it was given".into(),
        ));
    }
    let mut caused = caused.into_iter();
    Ok(first
        .into_iter()
        .map(|first| match first.then(|| caused.next()).flatten() {
            Some(caused) => (Applied::Done(caused.len()), caused),
            None => (Applied::Duplicate, Vec::new()),
        })
        .collect())
}

/// Records `event`'s id; false when it was already there.
fn record_processed(conn: &mut DbConnection, event: &Envelope) -> QueryResult<bool> {
    let statement = diesel::insert_into(processed_events::table)
        .values((
            processed_events::event_id.eq(event.event_id.to_string()),
            processed_events::event_type.eq(event.event_type()),
            processed_events::processed_at.eq(chrono::Utc::now().to_rfc3339()),
        ))
        .on_conflict_do_nothing();
    let inserted = crate::on_backend!(conn, |c| statement.execute(c))?;
    Ok(inserted == 1)
}

#[cfg(test)]
mod tests {
    use super::*;
    use events::{Event, OrderCompleted, Service};
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    const NONE: crate::db::Migrations = crate::db::PLUMBING_MIGRATIONS;

    /// Counts its effects and causes one event per application.
    struct Counting(AtomicUsize);

    impl Reactor for Counting {
        fn wants(&self, _: &Envelope) -> bool {
            true
        }
        fn react(&self, _: &mut DbConnection, e: &Envelope) -> Result<Vec<Envelope>, ReactError> {
            self.0.fetch_add(1, Ordering::SeqCst);
            Ok(vec![
                Envelope::new(Service::Orders, e.event.clone()).caused_by(e),
            ])
        }
    }

    /// An event for the tests; each call has a new id.
    fn completed() -> Envelope {
        Envelope::new(
            Service::Orders,
            Event::OrderCompleted(OrderCompleted {
                order_id: 1,
                product_id: 1,
                quantity: 1,
                customer_id: "c".into(),
            }),
        )
    }

    #[tokio::test]
    async fn an_event_applies_once_and_its_position_moves_even_for_a_duplicate() {
        let dir = tempfile::tempdir().unwrap();
        let db = Database::open(dir.path().join("i.db").to_str().unwrap(), NONE).unwrap();
        let reactor = Arc::new(Counting(AtomicUsize::new(0)));
        let event = completed();
        crate::leases::grant(&db, "t", 0, "me").await;
        let at = |next_offset, holder: &str| ConsumedAt {
            topic: "t".into(),
            partition: 0,
            next_offset,
            holder: holder.into(),
        };
        let first = apply_once_at(&db, reactor.clone(), event.clone(), Some(at(5, "me"))).await;
        let again = apply_once_at(&db, reactor.clone(), event.clone(), Some(at(9, "me"))).await;
        assert_eq!(first.unwrap(), Applied::Done(1));
        assert_eq!(again.unwrap(), Applied::Duplicate);
        // Another instance without the partition's lease commits nothing, not even a position.
        let mut other = event;
        other.event_id = uuid::Uuid::new_v4();
        let fenced = apply_once_at(&db, reactor.clone(), other, Some(at(10, "other"))).await;
        assert!(
            matches!(fenced, Err(ReactError::Db(crate::DbError::NotHolder(_)))),
            "{fenced:?}"
        );
        assert_eq!(reactor.0.load(Ordering::SeqCst), 1, "one effect");
        let (positions, outbox_rows) = db
            .read(|conn| {
                Ok::<_, DbError>((
                    offsets::load(conn, "t")?,
                    crate::outbox::pending(conn, 10)?.len(),
                ))
            })
            .await
            .unwrap();
        assert_eq!(
            positions.get(&0),
            Some(&9),
            "the duplicate moved the position"
        );
        assert_eq!(outbox_rows, 1, "one caused event");
    }

    /// Fails its first reaction, after its id was recorded; succeeds afterwards.
    struct FailsFirst(AtomicUsize);

    impl Reactor for FailsFirst {
        fn wants(&self, _: &Envelope) -> bool {
            true
        }
        fn react(&self, _: &mut DbConnection, _: &Envelope) -> Result<Vec<Envelope>, ReactError> {
            if self.0.fetch_add(1, Ordering::SeqCst) == 0 {
                return Err(ReactError::Db(DbError::Batch("disk I/O error".into())));
            }
            Ok(Vec::new())
        }
    }

    /// The id is recorded before the reaction runs: a reaction that fails must take it back
    /// with it, or the redelivery would be dropped as a duplicate and the effect lost.
    #[tokio::test]
    async fn a_failed_reaction_leaves_no_id_behind() {
        let dir = tempfile::tempdir().unwrap();
        let db = Database::open(dir.path().join("f.db").to_str().unwrap(), NONE).unwrap();
        let reactor = Arc::new(FailsFirst(AtomicUsize::new(0)));
        let event = completed();
        let failed = apply_once(&db, reactor.clone(), event.clone()).await;
        assert!(failed.unwrap_err().is_transient());
        let again = apply_once(&db, reactor.clone(), event.clone()).await;
        assert_eq!(again.unwrap(), Applied::Done(0), "applied on redelivery");
        let duplicate = apply_once(&db, reactor.clone(), event).await;
        assert_eq!(duplicate.unwrap(), Applied::Duplicate);
    }
}
