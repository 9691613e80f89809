//! Who does what among the instances of one service, decided in the service's own database.
//!
//! The instances of a service share one database (PostgreSQL; an SQLite file has one). Each
//! partition of the saga topic (`eventTopic/3`) and the relay of the outbox rows of no
//! partition (`relay`) is a lease row held by one instance until `expires_at`; holders renew, a
//! lease not renewed in time (the holder died, or is stopped) may be taken by another instance.
//! Live instances renew a row in `members`, so each takes its fair share of the partitions:
//! ⌈partitions / live⌉. A partition's lease is also what lets the instance publish the outbox
//! rows of that partition ([`crate::routing`]).
//!
//! A lease alone would not be safe — a holder paused past its expiry does not know it lost the
//! lease — so it is also a **fence**: the consumer stores its position in the same transaction
//! as the effects of the events it read, and [`crate::offsets::store`] refuses to commit unless
//! the lease row still names this instance ([`DbError::NotHolder`]). Writes are serialized per
//! database ([`crate::db`]), so a takeover and a stale holder's commit cannot interleave: the
//! loser's transaction rolls back and it re-reads its leases. Nothing depends on the broker's
//! group coordinator (see the README on tansu 0.6.0's).
//!
//! Instance ids are stable across restarts (`INSTANCE_ID`, by default service, host and
//! port), so an instance restarted after a crash finds its leases still its own and resumes
//! at once instead of waiting for them to expire. [`plan`] is the rule, without I/O.

use crate::db::{DbConnection, DbError, Lock};
use diesel::prelude::*;
use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

diesel::table! {
    /// One row per lease.
    leases (name) {
        name -> Text,
        holder -> Text,
        expires_at -> BigInt,
    }
}

diesel::table! {
    /// One row per live instance.
    members (member) {
        member -> Text,
        expires_at -> BigInt,
    }
}

/// The lease of the relay that publishes the outbox rows of no partition (dead letters).
pub const RELAY: &str = "relay";

/// The lease name of one partition of `topic`.
pub fn partition_lease(topic: &str, partition: i32) -> String {
    format!("{topic}/{partition}")
}

/// Milliseconds since the epoch, the unit of `expires_at`. Instances of one service compare
/// each other's clocks through it: their skew must stay well under the lease time.
pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or_default()
}

/// A partition lease as read: its holder and until when.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Held {
    /// The instance named in the row.
    pub holder: String,
    /// Milliseconds since the epoch.
    pub expires_at: i64,
}

/// What one balancing round does, decided by [`plan`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Plan {
    /// Held by this instance and renewed.
    pub keep: Vec<i32>,
    /// Held by this instance beyond its share: given up for others to claim.
    pub release: Vec<i32>,
    /// Free or expired: taken now.
    pub claim: Vec<i32>,
}

impl Plan {
    /// The partitions this instance holds after the round.
    pub fn holds(&self) -> BTreeSet<i32> {
        self.keep.iter().chain(&self.claim).copied().collect()
    }
}

/// The balancing rule: keep what is yours up to your share (⌈partitions / live members⌉),
/// release the rest (highest first), and claim free or expired partitions (lowest first) up
/// to your share. A lease of yours that expired but was not taken is still yours: nobody
/// consumed the partition meanwhile.
pub fn plan(
    me: &str,
    now_ms: i64,
    partitions: &[i32],
    leases: &BTreeMap<i32, Held>,
    live_members: usize,
) -> Plan {
    let share = partitions.len().div_ceil(live_members.max(1));
    let mine: Vec<i32> = partitions
        .iter()
        .copied()
        .filter(|p| leases.get(p).is_some_and(|l| l.holder == me))
        .collect();
    let free: Vec<i32> = partitions
        .iter()
        .copied()
        .filter(|p| {
            leases
                .get(p)
                .is_none_or(|l| l.holder != me && l.expires_at <= now_ms)
        })
        .collect();
    if mine.len() >= share {
        let (keep, release) = mine.split_at(share);
        Plan {
            keep: keep.to_vec(),
            release: release.to_vec(),
            claim: Vec::new(),
        }
    } else {
        let wanted = share - mine.len();
        Plan {
            keep: mine,
            release: Vec::new(),
            claim: free.into_iter().take(wanted).collect(),
        }
    }
}

/// Whether `me`, holding `holds` partitions of a `share` each, waits for another live
/// instance to release some: it holds fewer than its share, and another holds more (it gives
/// up the surplus at its next round). An instance idle because there are more instances than
/// partitions waits for nobody.
pub fn awaits_release(
    me: &str,
    now_ms: i64,
    share: usize,
    holds: usize,
    leases: &BTreeMap<i32, Held>,
) -> bool {
    let mut others: BTreeMap<&str, usize> = BTreeMap::new();
    for lease in leases.values() {
        if lease.holder != me && lease.expires_at > now_ms {
            *others.entry(lease.holder.as_str()).or_default() += 1;
        }
    }
    holds < share && others.values().any(|&n| n > share)
}

/// One instance's view of its leases.
#[derive(Debug, Clone)]
pub struct Membership {
    /// This instance's id, written into the rows it holds.
    pub me: String,
    /// How long a lease lasts without renewal.
    pub ttl: Duration,
}

/// The outcome of a balancing round.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Balanced {
    /// The partitions this instance holds now.
    pub holds: BTreeSet<i32>,
    /// Partitions nobody holds after the round (every live instance at its share cannot
    /// happen, so these mean instances that stopped balancing).
    pub orphaned: Vec<i32>,
    /// Live instances, this one included.
    pub members: usize,
    /// This instance holds less than its share and should look again soon rather than leave
    /// partitions unread until its next round: another live instance holds more than its
    /// share and releases the surplus at its next round ([`awaits_release`]), or another
    /// instance claimed a free partition this one wanted in the same moment (two joining at
    /// once pick the same lowest ones).
    pub rebalance_soon: bool,
}

impl Membership {
    fn expiry(&self, now: i64) -> i64 {
        now + self.ttl.as_millis() as i64
    }

    /// Renews this instance's membership and runs one [`plan`] round over `partitions` of
    /// `topic`, inside the caller's write transaction.
    pub fn balance(
        &self,
        conn: &mut DbConnection,
        topic: &str,
        partitions: &[i32],
    ) -> Result<Balanced, DbError> {
        let now = now_ms();
        let until = self.expiry(now);
        diesel::delete(members::table.filter(members::expires_at.le(now))).execute(conn)?;
        upsert_member(conn, &self.me, until)?;
        let live: i64 = members::table.count().get_result(conn)?;
        let prefix = format!("{topic}/");
        let rows: Vec<(String, String, i64)> = leases::table
            .filter(leases::name.like(format!("{prefix}%")))
            .select((leases::name, leases::holder, leases::expires_at))
            .load(conn)?;
        let current: BTreeMap<i32, Held> = rows
            .into_iter()
            .filter_map(|(name, holder, expires_at)| {
                let p = name.strip_prefix(&prefix)?.parse().ok()?;
                Some((p, Held { holder, expires_at }))
            })
            .collect();
        let plan = plan(&self.me, now, partitions, &current, live as usize);
        for p in &plan.release {
            diesel::delete(
                leases::table
                    .filter(leases::name.eq(partition_lease(topic, *p)))
                    .filter(leases::holder.eq(&self.me)),
            )
            .execute(conn)?;
        }
        for p in &plan.keep {
            take(conn, &partition_lease(topic, *p), &self.me, until)?;
        }
        let mut claimed = Vec::with_capacity(plan.claim.len());
        for p in &plan.claim {
            if self.claim(conn, &partition_lease(topic, *p), now, until)? {
                claimed.push(*p);
            }
        }
        let holds: BTreeSet<i32> = plan.keep.iter().chain(&claimed).copied().collect();
        let orphaned = partitions
            .iter()
            .copied()
            .filter(|p| {
                !holds.contains(p)
                    && current
                        .get(p)
                        .is_none_or(|l| l.holder == self.me || l.expires_at <= now)
            })
            .collect();
        let share = partitions.len().div_ceil((live as usize).max(1));
        Ok(Balanced {
            rebalance_soon: holds.len() < share
                && (claimed.len() < plan.claim.len()
                    || awaits_release(&self.me, now, share, holds.len(), &current)),
            holds,
            orphaned,
            members: live as usize,
        })
    }

    /// Takes or renews the single lease `name` unless another live instance holds it;
    /// returns until when it is held (milliseconds since the epoch), or `None`.
    pub fn hold(&self, conn: &mut DbConnection, name: &str) -> Result<Option<i64>, DbError> {
        let now = now_ms();
        let until = self.expiry(now);
        Ok(self.claim(conn, name, now, until)?.then_some(until))
    }

    /// Takes the lease `name` until `until` unless another instance holds it past `now`.
    /// The lease is locked first ([`Lock::Lease`]): two instances claiming it at once take
    /// turns, the second seeing the first's row, and a claim waits for the writes the old
    /// holder has in flight ([`fence`] holds the same lock shared).
    fn claim(
        &self,
        conn: &mut DbConnection,
        name: &str,
        now: i64,
        until: i64,
    ) -> Result<bool, DbError> {
        crate::db::lock(conn, Lock::Lease(name))?;
        let current: Option<(String, i64)> = leases::table
            .find(name)
            .select((leases::holder, leases::expires_at))
            .first(conn)
            .optional()?;
        match current {
            Some((holder, expires_at)) if holder != self.me && expires_at > now => Ok(false),
            _ => {
                take(conn, name, &self.me, until)?;
                Ok(true)
            }
        }
    }

    /// Gives up the partitions of `topic` and the membership (a graceful stop: the others
    /// take over at once instead of after the lease time).
    pub fn leave(&self, conn: &mut DbConnection, topic: &str) -> Result<(), DbError> {
        diesel::delete(
            leases::table
                .filter(leases::holder.eq(&self.me))
                .filter(leases::name.like(format!("{topic}/%"))),
        )
        .execute(conn)?;
        diesel::delete(members::table.filter(members::member.eq(&self.me))).execute(conn)?;
        Ok(())
    }

    /// Gives up the single lease `name` if this instance holds it.
    pub fn release(&self, conn: &mut DbConnection, name: &str) -> Result<(), DbError> {
        diesel::delete(
            leases::table
                .filter(leases::name.eq(name))
                .filter(leases::holder.eq(&self.me)),
        )
        .execute(conn)?;
        Ok(())
    }
}

/// Fails with [`DbError::NotHolder`] unless `me` holds the lease `name`; called inside the
/// transaction whose commit the lease guards. It holds the lease's lock shared until that
/// commit, so another instance cannot take the lease over while the write is in flight.
pub fn fence(conn: &mut DbConnection, name: &str, me: &str) -> Result<(), DbError> {
    crate::db::lock_shared(conn, Lock::Lease(name))?;
    let held: bool = diesel::select(diesel::dsl::exists(
        leases::table
            .filter(leases::name.eq(name))
            .filter(leases::holder.eq(me)),
    ))
    .get_result(conn)?;
    if held {
        Ok(())
    } else {
        Err(DbError::NotHolder(name.to_owned()))
    }
}

/// [`fence`] for several leases at once, in two statements whatever their number (a consumer's
/// batch of several partitions): their locks taken shared in the order given (ascending
/// partitions, as claims take them), then whether `me` holds every one.
pub fn fence_all(conn: &mut DbConnection, names: &[String], me: &str) -> Result<(), DbError> {
    if let [name] = names {
        return fence(conn, name, me);
    }
    crate::db::lock_leases_shared(conn, names)?;
    let held: Vec<String> = leases::table
        .filter(leases::name.eq_any(names))
        .filter(leases::holder.eq(me))
        .select(leases::name)
        .load(conn)?;
    match names.iter().find(|name| !held.contains(name)) {
        Some(lost) => Err(DbError::NotHolder(lost.clone())),
        None => Ok(()),
    }
}

/// Gives `me` the lease of `topic`'s `partition` (tests of what the fence guards).
#[cfg(test)]
pub(crate) async fn grant(db: &crate::db::Database, topic: &str, partition: i32, me: &str) {
    let (name, me) = (partition_lease(topic, partition), me.to_owned());
    db.write(move |conn| {
        take(conn, &name, &me, now_ms() + 60_000)?;
        Ok::<_, DbError>(((), Vec::new()))
    })
    .await
    .expect("lease granted");
}

fn take(conn: &mut DbConnection, name: &str, me: &str, until: i64) -> QueryResult<()> {
    let statement = diesel::insert_into(leases::table)
        .values((
            leases::name.eq(name),
            leases::holder.eq(me),
            leases::expires_at.eq(until),
        ))
        .on_conflict(leases::name)
        .do_update()
        .set((leases::holder.eq(me), leases::expires_at.eq(until)));
    crate::on_backend!(conn, |c| statement.execute(c)).map(|_| ())
}

fn upsert_member(conn: &mut DbConnection, me: &str, until: i64) -> QueryResult<()> {
    let statement = diesel::insert_into(members::table)
        .values((members::member.eq(me), members::expires_at.eq(until)))
        .on_conflict(members::member)
        .do_update()
        .set(members::expires_at.eq(until));
    crate::on_backend!(conn, |c| statement.execute(c)).map(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::db::{Database, PLUMBING_MIGRATIONS};

    const P6: [i32; 6] = [0, 1, 2, 3, 4, 5];

    fn held(holder: &str, expires_at: i64) -> Held {
        Held {
            holder: holder.into(),
            expires_at,
        }
    }

    #[test]
    fn alone_an_instance_claims_every_partition() {
        let p = plan("a", 100, &P6, &BTreeMap::new(), 1);
        assert_eq!(p.claim, P6.to_vec());
        assert!(p.keep.is_empty() && p.release.is_empty());
    }

    #[test]
    fn a_second_instance_makes_the_first_release_half_and_claims_it() {
        let all_a: BTreeMap<i32, Held> = P6.iter().map(|p| (*p, held("a", 1000))).collect();
        let a = plan("a", 100, &P6, &all_a, 2);
        assert_eq!((a.keep, a.release.clone()), (vec![0, 1, 2], vec![3, 4, 5]));
        // Before a releases, b finds nothing free; after, it claims the released three.
        assert!(plan("b", 100, &P6, &all_a, 2).claim.is_empty());
        let after: BTreeMap<i32, Held> = (0..3).map(|p| (p, held("a", 1000))).collect();
        assert_eq!(plan("b", 100, &P6, &after, 2).claim, vec![3, 4, 5]);
    }

    #[test]
    fn expired_leases_of_others_are_taken_and_live_ones_never() {
        let leases = BTreeMap::from([(0, held("dead", 50)), (1, held("live", 500))]);
        let p = plan("me", 100, &[0, 1], &leases, 1);
        assert_eq!(p.claim, vec![0], "expired taken, live left alone");
    }

    #[test]
    fn an_own_expired_lease_is_kept() {
        let leases = BTreeMap::from([(0, held("me", 50))]);
        assert_eq!(plan("me", 100, &[0], &leases, 1).keep, vec![0]);
    }

    #[test]
    fn more_instances_than_partitions_leave_some_idle() {
        let leases = BTreeMap::from([(0, held("a", 500)), (1, held("b", 500))]);
        assert_eq!(plan("c", 100, &[0, 1], &leases, 3), Plan::default());
        assert!(
            !awaits_release("c", 100, 1, 0, &leases),
            "nobody has a surplus"
        );
    }

    #[test]
    fn an_instance_short_of_its_share_awaits_a_live_surplus_only() {
        let a_holds_three = BTreeMap::from([
            (0, held("a", 500)),
            (1, held("a", 500)),
            (2, held("a", 500)),
            (3, held("b", 500)),
        ]);
        assert!(awaits_release("c", 100, 2, 0, &a_holds_three));
        assert!(
            !awaits_release("c", 100, 2, 2, &a_holds_three),
            "c has its share"
        );
        assert!(
            !awaits_release("c", 600, 2, 0, &a_holds_three),
            "expired: claimed, not awaited"
        );
        assert!(!awaits_release("a", 100, 3, 3, &a_holds_three));
    }

    async fn database(dir: &tempfile::TempDir) -> Database {
        Database::open(
            dir.path().join("l.db").to_str().unwrap(),
            PLUMBING_MIGRATIONS,
        )
        .unwrap()
    }

    fn member(me: &str) -> Membership {
        Membership {
            me: me.into(),
            ttl: Duration::from_secs(10),
        }
    }

    async fn balance(db: &Database, m: &Membership) -> Balanced {
        let m = m.clone();
        db.write(move |conn| Ok::<_, DbError>((m.balance(conn, "t", &P6)?, Vec::new())))
            .await
            .unwrap()
    }

    #[tokio::test]
    async fn two_instances_converge_on_disjoint_halves_and_the_fence_follows() {
        let dir = tempfile::tempdir().unwrap();
        let db = database(&dir).await;
        let (a, b) = (member("a"), member("b"));
        let got_a = balance(&db, &a).await;
        assert_eq!(got_a.holds.len(), 6);
        assert!(!got_a.rebalance_soon, "alone, a waits for nobody");
        let waiting_b = balance(&db, &b).await;
        assert!(waiting_b.holds.is_empty(), "nothing free yet");
        assert!(waiting_b.rebalance_soon, "a holds more than its share");
        let got_a = balance(&db, &a).await;
        assert_eq!(got_a.holds, BTreeSet::from([0, 1, 2]));
        assert!(!got_a.rebalance_soon);
        let got_b = balance(&db, &b).await;
        assert_eq!(got_b.holds, BTreeSet::from([3, 4, 5]));
        assert!(got_b.orphaned.is_empty());
        assert!(!got_b.rebalance_soon, "b has its share");
        let fenced = db
            .write(|conn| {
                let a_on_4 = fence(conn, &partition_lease("t", 4), "a");
                let b_on_4 = fence(conn, &partition_lease("t", 4), "b");
                Ok::<_, DbError>(((a_on_4.is_err(), b_on_4.is_ok()), Vec::new()))
            })
            .await
            .unwrap();
        assert_eq!(fenced, (true, true), "only the holder may commit");
        // a leaves gracefully: b takes everything on its next round.
        let left = a.clone();
        db.write(move |conn| Ok::<_, DbError>((left.leave(conn, "t")?, Vec::new())))
            .await
            .unwrap();
        assert_eq!(balance(&db, &b).await.holds.len(), 6);
    }

    #[tokio::test]
    async fn a_fence_of_several_leases_holds_only_while_every_one_is_held() {
        let dir = tempfile::tempdir().unwrap();
        let db = database(&dir).await;
        for p in [0, 1] {
            grant(&db, "t", p, "a").await;
        }
        grant(&db, "t", 2, "b").await;
        let fenced = db
            .write(|conn| {
                let names = |ps: &[i32]| -> Vec<String> {
                    ps.iter().map(|p| partition_lease("t", *p)).collect()
                };
                let both = fence_all(conn, &names(&[0, 1]), "a").is_ok();
                let lost = match fence_all(conn, &names(&[0, 1, 2]), "a") {
                    Err(DbError::NotHolder(name)) => name,
                    other => format!("{other:?}"),
                };
                Ok::<_, DbError>(((both, lost), Vec::new()))
            })
            .await
            .unwrap();
        assert_eq!(fenced, (true, "t/2".to_owned()));
    }

    #[tokio::test]
    async fn the_relay_lease_has_one_holder_until_it_expires() {
        let dir = tempfile::tempdir().unwrap();
        let db = database(&dir).await;
        let short = Membership {
            me: "a".into(),
            ttl: Duration::from_millis(200),
        };
        let b = member("b");
        let hold = |m: Membership| {
            db.write(move |conn| Ok::<_, DbError>((m.hold(conn, RELAY)?, Vec::new())))
        };
        assert!(hold(short.clone()).await.unwrap().is_some());
        assert!(hold(b.clone()).await.unwrap().is_none(), "a holds it");
        assert!(hold(short.clone()).await.unwrap().is_some(), "renewed");
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(
            hold(b.clone()).await.unwrap().is_some(),
            "expired: b takes it"
        );
        assert!(hold(short).await.unwrap().is_none());
    }
}
