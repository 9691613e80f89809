//! One open-loop run against a running stack — load, topic reader and `/proc` samples side by
//! side — and how its figures are printed.

use super::floor::Probe;
use super::load::{self, Load, Outcome};
use super::procfs::{self, Memory};
use super::statements::{self, Statement};
use super::stats::Spread;
use super::watcher::{Times, Watcher};
use crate::stack::{SERVICES, TOPIC};
use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::time::{Duration, Instant};

/// A running stack as the bench sees it.
pub struct Rig {
    /// Bootstrap servers.
    pub brokers: String,
    /// The run directory, with the services' databases.
    pub dir: PathBuf,
    /// Name and pid of the broker, each service instance, the bench itself and (PostgreSQL)
    /// every postgres process, all named "postgres" and counted as one.
    pub processes: Vec<(String, u32)>,
    /// Each service's `DATABASE_URL`, where it is PostgreSQL.
    pub databases: HashMap<&'static str, String>,
    /// The services' `KAFKA_FETCH_WAIT_MAX_MS`, also used by the bench's consumers.
    pub fetch_wait_ms: u64,
    /// Where the orders go.
    pub target: load::Target,
    /// `getconf CLK_TCK`.
    pub ticks_per_second: f64,
}

/// What a run offers.
#[derive(Debug, Clone, Copy)]
pub struct Plan {
    /// Orders per second.
    pub rate: f64,
    /// How long orders are posted.
    pub duration: Duration,
    /// How long to wait afterwards for the last sagas to end.
    pub drain: Duration,
}

impl Plan {
    /// The warm-up excluded from the steady window: 20 % of the run or 5 s, whichever is
    /// larger, but at most half the run.
    pub fn warm_up(&self) -> Duration {
        (self.duration / 5)
            .max(Duration::from_secs(5))
            .min(self.duration / 2)
    }
}

/// The figures of one run.
pub struct Report {
    /// What was offered.
    pub plan: Plan,
    /// Every request.
    pub load: Load,
    /// Answers other than 201, by status.
    pub other_status: BTreeMap<u16, usize>,
    /// Requests with no answer.
    pub no_answer: usize,
    /// Orders created (201).
    pub created: usize,
    /// Of those, OrderCompleted.
    pub completed: usize,
    /// Of those, OrderCancelled.
    pub cancelled: usize,
    /// Created orders with no terminal event after the drain wait.
    pub unfinished: usize,
    /// From the end of the posting to the last terminal event (or the drain timeout).
    pub drained_in: Duration,
    /// Terminal events stamped inside the steady window.
    pub steady_sagas: usize,
    /// OrderPlaced → terminal, both stamped by orders, ms.
    pub saga: Spread,
    /// OrderPlaced stamped → produced by orders' relay (the Kafka timestamp), ms.
    pub to_relayed: Spread,
    /// OrderPlaced produced → products' answer stamped: broker, fetch, products' work, ms.
    pub relayed_to_stock: Spread,
    /// OrderPlaced → products' answer (first hop, stamped by products), ms.
    pub to_stock: Spread,
    /// OrderPlaced → DeliveryStarted (first hop, stamped by delivery), ms.
    pub to_delivery: Spread,
    /// The later of those two → terminal (second hop, stamped by orders), ms.
    pub to_terminal: Spread,
    /// POST sent (bench clock) → terminal stamped by orders, ms.
    pub post_to_terminal: Spread,
    /// The same for the POSTs sent in the steady window: without the start, when several
    /// instances are still sharing out their partitions, ms.
    pub post_to_terminal_steady: Spread,
    /// Round trip of the 201 answers, ms.
    pub round_trip: Spread,
    /// The broker floor's round trip measured during the steady window, alongside the load:
    /// what the broker alone makes of a hop at this load, ms.
    pub floor_under_load: Spread,
    /// CPU seconds per process over the steady window.
    pub cpu_secs: Vec<(String, f64)>,
    /// Memory per process at the end of the window.
    pub memory: Vec<(String, Memory)>,
    /// Database bytes (file + WAL) per service before and after.
    pub database: Vec<(&'static str, u64, u64)>,
    /// PostgreSQL: the statements the services' databases ran in the steady window, or why
    /// they could not be counted; `None` on SQLite.
    pub statements: Option<Result<Vec<Statement>, String>>,
}

impl Report {
    /// Length of the steady window, seconds.
    pub fn steady_secs(&self) -> f64 {
        (self.plan.duration - self.plan.warm_up()).as_secs_f64()
    }

    /// Sagas ended per second in the steady window.
    pub fn throughput(&self) -> f64 {
        self.steady_sagas as f64 / self.steady_secs()
    }

    /// True when the rate was held: p99 POST → terminal under 1 s, at least 97 % of the
    /// offered rate completed in the steady window, and at most 1 % left unfinished.
    pub fn sustained(&self) -> bool {
        self.post_to_terminal.p99 < 1000.0
            && self.throughput() >= 0.97 * self.plan.rate
            && self.unfinished * 100 <= self.load.posts.len()
    }
}

/// Runs `plan` against the rig and collects its figures.
pub async fn open_loop(rig: &Rig, plan: Plan) -> Result<Report, String> {
    let database_before = database_sizes(rig);
    let watcher = {
        let (brokers, wait) = (rig.brokers.clone(), rig.fetch_wait_ms);
        tokio::task::spawn_blocking(move || Watcher::start(&brokers, TOPIC, wait))
            .await
            .map_err(|e| e.to_string())??
    };
    let probe = Probe::start(&rig.brokers, rig.fetch_wait_ms).await?;
    let started = Instant::now();
    let (load, (cpu_secs, memory, statements), floor_under_load) = tokio::join!(
        load::open_loop(&rig.target, plan.rate, plan.duration),
        sample_steady_window(rig, plan),
        probe.round_trips_between(started + plan.warm_up(), started + plan.duration)
    );
    let ids: Vec<i64> = load.posts.iter().filter_map(created_id).collect();
    let drained_in = drain(&watcher, &ids, plan.drain).await;
    let times = watcher.times_of(&ids);
    watcher.stop();
    let database = SERVICES
        .iter()
        .zip(database_before)
        .map(|(s, before)| (*s, before, database_bytes(rig, s)))
        .collect();
    Ok(summarise(
        plan,
        load,
        &ids,
        &times,
        drained_in,
        floor_under_load?,
        cpu_secs,
        memory,
        database,
        statements,
    ))
}

fn created_id(post: &load::Post) -> Option<i64> {
    match post.outcome {
        Outcome::Created(id) => Some(id),
        _ => None,
    }
}

fn database_sizes(rig: &Rig) -> Vec<u64> {
    SERVICES.iter().map(|s| database_bytes(rig, s)).collect()
}

/// Bytes of a service's database (file or PostgreSQL database).
pub fn database_bytes(rig: &Rig, service: &str) -> u64 {
    procfs::database_size(
        &rig.dir,
        service,
        rig.databases.get(service).map(String::as_str),
    )
}

/// Entries of one name (the postgres processes) summed into one; memory: the largest.
fn merged<T: Clone>(entries: Vec<(String, T)>, add: impl Fn(&T, &T) -> T) -> Vec<(String, T)> {
    let mut out: Vec<(String, T)> = Vec::new();
    for (name, value) in entries {
        match out.iter_mut().find(|(n, _)| *n == name) {
            Some((_, total)) => *total = add(total, &value),
            None => out.push((name, value)),
        }
    }
    out
}

/// What the steady window measures.
type Window = (
    Vec<(String, f64)>,
    Vec<(String, Memory)>,
    Option<Result<Vec<Statement>, String>>,
);

/// CPU ticks at the start and the end of the steady window → seconds per process; memory at
/// the end; on PostgreSQL the statements counted in between.
async fn sample_steady_window(rig: &Rig, plan: Plan) -> Window {
    let start = tokio::time::Instant::now();
    tokio::time::sleep_until(start + plan.warm_up()).await;
    let server = rig.databases.values().next().cloned();
    let names: Vec<String> = rig
        .databases
        .values()
        .map(|url| statements::database_name(url))
        .collect();
    let counting = match &server {
        Some(url) => Some(
            blocking({
                let url = url.clone();
                move || statements::reset(&url)
            })
            .await,
        ),
        None => None,
    };
    let first = procfs::cpu_sample(&rig.processes);
    tokio::time::sleep_until(start + plan.duration).await;
    let last = procfs::cpu_sample(&rig.processes);
    let statements = match (counting, server) {
        (Some(Ok(())), Some(url)) => Some(blocking(move || statements::read(&url, &names)).await),
        (Some(Err(e)), _) => Some(Err(e)),
        _ => None,
    };
    let memory = rig
        .processes
        .iter()
        .map(|(name, pid)| (name.clone(), procfs::memory(*pid)))
        .collect();
    let larger = |a: &Memory, b: &Memory| {
        if b.rss_kb > a.rss_kb { *b } else { *a }
    };
    (
        cpu_seconds(rig, &first, &last),
        merged(memory, larger),
        statements,
    )
}

/// Runs blocking database work off the runtime's threads.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, String> + Send + 'static,
) -> Result<T, String> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| e.to_string())?
}

/// CPU seconds per process between two samples (NaN for a process that went away).
pub fn cpu_seconds(rig: &Rig, first: &[Option<u64>], last: &[Option<u64>]) -> Vec<(String, f64)> {
    let each = rig
        .processes
        .iter()
        .zip(first.iter().zip(last))
        .map(|((name, _), pair)| {
            let secs = match pair {
                (Some(a), Some(b)) => b.saturating_sub(*a) as f64 / rig.ticks_per_second,
                _ => f64::NAN,
            };
            (name.clone(), secs)
        })
        .collect();
    // A postgres backend that exits meanwhile is NaN: left out of the sum.
    merged(each, |a, b| {
        if b.is_nan() {
            *a
        } else if a.is_nan() {
            *b
        } else {
            a + b
        }
    })
}

/// Waits until every order has a terminal event or `timeout` passes; returns how long it
/// waited.
async fn drain(watcher: &Watcher, ids: &[i64], timeout: Duration) -> Duration {
    let started = Instant::now();
    while watcher.terminal_count(ids) < ids.len() && started.elapsed() < timeout {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    started.elapsed()
}

#[allow(clippy::too_many_arguments)] // one call site; a struct would only rename them
fn summarise(
    plan: Plan,
    load: Load,
    ids: &[i64],
    times: &[Times],
    drained_in: Duration,
    floor_under_load: Spread,
    cpu_secs: Vec<(String, f64)>,
    memory: Vec<(String, Memory)>,
    database: Vec<(&'static str, u64, u64)>,
    statements: Option<Result<Vec<Statement>, String>>,
) -> Report {
    // One figure per saga that has both ends of the interval.
    let between = |interval: fn(&Times) -> Option<i64>| {
        Spread::of(
            times
                .iter()
                .filter_map(|t| interval(t).map(|ms| ms as f64))
                .collect(),
        )
    };
    let mut other_status = BTreeMap::new();
    for post in &load.posts {
        if let Outcome::Status(status) = post.outcome {
            *other_status.entry(status).or_insert(0) += 1;
        }
    }
    let sent: HashMap<i64, f64> = load
        .posts
        .iter()
        .filter_map(|p| created_id(p).map(|id| (id, p.sent_ms)))
        .collect();
    let steady_from = load.started_ms + plan.warm_up().as_secs_f64() * 1000.0;
    let steady_to = load.started_ms + plan.duration.as_secs_f64() * 1000.0;
    let terminal_at = |t: &Times| t.terminal_ms.map(|ms| ms as f64);
    Report {
        plan,
        other_status,
        no_answer: load
            .posts
            .iter()
            .filter(|p| p.outcome == Outcome::Failed)
            .count(),
        created: ids.len(),
        completed: times
            .iter()
            .filter(|t| t.terminal_ms.is_some() && !t.cancelled)
            .count(),
        cancelled: times.iter().filter(|t| t.cancelled).count(),
        unfinished: times.iter().filter(|t| t.terminal_ms.is_none()).count(),
        drained_in,
        steady_sagas: times
            .iter()
            .filter_map(terminal_at)
            .filter(|ms| (steady_from..steady_to).contains(ms))
            .count(),
        saga: between(|t| Some(t.terminal_ms? - t.placed_ms?)),
        to_relayed: between(|t| Some(t.placed_sent_ms? - t.placed_ms?)),
        relayed_to_stock: between(|t| Some(t.stock_ms? - t.placed_sent_ms?)),
        to_stock: between(|t| Some(t.stock_ms? - t.placed_ms?)),
        to_delivery: between(|t| Some(t.delivery_ms? - t.placed_ms?)),
        // Completed sagas only: a cancelled one may end before both answers.
        to_terminal: between(|t| {
            (!t.cancelled).then_some(())?;
            Some(t.terminal_ms? - t.stock_ms?.max(t.delivery_ms?))
        }),
        post_to_terminal: Spread::of(
            ids.iter()
                .zip(times)
                .filter_map(|(id, t)| Some(terminal_at(t)? - sent.get(id)?))
                .collect(),
        ),
        post_to_terminal_steady: Spread::of(
            ids.iter()
                .zip(times)
                .filter_map(|(id, t)| {
                    let sent = *sent.get(id)?;
                    (steady_from..steady_to)
                        .contains(&sent)
                        .then_some(terminal_at(t)? - sent)
                })
                .collect(),
        ),
        round_trip: Spread::of(
            load.posts
                .iter()
                .filter(|p| matches!(p.outcome, Outcome::Created(_)))
                .map(|p| p.round_trip_ms)
                .collect(),
        ),
        floor_under_load,
        cpu_secs,
        memory,
        database,
        statements,
        load,
    }
}

/// Prints every figure of a run as aligned tables.
pub fn print_report(r: &Report) {
    let p = r.plan;
    let warm = p.warm_up().as_secs_f64();
    println!();
    println!(
        "open loop: {:.0} orders/s for {:.0} s (warm-up {warm:.0} s excluded; steady window {warm:.0}–{:.0} s)",
        p.rate,
        p.duration.as_secs_f64(),
        p.duration.as_secs_f64()
    );
    let other: usize = r.other_status.values().sum();
    println!(
        "  orders     offered {}   201: {}   non-201: {other} {:?}   no answer: {}   waited for in-flight cap ({}): {}   sent >10 ms late: {}",
        r.load.posts.len(),
        r.created,
        r.other_status,
        r.no_answer,
        load::MAX_IN_FLIGHT,
        r.load.cap_hits,
        r.load.late_sends
    );
    println!(
        "  sagas      completed {}   cancelled {}   not ended after drain: {}   all ended: {}   (drain wait {:.1} s)",
        r.completed,
        r.cancelled,
        r.unfinished,
        if r.unfinished == 0 { "yes" } else { "NO" },
        r.drained_in.as_secs_f64()
    );
    println!(
        "  steady     {:.1} sagas/s ended in the steady window ({} in {:.0} s; {:.1} % of offered)",
        r.throughput(),
        r.steady_sagas,
        r.steady_secs(),
        100.0 * r.throughput() / p.rate
    );
    print_latency(r);
    print_resources(r);
    print_statements(r);
}

/// How many of the top statements are listed.
const TOP_STATEMENTS: usize = 15;

fn print_statements(r: &Report) {
    let sagas = r.steady_sagas.max(1) as f64;
    let listed = match &r.statements {
        None => return,
        Some(Err(e)) => {
            println!("  statements per saga: not counted: {e}");
            return;
        }
        Some(Ok(listed)) => listed,
    };
    let calls: i64 = listed.iter().map(|s| s.calls).sum();
    let mut per_database: BTreeMap<&str, i64> = BTreeMap::new();
    for s in listed {
        *per_database.entry(s.database.as_str()).or_default() += s.calls;
    }
    let postgres_cpu = r
        .cpu_secs
        .iter()
        .find(|(name, _)| name == "postgres")
        .map_or(f64::NAN, |(_, secs)| secs * 1000.0 / sagas);
    println!(
        "  PostgreSQL  {:.1} statements per saga ({calls} in the steady window: {}); {postgres_cpu:.2} ms of server CPU per saga",
        calls as f64 / sagas,
        per_database
            .iter()
            .map(|(db, n)| format!("{db} {:.1}", *n as f64 / sagas))
            .collect::<Vec<_>>()
            .join(", ")
    );
    println!(
        "    {:>9} {:>9}  {:<18} statement (top {TOP_STATEMENTS} by calls)",
        "per saga", "exec ms", "database"
    );
    for s in listed.iter().take(TOP_STATEMENTS) {
        let text: String = s.query.split_whitespace().collect::<Vec<_>>().join(" ");
        let text: String = text.chars().take(110).collect();
        println!(
            "    {:>9.2} {:>9.0}  {:<18} {text}",
            s.calls as f64 / sagas,
            s.exec_ms,
            s.database
        );
    }
}

fn print_latency(r: &Report) {
    println!(
        "  {:<30} {:>7} {:>9} {:>9} {:>9} {:>9}",
        "latency (ms)", "n", "p50", "p90", "p99", "max"
    );
    for (name, s) in [
        ("OrderPlaced → terminal", r.saga),
        ("  hop 1: → products' answer", r.to_stock),
        ("    committed → produced", r.to_relayed),
        ("    produced → answered", r.relayed_to_stock),
        ("  hop 1: → DeliveryStarted", r.to_delivery),
        ("  hop 2: later of both → end", r.to_terminal),
        ("POST sent → terminal", r.post_to_terminal),
        ("  sent in the steady window", r.post_to_terminal_steady),
        ("POST round trip (201)", r.round_trip),
        ("broker floor, under this load", r.floor_under_load),
    ] {
        println!(
            "    {name:<28} {:>7} {:>9.1} {:>9.1} {:>9.1} {:>9.1}",
            s.n, s.p50, s.p90, s.p99, s.max
        );
    }
}

fn print_resources(r: &Report) {
    let steady = r.steady_secs();
    println!(
        "  {:<12} {:>17} {:>13} {:>11} {:>11} {:>14} {:>14} {:>21}",
        "process",
        "CPU s/1000 sagas",
        "CPU % (core)",
        "VmHWM MiB",
        "VmRSS MiB",
        "db before MiB",
        "db after MiB",
        "db bytes/1000 orders"
    );
    // The database columns count the file and its WAL, as they grew during the run.
    for ((name, cpu), (_, mem)) in r.cpu_secs.iter().zip(&r.memory) {
        let per_thousand = cpu * 1000.0 / r.steady_sagas.max(1) as f64;
        let db = r
            .database
            .iter()
            // Shared by a service's instances: shown once, on its first.
            .find(|(s, _, _)| s == name || name.strip_suffix("-1") == Some(*s))
            .map(|(_, before, after)| {
                let grown = *after as f64 - *before as f64;
                format!(
                    "{:>14.1} {:>14.1} {:>21.0}",
                    mib(*before),
                    mib(*after),
                    grown * 1000.0 / r.created.max(1) as f64
                )
            })
            .unwrap_or_default();
        println!(
            "    {name:<10} {per_thousand:>17.3} {:>13.1} {:>11.1} {:>11.1} {db}",
            100.0 * cpu / steady,
            mem.hwm_kb as f64 / 1024.0,
            mem.rss_kb as f64 / 1024.0
        );
    }
}

/// Bytes in MiB.
pub fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}
