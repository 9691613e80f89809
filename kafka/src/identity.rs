//! Which Kafka cluster a service's stored positions belong to.
//!
//! The consumer's positions ([`crate::offsets`]) are offsets in one cluster's topic. Against
//! another cluster — a broker whose storage was wiped, a move to a managed cluster, a topic
//! deleted and created again — the same numbers point at other events: events would be
//! skipped (a position past some of the new topic's events) or replayed without notice. So the
//! first start records the cluster's id beside the positions, and a service finding its
//! positions belong to another cluster, or pointing past the end of a partition, refuses to
//! start and says how to proceed ([`IdentityError`]), instead of silently skipping or replaying.

use crate::db::{DbConnection, DbError};
use diesel::prelude::*;
use std::collections::BTreeMap;

diesel::table! {
    /// The cluster the positions of each topic belong to.
    broker_identity (topic) {
        topic -> Text,
        cluster_id -> Text,
        recorded_at -> Text,
    }
}

/// What [`check_cluster`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Known {
    /// Nothing was recorded for the topic: the cluster is recorded now.
    Recorded,
    /// The positions belong to this cluster.
    Same,
}

/// The broker is not the one the stored positions belong to.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    /// The cluster id differs from the one recorded with the positions.
    #[error(
        "the consumer positions in this service's database belong to Kafka cluster {stored}, \
         but the broker at KAFKA_BROKERS={brokers} is cluster {found}: read from those \
         positions, topic {topic} would skip or replay events. Point KAFKA_BROKERS at cluster \
         {stored}, or start this service on a new database (scripts/down.sh --wipe removes \
         every database and the broker's data together)"
    )]
    OtherCluster {
        /// The topic.
        topic: String,
        /// `KAFKA_BROKERS`.
        brokers: String,
        /// The id recorded with the positions.
        stored: String,
        /// The id the broker gives now.
        found: String,
    },
    /// A stored position is past the end of its partition: not the topic it was read from.
    #[error(
        "the stored position of {topic}[{partition}] is offset {stored}, past the end of that \
         partition on KAFKA_BROKERS={brokers} (offset {end}): the topic was deleted and created \
         again, or the broker lost events. Restore the broker's data, or start this service on \
         a new database (scripts/down.sh --wipe removes every database and the broker's data \
         together)"
    )]
    PositionsAhead {
        /// The topic.
        topic: String,
        /// The partition.
        partition: i32,
        /// `KAFKA_BROKERS`.
        brokers: String,
        /// The stored next offset.
        stored: i64,
        /// The partition's high watermark.
        end: i64,
    },
    /// The database failed.
    #[error(transparent)]
    Db(#[from] DbError),
}

impl From<diesel::result::Error> for IdentityError {
    fn from(e: diesel::result::Error) -> Self {
        IdentityError::Db(DbError::Query(e))
    }
}

/// Inside the caller's transaction: records `cluster_id` for `topic` when nothing is recorded
/// (a new database, or one from before the check existed), or checks it is the one recorded.
pub fn check_cluster(
    conn: &mut DbConnection,
    topic: &str,
    cluster_id: &str,
    brokers: &str,
) -> Result<Known, IdentityError> {
    crate::db::lock(conn, crate::db::Lock::Once("broker identity"))?;
    let stored: Option<String> = broker_identity::table
        .filter(broker_identity::topic.eq(topic))
        .select(broker_identity::cluster_id)
        .first(conn)
        .optional()?;
    match stored {
        Some(stored) if stored == cluster_id => Ok(Known::Same),
        Some(stored) => Err(IdentityError::OtherCluster {
            topic: topic.to_owned(),
            brokers: brokers.to_owned(),
            stored,
            found: cluster_id.to_owned(),
        }),
        None => {
            let statement = diesel::insert_into(broker_identity::table).values((
                broker_identity::topic.eq(topic),
                broker_identity::cluster_id.eq(cluster_id),
                broker_identity::recorded_at.eq(chrono::Utc::now().to_rfc3339()),
            ));
            crate::on_backend!(conn, |c| statement.execute(c))?;
            Ok(Known::Recorded)
        }
    }
}

/// Fails when a stored position (`stored`: next offset per partition) is past the end of its
/// partition (`ends`: high watermark per partition). A partition the topic no longer has is
/// past the end too.
pub fn check_positions(
    topic: &str,
    brokers: &str,
    stored: &BTreeMap<i32, i64>,
    ends: &BTreeMap<i32, i64>,
) -> Result<(), IdentityError> {
    for (&partition, &position) in stored {
        let end = ends.get(&partition).copied().unwrap_or(0);
        if position > end {
            return Err(IdentityError::PositionsAhead {
                topic: topic.to_owned(),
                partition,
                brokers: brokers.to_owned(),
                stored: position,
                end,
            });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::db::{Database, PLUMBING_MIGRATIONS};

    async fn check(db: &Database, cluster: &str) -> Result<Known, IdentityError> {
        let cluster = cluster.to_owned();
        db.write(move |conn| {
            Ok::<_, IdentityError>((
                check_cluster(conn, "eventTopic", &cluster, "127.0.0.1:9092")?,
                Vec::new(),
            ))
        })
        .await
    }

    #[tokio::test]
    async fn the_first_cluster_is_recorded_and_another_one_is_refused_by_name() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("identity.db");
        let db = Database::open(path.to_str().expect("path"), PLUMBING_MIGRATIONS).expect("db");
        assert_eq!(
            check(&db, "cluster-A").await.expect("first"),
            Known::Recorded
        );
        assert_eq!(check(&db, "cluster-A").await.expect("again"), Known::Same);
        let err = check(&db, "cluster-B").await.unwrap_err();
        assert!(
            matches!(&err, IdentityError::OtherCluster { stored, found, .. }
                if stored == "cluster-A" && found == "cluster-B"),
            "{err}"
        );
        assert!(err.to_string().contains("scripts/down.sh --wipe"), "{err}");
        // Refusing changed nothing: the positions still belong to A.
        assert_eq!(check(&db, "cluster-A").await.expect("still A"), Known::Same);
    }

    #[test]
    fn a_position_past_the_end_of_its_partition_is_refused() {
        let ends = BTreeMap::from([(0, 10), (1, 5)]);
        check_positions("t", "b", &BTreeMap::from([(0, 10), (1, 0)]), &ends).expect("within");
        let err = check_positions("t", "b", &BTreeMap::from([(1, 6)]), &ends).unwrap_err();
        assert!(
            matches!(
                err,
                IdentityError::PositionsAhead {
                    partition: 1,
                    stored: 6,
                    end: 5,
                    ..
                }
            ),
            "{err}"
        );
        // A partition the topic no longer has.
        assert!(check_positions("t", "b", &BTreeMap::from([(2, 1)]), &ends).is_err());
    }
}
