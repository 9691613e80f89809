//! The seam between the model and the services' rules: the model calls the rules only through
//! these function pointers, so a test can hand it a deliberately broken rule (a mutation) and
//! watch the checker catch it.

use delivery::saga::{Delivery, DeliveryState, IllegalTransition, OrderDelivery};
use events::Envelope;
use orders::saga::{CancelRefused, CustomerCancel, Order};
use products::saga::StockView;

/// Every saga rule the model uses, one pointer each.
#[derive(Clone, Copy)]
pub struct Rules {
    /// Orders: the event a newly stored order publishes.
    pub placed: fn(&Order) -> Envelope,
    /// Orders: one saga event applied to the order.
    pub orders_react: fn(Order, &Envelope) -> (Order, Vec<Envelope>),
    /// Orders: the customer's cancel (`PATCH /orders/{id}`).
    pub cancel_by_customer: fn(Order) -> Result<CustomerCancel, CancelRefused>,
    /// Orders: the saga timeout.
    pub time_out: fn(Order, u64) -> Option<(Order, Envelope)>,
    /// Orders: the saga timeout of an unanswered cancel request.
    pub expire_cancel_request: fn(Order, u64) -> Option<(Order, Envelope)>,
    /// Products: one saga event applied to its view of the order.
    pub products_react: fn(StockView, &Envelope) -> (StockView, Vec<Envelope>),
    /// Delivery: one saga event applied to the order's delivery.
    pub delivery_react: fn(OrderDelivery, &Envelope, i64) -> (OrderDelivery, Vec<Envelope>),
    /// Delivery: the courier's update (`PATCH /deliveries/{id}`).
    pub courier_update:
        fn(Delivery, DeliveryState) -> Result<(Delivery, Envelope), IllegalTransition>,
}

impl Rules {
    /// The services' own rules, as they run in production.
    pub fn real() -> Self {
        Rules {
            placed: orders::saga::placed,
            orders_react: orders::saga::react,
            cancel_by_customer: orders::saga::cancel_by_customer,
            time_out: orders::saga::time_out,
            expire_cancel_request: orders::saga::expire_cancel_request,
            products_react: products::saga::react,
            delivery_react: delivery::saga::react,
            courier_update: delivery::saga::courier_update,
        }
    }
}
