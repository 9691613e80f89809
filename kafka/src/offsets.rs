//! The consumer's position, kept in the service's own database.
//!
//! An event's effect and the offset after it commit in one transaction, so after a crash the
//! consumer resumes exactly after the last committed effect. The position does not depend on
//! the broker's group coordinator at all: the consumer assigns itself the partitions it holds
//! leases on and starts each from here (see [`crate::consumer`]); [`store`] commits only while
//! the lease is still this instance's ([`crate::leases`]).

use crate::db::{DbConnection, DbError};
use diesel::prelude::*;
use std::collections::BTreeMap;

diesel::table! {
    /// Next offset to read, per partition.
    consumer_offsets (topic, partition) {
        topic -> Text,
        partition -> Integer,
        next_offset -> BigInt,
        updated_at -> Text,
    }
}

/// Where a consumed message was: written with its effect.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConsumedAt {
    /// The topic read.
    pub topic: String,
    /// The partition read.
    pub partition: i32,
    /// The offset to read next (the message's offset + 1).
    pub next_offset: i64,
    /// The instance that read it: it must still hold the partition's lease to store this.
    pub holder: String,
}

/// Records `at` inside the caller's transaction, which fails with [`DbError::NotHolder`]
/// when `at.holder` lost the partition's lease ([`crate::leases`]): the effects read with a
/// lost lease never commit.
pub fn store(conn: &mut DbConnection, at: &ConsumedAt) -> Result<(), DbError> {
    crate::leases::fence(
        conn,
        &crate::leases::partition_lease(&at.topic, at.partition),
        &at.holder,
    )?;
    let now = chrono::Utc::now().to_rfc3339();
    let statement = diesel::insert_into(consumer_offsets::table)
        .values((
            consumer_offsets::topic.eq(&at.topic),
            consumer_offsets::partition.eq(at.partition),
            consumer_offsets::next_offset.eq(at.next_offset),
            consumer_offsets::updated_at.eq(&now),
        ))
        .on_conflict((consumer_offsets::topic, consumer_offsets::partition))
        .do_update()
        .set((
            consumer_offsets::next_offset.eq(at.next_offset),
            consumer_offsets::updated_at.eq(&now),
        ));
    crate::on_backend!(conn, |c| statement.execute(c))?;
    Ok(())
}

/// The next offset to read for every partition of `topic` this service has read.
pub fn load(conn: &mut DbConnection, topic: &str) -> QueryResult<BTreeMap<i32, i64>> {
    let rows: Vec<(i32, i64)> = consumer_offsets::table
        .filter(consumer_offsets::topic.eq(topic))
        .select((consumer_offsets::partition, consumer_offsets::next_offset))
        .load(conn)?;
    Ok(rows.into_iter().collect())
}
