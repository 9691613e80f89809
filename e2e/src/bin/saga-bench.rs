//! `saga-bench`: how fast the saga is, against a running mall (`scripts/up.sh`), printed as
//! figures — never asserted.
//!
//! - HTTP: `POST /orders` round trip, sequential.
//! - Saga latency: OrderPlaced → OrderCompleted, from the order's timeline timestamps (both
//!   stamped by orders, so one clock), sequential orders.
//! - Throughput: a burst of concurrent orders, until the last one completes.
//!
//! Usage: `saga-bench [ORDERS_SEQUENTIAL] [BURST] [CONCURRENCY]` (default 100 500 20). Reads
//! `ORDERS_URL`, `PRODUCTS_URL`, `DELIVERY_URL`, `KAFKA_BROKERS`, `KAFKA_TOPIC`.

use e2e::{Check, Mall, eventually};
use std::time::{Duration, Instant};

fn env(name: &str, default: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| default.to_owned())
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[rank.min(sorted.len() - 1)]
}

fn summary(name: &str, mut samples: Vec<f64>) -> f64 {
    samples.sort_by(f64::total_cmp);
    let median = percentile(&samples, 0.5);
    println!(
        "{name:<34} n={:<5} median {median:>7.1} ms   p95 {:>7.1} ms   max {:>7.1} ms",
        samples.len(),
        percentile(&samples, 0.95),
        samples.last().copied().unwrap_or(f64::NAN)
    );
    median
}

fn millis(timestamp: &serde_json::Value) -> Check<i64> {
    let text = timestamp.as_str().ok_or("timestamp is not a string")?;
    chrono_free_millis(text).ok_or_else(|| format!("bad timestamp {text}"))
}

/// Milliseconds of the day from `YYYY-MM-DDTHH:MM:SS.mmmZ` (enough for differences within a run).
fn chrono_free_millis(text: &str) -> Option<i64> {
    let time = text.split('T').nth(1)?.trim_end_matches('Z');
    let mut parts = time.split(':');
    let h: i64 = parts.next()?.parse().ok()?;
    let m: i64 = parts.next()?.parse().ok()?;
    let s: f64 = parts.next()?.parse().ok()?;
    Some(((h * 60 + m) * 60) * 1000 + (s * 1000.0).round() as i64)
}

async fn saga_latency(m: &Mall, order: i64) -> Check<f64> {
    let timeline = eventually(
        "the order completes",
        Duration::from_secs(30),
        || async move {
            let t = m.timeline(order).await?;
            if t.iter().any(|e| e["eventType"] == "OrderCompleted") {
                Ok(t)
            } else {
                Err(format!("{t:?}"))
            }
        },
    )
    .await?;
    let at = |kind: &str| {
        timeline
            .iter()
            .find(|e| e["eventType"] == kind)
            .ok_or_else(|| format!("no {kind}"))
            .and_then(|e| millis(&e["timestamp"]))
    };
    Ok((at("OrderCompleted")? - at("OrderPlaced")?) as f64)
}

async fn run(sequential: usize, burst: usize, concurrency: usize) -> Check {
    let m = Mall::new(
        env("ORDERS_URL", "http://127.0.0.1:8081"),
        env("PRODUCTS_URL", "http://127.0.0.1:8085"),
        env("DELIVERY_URL", "http://127.0.0.1:8082"),
        env("KAFKA_BROKERS", "127.0.0.1:9092"),
        env("KAFKA_TOPIC", "eventTopic"),
    );
    m.wait_healthy().await?;
    let product = m.create_product("bench", 1_000_000).await?;

    let (mut http, mut saga) = (Vec::new(), Vec::new());
    for _ in 0..sequential {
        let started = Instant::now();
        let order = m.place_order(product, 1).await?;
        http.push(started.elapsed().as_secs_f64() * 1000.0);
        saga.push(saga_latency(&m, order).await?);
    }
    println!(
        "saga-bench against {} ({sequential} sequential orders, then {burst} with {concurrency} in flight)",
        m.orders
    );
    let http_median = summary("POST /orders round trip", http);
    let saga_median = summary("OrderPlaced → OrderCompleted", saga);
    println!(
        "{:<34} {:.1}x",
        "saga / HTTP round trip (medians)",
        saga_median / http_median
    );

    let started = Instant::now();
    let semaphore = std::sync::Arc::new(tokio::sync::Semaphore::new(concurrency));
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..burst {
        let m = m.clone();
        let semaphore = semaphore.clone();
        tasks.spawn(async move {
            let _permit = semaphore.acquire_owned().await.map_err(|e| e.to_string())?;
            m.place_order(product, 1).await
        });
    }
    let mut ids = Vec::new();
    while let Some(joined) = tasks.join_next().await {
        ids.push(joined.map_err(|e| e.to_string())??);
    }
    let accepted = started.elapsed();
    for id in &ids {
        m.wait_order_state(*id, "OrderCompleted").await?;
    }
    let done = started.elapsed();
    println!(
        "{:<34} {:.0} orders/s accepted, {:.0} sagas/s completed ({burst} in {:.2} s)",
        "burst throughput",
        burst as f64 / accepted.as_secs_f64(),
        burst as f64 / done.as_secs_f64(),
        done.as_secs_f64()
    );
    Ok(())
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let args: Vec<usize> = std::env::args()
        .skip(1)
        .filter_map(|a| a.parse().ok())
        .collect();
    let arg = |i: usize, default| args.get(i).copied().unwrap_or(default);
    match run(arg(0, 100), arg(1, 500), arg(2, 20)).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("saga-bench: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}
