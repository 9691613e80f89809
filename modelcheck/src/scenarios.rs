//! The bounds explored: small ones for `cargo test` (seconds), deeper ones for
//! `scripts/test.sh` (about a minute).
//!
//! One order with an administrator changing its product's stock covers what other orders do
//! to it: no rule reads another order, only the product's stock, which a catalog change moves
//! the same way at any moment. Two orders competing for the last unit are explored too, with
//! people acting on one of them in the deeper run (every pair of both orders' states is a
//! state, so two orders with every action cost the square of one).

use crate::model::{Faults, OrderSpec, ProductSpec, Scenario};

const NO_FAULTS: Faults = Faults {
    republished: 0,
    restarts: 0,
    parked: 0,
    catalog_changes: 0,
};

/// Parking switched on: one event parked per run.
pub const ONE_PARKED: Faults = Faults {
    parked: 1,
    ..NO_FAULTS
};

/// One order of `quantity` units of a product with `stock` (`None`: the product is missing).
pub fn one_order(name: &str, stock: Option<i64>, quantity: i64, faults: Faults) -> Scenario {
    Scenario {
        name: name.into(),
        products: vec![ProductSpec { id: 1, stock }],
        orders: vec![order(1, quantity, true)],
        faults,
        max_states: 5_000_000,
        redrive: true,
    }
}

/// Two orders of one unit each competing for a product with `stock`; people act on the first
/// order when `people` says so (never on the second).
///
/// (With people on one order and a catalog change, the space passes 3 million states.)
pub fn two_orders(name: &str, stock: i64, people: bool, faults: Faults) -> Scenario {
    Scenario {
        name: name.into(),
        products: vec![ProductSpec {
            id: 1,
            stock: Some(stock),
        }],
        orders: vec![order(1, 1, people), order(2, 1, false)],
        faults,
        max_states: 5_000_000,
        redrive: true,
    }
}

fn order(id: i64, quantity: i64, people: bool) -> OrderSpec {
    OrderSpec {
        id,
        product_id: 1,
        quantity,
        people,
    }
}

/// What `cargo test` explores: every action, each fault kind on its own, in seconds.
pub fn bounded() -> Vec<Scenario> {
    let with = |faults| faults;
    vec![
        one_order("one order, last unit", Some(1), 1, NO_FAULTS),
        one_order("one order, more stock than ordered", Some(5), 2, NO_FAULTS),
        one_order("one order, missing product", None, 1, NO_FAULTS),
        one_order(
            "one order, a catalog change",
            Some(1),
            1,
            with(Faults {
                catalog_changes: 1,
                ..NO_FAULTS
            }),
        ),
        one_order(
            "one order, a restart",
            Some(1),
            1,
            with(Faults {
                restarts: 1,
                ..NO_FAULTS
            }),
        ),
        one_order(
            "one order, an event republished",
            Some(1),
            1,
            with(Faults {
                republished: 1,
                ..NO_FAULTS
            }),
        ),
        two_orders("two orders for the last unit", 1, false, NO_FAULTS),
    ]
}

/// What `scripts/test.sh` explores on top: faults combined, and two orders with a catalog
/// change.
pub fn deep() -> Vec<Scenario> {
    vec![
        one_order(
            "one order, an event republished and a catalog change",
            Some(1),
            1,
            Faults {
                republished: 1,
                catalog_changes: 1,
                ..NO_FAULTS
            },
        ),
        one_order(
            "one order, a restart and a catalog change",
            Some(1),
            1,
            Faults {
                restarts: 1,
                catalog_changes: 1,
                ..NO_FAULTS
            },
        ),
        two_orders(
            "two orders for the last unit, a catalog change",
            1,
            false,
            Faults {
                catalog_changes: 1,
                ..NO_FAULTS
            },
        ),
    ]
}
