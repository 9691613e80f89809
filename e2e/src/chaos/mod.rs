//! The fault-injection run (`chaos`, `scripts/chaos.sh`): a mixed workload against the real
//! processes while faults are injected at moments drawn from a seeded RNG, then invariants
//! checked on the REST APIs and the topic.
//!
//! - [`rng`]: the seeded generator; [`plan`]: which faults, when;
//! - [`workload`]: products, orders, cancels and completions; [`client`]: HTTP with timeouts
//!   and a record of every answer;
//! - [`inject`]: carrying out a fault on a [`crate::stack::Stack`];
//! - [`collect`]: reading the state (paged REST lists, topics) and injecting poison;
//! - [`check`]: the invariants, as pure functions of a snapshot.

pub mod check;
pub mod client;
pub mod collect;
pub mod inject;
pub mod plan;
pub mod rng;
pub mod workload;
