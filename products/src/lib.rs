//! The products service (:8085): owns the catalog and stock.
//!
//! On OrderPlaced it reserves the ordered units (StockDecreased) or refuses (ProductOutOfStock,
//! which starts a compensation chain it then ignores); on OrderCancelled or DeliveryCancelled
//! it releases the order's reservation exactly once (StockIncreased). Every catalog change is
//! announced as ProductChanged for orders' replica.

pub mod domain;
pub mod error;
pub mod reactor;
pub mod rebuild;
pub mod retention;
pub mod routes;
pub mod saga;
pub mod startup;
pub mod store;

pub use startup::{Settings, build};
