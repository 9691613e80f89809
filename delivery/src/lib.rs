//! The delivery service (:8082): one delivery per order.
//!
//! On OrderPlaced it starts a delivery (DeliveryStarted); on OrderCancelled it cancels it
//! (DeliveryCancelled) unless delivery started that chain itself. A courier completes a delivery
//! (only once the order is confirmed by OrderCompleted) or cancels it, which starts a
//! compensation chain initiated by delivery.

pub mod error;
pub mod reactor;
pub mod rebuild;
pub mod retention;
pub mod routes;
pub mod saga;
pub mod startup;
pub mod store;

pub use startup::{Settings, build, settings_from_env};
