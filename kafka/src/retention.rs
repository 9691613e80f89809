//! Retention: a background task that keeps each database's size, and so the cost of every
//! query, flat as history grows, by deleting what no event can need any more.
//!
//! Every round it runs the plumbing's two rules — published outbox rows older than the dedup
//! window, processed event ids older than the dedup window — and the service's own
//! [`PruneRule`]s for its *settled* saga records (orders: finished orders and their history;
//! products: decided reservations; delivery: finished deliveries and voided orders). Each rule
//! deletes in batches of at most [`BATCH`] rows, one short `BEGIN IMMEDIATE` transaction each,
//! pausing between batches so the consumer and HTTP writers get the lock in between, until a
//! batch finds nothing. Counts go to `mall_retention_deleted_total{table}` and one log line per
//! round that deleted anything.
//!
//! # Why the window makes it safe
//!
//! What is pruned is dedup state: a processed id answers "was this event applied?", a settled
//! record answers "what was decided for this order?" when an old event about it comes again.
//! Both questions can only be asked by an event that can still be read from the topic, and a
//! message lives on the topic for its retention (Kafka's default `retention.ms`: 7 days) after
//! it was published. Copies of one event (a relay republishing after a crash) are published
//! close together, and this service applied the event at or after its publication, so once
//! the window (`RETENTION_DEDUP_WINDOW_S`, default those same 7 days) has passed since the
//! record was written, no copy of any event that led to it is left to be read.
//! A settled record is one no new action can change (a delivered or cancelled delivery, a
//! released or delivered reservation, an order whose delivery finished): only the echoes of
//! its settlement can still come, and those are published when the other services consume
//! the settling event — again within the topic's retention, or never. Keeping the record a
//! whole window after its *last* change covers them. A record still open (a `Reserved`
//! reservation, a `DeliveryStarted` delivery, a pending or cancel-requested order) is never
//! pruned, however old: a courier or a customer may still act on it.
//!
//! The window therefore has to be at least the topic's retention; orders keeps its visible
//! history longer (`ORDER_HISTORY_RETENTION_S`, refused below the dedup window). What it does
//! not cover: a service stopped for longer than the window with events still unpublished in
//! its outbox publishes them late, after their peers may have pruned their records.
//!
//! Timestamps are RFC 3339 text written by `chrono::Utc::now().to_rfc3339()`: always `+00:00`,
//! fixed width up to the seconds, then 0, 3, 6 or 9 fraction digits. The cutoff is written the
//! same way, and since `+` sorts before `.` and the digits, comparing the text orders the
//! instants correctly (`…:05+00:00` < `…:05.123…`), so SQLite compares them on an index.

use crate::db::DbConnection;
use crate::db::{Database, DbError};
use crate::metrics::Metrics;
use crate::settings::RetentionSettings;
use diesel::prelude::*;
use prometheus::IntCounterVec;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

/// Rows a rule deletes per transaction at most: a few tens of milliseconds of the writer.
pub const BATCH: i64 = 5_000;

/// The least pause between two batches; the pause is also at least as long as the batch took,
/// so pruning holds the writer at most half the time while it catches up.
const MIN_PAUSE: Duration = Duration::from_millis(20);

/// Rows deleted, by table.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Deleted(Vec<(&'static str, usize)>);

impl Deleted {
    /// `count` rows of `table`.
    pub fn rows(table: &'static str, count: usize) -> Self {
        Deleted(vec![(table, count)])
    }

    /// These and `count` rows of `table`.
    pub fn and(mut self, table: &'static str, count: usize) -> Self {
        self.add(table, count);
        self
    }

    /// How many rows of `table`.
    pub fn of(&self, table: &str) -> usize {
        self.0
            .iter()
            .find(|(t, _)| *t == table)
            .map_or(0, |(_, n)| *n)
    }

    /// How many rows in all.
    pub fn total(&self) -> usize {
        self.0.iter().map(|(_, n)| n).sum()
    }

    fn add(&mut self, table: &'static str, count: usize) {
        match self.0.iter_mut().find(|(t, _)| *t == table) {
            Some((_, n)) => *n += count,
            None => self.0.push((table, count)),
        }
    }

    fn merge(&mut self, other: &Deleted) {
        for &(table, count) in &other.0 {
            self.add(table, count);
        }
    }
}

impl std::fmt::Display for Deleted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut first = true;
        for (table, count) in self.0.iter().filter(|(_, n)| *n > 0) {
            if !first {
                f.write_str(", ")?;
            }
            write!(f, "{count} {table}")?;
            first = false;
        }
        Ok(())
    }
}

/// Deletes at most `limit` (about; see the rule) prunable rows last changed before `cutoff`
/// (RFC 3339, see the module docs) and says how many it deleted. It runs inside a write
/// transaction.
pub type PruneFn = Arc<dyn Fn(&mut DbConnection, &str, i64) -> QueryResult<Deleted> + Send + Sync>;

/// One kind of row the retention task deletes once it is older than a window.
#[derive(Clone)]
pub struct PruneRule {
    /// What it prunes, for the log.
    name: &'static str,
    /// How old a row must be.
    window: Duration,
    /// Deletes one batch.
    prune: PruneFn,
}

impl PruneRule {
    /// A rule `name` that deletes, batch by batch, what `prune` finds older than `window`.
    /// `prune` must only ever select rows whose saga is settled.
    pub fn new<F>(name: &'static str, window: Duration, prune: F) -> Self
    where
        F: Fn(&mut DbConnection, &str, i64) -> QueryResult<Deleted> + Send + Sync + 'static,
    {
        PruneRule {
            name,
            window,
            prune: Arc::new(prune),
        }
    }

    /// What it prunes.
    pub fn name(&self) -> &'static str {
        self.name
    }
}

/// The cutoff for `window` at `now`, written as the timestamps it is compared with.
pub fn cutoff_at(now: chrono::DateTime<chrono::Utc>, window: Duration) -> String {
    let window = chrono::Duration::from_std(window).unwrap_or(chrono::Duration::MAX);
    now.checked_sub_signed(window)
        .unwrap_or(chrono::DateTime::<chrono::Utc>::MIN_UTC)
        .to_rfc3339()
}

/// Deletes up to `limit` outbox rows published before `cutoff`. Pending rows (null
/// `published_at`) never match, however old: they still have to be published.
pub fn prune_published_outbox(
    conn: &mut DbConnection,
    cutoff: &str,
    limit: i64,
) -> QueryResult<usize> {
    use crate::outbox::outbox;
    let batch: Vec<i64> = outbox::table
        .filter(outbox::published_at.lt(cutoff))
        .select(outbox::id)
        .limit(limit)
        .load(conn)?;
    diesel::delete(outbox::table.filter(outbox::id.eq_any(&batch))).execute(conn)
}

/// Deletes up to `limit` processed event ids recorded before `cutoff`.
pub fn prune_processed_events(
    conn: &mut DbConnection,
    cutoff: &str,
    limit: i64,
) -> QueryResult<usize> {
    use crate::inbox::processed_events as done;
    let batch: Vec<String> = done::table
        .filter(done::processed_at.lt(cutoff))
        .select(done::event_id)
        .limit(limit)
        .load(conn)?;
    diesel::delete(done::table.filter(done::event_id.eq_any(&batch))).execute(conn)
}

/// The rules every service runs: published outbox rows, processed ids and idempotency keys.
pub fn plumbing_rules(dedup_window: Duration) -> Vec<PruneRule> {
    vec![
        PruneRule::new("outbox", dedup_window, |conn, cutoff, limit| {
            prune_published_outbox(conn, cutoff, limit).map(|n| Deleted::rows("outbox", n))
        }),
        PruneRule::new("processed_events", dedup_window, |conn, cutoff, limit| {
            prune_processed_events(conn, cutoff, limit)
                .map(|n| Deleted::rows("processed_events", n))
        }),
        // A client retries within minutes; the dedup window is a generous, documented bound.
        PruneRule::new("idempotency_keys", dedup_window, |conn, cutoff, limit| {
            crate::idempotency::prune(conn, cutoff, limit)
                .map(|n| Deleted::rows("idempotency_keys", n))
        }),
    ]
}

/// The retention task of one service.
pub struct Retention {
    /// The database pruned.
    db: Database,
    /// The plumbing's rules, then the service's.
    rules: Vec<PruneRule>,
    /// Time between rounds.
    interval: Duration,
    /// Rows per transaction at most ([`BATCH`]; tests use less).
    batch: i64,
    /// `mall_retention_deleted_total{table}`.
    deleted: IntCounterVec,
}

impl Retention {
    /// The plumbing's rules plus `service_rules`, every `settings.interval`, counting into
    /// `metrics`.
    pub fn new(
        db: Database,
        settings: &RetentionSettings,
        service_rules: Vec<PruneRule>,
        metrics: &Metrics,
    ) -> Self {
        let mut rules = plumbing_rules(settings.dedup_window);
        rules.extend(service_rules);
        let deleted = metrics.retention_deleted.clone();
        for table in ["outbox", "processed_events", "idempotency_keys"] {
            // Present at 0 from the start, so a rate() sees the first deletion.
            deleted.with_label_values(&[table]);
        }
        Retention {
            db,
            rules,
            interval: settings.interval,
            batch: BATCH,
            deleted,
        }
    }

    /// The same task deleting at most `batch` rows per transaction.
    pub fn with_batch(mut self, batch: i64) -> Self {
        self.batch = batch.max(1);
        self
    }

    /// Prunes every `interval` until `stop`; a failed round is logged and tried again at the
    /// next one.
    pub async fn run(self, stop: CancellationToken) {
        loop {
            tokio::select! {
                _ = tokio::time::sleep(self.interval) => {}
                _ = stop.cancelled() => return,
            }
            if let Err(e) = self.round(&stop).await {
                log::warn!(
                    "retention: {e}; trying again in {} s",
                    self.interval.as_secs()
                );
            }
        }
    }

    /// One round: every rule until it finds nothing more to delete (or `stop`). Returns what
    /// it deleted.
    pub async fn round(&self, stop: &CancellationToken) -> Result<Deleted, DbError> {
        let mut round = Deleted::default();
        for rule in &self.rules {
            let cutoff = cutoff_at(chrono::Utc::now(), rule.window);
            round.merge(&self.drain(rule, &cutoff, stop).await?);
        }
        if round.total() > 0 {
            log::info!("retention: deleted {round}");
        }
        Ok(round)
    }

    /// Deletes `rule`'s rows older than `cutoff`, batch by batch, counting each committed one.
    async fn drain(
        &self,
        rule: &PruneRule,
        cutoff: &str,
        stop: &CancellationToken,
    ) -> Result<Deleted, DbError> {
        let mut drained = Deleted::default();
        loop {
            let started = Instant::now();
            let (prune, cutoff, batch) = (rule.prune.clone(), cutoff.to_owned(), self.batch);
            let deleted = self
                .db
                .write(move |conn| {
                    let deleted = prune(conn, &cutoff, batch)?;
                    Ok::<_, DbError>((deleted, Vec::new()))
                })
                .await?;
            for &(table, count) in &deleted.0 {
                self.deleted
                    .with_label_values(&[table])
                    .inc_by(count as u64);
            }
            drained.merge(&deleted);
            if deleted.total() == 0 || stop.is_cancelled() {
                return Ok(drained);
            }
            tokio::select! {
                _ = tokio::time::sleep(started.elapsed().max(MIN_PAUSE)) => {}
                _ = stop.cancelled() => return Ok(drained),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::inbox::processed_events;
    use crate::outbox::outbox;

    const NONE: crate::db::Migrations = crate::db::PLUMBING_MIGRATIONS;
    const DAY: Duration = Duration::from_secs(24 * 3600);

    fn ago(days: u32) -> String {
        cutoff_at(chrono::Utc::now(), DAY * days)
    }

    fn open(dir: &tempfile::TempDir) -> Database {
        Database::open(dir.path().join("r.db").to_str().unwrap(), NONE).unwrap()
    }

    fn retention(db: &Database, metrics: &Metrics) -> Retention {
        let settings = RetentionSettings {
            dedup_window: DAY * 7,
            interval: Duration::from_secs(60),
        };
        Retention::new(db.clone(), &settings, Vec::new(), metrics)
    }

    /// Outbox rows `event_id`s `prefix0..n`, published at `published_at` (None: pending) and
    /// written 30 days ago.
    async fn outbox_rows(db: &Database, prefix: &str, n: usize, published_at: Option<String>) {
        let prefix = prefix.to_owned();
        db.write(move |conn| {
            for i in 0..n {
                diesel::insert_into(outbox::table)
                    .values((
                        outbox::event_id.eq(format!("{prefix}{i}")),
                        outbox::event_type.eq("T"),
                        outbox::message_key.eq("k"),
                        outbox::payload.eq("{}"),
                        outbox::created_at.eq(ago(30)),
                        outbox::published_at.eq(published_at.clone()),
                    ))
                    .execute(conn)?;
            }
            Ok::<_, DbError>(((), Vec::new()))
        })
        .await
        .unwrap();
    }

    async fn processed(db: &Database, prefix: &str, n: usize, at: String) {
        let prefix = prefix.to_owned();
        db.write(move |conn| {
            for i in 0..n {
                diesel::insert_into(processed_events::table)
                    .values((
                        processed_events::event_id.eq(format!("{prefix}{i}")),
                        processed_events::event_type.eq("T"),
                        processed_events::processed_at.eq(at.clone()),
                    ))
                    .execute(conn)?;
            }
            Ok::<_, DbError>(((), Vec::new()))
        })
        .await
        .unwrap();
    }

    async fn outbox_ids(db: &Database) -> Vec<String> {
        db.read(|conn| {
            outbox::table
                .order(outbox::event_id)
                .select(outbox::event_id)
                .load::<String>(conn)
                .map_err(DbError::from)
        })
        .await
        .unwrap()
    }

    async fn processed_ids(db: &Database) -> Vec<String> {
        db.read(|conn| {
            processed_events::table
                .order(processed_events::event_id)
                .select(processed_events::event_id)
                .load::<String>(conn)
                .map_err(DbError::from)
        })
        .await
        .unwrap()
    }

    #[test]
    fn cutoffs_compare_as_text_like_the_instants() {
        let whole = "2026-03-01T10:00:05+00:00";
        let fraction = "2026-03-01T10:00:05.123456789+00:00";
        let millis = "2026-03-01T10:00:05.100+00:00";
        assert!(whole < millis && millis < fraction);
        let now = chrono::DateTime::parse_from_rfc3339(fraction)
            .unwrap()
            .to_utc();
        let cutoff = cutoff_at(now, DAY);
        assert_eq!(cutoff, "2026-02-28T10:00:05.123456789+00:00");
        assert!(cutoff.as_str() < whole);
        assert_eq!(cutoff, (now - chrono::Duration::days(1)).to_rfc3339());
    }

    #[tokio::test]
    async fn old_published_rows_go_pending_and_recent_ones_stay() {
        let dir = tempfile::tempdir().unwrap();
        let db = open(&dir);
        outbox_rows(&db, "old", 3, Some(ago(8))).await;
        outbox_rows(&db, "pending", 2, None).await;
        outbox_rows(&db, "recent", 2, Some(ago(6))).await;
        let metrics = Metrics::new();
        let deleted = retention(&db, &metrics)
            .round(&CancellationToken::new())
            .await
            .unwrap();
        assert_eq!(deleted.of("outbox"), 3);
        assert_eq!(
            outbox_ids(&db).await,
            ["pending0", "pending1", "recent0", "recent1"]
        );
        assert!(
            metrics
                .render()
                .contains("mall_retention_deleted_total{table=\"outbox\"} 3"),
            "{}",
            metrics.render()
        );
    }

    #[tokio::test]
    async fn old_processed_ids_go_and_recent_ones_stay() {
        let dir = tempfile::tempdir().unwrap();
        let db = open(&dir);
        processed(&db, "old", 4, ago(8)).await;
        processed(&db, "recent", 2, ago(6)).await;
        let metrics = Metrics::new();
        let deleted = retention(&db, &metrics)
            .round(&CancellationToken::new())
            .await
            .unwrap();
        assert_eq!(deleted.of("processed_events"), 4);
        assert_eq!(processed_ids(&db).await, ["recent0", "recent1"]);
    }

    #[tokio::test]
    async fn a_backlog_larger_than_a_batch_is_deleted_batch_by_batch() {
        let dir = tempfile::tempdir().unwrap();
        let db = open(&dir);
        outbox_rows(&db, "old", 10, Some(ago(8))).await;
        processed(&db, "old", 7, ago(8)).await;
        processed(&db, "recent", 1, ago(1)).await;
        let metrics = Metrics::new();
        let task = retention(&db, &metrics).with_batch(3);
        // Count the transactions: each commit bumps the commit counter.
        let commits = db.commits();
        let before = *commits.borrow();
        let deleted = task.round(&CancellationToken::new()).await.unwrap();
        assert_eq!(deleted.of("outbox"), 10);
        assert_eq!(deleted.of("processed_events"), 7);
        assert!(outbox_ids(&db).await.is_empty());
        assert_eq!(processed_ids(&db).await, ["recent0"]);
        // ⌈10/3⌉ + 1 empty for the outbox, ⌈7/3⌉ + 1 for the ids, 1 empty for the keys.
        assert_eq!(*commits.borrow() - before, 5 + 4 + 1);
    }

    #[tokio::test]
    async fn service_rules_run_with_their_own_window_and_are_counted() {
        let dir = tempfile::tempdir().unwrap();
        let db = open(&dir);
        let settings = RetentionSettings::default();
        let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
        let rule = {
            let seen = seen.clone();
            PruneRule::new("own", DAY * 30, move |_, cutoff, _| {
                let mut seen = seen.lock().unwrap();
                seen.push(cutoff.to_owned());
                // Two rows the first time, then nothing.
                Ok(Deleted::rows(
                    "own_rows",
                    if seen.len() == 1 { 2 } else { 0 },
                ))
            })
        };
        let metrics = Metrics::new();
        let task = Retention::new(db, &settings, vec![rule], &metrics);
        let deleted = task.round(&CancellationToken::new()).await.unwrap();
        assert_eq!(deleted.of("own_rows"), 2);
        let seen = seen.lock().unwrap();
        assert_eq!(seen.len(), 2, "until a batch finds nothing");
        assert!(seen[0] < ago(29) && seen[0] > ago(31), "{}", seen[0]);
        assert!(
            metrics
                .render()
                .contains("mall_retention_deleted_total{table=\"own_rows\"} 2")
        );
    }

    #[tokio::test]
    async fn a_stopped_task_returns() {
        let dir = tempfile::tempdir().unwrap();
        let db = open(&dir);
        let task = retention(&db, &Metrics::new());
        let stop = CancellationToken::new();
        stop.cancel();
        tokio::time::timeout(Duration::from_secs(5), task.run(stop))
            .await
            .unwrap();
    }
}
