//! The chaos workload: limited-stock products, orders offered at a steady rate with a few in
//! flight, and for some accepted orders a later customer cancel, courier cancel or courier
//! completion. Every choice comes from the seeded RNG, derived per order so that concurrency
//! does not change what is chosen.

use super::client::{Client, Reply};
use super::rng::Rng;
use crate::stack::Pool;
use serde_json::{Value, json};
use std::collections::BTreeSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::{Semaphore, mpsc};
use tokio::task::JoinSet;

/// Average units per order (quantities are 1–3).
pub const MEAN_QUANTITY: f64 = 2.0;
/// Total stock as a share of the expected demand: below 1, so some orders run out of stock.
pub const STOCK_SHARE: f64 = 0.6;
/// Share of accepted orders the customer later cancels.
pub const CUSTOMER_CANCELS: f64 = 0.15;
/// Share the courier later cancels.
pub const COURIER_CANCELS: f64 = 0.10;
/// Share the courier later completes.
pub const COURIER_COMPLETIONS: f64 = 0.30;

/// A product the run created.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Product {
    /// Its id.
    pub id: i64,
    /// Stock it was created with.
    pub initial: i64,
}

/// The instances of the three services; each request goes to the next live instance of its
/// service, round-robin ([`Pool::pick`]).
#[derive(Debug, Clone)]
pub struct Urls {
    /// orders.
    pub orders: Pool,
    /// products.
    pub products: Pool,
    /// delivery.
    pub delivery: Pool,
}

/// The stock of each of `count` products for `orders` orders: in total about
/// [`STOCK_SHARE`] of the expected demand, split unevenly.
pub fn stock_split(rng: &mut Rng, orders: u64, count: usize) -> Vec<i64> {
    let total = ((orders as f64) * MEAN_QUANTITY * STOCK_SHARE)
        .round()
        .max(count as f64);
    let weights: Vec<f64> = (0..count).map(|_| rng.uniform(0.5, 1.5)).collect();
    let sum: f64 = weights.iter().sum();
    weights
        .iter()
        .map(|w| ((total * w / sum).round() as i64).max(1))
        .collect()
}

/// Creates the products (retrying while products is not answering).
pub async fn create_products(
    client: &Client,
    urls: &Urls,
    stocks: &[i64],
) -> Result<Vec<Product>, String> {
    let mut products = Vec::new();
    for (i, stock) in stocks.iter().enumerate() {
        let body = json!({ "name": format!("chaos-{}", i + 1), "price": 100 * (i as i64 + 1), "stock": stock });
        let started = Instant::now();
        loop {
            let reply = client
                .call(
                    "POST /products",
                    "POST",
                    &format!("{}/products", urls.products.pick()),
                    Some(body.clone()),
                )
                .await;
            match reply {
                Reply::Status(201, p) => {
                    let id = p["id"]
                        .as_i64()
                        .ok_or_else(|| format!("POST /products answered {p}"))?;
                    products.push(Product {
                        id,
                        initial: *stock,
                    });
                    break;
                }
                Reply::Status(s, p) if s < 500 => {
                    return Err(format!("POST /products answered {s} {p}"));
                }
                other if started.elapsed() > Duration::from_secs(30) => {
                    return Err(format!("POST /products: {other:?}"));
                }
                _ => tokio::time::sleep(Duration::from_millis(500)).await,
            }
        }
    }
    Ok(products)
}

/// What happens to an accepted order later.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FollowUp {
    /// PATCH /orders/{id} {"state":"OrderCancelled"}.
    CustomerCancel,
    /// PATCH /deliveries/{id} {"deliveryState":"DeliveryCancelled"}.
    CourierCancel,
    /// PATCH /deliveries/{id} {"deliveryState":"DeliveryCompleted"}.
    CourierComplete,
}

/// What the workload decided for its `index`-th order.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct OrderPlan {
    /// Index into the products.
    pub product: usize,
    /// Units, 1–3.
    pub quantity: i64,
    /// What to do later if it is accepted.
    pub follow_up: Option<FollowUp>,
    /// When, as a share of the time from acceptance to the follow-up horizon (see
    /// [`follow_up_delay`]).
    pub delay_share: f64,
}

/// The shortest and longest span a follow-up is drawn from.
const SPAN: (Duration, Duration) = (Duration::from_secs(4), Duration::from_secs(60));

/// How long after its acceptance (at `accepted`, from the start of the workload) an order's
/// follow-up comes: somewhere between 0.2 s and the horizon (the planned end of the faults, or
/// of the orders if later), at least 4 s and at most 60 s away. So cancels and completions keep
/// coming while faults are still being injected after the last order was placed.
pub fn follow_up_delay(share: f64, accepted: Duration, horizon: Duration) -> Duration {
    let span = horizon.saturating_sub(accepted).clamp(SPAN.0, SPAN.1);
    let low = Duration::from_millis(200);
    low + (span - low).mul_f64(share.clamp(0.0, 1.0))
}

/// The choices for the `index`-th order of a run with `seed`.
pub fn order_plan(seed: u64, index: u64, products: usize) -> OrderPlan {
    let mut rng = Rng::derived(seed, index);
    let product = rng.below(products as u64) as usize;
    let quantity = rng.range(1, 3);
    let roll = rng.f64();
    let follow_up = if roll < CUSTOMER_CANCELS {
        Some(FollowUp::CustomerCancel)
    } else if roll < CUSTOMER_CANCELS + COURIER_CANCELS {
        Some(FollowUp::CourierCancel)
    } else if roll < CUSTOMER_CANCELS + COURIER_CANCELS + COURIER_COMPLETIONS {
        Some(FollowUp::CourierComplete)
    } else {
        None
    };
    OrderPlan {
        product,
        quantity,
        follow_up,
        delay_share: rng.f64(),
    }
}

/// Live counters, for progress lines and the summary.
#[derive(Debug, Default)]
pub struct Progress {
    /// POST /orders sent.
    pub offered: AtomicU64,
    /// 201s.
    pub accepted: AtomicU64,
    /// POST /orders answered with something else.
    pub refused: AtomicU64,
    /// POST /orders given up: no answer, or still 503/429, after [`PLACE_PATIENCE`].
    pub unanswered: AtomicU64,
    /// POST /orders sent again (same `Idempotency-Key`) after no answer, a 503 or a 429.
    pub retried: AtomicU64,
    /// Follow-ups finished (done, refused or skipped).
    pub follow_ups_done: AtomicU64,
    /// Follow-ups that reached the service and were answered 2xx.
    pub follow_ups_applied: AtomicU64,
    /// Follow-ups skipped (no delivery yet, no answer, refused).
    pub follow_ups_skipped: AtomicU64,
    /// Ids of every accepted order.
    pub accepted_ids: Mutex<BTreeSet<i64>>,
    /// Every attempt of a POST /orders: when, to which instance, how long until its answer.
    pub attempts: Mutex<Vec<Attempt>>,
}

/// One attempt of a POST /orders.
#[derive(Debug, Clone)]
pub struct Attempt {
    /// When it was sent.
    pub sent: Instant,
    /// The orders instance it went to.
    pub instance: String,
    /// Until the answer, or until the client gave up.
    pub took: Duration,
    /// Whether an answer came (any status).
    pub answered: bool,
}

impl Progress {
    /// The POST /orders attempts so far.
    pub fn attempts(&self) -> Vec<Attempt> {
        self.attempts
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// The accepted order ids so far.
    pub fn accepted_ids(&self) -> BTreeSet<i64> {
        self.accepted_ids
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// One progress line.
    pub fn line(&self) -> String {
        format!(
            "orders: {} offered, {} accepted, {} refused, {} given up ({} retries); \
             follow-ups: {} done",
            self.offered.load(Ordering::Relaxed),
            self.accepted.load(Ordering::Relaxed),
            self.refused.load(Ordering::Relaxed),
            self.unanswered.load(Ordering::Relaxed),
            self.retried.load(Ordering::Relaxed),
            self.follow_ups_done.load(Ordering::Relaxed),
        )
    }
}

/// The workload's settings.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Orders to offer.
    pub orders: u64,
    /// Orders offered per second.
    pub rate: f64,
    /// Seed.
    pub seed: u64,
    /// Requests in flight at most, for orders and for follow-ups each.
    pub in_flight: usize,
    /// Until when (from the start) follow-ups may be spread: see [`follow_up_delay`].
    pub horizon: Duration,
}

struct Job {
    order: i64,
    follow_up: FollowUp,
    due: Instant,
}

/// Runs the whole workload: offers every order at the rate, then waits for every follow-up.
/// `Err` names the tasks of it that panicked: a run whose workload broke proves nothing.
pub async fn run(
    client: Client,
    urls: Urls,
    products: Vec<Product>,
    settings: Settings,
    progress: Arc<Progress>,
) -> Result<(), String> {
    let (jobs, queue) = mpsc::unbounded_channel::<Job>();
    let follow_ups = tokio::spawn(run_follow_ups(
        client.clone(),
        urls.clone(),
        queue,
        settings.in_flight,
        progress.clone(),
    ));
    let limit = Arc::new(Semaphore::new(settings.in_flight));
    let start = tokio::time::Instant::now();
    let horizon = settings.horizon;
    let mut placing = JoinSet::new();
    let mut broken = Vec::new();
    for index in 0..settings.orders {
        let due = start + Duration::from_secs_f64(index as f64 / settings.rate.max(0.001));
        tokio::time::sleep_until(due).await;
        let Ok(permit) = limit.clone().acquire_owned().await else {
            break;
        };
        while let Some(done) = placing.try_join_next() {
            broken.extend(done.err().map(|e| format!("placing an order: {e}")));
        }
        let plan = order_plan(settings.seed, index, products.len());
        let Some(product) = products.get(plan.product).copied() else {
            break;
        };
        let (client, urls, jobs, progress) =
            (client.clone(), urls.clone(), jobs.clone(), progress.clone());
        let seed = settings.seed;
        placing.spawn(async move {
            let when = Timing { start, horizon };
            let key = (seed, index);
            place(&client, &urls, product, plan, key, when, &jobs, &progress).await;
            drop(permit);
        });
    }
    drop(jobs);
    while let Some(done) = placing.join_next().await {
        broken.extend(done.err().map(|e| format!("placing an order: {e}")));
    }
    match follow_ups.await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => broken.push(e),
        Err(e) => broken.push(format!("the follow-ups: {e}")),
    }
    if broken.is_empty() {
        Ok(())
    } else {
        Err(broken.join("; "))
    }
}

/// The start of the workload and the follow-up horizon.
#[derive(Clone, Copy)]
struct Timing {
    start: tokio::time::Instant,
    horizon: Duration,
}

/// How long a POST /orders is retried (same `Idempotency-Key`) while no instance answers or
/// one answers 503/429: longer than any planned outage, so an order is given up only when
/// orders did not come back.
const PLACE_PATIENCE: Duration = Duration::from_secs(60);
/// Pause between two attempts of one POST /orders.
const PLACE_RETRY_AFTER: Duration = Duration::from_millis(500);

/// The `Idempotency-Key` of the workload's `index`-th order: the same for every attempt, so a
/// retry after a kill that lost the answer cannot place the order twice.
pub fn idempotency_key(seed: u64, index: u64) -> String {
    format!("chaos-{seed}-{index}")
}

/// The customer name of the `index`-th order: [`check`](super::check) finds the orders that
/// came of one offer by it.
pub fn customer_name(index: u64) -> String {
    format!("Chaos #{index}")
}

#[allow(clippy::too_many_arguments)]
async fn place(
    client: &Client,
    urls: &Urls,
    product: Product,
    plan: OrderPlan,
    key: (u64, u64),
    when: Timing,
    jobs: &mpsc::UnboundedSender<Job>,
    progress: &Progress,
) {
    let (seed, index) = key;
    progress.offered.fetch_add(1, Ordering::Relaxed);
    let body = json!({ "productId": product.id, "quantity": plan.quantity,
                       "customerId": "chaos@12st.mall", "customerName": customer_name(index),
                       "customerAddr": "Seoul" });
    let key = idempotency_key(seed, index);
    let first = Instant::now();
    let mut attempt = 0u32;
    let reply = loop {
        if attempt > 0 {
            progress.retried.fetch_add(1, Ordering::Relaxed);
        }
        attempt += 1;
        let (instance, url) = urls.orders.pick_instance();
        let sent = Instant::now();
        let reply = client
            .call_keyed(
                "POST /orders",
                "POST",
                &format!("{url}/orders"),
                Some(body.clone()),
                Some(&key),
            )
            .await;
        progress
            .attempts
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(Attempt {
                sent,
                instance,
                took: sent.elapsed(),
                answered: reply.status().is_some(),
            });
        let again = match &reply {
            Reply::NoAnswer(_) => true,
            Reply::Status(s, _) => *s == 503 || *s == 429,
        };
        if !again || first.elapsed() >= PLACE_PATIENCE {
            break reply;
        }
        tokio::time::sleep(PLACE_RETRY_AFTER).await;
    };
    match reply {
        Reply::Status(201, order) => {
            let Some(id) = order["id"].as_i64() else {
                progress.refused.fetch_add(1, Ordering::Relaxed);
                return;
            };
            progress.accepted.fetch_add(1, Ordering::Relaxed);
            progress
                .accepted_ids
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert(id);
            if let Some(follow_up) = plan.follow_up {
                let _ = jobs.send(Job {
                    order: id,
                    follow_up,
                    due: Instant::now()
                        + follow_up_delay(plan.delay_share, when.start.elapsed(), when.horizon),
                });
            }
        }
        Reply::Status(..) => {
            progress.refused.fetch_add(1, Ordering::Relaxed);
        }
        Reply::NoAnswer(_) => {
            progress.unanswered.fetch_add(1, Ordering::Relaxed);
        }
    }
}

async fn run_follow_ups(
    client: Client,
    urls: Urls,
    mut queue: mpsc::UnboundedReceiver<Job>,
    in_flight: usize,
    progress: Arc<Progress>,
) -> Result<(), String> {
    let limit = Arc::new(Semaphore::new(in_flight));
    let mut running = JoinSet::new();
    let mut broken = Vec::new();
    while let Some(job) = queue.recv().await {
        while let Some(done) = running.try_join_next() {
            broken.extend(done.err().map(|e| format!("a follow-up: {e}")));
        }
        let (client, urls, limit, progress) = (
            client.clone(),
            urls.clone(),
            limit.clone(),
            progress.clone(),
        );
        running.spawn(async move {
            tokio::time::sleep_until(job.due.into()).await;
            let Ok(_permit) = limit.acquire().await else {
                return;
            };
            let applied = follow_up(&client, &urls, &job).await;
            progress.follow_ups_done.fetch_add(1, Ordering::Relaxed);
            if applied {
                progress.follow_ups_applied.fetch_add(1, Ordering::Relaxed);
            } else {
                progress.follow_ups_skipped.fetch_add(1, Ordering::Relaxed);
            }
        });
    }
    while let Some(done) = running.join_next().await {
        broken.extend(done.err().map(|e| format!("a follow-up: {e}")));
    }
    if broken.is_empty() {
        Ok(())
    } else {
        Err(broken.join("; "))
    }
}

const ATTEMPTS: u32 = 4;
const RETRY_AFTER: Duration = Duration::from_millis(1500);

/// Carries out one follow-up; true when a service accepted it (2xx). Retries when there is no
/// answer, no delivery yet, or (for a completion) the order is not confirmed yet (409); gives up
/// after a few attempts.
async fn follow_up(client: &Client, urls: &Urls, job: &Job) -> bool {
    for attempt in 0..ATTEMPTS {
        if attempt > 0 {
            tokio::time::sleep(RETRY_AFTER).await;
        }
        match job.follow_up {
            FollowUp::CustomerCancel => {
                let reply = client
                    .call(
                        "PATCH /orders/{id}",
                        "PATCH",
                        &format!("{}/orders/{}", urls.orders.pick(), job.order),
                        Some(json!({ "state": "OrderCancelled" })),
                    )
                    .await;
                match reply {
                    Reply::NoAnswer(_) => continue,
                    Reply::Status(s, _) => return (200..300).contains(&s),
                }
            }
            FollowUp::CourierCancel | FollowUp::CourierComplete => {
                let target = if job.follow_up == FollowUp::CourierCancel {
                    "DeliveryCancelled"
                } else {
                    "DeliveryCompleted"
                };
                let found = client
                    .call(
                        "GET /deliveries?orderId=",
                        "GET",
                        &format!("{}/deliveries?orderId={}", urls.delivery.pick(), job.order),
                        None,
                    )
                    .await;
                let delivery = match &found {
                    Reply::Status(200, Value::Array(list)) => list.first(),
                    Reply::Status(..) => return false,
                    Reply::NoAnswer(_) => continue,
                };
                let Some(delivery_id) = delivery.and_then(|d| d["id"].as_i64()) else {
                    continue; // not there yet
                };
                let started = delivery.is_some_and(|d| d["deliveryState"] == "DeliveryStarted");
                let reply = client
                    .call(
                        &format!("PATCH /deliveries/{{id}} {target}"),
                        "PATCH",
                        &format!("{}/deliveries/{delivery_id}", urls.delivery.pick()),
                        Some(json!({ "deliveryState": target })),
                    )
                    .await;
                match reply {
                    Reply::NoAnswer(_) => continue,
                    Reply::Status(409, _)
                        if started && job.follow_up == FollowUp::CourierComplete =>
                    {
                        continue; // the order may not be confirmed yet
                    }
                    Reply::Status(s, _) => return (200..300).contains(&s),
                }
            }
        }
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stock_is_limited_and_split_over_every_product() {
        let split = stock_split(&mut Rng::new(1), 500, 5);
        assert_eq!(split.len(), 5);
        let total: i64 = split.iter().sum();
        assert!((590..=610).contains(&total), "{total}");
        assert!(split.iter().all(|s| *s > 0));
    }

    #[test]
    fn order_choices_follow_the_mix() {
        let plans: Vec<OrderPlan> = (0..10_000).map(|i| order_plan(5, i, 5)).collect();
        let share = |f: FollowUp| {
            plans.iter().filter(|p| p.follow_up == Some(f)).count() as f64 / plans.len() as f64
        };
        assert!((share(FollowUp::CustomerCancel) - 0.15).abs() < 0.02);
        assert!((share(FollowUp::CourierCancel) - 0.10).abs() < 0.02);
        assert!((share(FollowUp::CourierComplete) - 0.30).abs() < 0.02);
        assert!(
            plans
                .iter()
                .all(|p| (1..=3).contains(&p.quantity) && p.product < 5)
        );
        assert_eq!(order_plan(5, 17, 5), plans[17]);
    }

    #[test]
    fn follow_ups_spread_to_the_horizon() {
        let s = Duration::from_secs;
        // Early in a short run whose faults go on until 45 s: up to 45 s away.
        assert_eq!(follow_up_delay(1.0, s(5), s(45)), s(40));
        assert_eq!(
            follow_up_delay(0.0, s(5), s(45)),
            Duration::from_millis(200)
        );
        // Near or past the horizon: within 4 s.
        assert_eq!(follow_up_delay(1.0, s(44), s(45)), s(4));
        assert_eq!(follow_up_delay(1.0, s(50), s(45)), s(4));
        // A long run: at most a minute away.
        assert_eq!(follow_up_delay(1.0, s(10), s(400)), s(60));
    }
}
