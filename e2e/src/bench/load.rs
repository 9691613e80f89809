//! The open-loop load: `POST /orders` on a fixed schedule (order `i` is due at `i / rate`
//! seconds), each request on its own task, so a slow answer never delays the next order.
//! In-flight requests are capped; every send that had to wait for the cap is counted.

use super::wall_ms;
use serde::Deserialize;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio::time::Instant;

/// The most requests in flight at once.
pub const MAX_IN_FLIGHT: usize = 4096;
/// A send this far behind its schedule counts as late (the generator could not keep up).
const LATE: Duration = Duration::from_millis(10);

/// How one `POST /orders` ended.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Outcome {
    /// 201 with the new order's id.
    Created(i64),
    /// Any other status.
    Status(u16),
    /// No answer: connection error or timeout.
    Failed,
}

/// One request of the run.
#[derive(Debug, Clone, Copy)]
pub struct Post {
    /// Wall clock at the send, Unix-epoch milliseconds.
    pub sent_ms: f64,
    /// Send to full response body, milliseconds.
    pub round_trip_ms: f64,
    /// How it ended.
    pub outcome: Outcome,
}

/// Every request of an open-loop run and how well the generator kept its schedule.
#[derive(Debug, Default)]
pub struct Load {
    /// Wall clock when order 0 was due, Unix-epoch milliseconds.
    pub started_ms: f64,
    /// The requests, in no particular order.
    pub posts: Vec<Post>,
    /// Sends that waited for the in-flight cap.
    pub cap_hits: usize,
    /// Sends more than 10 ms behind schedule.
    pub late_sends: usize,
}

#[derive(Deserialize)]
struct Created {
    id: i64,
}

/// Where and what to post.
#[derive(Clone)]
pub struct Target {
    /// The HTTP client (keep-alive, shared pool).
    pub client: reqwest::Client,
    /// `http://…/orders` of every orders instance; posts go round-robin.
    pub urls: Vec<String>,
    /// The next of `urls`.
    pub next: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    /// The JSON bodies (one per product bought); orders take them in turn.
    pub bodies: Vec<String>,
}

impl Target {
    /// Where the next order goes and what it buys: instances in turn, and after each round
    /// of instances the next body, so every instance sells every product.
    pub fn next(&self) -> (&str, &str) {
        let n = self.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let url = &self.urls[n % self.urls.len()];
        let body = &self.bodies[(n / self.urls.len()) % self.bodies.len()];
        (url, body)
    }
}

/// A client for the load: keep-alive with a pool as large as the in-flight cap.
pub fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .pool_max_idle_per_host(MAX_IN_FLIGHT)
        .tcp_nodelay(true)
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap_or_default()
}

/// Posts `rate × duration` orders on schedule and waits for every answer.
pub async fn open_loop(target: &Target, rate: f64, duration: Duration) -> Load {
    let count = (rate * duration.as_secs_f64()).round() as usize;
    // Precomputed, so the loop only sleeps and spawns.
    let schedule: Vec<Duration> = (0..count)
        .map(|i| Duration::from_secs_f64(i as f64 / rate))
        .collect();
    let cap = Arc::new(Semaphore::new(MAX_IN_FLIGHT));
    let mut tasks = JoinSet::new();
    let mut load = Load::default();
    let start = Instant::now();
    load.started_ms = wall_ms();
    for due in schedule {
        tokio::time::sleep_until(start + due).await;
        let permit = match cap.clone().try_acquire_owned() {
            Ok(permit) => permit,
            Err(_) => {
                load.cap_hits += 1;
                let Ok(permit) = cap.clone().acquire_owned().await else {
                    break;
                };
                permit
            }
        };
        if start.elapsed() > due + LATE {
            load.late_sends += 1;
        }
        let target = target.clone();
        tasks.spawn(async move {
            let post = post_order(&target).await;
            drop(permit);
            post
        });
    }
    while let Some(post) = tasks.join_next().await {
        if let Ok(post) = post {
            load.posts.push(post);
        }
    }
    load
}

async fn post_order(target: &Target) -> Post {
    let sent_ms = wall_ms();
    let sent = Instant::now();
    let (url, body) = target.next();
    let response = target
        .client
        .post(url)
        .header(reqwest::header::CONTENT_TYPE, "application/json")
        .body(body.to_owned())
        .send()
        .await;
    let outcome = match response {
        Ok(r) if r.status().as_u16() == 201 => match r.bytes().await {
            Ok(body) => serde_json::from_slice::<Created>(&body)
                .map_or(Outcome::Status(201), |c| Outcome::Created(c.id)),
            Err(_) => Outcome::Failed,
        },
        Ok(r) => {
            let status = r.status().as_u16();
            let _ = r.bytes().await; // read out, so the connection is reused
            Outcome::Status(status)
        }
        Err(_) => Outcome::Failed,
    };
    Post {
        sent_ms,
        round_trip_ms: sent.elapsed().as_secs_f64() * 1000.0,
        outcome,
    }
}
