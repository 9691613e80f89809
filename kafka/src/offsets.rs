//! The consumer's position, kept in the service's own database.
//!
//! An event's effect and the offset after it commit in one transaction, so after a crash the
//! consumer resumes exactly after the last committed effect. The position does not depend on
//! the broker's group coordinator at all: the consumer assigns itself the partitions it holds
//! leases on and starts each from here (see [`crate::consumer`]); [`store`] commits only while
//! the lease is still this instance's ([`crate::leases`]).

use crate::db::{DbConnection, DbError};
use crate::prepared::PrepareOnce;
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
    store_all(conn, std::slice::from_ref(at))
}

/// [`store`] for the partitions of one batch (read by one instance), whatever their number:
/// on PostgreSQL two statements, their leases' locks taken shared
/// ([`crate::db::lock_leases_shared`]), then their positions upserted only if `holder` holds
/// every lease (the check and the upsert in one statement, seeing what committed before the
/// locks were granted); on SQLite the fence ([`crate::leases::fence_all`]) and the upsert.
pub fn store_all(conn: &mut DbConnection, ats: &[ConsumedAt]) -> Result<(), DbError> {
    let Some(first) = ats.first() else {
        return Ok(());
    };
    debug_assert!(ats.iter().all(|at| at.holder == first.holder));
    let names: Vec<String> = ats
        .iter()
        .map(|at| crate::leases::partition_lease(&at.topic, at.partition))
        .collect();
    if let DbConnection::Postgres(pg) = &mut *conn {
        crate::db::lock_leases_shared_on(pg, &names)?;
        if store_if_held(pg, ats, &names, &first.holder)? == ats.len() {
            return Ok(());
        }
        // The locks are still held: no claim has committed since, so the fence names the
        // lease the upsert found lost.
        crate::leases::fence_all(conn, &names, &first.holder)?;
        return Err(DbError::NotHolder(names[0].clone()));
    }
    crate::leases::fence_all(conn, &names, &first.holder)?;
    let now = chrono::Utc::now().to_rfc3339();
    let rows: Vec<_> = ats
        .iter()
        .map(|at| {
            (
                consumer_offsets::topic.eq(&at.topic),
                consumer_offsets::partition.eq(at.partition),
                consumer_offsets::next_offset.eq(at.next_offset),
                consumer_offsets::updated_at.eq(&now),
            )
        })
        .collect();
    use diesel::upsert::excluded;
    let statement = diesel::insert_into(consumer_offsets::table)
        .values(&rows)
        .on_conflict((consumer_offsets::topic, consumer_offsets::partition))
        .do_update()
        .set((
            consumer_offsets::next_offset.eq(excluded(consumer_offsets::next_offset)),
            consumer_offsets::updated_at.eq(excluded(consumer_offsets::updated_at)),
        ));
    crate::on_backend!(conn, |c| statement.execute(c))?;
    Ok(())
}

/// Upserts the positions `ats` if `me` holds every lease of `names`, in one statement; how
/// many it stored: all or none.
fn store_if_held(
    pg: &mut diesel::PgConnection,
    ats: &[ConsumedAt],
    names: &[String],
    me: &str,
) -> QueryResult<usize> {
    use diesel::sql_types::{Array, BigInt, Integer, Text};
    #[derive(QueryableByName)]
    struct Stored {
        #[diesel(sql_type = Integer)]
        #[allow(dead_code)]
        partition: i32,
    }
    let stored: Vec<Stored> = diesel::sql_query(
        "WITH held AS (SELECT count(*) AS n FROM leases WHERE name = ANY($1) AND holder = $2) \
         INSERT INTO consumer_offsets (topic, partition, next_offset, updated_at) \
         SELECT v.topic, v.partition, v.next_offset, $6 \
         FROM unnest($3, $4, $5) AS v (topic, partition, next_offset), held \
         WHERE held.n = cardinality($1) \
         ON CONFLICT (topic, partition) DO UPDATE \
             SET next_offset = excluded.next_offset, updated_at = excluded.updated_at \
         RETURNING partition",
    )
    .bind::<Array<Text>, _>(names)
    .bind::<Text, _>(me)
    .bind::<Array<Text>, _>(ats.iter().map(|at| at.topic.as_str()).collect::<Vec<_>>())
    .bind::<Array<Integer>, _>(ats.iter().map(|at| at.partition).collect::<Vec<_>>())
    .bind::<Array<BigInt>, _>(ats.iter().map(|at| at.next_offset).collect::<Vec<_>>())
    .bind::<Text, _>(chrono::Utc::now().to_rfc3339())
    .prepared()
    .load(pg)?;
    Ok(stored.len())
}

/// The next offset to read for every partition of `topic` this service has read.
pub fn load(conn: &mut DbConnection, topic: &str) -> QueryResult<BTreeMap<i32, i64>> {
    let rows: Vec<(i32, i64)> = consumer_offsets::table
        .filter(consumer_offsets::topic.eq(topic))
        .select((consumer_offsets::partition, consumer_offsets::next_offset))
        .load(conn)?;
    Ok(rows.into_iter().collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::db::{Database, PLUMBING_MIGRATIONS};

    fn at(partition: i32, next_offset: i64) -> ConsumedAt {
        ConsumedAt {
            topic: "t".into(),
            partition,
            next_offset,
            holder: "a".into(),
        }
    }

    #[tokio::test]
    async fn a_batch_of_partitions_stores_every_position_or_none() {
        let dir = tempfile::tempdir().unwrap();
        let db = Database::open(
            dir.path().join("o.db").to_str().unwrap(),
            PLUMBING_MIGRATIONS,
        )
        .unwrap();
        for p in [0, 1, 2] {
            crate::leases::grant(&db, "t", p, "a").await;
        }
        let store = |ats: Vec<ConsumedAt>| {
            db.write(move |conn| {
                store_all(conn, &ats)?;
                Ok::<_, DbError>(((), Vec::new()))
            })
        };
        store(vec![at(0, 5), at(1, 7)]).await.unwrap();
        store(vec![at(0, 6), at(2, 3)]).await.unwrap();
        crate::leases::grant(&db, "t", 2, "b").await;
        let refused = store(vec![at(0, 9), at(1, 9), at(2, 9)]).await;
        assert!(
            matches!(&refused, Err(DbError::NotHolder(lease)) if lease == "t/2"),
            "{refused:?}"
        );
        let positions = db
            .read(|conn| load(conn, "t").map_err(DbError::from))
            .await
            .unwrap();
        assert_eq!(
            positions,
            BTreeMap::from([(0, 6), (1, 7), (2, 3)]),
            "the refused batch stored nothing"
        );
    }
}
