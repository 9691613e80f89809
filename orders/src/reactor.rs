//! The I/O shell around [`crate::saga::react`]: every saga event is appended to its order's
//! history, then the rule runs; ProductChanged updates the catalog replica.

use crate::{saga, store};
use diesel::sqlite::SqliteConnection;
use events::{Envelope, Event};
use kafka::{ReactError, Reactor};

/// Orders' reaction to everything on the topic that concerns an order or the catalog.
pub struct OrderReactor;

impl Reactor for OrderReactor {
    fn wants(&self, event: &Envelope) -> bool {
        event.event.order_id().is_some() || matches!(event.event, Event::ProductChanged(_))
    }

    fn react(
        &self,
        conn: &mut SqliteConnection,
        event: &Envelope,
    ) -> Result<Vec<Envelope>, ReactError> {
        if let Event::ProductChanged(p) = &event.event {
            store::upsert_product(conn, p)?;
            return Ok(Vec::new());
        }
        let Some(order_id) = event.event.order_id() else {
            return Ok(Vec::new());
        };
        store::record_history(conn, order_id, event)?;
        let Some(before) = store::order(conn, order_id)?.map(|s| s.order) else {
            return Err(ReactError::Rejected(format!(
                "order {order_id} does not exist here"
            )));
        };
        let (after, caused) = saga::react(before.clone(), event);
        if after != before {
            store::save_order(conn, &after)?;
        }
        Ok(caused)
    }
}
