//! `saga-bench`: how fast the saga is and what it costs, printed as figures — never asserted.
//! It starts its own stack (a fresh broker (Apache Kafka or tansu) and the three release binaries on free ports,
//! services logging at `warn`), like `chaos`, and measures:
//!
//! - the broker floor: sequential produce → consume round trips of one small message;
//! - open-loop runs: orders posted on a fixed schedule, each saga timed from its own events
//!   on the topic; steady-state throughput, latency percentiles, CPU per 1,000 sagas, memory
//!   and database growth;
//! - `--find-max`: rising rates until one is no longer held;
//! - `--fetch-wait-table`: saga latency and idle CPU for several `KAFKA_FETCH_WAIT_MAX_MS`;
//! - `--sync-table`: what fsyncing every SQLite commit costs (`SQLITE_SYNCHRONOUS` NORMAL vs FULL);
//! - `--compare-instances N` (PostgreSQL): the open loop on one instance per service, then on
//!   N, each on a fresh stack, optionally behind a delaying proxy (`--pg-delay MS`).
//!
//! Exits non-zero only when the stack cannot start or a measurement breaks.

use e2e::bench::delay::{self, DelayProxy};
use e2e::bench::floor::broker_floor;
use e2e::bench::run::{self, Plan, Report, Rig};
use e2e::bench::stats::Spread;
use e2e::bench::{load, preload, procfs};
use e2e::broker::BrokerKind;
use e2e::stack::{SERVICES, Stack, StackOptions, argument};
use e2e::{Check, Mall, eventually};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

const USAGE: &str = "\
usage: saga-bench [--rate R --duration S] [--find-max] [--fetch-wait-table] [--sync-table]
                  [--preload N] [--products N] [--keep]
                  [--fetch-wait MS] [--bin-dir DIR] (--kafka DIR | --tansu PATH)
                  [--postgres URL [--instances N | --compare-instances N] [--partitions P]
                   [--pg-delay MS]] [--broker-storage URL]

Starts its own broker and services (scripts/bench.sh builds them) and prints figures.
With no mode flag: broker floor, open loop at 300/s for 30 s and at 1000/s for 60 s, and the
fetch-wait table.

  --rate R --duration S  broker floor, then one open loop: R orders/s for S seconds (default 30)
  --find-max             broker floor, then rising rates from 50/s (20 s each) to the first not held
                         (p99 POST→terminal < 1 s, >= 97 % of the rate ended in steady state)
  --fetch-wait-table     for KAFKA_FETCH_WAIT_MAX_MS 10, 20, 50, 100, 500 (a fresh stack each): saga p50
                         at 50/s and idle CPU of the broker and the services
  --sync-table           for SQLITE_SYNCHRONOUS NORMAL and FULL (a fresh stack each): 300, 1000, 1500
                         and 3000 orders/s for 20 s each; sagas ended per second, p50, p99, CPU per saga
  --preload N            first fill the databases with N completed orders (not for the table)
  --products N           the orders buy N products in turn (default 1: every saga reserves the same
                         product, whose decisions then take turns across instances)
  --fetch-wait MS        the services' KAFKA_FETCH_WAIT_MAX_MS for the floor and the open loops
                         (default: $KAFKA_FETCH_WAIT_MAX_MS, else the services' default, 500)
  --keep                 keep the run directories (databases, logs)
  --bin-dir DIR          where orders, products, delivery are (default target/release)
  --kafka DIR            Apache Kafka's jars (scripts/bench.sh: .tools/kafka-<version>/libs)
  --tansu PATH           or the tansu broker's binary
  --postgres URL         the services on PostgreSQL (URL of a server's maintenance database;
                         fresh databases per run); the postgres processes' CPU is one line
  --instances N          N instances of each service (needs --postgres); orders go round-robin
  --partitions P         KAFKA_PARTITIONS for the services (which create the topic)
  --compare-instances N  with --rate: the open loop with 1 instance per service, then with N (a fresh
                         stack each), and both side by side (sagas/s, p99, CPU and statements per saga)
  --pg-delay MS          the services reach PostgreSQL through a proxy of the bench's that delays each
                         direction by MS ms (PostgreSQL on another host, without tc netem)
  --broker-storage URL   tansu's --storage-engine (default sqlite://tansu.db; memory://tansu/
                         keeps nothing across a broker restart: to measure the broker's share)";

/// Stock of the bench product: enough that no saga is refused.
const STOCK: i64 = 100_000_000;
/// Round trips of the broker floor.
const FLOOR_ROUND_TRIPS: usize = 200;
/// Rates of `--find-max`, orders/s.
const FIND_MAX_RATES: [f64; 14] = [
    50.0, 100.0, 200.0, 400.0, 600.0, 800.0, 1000.0, 1200.0, 1500.0, 2000.0, 2500.0, 3000.0,
    4000.0, 5000.0,
];
/// Fetch waits of the table, ms.
const TABLE_FETCH_WAITS: [u64; 5] = [10, 20, 50, 100, 500];

struct Options {
    bin_dir: PathBuf,
    broker: BrokerKind,
    rate: Option<f64>,
    duration: Option<f64>,
    find_max: bool,
    fetch_wait_table: bool,
    sync_table: bool,
    preload: u64,
    /// `--products N`: how many products the orders buy, in turn.
    products: usize,
    fetch_wait_ms: u64,
    keep: bool,
    stack: StackOptions,
    /// `--compare-instances N`: one instance per service, then N.
    compare_instances: Option<usize>,
    /// `--pg-delay MS`: each direction between the services and PostgreSQL delayed this long.
    pg_delay: Option<Duration>,
}

impl Options {
    /// No mode flag: everything, with the default rates.
    fn is_default(&self) -> bool {
        self.rate.is_none() && !self.find_max && !self.fetch_wait_table && !self.sync_table
    }
}

fn number<T: std::str::FromStr>(args: &[String], name: &str) -> Result<Option<T>, String> {
    argument(args, name)
        .map(|v| {
            v.to_string_lossy()
                .parse()
                .map_err(|_| format!("{name} needs a number"))
        })
        .transpose()
}

/// The path made absolute: the broker runs in the run directory, where a relative path
/// would not resolve.
fn absolute(path: PathBuf) -> Result<PathBuf, String> {
    std::path::absolute(&path).map_err(|e| format!("{}: {e}", path.display()))
}

/// Parses the command line; `Err("")` asks for the usage text alone.
fn parse(args: &[String]) -> Result<Options, String> {
    const VALUED: [&str; 15] = [
        "--products",
        "--compare-instances",
        "--pg-delay",
        "--postgres",
        "--broker-storage",
        "--instances",
        "--partitions",
        "--rate",
        "--duration",
        "--preload",
        "--fetch-wait",
        "--bin-dir",
        "--tansu",
        "--kafka",
        "--brokers",
    ];
    const FLAGS: [&str; 4] = ["--find-max", "--fetch-wait-table", "--sync-table", "--keep"];
    let mut i = 0;
    while i < args.len() {
        match args[i].as_str() {
            "-h" | "--help" => return Err(String::new()),
            a if VALUED.contains(&a) => i += 2,
            a if FLAGS.contains(&a) => i += 1,
            a => return Err(format!("unknown argument {a:?}")),
        }
    }
    let env_wait = std::env::var("KAFKA_FETCH_WAIT_MAX_MS")
        .ok()
        .and_then(|v| v.parse().ok());
    let o = Options {
        bin_dir: absolute(argument(args, "--bin-dir").unwrap_or_else(|| "target/release".into()))?,
        broker: BrokerKind::from_args(args)?,
        rate: number(args, "--rate")?,
        duration: number(args, "--duration")?,
        find_max: args.iter().any(|a| a == "--find-max"),
        fetch_wait_table: args.iter().any(|a| a == "--fetch-wait-table"),
        sync_table: args.iter().any(|a| a == "--sync-table"),
        preload: number(args, "--preload")?.unwrap_or(0),
        products: number(args, "--products")?.unwrap_or(1),
        fetch_wait_ms: number(args, "--fetch-wait")?
            .or(env_wait)
            .unwrap_or(kafka::settings::DEFAULT_FETCH_WAIT_MS),
        keep: args.iter().any(|a| a == "--keep"),
        stack: StackOptions::from_args(args)?,
        compare_instances: number(args, "--compare-instances")?,
        pg_delay: number::<f64>(args, "--pg-delay")?.map(|ms| Duration::from_secs_f64(ms / 1000.0)),
    };
    if (o.compare_instances.is_some() || o.pg_delay.is_some()) && o.stack.postgres.is_none() {
        return Err("--compare-instances and --pg-delay need --postgres".into());
    }
    if o.compare_instances.is_some() && o.rate.is_none() {
        return Err("--compare-instances goes with --rate".into());
    }
    if o.preload > 0 && o.stack.postgres.is_some() {
        return Err("--preload writes SQLite files; it does not go with --postgres".into());
    }
    if o.products == 0 {
        return Err("--products must be at least 1".into());
    }
    if o.duration.is_some() && o.rate.is_none() {
        return Err("--duration goes with --rate".into());
    }
    if o.rate.is_some_and(|r| r <= 0.0) || o.duration.is_some_and(|d| d <= 0.0) {
        return Err("--rate and --duration must be positive".into());
    }
    Ok(o)
}

/// A started stack, its run directory and the bench's view of it.
struct Session {
    stack: Stack,
    rig: Rig,
    /// The products the orders buy, in turn (the preload's history is of the first).
    products: Vec<i64>,
    dir: tempfile::TempDir,
    /// The delaying proxy to PostgreSQL (`--pg-delay`), for as long as the stack runs.
    _proxy: Option<DelayProxy>,
}

/// Every service logs at `warn` (logging must not dominate) with this fetch wait.
fn service_env(fetch_wait_ms: u64) -> Vec<(&'static str, String, String)> {
    SERVICES
        .iter()
        .flat_map(|s| {
            [
                (*s, "RUST_LOG".to_owned(), "warn".to_owned()),
                (
                    *s,
                    "KAFKA_FETCH_WAIT_MAX_MS".to_owned(),
                    fetch_wait_ms.to_string(),
                ),
                // Every request comes from 127.0.0.1, up to MAX_IN_FLIGHT at once (each its
                // own connection past saturation): the per-address cap must not be what the
                // bench measures.
                (
                    *s,
                    kafka::connections::SETTING.to_owned(),
                    (load::MAX_IN_FLIGHT + 64).to_string(),
                ),
            ]
        })
        .collect()
}

async fn start_session(o: &Options, fetch_wait_ms: u64) -> Result<Session, String> {
    start_session_with(o, fetch_wait_ms, o.stack.clone(), Vec::new()).await
}

/// [`start_session`] with other stack options and more variables for every service.
async fn start_session_with(
    o: &Options,
    fetch_wait_ms: u64,
    mut stack_options: StackOptions,
    extra_env: Vec<(&'static str, String)>,
) -> Result<Session, String> {
    let mut env = service_env(fetch_wait_ms);
    for service in SERVICES {
        for (name, value) in &extra_env {
            env.push((service, (*name).to_owned(), value.clone()));
        }
    }
    let dir = tempfile::Builder::new()
        .prefix("mall-bench-")
        .tempdir()
        .map_err(|e| format!("cannot create a run directory: {e}"))?;
    let proxy = match (&stack_options.postgres, o.pg_delay) {
        (Some(url), Some(delay)) => {
            let proxy = DelayProxy::start(delay::address_of(url)?, delay)
                .await
                .map_err(|e| format!("the delaying proxy: {e}"))?;
            let through = delay::through(url, proxy.local)?;
            let probe = through.clone();
            let trips =
                tokio::task::spawn_blocking(move || delay::statement_round_trips(&probe, 200))
                    .await
                    .map_err(|e| e.to_string())??;
            let trips = Spread::of(trips);
            println!(
                "PostgreSQL through the delaying proxy ({:.1} ms each way): a statement's round trip p50 {:.1} ms, p90 {:.1} ms, p99 {:.1} ms",
                delay.as_secs_f64() * 1000.0,
                trips.p50,
                trips.p90,
                trips.p99
            );
            stack_options.postgres = Some(through);
            Some(proxy)
        }
        _ => None,
    };
    let started = async {
        let stack =
            Stack::start_with_options(dir.path(), &o.bin_dir, &o.broker, env, stack_options)
                .map_err(|e| format!("start-up: {e}"))?;
        let mall = stack.mall();
        mall.wait_healthy().await?;
        let mut products = Vec::with_capacity(o.products);
        for _ in 0..o.products {
            products.push(bench_product(&mall).await?);
        }
        Ok::<_, String>((stack, products))
    }
    .await;
    match started {
        Ok((stack, products)) => Ok(Session {
            rig: rig_of(&stack, fetch_wait_ms, &products),
            stack,
            products,
            dir,
            _proxy: proxy,
        }),
        // The logs say why.
        Err(e) => Err(format!(
            "{e} (run directory kept: {})",
            dir.keep().display()
        )),
    }
}

/// Creates a product the orders buy and waits until orders' replica knows it.
async fn bench_product(mall: &Mall) -> Check<i64> {
    let id = mall.create_product("bench", STOCK).await?;
    let url = format!("{}/products/{id}", mall.orders);
    eventually(
        "orders' replica knows the bench product",
        Duration::from_secs(30),
        || {
            let url = url.clone();
            async move { mall.expect("GET", &url, None, 200).await.map(|_| ()) }
        },
    )
    .await?;
    Ok(id)
}

fn rig_of(stack: &Stack, fetch_wait_ms: u64, products: &[i64]) -> Rig {
    let mut processes = stack.pids();
    processes.push(("saga-bench".to_owned(), std::process::id()));
    let databases: std::collections::HashMap<&'static str, String> = SERVICES
        .iter()
        .filter_map(|s| Some((*s, stack.database_url(s)?.to_owned())))
        .filter(|(_, url)| url.starts_with("postgres"))
        .collect();
    if let Some(url) = databases.values().next() {
        processes.extend(
            procfs::postgres_server_pids(url)
                .into_iter()
                .map(|pid| ("postgres".to_owned(), pid)),
        );
    }
    let bodies = products
        .iter()
        .map(|product| {
            serde_json::json!({ "productId": product, "quantity": 1, "customerId": "bench@12st.mall",
                                "customerName": "Bench", "customerAddr": "Seoul" })
            .to_string()
        })
        .collect();
    Rig {
        brokers: stack.brokers().to_owned(),
        dir: stack.dir().to_owned(),
        processes,
        databases,
        fetch_wait_ms,
        target: load::Target {
            client: load::client(),
            urls: stack
                .instances("orders")
                .iter()
                .map(|i| format!("{}/orders", stack.url(i)))
                .collect(),
            next: Default::default(),
            bodies,
        },
        ticks_per_second: procfs::clock_ticks_per_second(),
    }
}

/// Stops the stack; keeps the run directory when asked.
fn finish(mut session: Session, keep: bool) {
    session.stack.stop();
    if keep {
        println!("run directory kept: {}", session.dir.keep().display());
    }
}

/// Stops the services, writes `orders` completed orders of history into their databases,
/// starts them again.
async fn preload_history(session: &mut Session, orders: u64) -> Result<(), String> {
    println!();
    println!("preload: {orders} completed orders of history");
    print_database_sizes(session, "before");
    for service in SERVICES {
        session
            .stack
            .terminate(service, Duration::from_secs(30))
            .await?;
    }
    let started = Instant::now();
    let (dir, product) = (session.rig.dir.clone(), session.products[0]);
    let took = tokio::task::spawn_blocking(move || preload::fill(&dir, orders, product))
        .await
        .map_err(|e| e.to_string())??;
    let total = started.elapsed().as_secs_f64();
    for (service, took) in took {
        println!("  {service:<10} filled in {:>6.1} s", took.as_secs_f64());
    }
    println!(
        "  {:<10} {total:>6.1} s ({:.0} orders/s)",
        "all",
        orders as f64 / total
    );
    print_database_sizes(session, "after");
    // The kernel is still writing the fill's gigabytes back to disk, which would slow every
    // fsync of the load's checkpoints: flush them first, so the load measures a large
    // database, not the fill's writeback.
    let flushing = Instant::now();
    match std::process::Command::new("sync").status() {
        Ok(status) if status.success() => println!(
            "  flushed to disk in {:.1} s",
            flushing.elapsed().as_secs_f64()
        ),
        other => println!("  sync did not run ({other:?}); the load may meet the fill's writeback"),
    }
    // SQLite's page caches of the fill were the bench's peak memory, not the load's: reset
    // VmHWM to the current RSS (Linux 4.0+; harmless where it fails).
    let _ = std::fs::write("/proc/self/clear_refs", "5");
    for service in SERVICES {
        session.stack.restart_service(service)?;
    }
    session.stack.mall().wait_healthy().await?;
    session.rig = rig_of(&session.stack, session.rig.fetch_wait_ms, &session.products);
    Ok(())
}

fn print_database_sizes(session: &Session, when: &str) {
    let sizes: Vec<String> = SERVICES
        .iter()
        .map(|s| {
            format!(
                "{s} {:.1} MiB",
                run::mib(run::database_bytes(&session.rig, s))
            )
        })
        .collect();
    println!("  db + wal {when:<7} {}", sizes.join("   "));
}

fn print_floor(floor: &Spread, fetch_wait_ms: u64) {
    println!();
    println!(
        "broker floor: {} sequential produce (acks=all, linger 0) → consume (fetch.wait.max.ms {fetch_wait_ms}) round trips of one small message",
        floor.n
    );
    println!(
        "  p50 {:.1} ms   p90 {:.1} ms   p99 {:.1} ms   max {:.1} ms",
        floor.p50, floor.p90, floor.p99, floor.max
    );
}

fn print_ratio(report: &Report, floor: &Spread) {
    let saga = report.saga.p50;
    let ratio = |floor: f64| format!("{saga:.1} / (2 × {floor:.1}) = {:.2}", saga / (2.0 * floor));
    println!(
        "  saga p50 / (2 × floor p50) = {}   (floor under this load: {})",
        ratio(floor.p50),
        ratio(report.floor_under_load.p50)
    );
}

/// The open-loop runs asked for: `--rate`, or the default pair.
fn plans(o: &Options) -> Vec<Plan> {
    let plan = |rate: f64, secs: f64| Plan {
        rate,
        duration: Duration::from_secs_f64(secs),
        drain: Duration::from_secs(30),
    };
    match o.rate {
        Some(rate) => vec![plan(rate, o.duration.unwrap_or(30.0))],
        None if o.is_default() => vec![plan(300.0, 30.0), plan(1000.0, 60.0)],
        None => Vec::new(),
    }
}

/// One stack: preload, floor, the open loops, find-max. The run directory is kept on failure.
async fn main_stack(o: &Options) -> Result<(), String> {
    let mut session = start_session(o, o.fetch_wait_ms).await?;
    println!("stack up: {}", session.rig.dir.display());
    let outcome = measure_main(&mut session, o).await;
    finish(session, o.keep || outcome.is_err());
    outcome
}

async fn measure_main(session: &mut Session, o: &Options) -> Result<(), String> {
    if o.preload > 0 {
        preload_history(session, o.preload).await?;
    }
    let floor = broker_floor(&session.rig.brokers, o.fetch_wait_ms, FLOOR_ROUND_TRIPS).await?;
    print_floor(&floor, o.fetch_wait_ms);
    for plan in plans(o) {
        let report = run::open_loop(&session.rig, plan).await?;
        run::print_report(&report);
        print_ratio(&report, &floor);
        check_alive(&mut session.stack)?;
    }
    if o.find_max {
        find_max(session).await?;
    }
    Ok(())
}

/// Fails when a process of the stack has exited.
fn check_alive(stack: &mut Stack) -> Result<(), String> {
    match stack.reap_exited().first() {
        Some((name, status)) => Err(format!("{name} exited during the bench ({status})")),
        None => Ok(()),
    }
}

async fn find_max(session: &mut Session) -> Result<(), String> {
    println!();
    println!(
        "find-max: 20 s per rate; held = p99 POST→terminal < 1 s, >= 97 % of the rate ended in the steady window, <= 1 % unfinished"
    );
    println!(
        "  {:>9} {:>8} {:>9} {:>9} {:>9} {:>9} {:>10} {:>8} {:>9} {:>5}",
        "offered/s",
        "orders",
        "ended/s",
        "% offered",
        "p50 ms",
        "p99 ms",
        "unfinished",
        "non-201",
        "cap waits",
        "held"
    );
    let mut best = None;
    for rate in FIND_MAX_RATES {
        let plan = Plan {
            rate,
            duration: Duration::from_secs(20),
            drain: Duration::from_secs(20),
        };
        let r = run::open_loop(&session.rig, plan).await?;
        check_alive(&mut session.stack)?;
        let non_201: usize = r.other_status.values().sum::<usize>() + r.no_answer;
        println!(
            "  {rate:>9.0} {:>8} {:>9.1} {:>9.1} {:>9.1} {:>9.1} {:>10} {non_201:>8} {:>9} {:>5}",
            r.load.posts.len(),
            r.throughput(),
            100.0 * r.throughput() / rate,
            r.post_to_terminal.p50,
            r.post_to_terminal.p99,
            r.unfinished,
            r.load.cap_hits,
            if r.sustained() { "yes" } else { "no" }
        );
        if !r.sustained() {
            break;
        }
        best = Some(rate);
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
    match best {
        Some(rate) => println!("  highest rate held: {rate:.0} orders/s"),
        None => println!(
            "  no rate was held, not even {:.0} orders/s",
            FIND_MAX_RATES[0]
        ),
    }
    Ok(())
}

/// One row of the fetch-wait table.
struct TableRow {
    fetch_wait_ms: u64,
    floor: Spread,
    saga: Spread,
    unfinished: usize,
    /// % of a core while idle: broker, then each service.
    idle: Vec<(String, f64)>,
}

/// CPU % of a core per process over `window` with no load.
async fn idle_cpu(rig: &Rig, window: Duration) -> Vec<(String, f64)> {
    let first = procfs::cpu_sample(&rig.processes);
    tokio::time::sleep(window).await;
    let last = procfs::cpu_sample(&rig.processes);
    run::cpu_seconds(rig, &first, &last)
        .into_iter()
        .filter(|(name, _)| name != "saga-bench")
        .map(|(name, secs)| (name, 100.0 * secs / window.as_secs_f64()))
        .collect()
}

/// One row on a fresh stack; its run directory is kept on failure.
async fn table_row(o: &Options, fetch_wait_ms: u64) -> Result<TableRow, String> {
    let mut session = start_session(o, fetch_wait_ms).await?;
    let row = measure_row(&mut session, fetch_wait_ms).await;
    finish(session, o.keep || row.is_err());
    row
}

async fn measure_row(session: &mut Session, fetch_wait_ms: u64) -> Result<TableRow, String> {
    tokio::time::sleep(Duration::from_secs(3)).await; // start-up work settles
    let idle = idle_cpu(&session.rig, Duration::from_secs(10)).await;
    let floor = broker_floor(&session.rig.brokers, fetch_wait_ms, 50).await?;
    let plan = Plan {
        rate: 50.0,
        duration: Duration::from_secs(15),
        drain: Duration::from_secs(15),
    };
    let report = run::open_loop(&session.rig, plan).await?;
    check_alive(&mut session.stack)?;
    Ok(TableRow {
        fetch_wait_ms,
        floor,
        saga: report.saga,
        unfinished: report.unfinished,
        idle,
    })
}

async fn fetch_wait_table(o: &Options) -> Result<(), String> {
    println!();
    println!(
        "fetch-wait table: a fresh stack per KAFKA_FETCH_WAIT_MAX_MS; idle CPU over 10 s with no orders, then 50 orders/s for 15 s"
    );
    let mut rows = Vec::new();
    for wait in TABLE_FETCH_WAITS {
        rows.push(table_row(o, wait).await?);
    }
    println!(
        "  {:>13} {:>14} {:>13} {:>13} {:>10} {:>10} {:>11} {:>11} {:>11} {:>11}",
        "fetch wait ms",
        "floor p50 ms",
        "saga p50 ms",
        "saga p99 ms",
        "ratio",
        "unfinished",
        "idle broker",
        "idle orders",
        "idle prod.",
        "idle deliv."
    );
    for row in rows {
        let idle: Vec<String> = row
            .idle
            .iter()
            .map(|(_, pct)| format!("{pct:>10.1}%"))
            .collect();
        println!(
            "  {:>13} {:>14.1} {:>13.1} {:>13.1} {:>10.2} {:>10} {}",
            row.fetch_wait_ms,
            row.floor.p50,
            row.saga.p50,
            row.saga.p99,
            row.saga.p50 / (2.0 * row.floor.p50),
            row.unfinished,
            idle.join(" ")
        );
    }
    println!("  (ratio = saga p50 / (2 × floor p50); idle = % of one core)");
    Ok(())
}

/// Offered rates of `--sync-table`, orders/s: light, held, near and past saturation (with
/// the broker probe paced, this machine holds 1,500/s).
const SYNC_TABLE_RATES: [f64; 4] = [300.0, 1000.0, 1500.0, 3000.0];

/// What fsyncing every commit costs: the same open loops on a fresh stack with SQLite's
/// `synchronous` NORMAL and then FULL.
async fn sync_table(o: &Options) -> Result<(), String> {
    println!();
    println!(
        "sync table: a fresh stack per SQLITE_SYNCHRONOUS; {} orders/s for 20 s each",
        SYNC_TABLE_RATES.map(|r| r.to_string()).join(", ")
    );
    println!(
        "  {:>11} {:>9} {:>9} {:>9} {:>9} {:>10} {:>14}",
        "synchronous", "offered/s", "ended/s", "p50 ms", "p99 ms", "unfinished", "CPU ms/saga"
    );
    let mut ended: Vec<(&str, f64, f64)> = Vec::new();
    for sync in ["NORMAL", "FULL"] {
        let mut session = start_session_with(
            o,
            o.fetch_wait_ms,
            o.stack.clone(),
            vec![("SQLITE_SYNCHRONOUS", sync.to_owned())],
        )
        .await?;
        let rows = async {
            tokio::time::sleep(Duration::from_secs(3)).await; // start-up work settles
            let mut rows = Vec::new();
            for rate in SYNC_TABLE_RATES {
                let plan = Plan {
                    rate,
                    duration: Duration::from_secs(20),
                    drain: Duration::from_secs(20),
                };
                let first = procfs::cpu_sample(&session.rig.processes);
                let r = run::open_loop(&session.rig, plan).await?;
                let last = procfs::cpu_sample(&session.rig.processes);
                check_alive(&mut session.stack)?;
                let cpu: f64 = run::cpu_seconds(&session.rig, &first, &last)
                    .into_iter()
                    .filter(|(name, _)| name != "saga-bench")
                    .map(|(_, secs)| secs)
                    .sum();
                let sagas = (r.completed + r.cancelled).max(1) as f64;
                rows.push((
                    rate,
                    r.throughput(),
                    r.saga.p50,
                    r.saga.p99,
                    r.unfinished,
                    1000.0 * cpu / sagas,
                ));
                tokio::time::sleep(Duration::from_secs(2)).await;
            }
            Ok::<_, String>(rows)
        }
        .await;
        finish(session, o.keep || rows.is_err());
        for (rate, per_s, p50, p99, unfinished, cpu) in rows? {
            println!(
                "  {sync:>11} {rate:>9.0} {per_s:>9.1} {p50:>9.1} {p99:>9.1} {unfinished:>10} {cpu:>14.2}"
            );
            ended.push((sync, rate, per_s));
        }
    }
    for rate in SYNC_TABLE_RATES {
        let of = |sync: &str| {
            ended
                .iter()
                .find(|(s, r, _)| *s == sync && *r == rate)
                .map_or(0.0, |(_, _, per_s)| *per_s)
        };
        println!(
            "  at {rate:.0}/s offered: FULL ends {:.1} % of NORMAL's sagas per second",
            100.0 * of("FULL") / of("NORMAL").max(f64::MIN_POSITIVE)
        );
    }
    Ok(())
}

fn print_header(o: &Options) {
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    println!(
        "saga-bench — 12st Mall on {cores} cores — fetch wait {} ms (floor, open loops) — {}",
        o.fetch_wait_ms,
        chrono::Utc::now().format("%Y-%m-%d %H:%M:%S UTC")
    );
}

/// `--compare-instances N`: the open loop on one instance per service, then on N, each on a
/// fresh stack, and the two side by side.
async fn compare_instances(o: &Options, n: usize) -> Result<(), String> {
    let mut rows = Vec::new();
    for instances in [1, n] {
        println!();
        println!(
            "=== {instances} instance(s) per service{} ===",
            o.pg_delay.map_or(String::new(), |d| format!(
                ", PostgreSQL behind {:.1} ms each way",
                d.as_secs_f64() * 1000.0
            ))
        );
        let stack_options = StackOptions {
            instances,
            ..o.stack.clone()
        };
        let session = start_session_with(o, o.fetch_wait_ms, stack_options, Vec::new()).await?;
        let mut reports = Vec::new();
        let outcome = async {
            for plan in plans(o) {
                let report = run::open_loop(&session.rig, plan).await?;
                run::print_report(&report);
                reports.push(report);
            }
            Ok::<_, String>(())
        }
        .await;
        finish(session, o.keep || outcome.is_err());
        outcome?;
        rows.extend(reports.into_iter().map(|r| (instances, r)));
    }
    println!();
    println!("instances compared (same offered rate, same partitions):");
    println!(
        "  {:>9} {:>10} {:>10} {:>12} {:>12} {:>18} {:>12}",
        "instances", "offered/s", "ended/s", "p50 ms", "p99 ms", "steady p50/p99 ms", "× one's"
    );
    let one = rows.first().map_or(1.0, |(_, r)| r.throughput());
    for (instances, r) in &rows {
        println!(
            "  {instances:>9} {:>10.0} {:>10.1} {:>12.0} {:>12.0} {:>18} {:>12.2}",
            r.plan.rate,
            r.throughput(),
            r.post_to_terminal.p50,
            r.post_to_terminal.p99,
            format!(
                "{:.0} / {:.0}",
                r.post_to_terminal_steady.p50, r.post_to_terminal_steady.p99
            ),
            r.throughput() / one
        );
    }
    Ok(())
}

async fn bench(o: &Options) -> Result<(), String> {
    print_header(o);
    if let Some(n) = o.compare_instances {
        return compare_instances(o, n).await;
    }
    if o.is_default() || o.rate.is_some() || o.find_max {
        main_stack(o).await?;
    }
    if o.is_default() || o.fetch_wait_table {
        fetch_wait_table(o).await?;
    }
    if o.sync_table {
        sync_table(o).await?;
    }
    Ok(())
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let o = match parse(&args) {
        Ok(o) => o,
        Err(e) => {
            if !e.is_empty() {
                eprintln!("saga-bench: {e}");
            }
            eprintln!("{USAGE}");
            return if e.is_empty() {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(2)
            };
        }
    };
    let outcome = tokio::select! {
        outcome = bench(&o) => outcome,
        _ = kafka::shutdown_signal() => Err("interrupted".to_owned()),
    };
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("saga-bench: {e}");
            ExitCode::FAILURE
        }
    }
}
