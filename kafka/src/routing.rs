//! Which partition of the saga topic each outbox row goes to, and which rows this instance
//! publishes.
//!
//! A row is stamped with its partition when it is written (`outbox.topic_partition`): the
//! CRC-32 of its key modulo the topic's partition count, the hash of librdkafka's default
//! partitioner, so the relay produces it to the partition a keyed send would have chosen, and
//! every event of one key to one partition. Each instance publishes the rows of the partitions
//! its consumer holds (their leases, [`crate::leases`]): an order's events are consumed,
//! decided on and published by one instance per service, and the instances of a service
//! publish side by side. Rows of no partition — dead letters, for another topic — are
//! published by the holder of the `relay` lease.
//!
//! A write that stamps a row another instance publishes (a POST on one orders instance for an
//! order whose partition another holds) marks its transaction, and the writer announces that
//! commit: the holder's relay wakes at once instead of at its next poll.

use std::cell::Cell;
use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};
use tokio::sync::watch;

/// The partition of the saga topic's `partitions` that `key` goes to: what librdkafka's
/// default partitioner (`consistent_random`) picks for a non-empty key. The empty key, which
/// it would scatter at random, goes to partition 0.
pub fn partition_for(key: &str, partitions: i32) -> i32 {
    let count = partitions.max(1) as u32;
    (crc32fast::hash(key.as_bytes()) % count) as i32
}

/// One instance's view of where rows go and which it publishes; shared by its database's
/// writes, its consumer and its relay.
#[derive(Debug)]
pub struct Routing {
    /// The saga topic's partition count; 0 until the host has read it, and rows written until
    /// then carry no partition.
    partitions: AtomicI32,
    /// The partitions this instance's consumer holds, whose rows its relay publishes; the relay
    /// watches it to follow a rebalance at once.
    held: watch::Sender<BTreeSet<i32>>,
    /// Whether this instance holds the `relay` lease (rows of no partition).
    relay_lease: AtomicBool,
}

thread_local! {
    /// Set by a write that stamped a row another instance publishes; the writer announces its
    /// transaction's commit, and clears it. The thread's own: a writer thread runs one
    /// transaction at a time, and the writers of one instance run theirs side by side.
    static FOREIGN: Cell<bool> = const { Cell::new(false) };
}

impl Default for Routing {
    fn default() -> Self {
        Routing {
            partitions: AtomicI32::new(0),
            held: watch::Sender::new(BTreeSet::new()),
            relay_lease: AtomicBool::new(false),
        }
    }
}

impl Routing {
    /// The saga topic has `count` partitions (read by the host before anything is written,
    /// and again at every balancing round).
    pub fn set_partitions(&self, count: i32) {
        self.partitions.store(count.max(0), Ordering::Relaxed);
    }

    /// The partition a saga event of `key` goes to; `None` while the count is unknown.
    pub fn partition_of(&self, key: &str) -> Option<i32> {
        match self.partitions.load(Ordering::Relaxed) {
            0 => None,
            count => Some(partition_for(key, count)),
        }
    }

    /// The consumer now holds `partitions`.
    pub fn hold(&self, partitions: &BTreeSet<i32>) {
        self.held.send_if_modified(|held| {
            let changed = held != partitions;
            if changed {
                held.clone_from(partitions);
            }
            changed
        });
    }

    /// The partitions this instance publishes.
    pub fn held(&self) -> BTreeSet<i32> {
        self.held.borrow().clone()
    }

    /// Changes whenever the partitions held do.
    pub fn watch_held(&self) -> watch::Receiver<BTreeSet<i32>> {
        self.held.subscribe()
    }

    /// Whether this instance holds the `relay` lease, as its relay last found.
    pub(crate) fn set_relay_lease(&self, held: bool) {
        self.relay_lease.store(held, Ordering::Relaxed);
    }

    /// Notes that a row of `partition` was just written: when another instance publishes it,
    /// the transaction is to be announced.
    pub(crate) fn written(&self, partition: Option<i32>) {
        let elsewhere = match partition {
            Some(p) => !self.held.borrow().contains(&p),
            None => !self.relay_lease.load(Ordering::Relaxed),
        };
        if elsewhere {
            FOREIGN.set(true);
        }
    }

    /// Whether the transaction now committing on this thread wrote a row another instance
    /// publishes; clears the mark for the next one.
    pub(crate) fn take_foreign(&self) -> bool {
        FOREIGN.replace(false)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_spread_over_every_partition_and_stay_put() {
        let spread: BTreeSet<i32> = (1..200).map(|k| partition_for(&k.to_string(), 6)).collect();
        assert_eq!(spread, (0..6).collect());
        assert_eq!(partition_for("42", 6), partition_for("42", 6));
        assert_eq!(partition_for("", 6), 0);
    }

    #[test]
    fn a_row_is_foreign_unless_this_instance_publishes_its_partition() {
        let routing = Routing::default();
        assert_eq!(routing.partition_of("7"), None, "count unknown");
        routing.set_partitions(4);
        let p = routing.partition_of("7").unwrap();
        routing.written(Some(p));
        assert!(routing.take_foreign(), "nobody here holds {p}");
        assert!(!routing.take_foreign(), "cleared");
        routing.hold(&BTreeSet::from([p]));
        routing.written(Some(p));
        assert!(!routing.take_foreign());
        routing.written(None);
        assert!(routing.take_foreign(), "no relay lease here");
        routing.set_relay_lease(true);
        routing.written(None);
        assert!(!routing.take_foreign());
    }
}
