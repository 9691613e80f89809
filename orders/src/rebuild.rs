//! Orders' part of rebuilding its read model from the topic ([`kafka::rebuild`] reads the
//! topic into an empty database, leaves out what orders parked and stores the positions at the
//! ends): every event through the same rules that built it — products' and delivery's events
//! through [`saga::react`] (their caused events are already on the topic and are not published
//! again), orders' own decisions through [`saga::replay_own`], ProductChanged into the catalog
//! replica, and every saga event into its order's history.
//!
//! What the topic does not hold cannot come back: an order's `createdAt` becomes its
//! OrderPlaced's timestamp and `updatedAt` the rebuild's; events that arrived together keep
//! their topic order in the history.

use crate::reactor::OrderReactor;
use crate::{saga, store};
use events::{Envelope, Event, Service};
use kafka::db::DbConnection;
use kafka::rebuild::Rebuild;

impl Rebuild for OrderReactor {
    fn service(&self) -> Service {
        Service::Orders
    }

    /// No orders, history or catalog.
    fn is_empty(&self, conn: &mut DbConnection) -> diesel::QueryResult<bool> {
        store::is_empty(conn)
    }

    fn apply_read_back(
        &self,
        conn: &mut DbConnection,
        event: &Envelope,
    ) -> diesel::QueryResult<()> {
        apply(conn, event)
    }

    /// The order id: no new order may take one the topic holds ([`crate::ids`]).
    fn id_of(&self, payload: &[u8]) -> Option<i64> {
        crate::ids::order_id_of(payload)
    }
}

/// Applies one event read back from the topic.
fn apply(conn: &mut DbConnection, event: &Envelope) -> diesel::QueryResult<()> {
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
