//! The orders service (:8081): where customers place and cancel orders.
//!
//! An order starts pending (`OrderPlaced`); it completes once both StockDecreased and
//! DeliveryStarted arrived, and is cancelled by ProductOutOfStock, by a courier's
//! DeliveryCancelled, by the customer, or by the saga timeout when it stays pending too long.
//! It also keeps every order's saga history across the three services (the others' events fed
//! from the topic, its own recorded as it writes them) and a replica of the catalog.

pub mod dashboard;
pub mod domain;
pub mod error;
pub mod history;
pub mod ids;
pub mod pending;
pub mod reactor;
pub mod rebuild;
pub mod retention;
pub mod routes;
pub mod saga;
pub mod startup;
pub mod store;
pub mod timeouts;

pub use startup::{Settings, build, settings_from_env};
