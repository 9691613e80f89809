//! Backpressure from the whole saga, not only from orders' own database: a new order is
//! refused with a 503 while too many placed orders are still pending.
//!
//! Why: admission control ([`kafka::admission`]) bounds the requests orders itself is working
//! on, but orders can accept orders faster than the broker and the other services carry them
//! (measured with tansu at 1,000 orders/s offered: orders accepted ~390/s into a saga pipeline
//! that ended fewer, and accepted sagas took 9–11 s). A pending order is one whose saga has
//! not come back yet, wherever it waits — in the outbox, in the broker, in products' or
//! delivery's consumer, in orders' own — so their number is the backlog of the saga itself.
//! It is counted in the database, so every instance sees the same figure and a restart
//! starts with the right one.

use crate::store;
use kafka::metrics::prometheus::IntGauge;
use kafka::{Database, DbError};
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// How often the count is read again: an overload admits at most this long's worth of extra
/// orders before the count catches up.
const REFRESH_EVERY: Duration = Duration::from_millis(200);

/// The number of pending orders, as last counted, and the bound new orders are held to.
#[derive(Debug)]
pub struct PendingOrders {
    /// `mall_orders_pending`: the last count, for `/metrics` and for [`PendingOrders::admit`].
    counted: IntGauge,
    max: i64,
}

/// Why a new order is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error(
    "too busy: {pending} orders are still in progress (at most {max}); nothing was done, \
     retry in a second"
)]
pub struct TooManyPending {
    /// Pending orders when last counted.
    pub pending: i64,
    /// `ORDERS_MAX_PENDING`.
    pub max: i64,
}

impl PendingOrders {
    /// A bound of `max` pending orders; nothing counted yet (0).
    pub fn new(max: i64) -> Arc<Self> {
        let counted = IntGauge::new(
            "mall_orders_pending",
            "Orders placed whose saga has not ended yet (counted every 200 ms)",
        )
        .expect("a fixed gauge definition is valid");
        Arc::new(PendingOrders { counted, max })
    }

    /// The gauge, to register with the service's metrics.
    pub fn gauge(&self) -> IntGauge {
        self.counted.clone()
    }

    /// Ok when one more order may be placed.
    pub fn admit(&self) -> Result<(), TooManyPending> {
        let pending = self.counted.get();
        if pending >= self.max {
            return Err(TooManyPending {
                pending,
                max: self.max,
            });
        }
        Ok(())
    }

    /// Records a count.
    pub fn set(&self, pending: i64) {
        self.counted.set(pending);
    }

    /// Counts the pending orders every [`REFRESH_EVERY`] until `stop`.
    pub async fn run(self: Arc<Self>, db: Database, stop: CancellationToken) {
        loop {
            match db
                .read(|conn| store::pending_count(conn).map_err(DbError::from))
                .await
            {
                Ok(pending) => self.set(pending),
                // The last count stays: a database that cannot be read fails the writes too.
                Err(e) => log::warn!("counting pending orders: {e}"),
            }
            tokio::select! {
                _ = tokio::time::sleep(REFRESH_EVERY) => {}
                _ = stop.cancelled() => return,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn orders_are_refused_from_the_bound_on() {
        let pending = PendingOrders::new(3);
        pending.set(2);
        assert_eq!(pending.admit(), Ok(()));
        pending.set(3);
        let refused = pending.admit().unwrap_err();
        assert_eq!(refused, TooManyPending { pending: 3, max: 3 });
        assert!(
            refused
                .to_string()
                .contains("3 orders are still in progress")
        );
        assert_eq!(pending.gauge().get(), 3);
        pending.set(0);
        assert_eq!(pending.admit(), Ok(()));
    }
}
