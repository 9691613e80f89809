//! The consumer loop every service runs: decode, apply exactly once, record the position.
//!
//! **No broker consumer group.** The instances of a service share the topic's partitions
//! through leases in their shared database ([`crate::leases`]; one instance on SQLite holds
//! them all): each assigns itself the partitions it holds and starts each at the position
//! stored there ([`crate::offsets`]), written in the same transaction as the effect of the
//! event before it — and only while the lease is still its own. Nothing depends on the broker's
//! group coordinator, whose rebalances after quick crashes can leave a restarted member with
//! no partitions for good (tansu 0.6.0; see the README). A crash at any instant loses nothing
//! and doubles nothing: the position and the effect commit together, and the inbox absorbs
//! any repeat anyway. Every 3 s (`BALANCE_EVERY`) the consumer renews its leases and takes its
//! fair share — every second while it is short of its share and another instance is to
//! release partitions (an instance joined) or took one it wanted in the same moment, so a
//! released partition is unread for about a second rather than up to three;
//! when what it holds changes it reassigns itself.
//!
//! A message that cannot be decoded or is refused by the service's rules is parked
//! ([`crate::parking`]); every other failure (the database busy, full, read-only…) is
//! retried, and [`ConsumerStatus`] shows it to `/health`. A watchdog reopens the consumer when
//! events wait on the topic and nothing moves while the broker answers.
//!
//! [`ConsumerStatus`] also feeds `/metrics`: the outcome counters `/health` shows *are* the
//! Prometheus counters, and the position and lag gauges move with the figures `/health` shows.

use crate::db::{Database, DbError};
use crate::inbox::{self, Applied, ReactError, Reactor};
use crate::leases::{Balanced, Membership};
use crate::metrics::Metrics;
use crate::offsets::{self, ConsumedAt};
use crate::parking;
use crate::settings::KafkaSettings;
use chrono::{DateTime, Utc};
use events::{DeadLetter, Decoded, Envelope, ParkedFrom};
use futures_util::FutureExt;
use prometheus::{Histogram, IntCounter, IntGaugeVec};
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext, StreamConsumer};
use rdkafka::error::{KafkaError, KafkaResult};
use rdkafka::message::{BorrowedMessage, Message};
use rdkafka::{ClientContext, Offset, TopicPartitionList};
use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

/// Logs client errors with the service's name.
pub struct LoggingContext {
    group: String,
}

impl ClientContext for LoggingContext {
    fn error(&self, error: KafkaError, reason: &str) {
        log::warn!("consumer {}: {error}: {reason}", self.group);
    }
}

impl ConsumerContext for LoggingContext {}

/// The consumer type every service uses.
pub type SagaConsumer = StreamConsumer<LoggingContext>;

/// Commits the positions to the broker under the service's group id, for display only
/// (`kafka-consumer-groups --describe`). A client of its own, apart from the one that reads,
/// which is reopened at will: closing a client waits for its unanswered commits, and with the
/// coordinator unreachable that wait would hold up a reopen or a stop. This one lives as long
/// as the consumer loop and is never closed, not even when the loop is dropped mid-way (a
/// runtime shutting down): it is left to the process's exit. Its commits are for display
/// only — the positions that count are in the database already.
struct PositionDisplay {
    /// Never dropped: a close would wait for commits a broker that is away never answers.
    client: std::mem::ManuallyDrop<BaseConsumer<LoggingContext>>,
}

impl PositionDisplay {
    fn new(settings: &KafkaSettings) -> KafkaResult<Self> {
        Ok(PositionDisplay {
            client: std::mem::ManuallyDrop::new(group_client(settings, "positions", &[])?),
        })
    }

    /// Sends `positions` without waiting for the answer; true when sent.
    fn commit(&self, positions: &TopicPartitionList) -> bool {
        // Serves the client's events (errors); no partition is assigned, so no message comes.
        let _ = self.client.poll(Duration::ZERO);
        match self.client.commit(positions, CommitMode::Async) {
            Ok(()) => true,
            Err(e) => {
                log::debug!(
                    "consumer {}: positions not shown to the broker: {e}",
                    self.client.context().group
                );
                false
            }
        }
    }
}

/// A consumer that reads where it is told; it stores and commits nothing to the broker.
pub fn create_consumer(settings: &KafkaSettings) -> KafkaResult<SagaConsumer> {
    let fetch_wait = settings.fetch_wait_max.as_millis().to_string();
    group_client(
        settings,
        "consumer",
        &[
            ("enable.auto.offset.store", "false"),
            // A stored position the broker no longer has (deleted by retention) starts at the
            // earliest it has; another cluster's positions are refused at start (identity).
            ("auto.offset.reset", "earliest"),
            ("enable.partition.eof", "false"),
            ("fetch.wait.max.ms", &fetch_wait),
        ],
    )
}

/// A client of the service's group (no group is joined: partitions are assigned from the
/// leases; the group id names where positions are shown, see [`PositionDisplay`]) that
/// commits nothing by itself, creates no topic, and is back within a second of a broker
/// restart (the default backs off up to 10 s); then `extra`, then the operator's
/// `KAFKA_CLIENT_*` properties, which win.
fn group_client<C>(settings: &KafkaSettings, role: &str, extra: &[(&str, &str)]) -> KafkaResult<C>
where
    C: rdkafka::config::FromClientConfigAndContext<LoggingContext>,
{
    let group: [(&str, &str); 5] = [
        ("group.id", &settings.group_id),
        ("enable.auto.commit", "false"),
        ("reconnect.backoff.max.ms", "1000"),
        ("socket.nagle.disable", "true"),
        ("allow.auto.create.topics", "false"),
    ];
    let ours: Vec<(&str, &str)> = group.iter().chain(extra).copied().collect();
    settings
        .client_config_with(role, &ours)
        .create_with_context(LoggingContext {
            group: settings.group_id.clone(),
        })
}

/// A client without a group for metadata and watermarks (`/health`, the watchdog).
pub fn create_probe(settings: &KafkaSettings) -> KafkaResult<BaseConsumer> {
    settings
        .client_config_with(
            "probe",
            &[
                ("socket.nagle.disable", "true"),
                ("reconnect.backoff.max.ms", "1000"),
                ("allow.auto.create.topics", "false"),
            ],
        )
        .create()
}

/// What the consumer is doing, for `/health`, `/metrics` and the watchdog.
pub struct ConsumerStatus {
    group: String,
    stuck_after: Duration,
    inner: Mutex<ConsumerState>,
    metrics: ConsumerMetrics,
}

/// The consumer's share of the service's [`Metrics`]: the one place its counts are kept.
struct ConsumerMetrics {
    applied: IntCounter,
    duplicates: IntCounter,
    skipped: IntCounter,
    parked: IntCounter,
    retries: IntCounter,
    reopened: IntCounter,
    batch: Histogram,
    lag: IntGaugeVec,
    position: IntGaugeVec,
}

impl ConsumerMetrics {
    fn new(m: &Metrics) -> Self {
        let outcome = |o: &str| m.events_consumed.with_label_values(&[o]);
        ConsumerMetrics {
            applied: outcome("applied"),
            duplicates: outcome("duplicate"),
            skipped: outcome("skipped"),
            parked: outcome("parked"),
            retries: m.event_retries.clone(),
            reopened: m.consumer_reopened.clone(),
            batch: m.consumer_batch.clone(),
            lag: m.consumer_lag.clone(),
            position: m.consumer_position.clone(),
        }
    }

    /// Sets the partition's position and lag gauges.
    fn show(&self, partition: i32, p: &Progress) {
        let label = partition.to_string();
        self.position.with_label_values(&[&label]).set(p.position);
        self.lag.with_label_values(&[&label]).set(p.lag());
    }
}

struct ConsumerState {
    assigned: BTreeMap<i32, Progress>,
    /// The last successful balancing round.
    last_balance: Instant,
    /// Instances sharing the partitions, at the last round.
    members: usize,
    /// Partitions no live instance held, since when.
    orphaned: Option<(Vec<i32>, Instant)>,
    topic_partitions: Option<usize>,
    last_probe_ok: Option<Instant>,
    last_progress: Instant,
    retrying: Option<Retrying>,
    last_reopen: Option<(Instant, String)>,
    last_error: Option<String>,
    /// The topic's ends (high watermark per partition) as the monitor saw them, oldest first:
    /// what [`ConsumerStatus::read_through`] compares positions with.
    ends_seen: VecDeque<(DateTime<Utc>, BTreeMap<i32, i64>)>,
}

/// Samples of the topic's ends kept for [`ConsumerStatus::read_through`]: 1,000 at one per
/// two seconds is half an hour of a consumer falling behind before the oldest is dropped
/// (which only makes the answer later, never earlier).
const ENDS_KEPT: usize = 1000;

#[derive(Debug, Clone, Copy, Default)]
struct Progress {
    position: i64,
    low: i64,
    high: Option<i64>,
    behind_since: Option<Instant>,
}

impl Progress {
    fn lag(&self) -> i64 {
        self.high
            .map_or(0, |high| high - self.position.max(self.low))
            .max(0)
    }
}

struct Retrying {
    event: String,
    error: String,
    attempts: u32,
    since: Instant,
}

impl ConsumerStatus {
    /// The status of `group`'s consumer, counted in `metrics`; a stall longer than
    /// `stuck_after` is a problem.
    pub fn new(group: &str, stuck_after: Duration, metrics: &Metrics) -> Self {
        let now = Instant::now();
        ConsumerStatus {
            group: group.to_owned(),
            stuck_after,
            inner: Mutex::new(ConsumerState {
                assigned: BTreeMap::new(),
                last_balance: now,
                members: 0,
                orphaned: None,
                topic_partitions: None,
                last_probe_ok: None,
                last_progress: now,
                retrying: None,
                last_reopen: None,
                last_error: None,
                ends_seen: VecDeque::new(),
            }),
            metrics: ConsumerMetrics::new(metrics),
        }
    }

    fn state(&self) -> MutexGuard<'_, ConsumerState> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn assigned(&self, positions: &BTreeMap<i32, i64>) {
        let mut s = self.state();
        let old = std::mem::take(&mut s.assigned);
        s.assigned = positions
            .iter()
            .map(|(p, position)| {
                let kept = old.get(p).copied().unwrap_or_default();
                (
                    *p,
                    Progress {
                        position: *position,
                        ..kept
                    },
                )
            })
            .collect();
        s.last_progress = Instant::now();
        // Partitions no longer held leave the gauges.
        self.metrics.position.reset();
        self.metrics.lag.reset();
        for (id, p) in &s.assigned {
            self.metrics.show(*id, p);
        }
    }

    fn balanced(&self, b: &Balanced) {
        let mut s = self.state();
        s.last_balance = Instant::now();
        s.members = b.members;
        s.orphaned = if b.orphaned.is_empty() {
            None
        } else {
            let since = s.orphaned.as_ref().map_or_else(Instant::now, |(_, t)| *t);
            Some((b.orphaned.clone(), since))
        };
    }

    fn progressed(&self, partition: i32, next: i64) {
        let mut s = self.state();
        s.last_progress = Instant::now();
        s.retrying = None;
        if let Some(p) = s.assigned.get_mut(&partition) {
            p.position = next;
            if p.lag() == 0 {
                p.behind_since = None;
            }
            self.metrics.show(partition, p);
        }
    }

    fn retrying(&self, event: String, error: String, attempts: u32) {
        self.metrics.retries.inc();
        let mut s = self.state();
        let since = s
            .retrying
            .as_ref()
            .filter(|r| r.event == event)
            .map_or_else(Instant::now, |r| r.since);
        s.retrying = Some(Retrying {
            event,
            error,
            attempts,
            since,
        });
    }

    fn observed(&self, partitions: usize, watermarks: &BTreeMap<i32, (i64, i64)>) {
        self.observed_at(Utc::now(), partitions, watermarks);
    }

    fn observed_at(
        &self,
        at: DateTime<Utc>,
        partitions: usize,
        watermarks: &BTreeMap<i32, (i64, i64)>,
    ) {
        let mut s = self.state();
        let now = Instant::now();
        if watermarks.len() == partitions {
            if s.ends_seen.len() == ENDS_KEPT {
                s.ends_seen.pop_front();
            }
            let ends = watermarks
                .iter()
                .map(|(p, (_, high))| (*p, *high))
                .collect();
            s.ends_seen.push_back((at, ends));
        }
        s.topic_partitions = Some(partitions);
        s.last_probe_ok = Some(now);
        for (partition, (low, high)) in watermarks {
            if let Some(p) = s.assigned.get_mut(partition) {
                p.low = *low;
                p.high = Some(*high);
                if p.lag() > 0 {
                    p.behind_since.get_or_insert(now);
                } else {
                    p.behind_since = None;
                }
                self.metrics.show(*partition, p);
            }
        }
    }

    fn error(&self, error: String) {
        self.state().last_error = Some(error);
    }

    /// The latest moment by which the service has read everything that was on the topic:
    /// the newest sample of the topic's ends (taken every two seconds, on every partition)
    /// that `positions` — the next offset to read per partition, as stored with the effects —
    /// have all reached. `None` until one is reached. Orders' saga timeout uses it: an order
    /// may time out only once every answer that reached the topic before its deadline has been
    /// applied, however late the consumer runs (a restart, a backlog).
    pub fn read_through(&self, positions: &BTreeMap<i32, i64>) -> Option<DateTime<Utc>> {
        let mut s = self.state();
        let reached = s.ends_seen.iter().rposition(|(_, ends)| {
            ends.iter()
                .all(|(p, high)| positions.get(p).copied().unwrap_or(0) >= *high)
        })?;
        // Older samples can no longer be the answer: positions only move forward.
        s.ends_seen.drain(..reached);
        s.ends_seen.front().map(|(at, _)| *at)
    }

    /// Events waiting while nothing moved for `stuck_after`: `(partitions, events, seconds)`.
    fn stalled(&self, s: &ConsumerState) -> Option<(Vec<i32>, i64, u64)> {
        let now = Instant::now();
        let mut partitions = Vec::new();
        let mut waiting = 0;
        let mut idle = Duration::ZERO;
        for (id, p) in &s.assigned {
            let Some(behind) = p.behind_since else {
                continue;
            };
            let quiet = now.duration_since(behind.max(s.last_progress));
            if quiet > self.stuck_after {
                partitions.push(*id);
                waiting += p.lag();
                idle = idle.max(quiet);
            }
        }
        (!partitions.is_empty()).then_some((partitions, waiting, idle.as_secs()))
    }

    /// Why the consumer is stuck, if it is: its leases not renewed, partitions nobody
    /// consumes, one event retried, or events waiting with no progress, each for longer than
    /// the session timeout. (Holding no partitions is fine while other instances hold them all.)
    pub fn problem(&self) -> Option<String> {
        let s = self.state();
        let group = &self.group;
        let last_error = || {
            s.last_error
                .as_deref()
                .map(|e| format!("; last error: {e}"))
                .unwrap_or_default()
        };
        if s.last_balance.elapsed() > self.stuck_after {
            return Some(format!(
                "consumer {group} could not renew its partition leases for {} s{}",
                s.last_balance.elapsed().as_secs(),
                last_error()
            ));
        }
        if let Some((partitions, since)) = s
            .orphaned
            .as_ref()
            .filter(|(_, t)| t.elapsed() > self.stuck_after)
        {
            return Some(format!(
                "consumer {group}: partitions {partitions:?} held by no instance for {} s{}",
                since.elapsed().as_secs(),
                last_error()
            ));
        }
        if let Some(r) = s
            .retrying
            .as_ref()
            .filter(|r| r.since.elapsed() > self.stuck_after)
        {
            return Some(format!(
                "consumer {group} stuck for {} s on {} ({} attempts): {}",
                r.since.elapsed().as_secs(),
                r.event,
                r.attempts,
                r.error
            ));
        }
        self.stalled(&s).map(|(partitions, waiting, idle)| {
            format!(
                "consumer {group}: {waiting} events waiting on partitions {partitions:?}, \
                 no progress for {idle} s"
            )
        })
    }

    /// Why the watchdog should reopen the consumer: the broker answers, events wait and
    /// nothing moves (and no event is being retried on purpose). At most once per
    /// `stuck_after`. (New partitions are taken by the next balancing round.)
    fn reopen_reason(&self) -> Option<String> {
        let s = self.state();
        if s.last_reopen
            .as_ref()
            .is_some_and(|(at, _)| at.elapsed() < self.stuck_after)
        {
            return None;
        }
        let broker_answers = s
            .last_probe_ok
            .is_some_and(|t| t.elapsed() < Duration::from_secs(5));
        if s.retrying.is_some() || !broker_answers {
            return None;
        }
        self.stalled(&s).map(|(partitions, waiting, idle)| {
            format!(
                "{waiting} events waiting on partitions {partitions:?} and no progress for {idle} s"
            )
        })
    }

    fn reopened(&self, reason: String) {
        self.metrics.reopened.inc();
        let mut s = self.state();
        s.last_reopen = Some((Instant::now(), reason));
        s.last_progress = Instant::now();
    }

    fn count(&self, outcome: Counted) {
        self.count_many(outcome, 1);
    }

    fn count_many(&self, outcome: Counted, n: usize) {
        let m = &self.metrics;
        let counter = match outcome {
            Counted::Applied => &m.applied,
            Counted::Duplicate => &m.duplicates,
            Counted::Skipped => &m.skipped,
            Counted::Parked => &m.parked,
        };
        counter.inc_by(n as u64);
    }

    /// The consumer group: the service's name.
    pub fn group(&self) -> &str {
        &self.group
    }

    /// The figures `/health` shows.
    pub fn snapshot(&self) -> serde_json::Value {
        let s = self.state();
        let m = &self.metrics;
        let partitions: BTreeMap<String, serde_json::Value> = s
            .assigned
            .iter()
            .map(|(id, p)| {
                (
                    id.to_string(),
                    serde_json::json!({ "position": p.position, "highWatermark": p.high, "lag": p.lag() }),
                )
            })
            .collect();
        serde_json::json!({
            "partitions": partitions,
            "instancesSharing": s.members,
            "secondsSinceBalance": s.last_balance.elapsed().as_secs(),
            "applied": m.applied.get(),
            "duplicatesIgnored": m.duplicates.get(),
            "skipped": m.skipped.get(),
            "parked": m.parked.get(),
            "retrying": s.retrying.as_ref().map(|r| serde_json::json!({
                "event": r.event, "attempts": r.attempts, "error": r.error,
                "forSeconds": r.since.elapsed().as_secs(),
            })),
            "secondsSinceProgress": s.last_progress.elapsed().as_secs(),
            "reopened": m.reopened.get(),
            "lastReopen": s.last_reopen.as_ref().map(|(_, why)| why),
            "lastError": s.last_error,
        })
    }
}

#[derive(Debug, Clone, Copy)]
enum Counted {
    Applied,
    Duplicate,
    Skipped,
    Parked,
}

/// At most this many fetched messages commit in one transaction.
const MAX_BATCH: usize = 500;

/// What happened to one message.
#[derive(Debug, PartialEq, Eq)]
enum Outcome {
    /// Applied, ignored as a duplicate or parked: the position after it is committed.
    Stored,
    /// Not for this service: the position after it is stored with the next commit.
    Skipped,
    /// Shutdown came while it was being retried: leave it for the next start.
    Interrupted,
    /// Another instance took the partition's lease: nothing of it committed here.
    LeaseLost,
}

/// How often the consumer renews its leases and rebalances (a third of the default lease
/// time, so two rounds may fail before a lease lapses).
const BALANCE_EVERY: Duration = Duration::from_secs(3);

/// Why [`EventConsumer::consume`] returned.
enum Exit {
    Stopped,
    Reopen(String),
    /// The partitions held changed: assign the new set.
    Rebalanced,
}

/// One assignment: the consumer and where it stands.
struct Session {
    consumer: SagaConsumer,
    read: ReadSoFar,
    /// The topic's partitions at the last round.
    partitions: Vec<i32>,
    /// The partitions this instance holds and reads.
    holds: BTreeSet<i32>,
    balanced_at: Instant,
    /// This instance should have more partitions soon ([`Balanced::rebalance_soon`]): it
    /// balances every tick until it has them.
    rebalance_soon: bool,
    /// The positions last committed to the broker's group, for display.
    shown: BTreeMap<i32, i64>,
}

/// Where a session stands, per partition.
struct ReadSoFar {
    positions: BTreeMap<i32, i64>,
    /// Partitions whose position moved past skipped messages only; flushed every second.
    unsaved: BTreeSet<i32>,
}

/// The loop that feeds the topic to a service's [`Reactor`].
pub struct EventConsumer {
    /// Consumers are (re)created from these.
    settings: KafkaSettings,
    /// Metadata and watermarks, without a group.
    probe: Arc<BaseConsumer>,
    /// Where effects, positions and dead letters commit.
    db: Database,
    /// The service's rules.
    reactor: Arc<dyn Reactor>,
    /// Shared with `/health`; counts into the service's [`Metrics`].
    status: Arc<ConsumerStatus>,
    /// This instance's partition leases; given up by the host after the consumer and the
    /// relay have stopped ([`EventConsumer::leave`]).
    membership: Membership,
    /// TEST ONLY ([`TEST_PARK_ENV`]): event types parked on arrival unless redriven.
    test_park: BTreeSet<String>,
}

/// TEST ONLY: `MALL_TEST_PARK_EVENT_TYPES=OrderCancelRequested,...` makes the consumer park
/// every event of these types it would apply, as a bug in its rules would (a `Rejected` dead
/// letter naming this variable), except a redriven copy, which it applies. The suites use it
/// to park real saga events; never set it in production.
pub const TEST_PARK_ENV: &str = "MALL_TEST_PARK_EVENT_TYPES";

/// What the consumer does with a decoded event before its rules see it.
#[derive(Debug, PartialEq, Eq)]
enum Screen {
    /// Not for this service (its rules do not act on it, or it is a redrive for another).
    Skip,
    /// Parked by the test hook ([`TEST_PARK_ENV`]).
    ParkForTest,
    /// For the rules.
    Apply,
}

impl EventConsumer {
    /// Wires the service's database and reactor to the topic, counting into `metrics`.
    pub fn new(
        settings: &KafkaSettings,
        probe: Arc<BaseConsumer>,
        db: Database,
        reactor: Arc<dyn Reactor>,
        metrics: &Metrics,
    ) -> Self {
        EventConsumer {
            status: Arc::new(ConsumerStatus::new(
                &settings.group_id,
                settings.session_timeout,
                metrics,
            )),
            membership: Membership {
                me: settings.instance.clone(),
                ttl: settings.session_timeout,
            },
            settings: settings.clone(),
            probe,
            db,
            reactor,
            test_park: test_park_types(std::env::var(TEST_PARK_ENV).ok().as_deref()),
        }
    }

    /// Whether `event` (read in `message`) is for the rules, skipped or parked for a test.
    fn screen(&self, message: &BorrowedMessage<'_>, event: &Envelope) -> Screen {
        let redrive_for = header(message, events::dead_letter::REDRIVE_FOR_HEADER);
        if redrive_for.as_deref().is_some_and(|g| g != self.group()) || !self.reactor.wants(event) {
            return Screen::Skip;
        }
        if redrive_for.is_none() && self.test_park.contains(event.event_type()) {
            return Screen::ParkForTest;
        }
        Screen::Apply
    }

    /// The status `/health` reads.
    pub fn status(&self) -> Arc<ConsumerStatus> {
        self.status.clone()
    }

    /// Consumes until `shutdown`; the event in hand is finished first and the positions of
    /// skipped messages are saved.
    pub async fn run(self, shutdown: CancellationToken) {
        let monitor = tokio::spawn(monitor(
            self.probe.clone(),
            self.settings.topic.clone(),
            self.status.clone(),
        ));
        let display = PositionDisplay::new(&self.settings)
            .inspect_err(|e| {
                log::warn!(
                    "consumer {}: positions not shown to the broker: {e}",
                    self.group()
                )
            })
            .ok();
        let mut failures = 0u32;
        while !shutdown.is_cancelled() {
            let session = match self.open().await {
                Ok(session) => session,
                Err(e) => {
                    failures += 1;
                    log::warn!("consumer {}: cannot start reading: {e}", self.group());
                    self.status.error(e);
                    let backoff = Duration::from_millis(200 * u64::from(failures.min(10)));
                    tokio::select! {
                        _ = tokio::time::sleep(backoff) => continue,
                        _ = shutdown.cancelled() => break,
                    }
                }
            };
            failures = 0;
            match self.consume(session, display.as_ref(), &shutdown).await {
                Exit::Stopped => break,
                Exit::Rebalanced => {}
                Exit::Reopen(reason) => {
                    log::warn!("consumer {}: {reason}; reopening it", self.group());
                    self.status.reopened(reason);
                }
            }
        }
        monitor.abort();
        log::info!("consumer {} stopped", self.group());
    }

    /// Gives up this instance's partitions and membership (a graceful stop: the others take
    /// over at once instead of after the lease time). Called by the host after the relay's
    /// last pass, which publishes the rows of those partitions under their leases.
    pub async fn leave(db: &Database, settings: &KafkaSettings) {
        let membership = Membership {
            me: settings.instance.clone(),
            ttl: settings.session_timeout,
        };
        let topic = settings.topic.clone();
        let left = db
            .write(move |conn| Ok::<_, DbError>((membership.leave(conn, &topic)?, Vec::new())))
            .await;
        match left {
            Ok(()) => db.routing().hold(&BTreeSet::new()),
            Err(e) => log::warn!(
                "consumer {}: leases not given up (they expire): {e}",
                settings.group_id
            ),
        }
    }

    /// One balancing round over `partitions` (see [`crate::leases`]).
    async fn balance(&self, partitions: &[i32]) -> Result<Balanced, DbError> {
        let count = partitions.len();
        let (membership, topic, partitions) = (
            self.membership.clone(),
            self.settings.topic.clone(),
            partitions.to_vec(),
        );
        let balanced = self
            .db
            .write(move |conn| {
                let b = membership.balance(conn, &topic, &partitions)?;
                Ok::<_, DbError>((b, Vec::new()))
            })
            .await?;
        self.status.balanced(&balanced);
        // The relay publishes the rows of the partitions held, under the same leases.
        let routing = self.db.routing();
        routing.set_partitions(i32::try_from(count).unwrap_or(i32::MAX));
        routing.hold(&balanced.holds);
        Ok(balanced)
    }

    fn group(&self) -> &str {
        &self.settings.group_id
    }

    /// Takes this instance's share of the partitions and assigns them, each at its stored
    /// position.
    async fn open(&self) -> Result<Session, String> {
        let probe = self.probe.clone();
        let topic = self.settings.topic.clone();
        let partitions = tokio::task::spawn_blocking(move || partitions_of(&probe, &topic))
            .await
            .map_err(|e| e.to_string())??;
        let balanced = self.balance(&partitions).await.map_err(|e| e.to_string())?;
        let topic = self.settings.topic.clone();
        // Read after the leases were taken: a former holder can no longer move them.
        let stored = self
            .db
            .read(move |conn| offsets::load(conn, &topic).map_err(DbError::from))
            .await
            .map_err(|e| e.to_string())?;
        let consumer = create_consumer(&self.settings).map_err(|e| e.to_string())?;
        let mut assignment = TopicPartitionList::new();
        let mut positions = BTreeMap::new();
        for &partition in &balanced.holds {
            let offset = match stored.get(&partition) {
                Some(next) => Offset::Offset(*next),
                None => Offset::Beginning,
            };
            assignment
                .add_partition_offset(&self.settings.topic, partition, offset)
                .map_err(|e| e.to_string())?;
            positions.insert(partition, stored.get(&partition).copied().unwrap_or(0));
        }
        consumer.assign(&assignment).map_err(|e| e.to_string())?;
        log::info!(
            "consumer {} ({}, {} instance(s)): reading {} from stored positions {positions:?}",
            self.group(),
            self.membership.me,
            balanced.members,
            self.settings.topic
        );
        self.status.assigned(&positions);
        Ok(Session {
            consumer,
            read: ReadSoFar {
                positions,
                unsaved: BTreeSet::new(),
            },
            partitions,
            holds: balanced.holds,
            balanced_at: Instant::now(),
            rebalance_soon: balanced.rebalance_soon,
            shown: BTreeMap::new(),
        })
    }

    async fn consume(
        &self,
        mut session: Session,
        display: Option<&PositionDisplay>,
        shutdown: &CancellationToken,
    ) -> Exit {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        loop {
            let first = tokio::select! {
                biased;
                _ = shutdown.cancelled() => break,
                _ = tick.tick() => {
                    self.save_positions(&mut session.read).await;
                    self.show_positions(&mut session, display);
                    if let Some(reason) = self.status.reopen_reason() {
                        return Exit::Reopen(reason);
                    }
                    let due = if session.rebalance_soon { Duration::ZERO } else { BALANCE_EVERY };
                    if session.balanced_at.elapsed() >= due
                        && self.rebalance(&mut session).await
                    {
                        return Exit::Rebalanced;
                    }
                    continue;
                }
                message = session.consumer.recv() => message,
            };
            let first = match first {
                Ok(message) => message,
                Err(e) => {
                    log::warn!("consumer {}: {e}", self.group());
                    self.status.error(e.to_string());
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    continue;
                }
            };
            // Whatever else the last fetch brought is applied with it, in one transaction.
            let mut messages = vec![first];
            while messages.len() < MAX_BATCH {
                match session.consumer.recv().now_or_never() {
                    Some(Ok(message)) => messages.push(message),
                    Some(Err(e)) => {
                        log::warn!("consumer {}: {e}", self.group());
                        self.status.error(e.to_string());
                        break;
                    }
                    None => break,
                }
            }
            self.status.metrics.batch.observe(messages.len() as f64);
            match self
                .handle_batch(&messages, &mut session.read, shutdown)
                .await
            {
                Outcome::Interrupted => break,
                Outcome::LeaseLost => {
                    log::warn!(
                        "consumer {}: another instance took a partition; rebalancing",
                        self.group()
                    );
                    return Exit::Rebalanced;
                }
                Outcome::Stored | Outcome::Skipped => {}
            }
        }
        self.save_positions(&mut session.read).await;
        self.show_positions(&mut session, display);
        Exit::Stopped
    }

    /// Commits the positions of the partitions this instance holds to the broker, under the
    /// service's group id, so `kafka-consumer-groups --describe` shows where the service stands
    /// and its lag. For display only: the consumer never reads them back; the positions in the
    /// database, fenced by the leases, stay the truth. Kafka accepts commits from a group with
    /// no active members, which is what assigning (not subscribing) makes it.
    fn show_positions(&self, session: &mut Session, display: Option<&PositionDisplay>) {
        let Some(display) = display else {
            return;
        };
        let held: BTreeMap<i32, i64> = session
            .read
            .positions
            .iter()
            .filter(|(p, _)| session.holds.contains(p))
            .map(|(p, next)| (*p, *next))
            .collect();
        if held == session.shown {
            return;
        }
        let mut list = TopicPartitionList::new();
        for (partition, next) in &held {
            if list
                .add_partition_offset(&self.settings.topic, *partition, Offset::Offset(*next))
                .is_err()
            {
                return;
            }
        }
        if display.commit(&list) {
            session.shown = held;
        }
    }

    /// Renews the leases; true when the partitions held changed (positions saved first).
    async fn rebalance(&self, session: &mut Session) -> bool {
        let partitions: Vec<i32> = match self.status.state().topic_partitions {
            Some(n) => (0..n as i32).collect(),
            None => session.partitions.clone(),
        };
        match self.balance(&partitions).await {
            Ok(balanced) => {
                session.balanced_at = Instant::now();
                session.rebalance_soon = balanced.rebalance_soon;
                session.partitions = partitions;
                if balanced.holds == session.holds {
                    return false;
                }
                self.save_positions(&mut session.read).await;
                log::info!(
                    "consumer {}: partitions {:?} -> {:?} ({} instance(s))",
                    self.group(),
                    session.holds,
                    balanced.holds,
                    balanced.members
                );
                true
            }
            Err(e) => {
                log::warn!("consumer {}: cannot renew its leases: {e}", self.group());
                self.status.error(e.to_string());
                false
            }
        }
    }

    /// Handles messages in order: runs of decodable ones commit together
    /// ([`EventConsumer::apply_run`]); an undecodable one, or a run whose transaction fails,
    /// goes through [`EventConsumer::handle`] one message at a time (retries, parking).
    async fn handle_batch(
        &self,
        messages: &[BorrowedMessage<'_>],
        read: &mut ReadSoFar,
        shutdown: &CancellationToken,
    ) -> Outcome {
        let mut rest = messages;
        while !rest.is_empty() {
            let decoded: Vec<Option<Envelope>> = rest
                .iter()
                .map_while(|m| match events::decode(m.payload().unwrap_or_default()) {
                    Ok(Decoded::Known(event)) => match self.screen(m, &event) {
                        Screen::Apply => Some(Some(*event)),
                        Screen::Skip => Some(None),
                        Screen::ParkForTest => None,
                    },
                    Ok(Decoded::Unknown { .. }) => Some(None),
                    Err(_) => None,
                })
                .collect();
            let (run, after) = rest.split_at(decoded.len().max(1));
            rest = after;
            if !decoded.is_empty() && self.apply_run(run, decoded, read).await {
                continue;
            }
            for message in run {
                let at = consumed_at(message, &self.membership.me);
                match self.handle(message, &at, shutdown).await {
                    Outcome::Stored => {
                        read.unsaved.remove(&at.partition);
                    }
                    Outcome::Skipped => {
                        read.unsaved.insert(at.partition);
                    }
                    Outcome::Interrupted => return Outcome::Interrupted,
                    Outcome::LeaseLost => return Outcome::LeaseLost,
                }
                read.positions.insert(at.partition, at.next_offset);
                self.status.progressed(at.partition, at.next_offset);
            }
        }
        Outcome::Stored
    }

    /// Applies a run of decoded messages (`None`: not for this service) and stores the
    /// position after each partition's last one, all in one transaction. False when the
    /// transaction failed: nothing of it committed, and the caller handles the messages
    /// one by one.
    async fn apply_run(
        &self,
        run: &[BorrowedMessage<'_>],
        decoded: Vec<Option<Envelope>>,
        read: &mut ReadSoFar,
    ) -> bool {
        let mut last: BTreeMap<i32, ConsumedAt> = BTreeMap::new();
        for message in run {
            let at = consumed_at(message, &self.membership.me);
            last.insert(at.partition, at);
        }
        let wanted: Vec<(Envelope, String)> = run
            .iter()
            .zip(decoded)
            .filter_map(|(message, event)| {
                let event = event?;
                let what = describe_event(&event, &consumed_at(message, &self.membership.me));
                Some((event, what))
            })
            .collect();
        let skipped = run.len() - wanted.len();
        if wanted.is_empty() {
            // Nothing to apply: the positions go with the next commit or the next tick.
            for (partition, at) in last {
                read.unsaved.insert(partition);
                read.positions.insert(partition, at.next_offset);
                self.status.progressed(partition, at.next_offset);
            }
            self.status.count_many(Counted::Skipped, skipped);
            return true;
        }
        let reactor = self.reactor.clone();
        let positions: Vec<ConsumedAt> = last.values().cloned().collect();
        let result = self
            .db
            .write(move |conn| {
                let (events, whats): (Vec<Envelope>, Vec<String>) = wanted.into_iter().unzip();
                let mut outcomes = Vec::with_capacity(events.len());
                let mut caused = Vec::new();
                // The positions, and their leases' fence, first: the locks of what the batch
                // decides on (a product's stock, which instances take turns on) are then held
                // three round trips less before the commit.
                offsets::store_all(conn, &positions)?;
                let applied = inbox::apply_all_in(conn, &*reactor, &events)?;
                for ((applied, events), what) in applied.into_iter().zip(whats) {
                    outcomes.push((applied, what));
                    caused.extend(events);
                }
                Ok::<_, ReactError>((outcomes, caused))
            })
            .await;
        let outcomes = match result {
            Ok(outcomes) => outcomes,
            Err(e) => {
                log::debug!(
                    "consumer {}: a batch of {} failed ({e}); applying its events one by one",
                    self.group(),
                    run.len()
                );
                return false;
            }
        };
        for (applied, what) in outcomes {
            match applied {
                Applied::Done(caused) => {
                    log::debug!("applied {what} -> {caused} event(s)");
                    self.status.count(Counted::Applied);
                }
                Applied::Duplicate => {
                    log::info!("ignored redelivered {what}");
                    self.status.count(Counted::Duplicate);
                }
            }
        }
        self.status.count_many(Counted::Skipped, skipped);
        for (partition, at) in last {
            read.unsaved.remove(&partition);
            read.positions.insert(partition, at.next_offset);
            self.status.progressed(partition, at.next_offset);
        }
        true
    }

    /// Stores the positions that moved past skipped messages only.
    async fn save_positions(&self, read: &mut ReadSoFar) {
        if read.unsaved.is_empty() {
            return;
        }
        let moved: Vec<ConsumedAt> = read
            .unsaved
            .iter()
            .map(|p| ConsumedAt {
                holder: self.membership.me.clone(),
                topic: self.settings.topic.clone(),
                partition: *p,
                next_offset: read.positions[p],
            })
            .collect();
        let saved = self
            .db
            .write(move |conn| {
                offsets::store_all(conn, &moved)?;
                Ok::<_, DbError>(((), Vec::new()))
            })
            .await;
        match saved {
            Ok(()) => read.unsaved.clear(),
            // Only skipped messages are behind them: at worst they are read again.
            Err(e) => log::warn!("consumer {}: cannot save positions: {e}", self.group()),
        }
    }

    async fn handle(
        &self,
        message: &BorrowedMessage<'_>,
        at: &ConsumedAt,
        shutdown: &CancellationToken,
    ) -> Outcome {
        let payload = message.payload().unwrap_or_default();
        let event = match events::decode(payload) {
            Ok(Decoded::Known(event)) => *event,
            Ok(Decoded::Unknown { event_type }) => {
                log::debug!(
                    "skipping unknown event type {event_type} at {}",
                    describe(at)
                );
                self.status.count(Counted::Skipped);
                return Outcome::Skipped;
            }
            Err(e) => {
                let letter =
                    DeadLetter::undecodable(self.parked_from(message), payload, e.to_string());
                return self.park(letter, at, None, shutdown).await;
            }
        };
        match self.screen(message, &event) {
            Screen::Apply => {}
            Screen::Skip => {
                self.status.count(Counted::Skipped);
                return Outcome::Skipped;
            }
            Screen::ParkForTest => {
                let letter = DeadLetter::rejected(
                    self.parked_from(message),
                    payload,
                    format!(
                        "{}: parked by the test hook {TEST_PARK_ENV} (test only)",
                        describe_event(&event, at)
                    ),
                );
                return self.park(letter, at, Some(&event), shutdown).await;
            }
        }
        let what = describe_event(&event, at);
        let mut attempt = 0u32;
        loop {
            let result = inbox::apply_once_at(
                &self.db,
                self.reactor.clone(),
                event.clone(),
                Some(at.clone()),
            )
            .await;
            let reason = match result {
                Ok(Applied::Done(caused)) => {
                    log::debug!("applied {what} -> {caused} event(s)");
                    self.status.count(Counted::Applied);
                    return Outcome::Stored;
                }
                Ok(Applied::Duplicate) => {
                    log::info!("ignored redelivered {what}");
                    self.status.count(Counted::Duplicate);
                    return Outcome::Stored;
                }
                Err(ReactError::Db(DbError::NotHolder(_))) => return Outcome::LeaseLost,
                Err(e) if e.is_transient() => e,
                Err(ReactError::Db(DbError::Task(panic))) => {
                    let letter = DeadLetter::handler_panicked(
                        self.parked_from(message),
                        payload,
                        format!("{what}: the handler failed: {panic}"),
                    );
                    return self.park(letter, at, Some(&event), shutdown).await;
                }
                Err(e) => {
                    let letter = DeadLetter::rejected(
                        self.parked_from(message),
                        payload,
                        format!("{what} cannot be applied: {e}"),
                    );
                    return self.park(letter, at, Some(&event), shutdown).await;
                }
            };
            attempt += 1;
            if attempt <= 3 || attempt.is_multiple_of(20) {
                log::warn!("{what} failed (attempt {attempt}), retrying: {reason}");
            }
            self.status
                .retrying(what.clone(), reason.to_string(), attempt);
            if !self.pause(attempt, shutdown).await {
                return Outcome::Interrupted;
            }
        }
    }

    /// Parks a message: dead letter, local record, position and (for a saga event) its
    /// `EventParked` in one transaction. Retried until it commits, whatever the failure: a
    /// message is never skipped unrecorded. A failure that is not the environment's (a
    /// constraint, a broken table) keeps the consumer on this message, and `/health` names
    /// it (503 once it lasts `KAFKA_SESSION_TIMEOUT_MS`) until someone fixes the database.
    async fn park(
        &self,
        letter: DeadLetter,
        at: &ConsumedAt,
        event: Option<&Envelope>,
        shutdown: &CancellationToken,
    ) -> Outcome {
        log::error!(
            "consumer {}: parking {} on {}.DLT: {}",
            self.group(),
            describe(at),
            self.settings.topic,
            letter.reason
        );
        let dead_letter_topic = self.settings.dead_letter_topic();
        let mut attempt = 0u32;
        loop {
            let (letter, topic, position) = (letter.clone(), dead_letter_topic.clone(), at.clone());
            let event = event.cloned();
            let parked = self
                .db
                .write(move |conn| {
                    let note = parking::park(conn, &letter, &topic, &position, event.as_ref())?;
                    Ok::<_, DbError>(((), note.into_iter().collect()))
                })
                .await;
            let e = match parked {
                Ok(()) => {
                    self.db.wake_relay();
                    self.status.count(Counted::Parked);
                    return Outcome::Stored;
                }
                Err(DbError::NotHolder(_)) => return Outcome::LeaseLost,
                Err(e) => e,
            };
            attempt += 1;
            if !e.is_transient() && (attempt <= 3 || attempt.is_multiple_of(20)) {
                log::error!(
                    "consumer {}: cannot record the parking of {} (attempt {attempt}): {e}; \
                     the partition waits until it can",
                    self.group(),
                    describe(at)
                );
            }
            self.status
                .retrying(format!("parking {}", describe(at)), e.to_string(), attempt);
            if !self.pause(attempt, shutdown).await {
                return Outcome::Interrupted;
            }
        }
    }

    /// Backs off before a retry; false when shutdown came first.
    async fn pause(&self, attempt: u32, shutdown: &CancellationToken) -> bool {
        let backoff = Duration::from_millis(50 * u64::from(attempt.min(40)));
        tokio::select! {
            _ = tokio::time::sleep(backoff) => true,
            _ = shutdown.cancelled() => false,
        }
    }

    fn parked_from(&self, message: &BorrowedMessage<'_>) -> ParkedFrom {
        ParkedFrom {
            consumer_group: self.settings.group_id.clone(),
            topic: message.topic().to_owned(),
            partition: message.partition(),
            offset: message.offset(),
            key: message
                .key()
                .map(|k| String::from_utf8_lossy(k).into_owned()),
        }
    }
}

/// The event types named in the test hook's variable ([`TEST_PARK_ENV`]).
fn test_park_types(value: Option<&str>) -> BTreeSet<String> {
    let types: BTreeSet<String> = value
        .unwrap_or_default()
        .split(',')
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .map(str::to_owned)
        .collect();
    if !types.is_empty() {
        log::warn!("{TEST_PARK_ENV} is set (TEST ONLY): parking every {types:?} on arrival");
    }
    types
}

/// The value of the message's header `name`, if it has one (lossy UTF-8).
fn header(message: &BorrowedMessage<'_>, name: &str) -> Option<String> {
    use rdkafka::message::Headers;
    let headers = message.headers()?;
    headers
        .iter()
        .find(|h| h.key == name)
        .and_then(|h| h.value)
        .map(|v| String::from_utf8_lossy(v).into_owned())
}

/// How long a start-up read of the topic is retried: right after a partition leader moved, a
/// broker can take seconds to serve the partitions' ends.
pub const START_READ_RETRY: Duration = Duration::from_secs(30);

/// Runs the blocking `read` on a blocking thread until it succeeds or [`START_READ_RETRY`]
/// has passed (then its last error); `what` names it in the log line of each retry.
pub async fn read_retrying<T, F>(what: &str, read: F) -> Result<T, String>
where
    T: Send + 'static,
    F: Fn() -> Result<T, String> + Clone + Send + 'static,
{
    let started = Instant::now();
    loop {
        let attempt = read.clone();
        let result = tokio::task::spawn_blocking(attempt)
            .await
            .map_err(|e| e.to_string())
            .and_then(|r| r);
        match result {
            Ok(value) => return Ok(value),
            Err(reason) if started.elapsed() > START_READ_RETRY => return Err(reason),
            Err(reason) => {
                log::info!("{what}: {reason}; retrying");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
    }
}

/// The partition ids of `topic`; an error when it has none (yet).
pub fn partitions_of(probe: &BaseConsumer, topic: &str) -> Result<Vec<i32>, String> {
    let metadata = probe
        .fetch_metadata(Some(topic), Duration::from_secs(5))
        .map_err(|e| format!("metadata of {topic}: {e}"))?;
    let partitions: Vec<i32> = metadata
        .topics()
        .iter()
        .filter(|t| t.name() == topic && t.error().is_none())
        .flat_map(|t| t.partitions().iter().map(|p| p.id()))
        .collect();
    if partitions.is_empty() {
        return Err(format!("topic {topic} has no partitions (yet)"));
    }
    Ok(partitions)
}

/// The low and high watermark of each partition: two ListOffsets requests for all
/// partitions together (earliest, latest), not two per partition — on tansu every request
/// costs broker CPU, and this runs every two seconds in every service.
pub fn watermarks(
    probe: &BaseConsumer,
    topic: &str,
    partitions: &[i32],
) -> Result<BTreeMap<i32, (i64, i64)>, String> {
    // As timestamps, Beginning (-2) asks for the earliest offset, End (-1) for the next to be
    // written.
    let query = |timestamp: Offset| -> Result<BTreeMap<i32, i64>, String> {
        let mut asked = TopicPartitionList::new();
        for p in partitions {
            asked
                .add_partition_offset(topic, *p, timestamp)
                .map_err(|e| e.to_string())?;
        }
        let answer = probe
            .offsets_for_times(asked, Duration::from_secs(2))
            .map_err(|e| format!("offsets of {topic}: {e}"))?;
        answer
            .elements_for_topic(topic)
            .iter()
            .map(|e| match (e.error(), e.offset()) {
                (Ok(()), Offset::Offset(offset)) => Ok((e.partition(), offset)),
                (Err(err), _) => Err(format!("offsets of {topic}[{}]: {err}", e.partition())),
                (Ok(()), other) => Err(format!(
                    "offsets of {topic}[{}]: no offset ({other:?})",
                    e.partition()
                )),
            })
            .collect()
    };
    let low = query(Offset::Beginning)?;
    let high = query(Offset::End)?;
    Ok(low
        .into_iter()
        .filter_map(|(p, low)| high.get(&p).map(|high| (p, (low, *high))))
        .collect())
}

/// Every two seconds: the topic's partitions and high watermarks, for `/health` and the
/// watchdog.
async fn monitor(probe: Arc<BaseConsumer>, topic: String, status: Arc<ConsumerStatus>) {
    loop {
        tokio::time::sleep(Duration::from_secs(2)).await;
        let (probe, t) = (probe.clone(), topic.clone());
        let observed = tokio::task::spawn_blocking(move || {
            let partitions = partitions_of(&probe, &t)?;
            let marks = watermarks(&probe, &t, &partitions)?;
            Ok::<_, String>((partitions.len(), marks))
        })
        .await;
        match observed {
            Ok(Ok((count, marks))) => status.observed(count, &marks),
            Ok(Err(e)) => log::debug!("consumer monitor: {e}"),
            Err(e) => log::debug!("consumer monitor: {e}"),
        }
    }
}

/// Where a message was, as the position after it.
fn consumed_at(message: &BorrowedMessage<'_>, holder: &str) -> ConsumedAt {
    ConsumedAt {
        holder: holder.to_owned(),
        topic: message.topic().to_owned(),
        partition: message.partition(),
        next_offset: message.offset() + 1,
    }
}

/// An event as log lines name it: type, id, order (correlation id) and position.
fn describe_event(event: &Envelope, at: &ConsumedAt) -> String {
    format!(
        "{} {} (order {}) at {}",
        event.event_type(),
        event.event_id,
        event.correlation_id.as_deref().unwrap_or("-"),
        describe(at)
    )
}

fn describe(at: &ConsumedAt) -> String {
    format!("{}[{}]@{}", at.topic, at.partition, at.next_offset - 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn read_through_is_the_newest_end_every_partition_has_reached() {
        let s = status();
        let t = |secs| DateTime::<Utc>::from_timestamp(secs, 0).expect("time");
        let positions = |a, b| BTreeMap::from([(0, a), (1, b)]);
        assert_eq!(s.read_through(&positions(0, 0)), None, "nothing seen yet");
        s.observed_at(t(10), 2, &BTreeMap::from([(0, (0, 5)), (1, (0, 3))]));
        s.observed_at(t(12), 2, &BTreeMap::from([(0, (0, 9)), (1, (0, 3))]));
        // A sample missing a partition says nothing about it: not kept.
        s.observed_at(t(13), 2, &BTreeMap::from([(0, (0, 9))]));
        assert_eq!(
            s.read_through(&positions(4, 3)),
            None,
            "behind on partition 0"
        );
        assert_eq!(
            s.read_through(&positions(5, 2)),
            None,
            "behind on partition 1"
        );
        assert_eq!(s.read_through(&positions(5, 3)), Some(t(10)));
        assert_eq!(s.read_through(&positions(9, 3)), Some(t(12)));
        // Positions never go back, so the older sample is gone for good.
        assert_eq!(s.read_through(&positions(5, 3)), None);
    }

    fn status() -> ConsumerStatus {
        ConsumerStatus::new("products", Duration::from_millis(50), &Metrics::new())
    }

    fn balanced(orphaned: Vec<i32>) -> Balanced {
        Balanced {
            holds: BTreeSet::new(),
            orphaned,
            members: 2,
            rebalance_soon: false,
        }
    }

    #[test]
    fn leases_not_renewed_or_partitions_nobody_reads_are_problems_holding_none_is_not() {
        let s = status();
        assert_eq!(s.problem(), None);
        std::thread::sleep(Duration::from_millis(60));
        assert!(s.problem().unwrap().contains("could not renew"));
        s.balanced(&balanced(vec![]));
        assert_eq!(s.problem(), None, "the other instance holds them all");
        s.balanced(&balanced(vec![2]));
        assert_eq!(s.problem(), None, "just orphaned");
        std::thread::sleep(Duration::from_millis(60));
        s.balanced(&balanced(vec![2]));
        let problem = s.problem().unwrap();
        assert!(problem.contains("[2] held by no instance"), "{problem}");
        s.balanced(&balanced(vec![]));
        assert_eq!(s.problem(), None);
    }

    #[test]
    fn waiting_events_without_progress_are_a_problem_and_reopen_the_consumer() {
        let s = status();
        s.assigned(&BTreeMap::from([(0, 5), (1, 0)]));
        s.observed(2, &BTreeMap::from([(0, (0, 9)), (1, (0, 0))]));
        assert_eq!(s.problem(), None, "just fell behind");
        std::thread::sleep(Duration::from_millis(60));
        s.balanced(&balanced(vec![]));
        let problem = s.problem().unwrap();
        assert!(
            problem.contains("4 events waiting on partitions [0]"),
            "{problem}"
        );
        assert!(s.reopen_reason().is_some());
        s.reopened("test".into());
        assert!(s.reopen_reason().is_none(), "at most once per timeout");
        s.progressed(0, 9);
        assert_eq!(s.problem(), None, "caught up");
    }

    #[test]
    fn an_event_retried_too_long_is_a_problem_but_not_a_reason_to_reopen() {
        let s = status();
        s.assigned(&BTreeMap::from([(0, 0)]));
        s.observed(1, &BTreeMap::from([(0, (0, 3))]));
        s.retrying("OrderPlaced x".into(), "disk I/O error".into(), 1);
        std::thread::sleep(Duration::from_millis(60));
        s.retrying("OrderPlaced x".into(), "disk I/O error".into(), 9);
        s.balanced(&balanced(vec![]));
        let problem = s.problem().unwrap();
        assert!(
            problem.contains("stuck") && problem.contains("disk I/O error"),
            "{problem}"
        );
        assert!(s.reopen_reason().is_none());
    }

    #[test]
    fn health_and_metrics_show_the_same_counts_positions_and_lags() {
        let metrics = Metrics::new();
        let s = ConsumerStatus::new("orders", Duration::from_secs(10), &metrics);
        s.assigned(&BTreeMap::from([(0, 5), (1, 0)]));
        s.observed(2, &BTreeMap::from([(0, (0, 9)), (1, (0, 0))]));
        s.count(Counted::Applied);
        s.count(Counted::Applied);
        s.count(Counted::Duplicate);
        s.count(Counted::Parked);
        s.progressed(0, 6);
        s.retrying("OrderPlaced x".into(), "database is locked".into(), 1);
        s.reopened("test".into());
        let health = s.snapshot();
        assert_eq!(health["applied"], 2);
        assert_eq!(health["duplicatesIgnored"], 1);
        assert_eq!(health["parked"], 1);
        assert_eq!(health["reopened"], 1);
        assert_eq!(health["partitions"]["0"]["lag"], 3);
        let text = metrics.render();
        for line in [
            "mall_events_consumed_total{outcome=\"applied\"} 2",
            "mall_events_consumed_total{outcome=\"duplicate\"} 1",
            "mall_events_consumed_total{outcome=\"parked\"} 1",
            "mall_events_consumed_total{outcome=\"skipped\"} 0",
            "mall_event_retries_total 1",
            "mall_consumer_reopened_total 1",
            "mall_consumer_position{partition=\"0\"} 6",
            "mall_consumer_lag{partition=\"0\"} 3",
            "mall_consumer_lag{partition=\"1\"} 0",
        ] {
            assert!(text.lines().any(|l| l == line), "{line} not in\n{text}");
        }
        s.assigned(&BTreeMap::from([(1, 0)]));
        let text = metrics.render();
        assert!(
            !text.contains("partition=\"0\""),
            "a partition no longer held leaves the gauges: {text}"
        );
    }
}
