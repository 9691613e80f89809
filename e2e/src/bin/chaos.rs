//! The fault-injection run (`scripts/chaos.sh`): starts its own broker and the three services
//! (free ports, fresh databases in a run directory), drives a mixed workload — orders on a few
//! limited-stock products, customer cancels, courier cancels and completions, poison messages —
//! while it SIGKILLs services (also twice in a row and two at once), SIGKILLs and restarts the
//! broker, SIGSTOPs a service past its session timeout and restarts one gracefully, at moments
//! drawn from a seeded RNG (`--seed N` replays the plan). Then it waits for the mall to go quiet
//! and checks the invariants on the REST APIs and the topic. Ends with `N passed, N failed`;
//! exits non-zero on any violation.
//!
//! With `--postgres URL` each service gets a fresh database on that server; `--instances N`
//! (needs `--postgres`) runs N processes per service on it: the faults then hit single
//! instances (`orders-2`), the workload spreads its requests round-robin over the live
//! instances, and the state is read through a live one. `--partitions P` sets
//! `KAFKA_PARTITIONS`.
//!
//! With `--brokers 3` the broker is a three-node Kafka cluster (replication factor 3,
//! `min.insync.replicas` 2, no unclean leader election) and each broker fault (3 by default)
//! SIGKILLs the node leading the saga topic's partition 0 under load and restarts it.
//!
//! Usage: `chaos --bin-dir target/release --kafka .tools/kafka-4.1.1/libs [--brokers 3] [--orders 500] [--kills 5]
//! [--broker-restarts 1] [--stops 1] [--terms 1] [--long-pauses 0] [--rate 25] [--seed N] [--keep]
//! [--postgres URL] [--instances N] [--partitions P]`
//!
//! `--long-pauses N` adds N pauses of 30 s of an orders and a products instance at once (the
//! second of each): they wake long after their leases moved, and must write nothing stale.

use e2e::broker::BrokerKind;
use e2e::chaos::check::{self, CheckResult, Violation, names};
use e2e::chaos::client::Client;
use e2e::chaos::collect::{self, Context};
use e2e::chaos::inject::{self, FaultRecord};
use e2e::chaos::plan::{self, Counts, PlannedFault};
use e2e::chaos::rng::{Rng, fresh_seed};
use e2e::chaos::workload::{self, Product, Progress, Urls};
use e2e::stack::{SERVICES, Stack, StackOptions};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

const USAGE: &str =
    "usage: chaos --bin-dir <dir with orders, products, delivery> (--kafka <dir of Kafka's jars> [--brokers N] | --tansu <tansu binary>)
             [--orders N=500] [--kills N=5] [--broker-restarts N=1] [--stops N=1] [--terms N=1]
             [--long-pauses N=0] [--rate R=25] [--seed N] [--keep]
             [--postgres URL] [--instances N=1] [--partitions P]";

/// How long after the last restart every invariant must hold.
const SETTLE: Duration = Duration::from_secs(30);
/// How long the services may take to answer /health after the last fault.
const HEALTH_TIMEOUT: Duration = Duration::from_secs(60);
/// Poison messages injected.
const POISON: usize = 3;
/// Products created.
const PRODUCTS: usize = 5;

#[derive(Debug, Clone)]
struct Options {
    bin_dir: PathBuf,
    broker: BrokerKind,
    orders: u64,
    counts: Counts,
    rate: f64,
    seed: u64,
    keep: bool,
    stack: StackOptions,
}

fn parse(args: &[String]) -> Result<Options, String> {
    let mut bin_dir = None;
    let mut o = Options {
        bin_dir: PathBuf::new(),
        broker: BrokerKind::from_args(args)?,
        orders: 500,
        counts: Counts {
            kills: 5,
            broker_restarts: 1,
            stops: 1,
            terms: 1,
            long_pauses: 0,
        },
        rate: 25.0,
        seed: fresh_seed(),
        keep: false,
        stack: StackOptions::from_args(args)?,
    };
    let mut i = 0;
    while i < args.len() {
        let flag = args[i].as_str();
        if flag == "--keep" {
            o.keep = true;
            i += 1;
            continue;
        }
        if flag == "--help" || flag == "-h" {
            return Err(String::new());
        }
        let value = args
            .get(i + 1)
            .ok_or_else(|| format!("{flag} needs a value"))?;
        let number = || {
            value
                .parse::<u64>()
                .map_err(|_| format!("{flag}: not a number: {value}"))
        };
        let small = || {
            value
                .parse::<u32>()
                .map_err(|_| format!("{flag}: not a number: {value}"))
        };
        match flag {
            "--bin-dir" => bin_dir = Some(PathBuf::from(value)),
            "--kafka" | "--tansu" | "--brokers" => {} // read by BrokerKind
            "--orders" => o.orders = number()?,
            "--kills" => o.counts.kills = small()?,
            "--broker-restarts" => o.counts.broker_restarts = small()?,
            "--stops" => o.counts.stops = small()?,
            "--terms" => o.counts.terms = small()?,
            "--long-pauses" => o.counts.long_pauses = small()?,
            "--seed" => o.seed = number()?,
            "--postgres" | "--instances" | "--partitions" => {} // read by StackOptions
            "--rate" => {
                o.rate = value
                    .parse::<f64>()
                    .ok()
                    .filter(|r| *r > 0.0 && r.is_finite())
                    .ok_or_else(|| format!("--rate: not a positive number: {value}"))?;
            }
            _ => return Err(format!("unknown argument {flag}")),
        }
        i += 2;
    }
    let Some(bin_dir) = bin_dir else {
        return Err("--bin-dir is required".into());
    };
    if o.broker.nodes() > 1 && !args.iter().any(|a| a == "--broker-restarts") {
        // A cluster's run is about losing leaders: several, each the leader of the moment.
        o.counts.broker_restarts = 3;
    }
    // The broker runs in the run directory, so relative paths would break.
    o.bin_dir = bin_dir
        .canonicalize()
        .map_err(|e| format!("--bin-dir {}: {e}", bin_dir.display()))?;
    for service in SERVICES {
        if !o.bin_dir.join(service).is_file() {
            return Err(format!("no {service} binary in {}", o.bin_dir.display()));
        }
    }
    Ok(o)
}

/// Everything the report prints.
struct Outcome {
    faults: Vec<FaultRecord>,
    crashes: Vec<String>,
    results: Vec<CheckResult>,
    progress: Arc<Progress>,
    client: Client,
    poison_errors: Vec<String>,
    workload_took: Duration,
    /// When every order was terminal, after the last restart.
    quiet_after: Option<Duration>,
    /// When every invariant held, after the last restart.
    held_after: Option<Duration>,
    /// How long the workload went on after the last restart (follow-ups).
    load_after: Duration,
    /// The start of the workload, from which the faults' offsets count.
    t0: Instant,
}

fn secs(d: Duration) -> String {
    format!("{:.1} s", d.as_secs_f64())
}

/// Notes every process that exited by itself (a crash: a violation) and starts it again, so
/// the run goes on.
async fn reap(stack: &mut Stack, crashes: &mut Vec<String>, t0: Instant) {
    for (name, status) in stack.reap_exited() {
        let line = format!(
            "{name} exited by itself ({status}) at +{}",
            secs(t0.elapsed())
        );
        println!("  {line}");
        crashes.push(line);
        let restarted = if stack.is_broker(&name) {
            stack.restart_broker().await
        } else {
            stack.restart_service(&name)
        };
        if let Err(e) = restarted {
            crashes.push(format!("could not restart {name}: {e}"));
        }
    }
}

async fn run(
    stack: &mut Stack,
    o: &Options,
    plan: &[PlannedFault],
    window: Duration,
) -> Result<Outcome, String> {
    let client = Client::new();
    let urls = Urls {
        orders: stack.pool("orders"),
        products: stack.pool("products"),
        delivery: stack.pool("delivery"),
    };
    let all = stack.all_instances();
    let mut crashes = Vec::new();
    let started = Instant::now();
    let mut problems = Vec::new();
    if !inject::wait_healthy(stack, &client, &all, HEALTH_TIMEOUT, &mut problems).await {
        return Err(format!("the mall did not start: {}", problems.join("; ")));
    }
    crashes.extend(problems);
    println!("mall up in {}", secs(started.elapsed()));

    let mut rng = Rng::derived(o.seed, u64::MAX);
    let stocks = workload::stock_split(&mut rng, o.orders, PRODUCTS);
    let products: Vec<Product> = workload::create_products(&client, &urls, &stocks).await?;
    println!(
        "products: {}",
        products
            .iter()
            .map(|p| format!("#{} stock {}", p.id, p.initial))
            .collect::<Vec<_>>()
            .join(", ")
    );
    let poison_at: Vec<Duration> = {
        let mut at: Vec<Duration> = (0..POISON)
            .map(|_| window.mul_f64(rng.uniform(0.1, 0.9)))
            .collect();
        at.sort();
        at
    };

    // Follow-ups are spread until the planned faults end, so there is traffic during every
    // fault even when the orders are all placed before the last one.
    let horizon = plan
        .last()
        .map(|p| p.at + p.fault.estimate())
        .unwrap_or_default()
        .max(window);
    let progress = Arc::new(Progress::default());
    let t0 = Instant::now();
    println!(
        "workload: {} orders at {}/s (about {}), {} faults",
        o.orders,
        o.rate,
        secs(window),
        plan.len()
    );
    let load = tokio::spawn(workload::run(
        client.clone(),
        urls.clone(),
        products.clone(),
        workload::Settings {
            orders: o.orders,
            rate: o.rate,
            seed: o.seed,
            in_flight: 8,
            horizon,
        },
        progress.clone(),
    ));
    let poison = {
        let brokers = stack.brokers().to_owned();
        tokio::spawn(async move {
            let mut keys = Vec::new();
            let mut errors = Vec::new();
            let producer = match collect::poison_producer(&brokers) {
                Ok(p) => p,
                Err(e) => return (keys, vec![e]),
            };
            for (i, at) in poison_at.iter().enumerate() {
                tokio::time::sleep_until((t0 + *at).into()).await;
                let n = i + 1;
                println!(
                    "  +{:6.1} s  poison-{n} published",
                    t0.elapsed().as_secs_f64()
                );
                match collect::inject_poison(&producer, e2e::stack::TOPIC, n).await {
                    Ok(key) => keys.push(key),
                    Err(e) => errors.push(e),
                }
            }
            (keys, errors)
        })
    };
    let ticker = {
        let progress = progress.clone();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_secs(5)).await;
                println!(
                    "  +{:6.1} s  {}",
                    t0.elapsed().as_secs_f64(),
                    progress.line()
                );
            }
        })
    };

    let mut faults = Vec::new();
    let mut last_restart = t0;
    for (i, planned) in plan.iter().enumerate() {
        let earliest = last_restart.max(t0)
            + if i == 0 {
                Duration::ZERO
            } else {
                Duration::from_secs(1)
            };
        let at = (t0 + planned.at).max(earliest);
        tokio::time::sleep_until(at.into()).await;
        reap(stack, &mut crashes, t0).await;
        println!(
            "  +{:6.1} s  fault {}/{}: {}",
            t0.elapsed().as_secs_f64(),
            i + 1,
            plan.len(),
            planned.fault
        );
        let record = inject::execute(stack, &client, &planned.fault, t0).await;
        last_restart = Instant::now();
        faults.push(record);
    }
    // A workload that broke proves nothing: its panic is a failure of the run.
    match load.await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => crashes.push(format!("the workload panicked: {e}")),
        Err(e) => crashes.push(format!("the workload task failed: {e}")),
    }
    let workload_end = Instant::now();
    let workload_took = workload_end.duration_since(t0);
    let (poison_keys, poison_errors) = poison
        .await
        .unwrap_or_else(|e| (Vec::new(), vec![format!("the poison task failed: {e}")]));
    ticker.abort();
    println!(
        "  +{:6.1} s  workload done: {}",
        t0.elapsed().as_secs_f64(),
        progress.line()
    );
    let last_restart = faults.iter().map(|f| f.last_restart).max().unwrap_or(t0);
    println!(
        "  last restart at +{}, workload ended at +{}",
        secs(last_restart.duration_since(t0)),
        secs(workload_end.duration_since(t0))
    );
    // Every item must hold within SETTLE of the last restart — or of the end of the workload
    // when follow-ups were still being sent after it.
    let load_after = workload_end.saturating_duration_since(last_restart);
    let (reference_at, reference) = if workload_end > last_restart {
        (workload_end, "the end of the workload")
    } else {
        (last_restart, "the last restart")
    };

    // Quiescence.
    let mut problems = Vec::new();
    if !inject::wait_healthy(stack, &client, &all, HEALTH_TIMEOUT, &mut problems).await {
        crashes.push(format!("after the last fault: {}", problems.join("; ")));
    } else {
        crashes.extend(problems);
    }
    reap(stack, &mut crashes, t0).await;
    println!(
        "  +{:6.1} s  services healthy; checking (every item must hold within {} of {reference})",
        t0.elapsed().as_secs_f64(),
        secs(SETTLE)
    );
    let deadline = reference_at + SETTLE;
    let accepted = progress.accepted_ids();
    let topic_deadline = Duration::from_secs(30) + Duration::from_millis(10 * o.orders);
    let mut quiet_after = None;
    let mut held_after = None;
    let results = loop {
        let s = collect::snapshot(Context {
            client: &client,
            urls: &urls,
            brokers: stack.brokers(),
            topic: e2e::stack::TOPIC,
            products: &products,
            accepted: accepted.clone(),
            poison_keys: poison_keys.clone(),
            topic_deadline,
            planned_orders: o.orders,
            offered: progress.offered.load(Ordering::Relaxed),
            given_up: progress.unanswered.load(Ordering::Relaxed),
            follow_ups_applied: progress.follow_ups_applied.load(Ordering::Relaxed),
        })
        .await;
        let results = check::check_all(&s);
        let since = Instant::now().saturating_duration_since(last_restart);
        if quiet_after.is_none()
            && results
                .iter()
                .any(|r| r.name == names::TERMINAL && r.passed())
        {
            quiet_after = Some(since);
        }
        let failing: Vec<&str> = results
            .iter()
            .filter(|r| !r.passed())
            .map(|r| r.name)
            .collect();
        if failing.is_empty() {
            held_after = Some(since);
            break results;
        }
        if Instant::now() > deadline {
            break results;
        }
        println!(
            "  +{:6.1} s  not yet: {}",
            t0.elapsed().as_secs_f64(),
            failing.join("; ")
        );
        tokio::time::sleep(Duration::from_secs(1)).await;
    };
    Ok(Outcome {
        faults,
        crashes,
        results,
        progress,
        client,
        poison_errors,
        workload_took,
        quiet_after,
        held_after,
        load_after,
        t0,
    })
}

/// The fault-recovery check: every fault over within the recovery timeout, without trouble, and
/// no process died by itself.
fn recovery(outcome: &Outcome) -> CheckResult {
    let mut violations = Vec::new();
    for f in &outcome.faults {
        if f.recovered_after.is_none() || !f.problems.is_empty() {
            violations.push(Violation::general(format!(
                "{} at +{}: {}",
                f.fault,
                secs(f.offset),
                if f.problems.is_empty() {
                    "did not recover".to_owned()
                } else {
                    f.problems.join("; ")
                }
            )));
        }
    }
    for c in &outcome.crashes {
        violations.push(Violation::general(c.clone()));
    }
    for e in &outcome.poison_errors {
        violations.push(Violation::general(format!("poison not injected: {e}")));
    }
    CheckResult {
        name: "every fault recovered; no process died by itself",
        items: outcome.faults.len(),
        violations,
    }
}

/// POST /orders beside the long pauses: the attempts sent while two instances were paused to
/// an instance that was not, against those sent and answered while no fault was on.
fn posts_beside_pauses(outcome: &Outcome) -> CheckResult {
    let t0 = outcome.t0;
    let pauses: Vec<(Instant, Instant, &[String; 2])> = outcome
        .faults
        .iter()
        .filter_map(|f| match &f.fault {
            plan::Fault::StopTwo {
                services,
                stopped_for,
            } => Some((t0 + f.offset, t0 + f.offset + *stopped_for, services)),
            _ => None,
        })
        .collect();
    // A fault's span: from its first signal until its services were healthy again, and a
    // second either side (connections re-opened, leases re-balanced).
    let faults: Vec<(Instant, Instant)> = outcome
        .faults
        .iter()
        .map(|f| {
            let began = t0 + f.offset;
            let over = f.recovered_after.unwrap_or(f.fault.estimate());
            (
                began.checked_sub(Duration::from_secs(1)).unwrap_or(began),
                began + over + Duration::from_secs(1),
            )
        })
        .collect();
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    let (mut beside, mut usual) = (Vec::new(), Vec::new());
    for a in outcome.progress.attempts() {
        let answered_at = a.sent + a.took;
        let paused_elsewhere = pauses.iter().any(|(from, to, stopped)| {
            a.sent >= *from && a.sent < *to && !stopped.contains(&a.instance)
        });
        if paused_elsewhere {
            beside.push(a.answered.then(|| ms(a.took)));
        } else if a.answered
            && !faults
                .iter()
                .any(|(from, to)| a.sent < *to && answered_at > *from)
        {
            usual.push(ms(a.took));
        }
    }
    let spread = |v: Vec<f64>| e2e::bench::stats::Spread::of(v);
    let (during, normal) = (
        spread(beside.iter().flatten().copied().collect()),
        spread(usual.clone()),
    );
    println!(
        "POST /orders to live instances: beside the pauses n {} p50 {:.0} ms p99 {:.0} ms max {:.0} ms; \
         outside every fault n {} p50 {:.0} ms p99 {:.0} ms max {:.0} ms",
        during.n, during.p50, during.p99, during.max, normal.n, normal.p50, normal.p99, normal.max
    );
    check::beside_pauses(&beside, &usual)
}

fn report(o: &Options, outcome: &Outcome) -> (usize, usize) {
    println!();
    println!("faults injected (seed {}):", o.seed);
    println!(
        "  {:>8}  {:<44} {:<18} healthy again after",
        "offset", "fault", "target"
    );
    for f in &outcome.faults {
        let healthy = match f.recovered_after {
            Some(d) => secs(d),
            None => "NOT RECOVERED".into(),
        };
        let notes = if f.notes.is_empty() {
            String::new()
        } else {
            format!(" ({})", f.notes.join(", "))
        };
        println!(
            "  {:>8}  {:<44} {:<18} {healthy}{notes}",
            format!("+{}", secs(f.offset)),
            f.fault.label(),
            f.fault.target()
        );
    }
    let p = &outcome.progress;
    println!();
    println!(
        "workload ({}): {} offered, {} accepted (201), {} refused, {} unanswered; follow-ups: {} applied, {} skipped",
        secs(outcome.workload_took),
        p.offered.load(Ordering::Relaxed),
        p.accepted.load(Ordering::Relaxed),
        p.refused.load(Ordering::Relaxed),
        p.unanswered.load(Ordering::Relaxed),
        p.follow_ups_applied.load(Ordering::Relaxed),
        p.follow_ups_skipped.load(Ordering::Relaxed),
    );
    {
        let log = outcome.client.log();
        println!(
            "http: {} requests, {} without an answer (killed or stopped service), {} 5xx",
            log.requests,
            log.no_answer,
            log.server_errors.len()
        );
        for ((what, status), n) in &log.statuses {
            println!("  {what:<44} {status:>9} × {n}");
        }
    }
    let after = "after the last restart";
    let load = if outcome.load_after > Duration::ZERO {
        format!(
            " (follow-ups went on {} after it)",
            secs(outcome.load_after)
        )
    } else {
        String::new()
    };
    match (outcome.quiet_after, outcome.held_after) {
        (quiet, Some(held)) => println!(
            "quiescence: every order terminal {} and every invariant held {} {after}{load}",
            quiet.map(secs).unwrap_or_else(|| "?".into()),
            secs(held),
        ),
        (Some(quiet), None) => println!(
            "quiescence: every order terminal {} {after}{load}; some invariant still broken at the deadline",
            secs(quiet),
        ),
        (None, None) => println!(
            "quiescence: NOT reached: some order not terminal at the deadline ({} {after}{load})",
            secs(SETTLE)
        ),
    }

    let mut results = outcome.results.clone();
    results.push(recovery(outcome));
    if o.counts.long_pauses > 0 {
        results.push(posts_beside_pauses(outcome));
    }
    println!();
    println!("invariants:");
    println!("  {:<70} {:>7} {:>10}", "check", "items", "violations");
    for r in &results {
        println!("  {:<70} {:>7} {:>10}", r.name, r.items, r.violations.len());
    }
    const SHOWN: usize = 100;
    for r in results.iter().filter(|r| !r.passed()) {
        println!();
        println!("FAIL {} — {} violation(s):", r.name, r.violations.len());
        for v in r.violations.iter().take(SHOWN) {
            println!("  - {v}");
        }
        if r.violations.len() > SHOWN {
            println!("  … and {} more", r.violations.len() - SHOWN);
        }
    }
    let passed = results.iter().filter(|r| r.passed()).count();
    (passed, results.len() - passed)
}

#[tokio::main]
async fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let o = match parse(&args) {
        Ok(o) => o,
        Err(e) => {
            if !e.is_empty() {
                eprintln!("chaos: {e}");
            }
            eprintln!("{USAGE}");
            return ExitCode::from(2);
        }
    };
    let window = Duration::from_secs_f64(o.orders as f64 / o.rate);
    let plan = plan::plan_for(&mut Rng::new(o.seed), &o.counts, window, o.stack.instances);
    let dir = match tempfile::Builder::new().prefix("mall-chaos-").tempdir() {
        Ok(dir) => dir,
        Err(e) => {
            eprintln!("cannot create a run directory: {e}");
            return ExitCode::FAILURE;
        }
    };
    println!(
        "chaos: seed {} (replay with --seed {}); run directory {}",
        o.seed,
        o.seed,
        dir.path().display()
    );
    println!(
        "plan: {} orders at {}/s, {} service kills, {} broker restarts, {} stops, {} graceful restarts, {} long pauses",
        o.orders,
        o.rate,
        o.counts.kills,
        o.counts.broker_restarts,
        o.counts.stops,
        o.counts.terms,
        o.counts.long_pauses
    );
    for (i, p) in plan.iter().enumerate() {
        println!("  {:>2}. at +{:>6}  {}", i + 1, secs(p.at), p.fault);
    }
    let extra_env = vec![("products", "SEED_CATALOG".to_owned(), "false".to_owned())];
    if o.stack.instances > 1 || o.stack.postgres.is_some() {
        println!(
            "stack: {} instance(s) per service on PostgreSQL{}",
            o.stack.instances,
            o.stack
                .partitions
                .map(|p| format!(", {p} partitions"))
                .unwrap_or_default()
        );
    }
    let mut stack = match Stack::start_with_options(
        dir.path(),
        &o.bin_dir,
        &o.broker,
        extra_env,
        o.stack.clone(),
    ) {
        Ok(stack) => stack,
        Err(e) => {
            println!("FAIL start-up: {e}");
            let kept = dir.keep();
            println!("run directory kept: {}", kept.display());
            println!("0 passed, 1 failed");
            return ExitCode::FAILURE;
        }
    };
    let outcome = tokio::select! {
        outcome = run(&mut stack, &o, &plan, window) => outcome,
        _ = kafka::shutdown_signal() => Err("interrupted".to_owned()),
    };
    stack.stop();
    let (passed, failed) = match &outcome {
        Ok(outcome) => report(&o, outcome),
        Err(e) => {
            println!("FAIL {e}");
            (0, 1)
        }
    };
    println!();
    if failed > 0 || o.keep {
        let kept = dir.keep();
        println!(
            "run directory kept: {} (logs: <broker node>.log and <service or instance>.log)",
            kept.display()
        );
    } else {
        println!("run directory removed (use --keep to keep it)");
    }
    if failed > 0 {
        println!(
            "replay: chaos --seed {} (same plan and choices, not the same timing)",
            o.seed
        );
    }
    println!("{passed} passed, {failed} failed");
    if failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
