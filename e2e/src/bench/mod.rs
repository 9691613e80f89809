//! The pieces of `saga-bench`: an open-loop load generator, a reader of the saga topic that
//! times every order from its own events, the broker's floor (one produce + consume round
//! trip), CPU and memory from `/proc`, PostgreSQL's statement counts, and a filler that gives
//! the databases a history.
//! The binary puts them together and prints figures; nothing here asserts.

pub mod delay;
pub mod floor;
pub mod load;
pub mod preload;
pub mod procfs;
pub mod run;
pub mod statements;
pub mod stats;
pub mod watcher;

use std::time::{SystemTime, UNIX_EPOCH};

/// Wall-clock milliseconds since the Unix epoch: the clock orders stamps events with, so the
/// bench's send times and the events' timestamps can be subtracted.
pub fn wall_ms() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64() * 1000.0)
        .unwrap_or(0.0)
}
