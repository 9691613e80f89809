//! An exhaustive model check of the saga (issue 25): every interleaving of the services' own
//! rules (`orders`, `products` and `delivery`'s `saga.rs`, called, never re-implemented), with
//! the customer's, the courier's and the administrator's actions, the saga timeout and faults,
//! against the saga's invariants.
//!
//! - [`model`]: the topic, the services' states and every action;
//! - [`invariants`]: what must hold in every state and once the saga is quiet;
//! - [`explore`]: breadth-first search, so a broken invariant comes with a shortest run;
//! - [`rules`]: the seam through which the model calls the rules (and a test injects a broken
//!   one);
//! - [`scenarios`]: the bounds the test suite and `scripts/test.sh` explore.

pub mod explore;
pub mod invariants;
pub mod model;
pub mod rules;
pub mod scenarios;

pub use explore::{Report, Violation, check};
pub use invariants::Invariant;
pub use model::{Faults, OrderSpec, ProductSpec, Scenario};
pub use rules::Rules;
