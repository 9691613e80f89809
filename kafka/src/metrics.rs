//! Prometheus metrics, served in the text exposition format at `GET /metrics` on every service.
//!
//! Each service has its own [`Metrics`] with its own [`Registry`], never the process-global
//! one: the in-process test suite runs three services in one process and must keep them apart.
//! [`ServiceHost::start`](crate::ServiceHost::start) creates it and shares it with the consumer
//! ([`ConsumerStatus`](crate::consumer::ConsumerStatus)), the relay
//! ([`RelayStatus`](crate::outbox::RelayStatus)), the HTTP middleware ([`track_requests`]) and
//! `/metrics`. The consumer's and the relay's counters are the very ones `/health` shows, so
//! the two endpoints never disagree. A service adds its own with [`Metrics::register`]
//! (orders: `mall_saga_duration_seconds`). Every name starts with `mall_`.

use actix_web::body::MessageBody;
use actix_web::dev::{ServiceRequest, ServiceResponse};
use actix_web::http::Method;
use actix_web::middleware::Next;
use actix_web::web;
use prometheus::core::Collector;
use prometheus::{
    Gauge, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};
use std::time::Instant;

/// The `prometheus` crate, so a service builds its own metrics with the same version without
/// depending on it itself.
pub use prometheus;

/// The content type of `GET /metrics`: the text exposition format, version 0.0.4.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// The `route` label of a request that matched no route (a 404 from the default service).
pub const UNMATCHED: &str = "unmatched";

/// Buckets of `mall_http_request_duration_seconds`: 0.5 ms to 10 s.
const HTTP_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// One service's metrics: its registry and the collectors the shared I/O shell feeds.
pub struct Metrics {
    registry: Registry,
    /// `mall_events_consumed_total{outcome}`.
    pub(crate) events_consumed: IntCounterVec,
    /// `mall_event_retries_total`.
    pub(crate) event_retries: IntCounter,
    /// `mall_consumer_lag{partition}`.
    pub(crate) consumer_lag: IntGaugeVec,
    /// `mall_consumer_position{partition}`.
    pub(crate) consumer_position: IntGaugeVec,
    /// `mall_consumer_reopened_total`.
    pub(crate) consumer_reopened: IntCounter,
    /// `mall_consumer_batch_messages`.
    pub(crate) consumer_batch: Histogram,
    /// `mall_outbox_pending_rows`, set at scrape time.
    pub(crate) outbox_pending: IntGauge,
    /// `mall_relay_lag_seconds`, set at scrape time.
    pub(crate) relay_lag: Gauge,
    /// `mall_dead_letters_open`, set at scrape time.
    pub(crate) dead_letters_open: IntGauge,
    /// `mall_relay_published_total`.
    pub(crate) relay_published: IntCounter,
    /// `mall_relay_failures_total`.
    pub(crate) relay_failures: IntCounter,
    /// `mall_relay_refused_total`.
    pub(crate) relay_refused: IntCounter,
    /// `mall_producer_recreated_total`.
    pub(crate) producer_recreated: IntCounter,
    /// `mall_retention_deleted_total{table}`.
    pub(crate) retention_deleted: IntCounterVec,
    /// `mall_http_requests_total{method,route,status}`.
    http_requests: IntCounterVec,
    /// `mall_http_request_duration_seconds{method,route}`.
    http_duration: HistogramVec,
}

impl Metrics {
    /// A new registry holding every metric of the shared I/O shell.
    pub fn new() -> Self {
        let registry = Registry::new();
        let r = &registry;
        let events_consumed = add(
            r,
            IntCounterVec::new(
                Opts::new(
                    "mall_events_consumed_total",
                    "Messages the consumer finished with, by outcome: applied (effect \
                     committed), duplicate (event id already applied), skipped (not for \
                     this service or an unknown type), parked (sent to the dead-letter topic)",
                ),
                &["outcome"],
            ),
        );
        for outcome in ["applied", "duplicate", "skipped", "parked"] {
            // Present at 0 from the start, so a rate() sees the first event.
            events_consumed.with_label_values(&[outcome]);
        }
        Metrics {
            events_consumed,
            event_retries: add(
                r,
                IntCounter::new(
                    "mall_event_retries_total",
                    "Failed attempts to apply or park a message that were retried \
                     (database busy, full, read-only...)",
                ),
            ),
            consumer_lag: add(
                r,
                IntGaugeVec::new(
                    Opts::new(
                        "mall_consumer_lag",
                        "Messages on the partition after the consumer's position \
                         (high watermark, read every 2 s, minus position)",
                    ),
                    &["partition"],
                ),
            ),
            consumer_position: add(
                r,
                IntGaugeVec::new(
                    Opts::new(
                        "mall_consumer_position",
                        "The offset the consumer reads next on the partition",
                    ),
                    &["partition"],
                ),
            ),
            consumer_reopened: add(
                r,
                IntCounter::new(
                    "mall_consumer_reopened_total",
                    "Times the watchdog reopened the consumer (no progress while events \
                     waited, or new partitions)",
                ),
            ),
            consumer_batch: add(
                r,
                Histogram::with_opts(
                    HistogramOpts::new(
                        "mall_consumer_batch_messages",
                        "Messages handled together per fetch: a run without bad messages \
                         commits in one transaction",
                    )
                    .buckets(vec![1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0, 500.0]),
                ),
            ),
            outbox_pending: add(
                r,
                IntGauge::new(
                    "mall_outbox_pending_rows",
                    "Outbox rows committed but not yet acknowledged by the broker",
                ),
            ),
            dead_letters_open: add(
                r,
                IntGauge::new(
                    "mall_dead_letters_open",
                    "Messages this service parked that were neither redriven nor discarded",
                ),
            ),
            relay_lag: add(
                r,
                Gauge::new(
                    "mall_relay_lag_seconds",
                    "Age of the oldest pending outbox row; 0 when none is pending",
                ),
            ),
            relay_published: add(
                r,
                IntCounter::new(
                    "mall_relay_published_total",
                    "Outbox rows published and acknowledged by the broker",
                ),
            ),
            relay_failures: add(
                r,
                IntCounter::new(
                    "mall_relay_failures_total",
                    "Relay rounds that failed (broker did not acknowledge, database error) \
                     and were retried",
                ),
            ),
            relay_refused: add(
                r,
                IntCounter::new(
                    "mall_relay_refused_total",
                    "Outbox rows the broker refused for good (too large...), marked with \
                     the error and skipped",
                ),
            ),
            producer_recreated: add(
                r,
                IntCounter::new(
                    "mall_producer_recreated_total",
                    "Times the relay replaced a producer that hit a fatal error",
                ),
            ),
            retention_deleted: add(
                r,
                IntCounterVec::new(
                    Opts::new(
                        "mall_retention_deleted_total",
                        "Rows the retention task deleted because they aged out of their \
                         window (settled history, published outbox rows, processed ids), \
                         by table",
                    ),
                    &["table"],
                ),
            ),
            http_requests: add(
                r,
                IntCounterVec::new(
                    Opts::new(
                        "mall_http_requests_total",
                        "HTTP requests answered, by method, route pattern (\"unmatched\" \
                         when none matched) and status",
                    ),
                    &["method", "route", "status"],
                ),
            ),
            http_duration: add(
                r,
                HistogramVec::new(
                    HistogramOpts::new(
                        "mall_http_request_duration_seconds",
                        "Time from receiving an HTTP request to its response head",
                    )
                    .buckets(HTTP_BUCKETS.to_vec()),
                    &["method", "route"],
                ),
            ),
            registry,
        }
    }

    /// Adds a service's own collector (orders' saga durations) to this service's registry.
    /// Fails when a metric of the same name is already registered.
    pub fn register(&self, collector: impl Collector + 'static) -> prometheus::Result<()> {
        self.registry.register(Box::new(collector))
    }

    /// This service's registry.
    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// Everything registered, in the Prometheus text exposition format.
    pub fn render(&self) -> String {
        let mut text = String::new();
        if let Err(e) = TextEncoder::new().encode_utf8(&self.registry.gather(), &mut text) {
            log::error!("/metrics: cannot encode the metrics: {e}");
        }
        text
    }

    /// Sets the outbox gauges from the pending row count and the age of the oldest one.
    pub(crate) fn outbox_backlog(&self, pending: i64, oldest_age_seconds: f64) {
        self.outbox_pending.set(pending);
        self.relay_lag.set(oldest_age_seconds.max(0.0));
    }

    /// Sets the gauge of parked messages waiting for an administrator.
    pub fn dead_letters_open(&self, open: i64) {
        self.dead_letters_open.set(open);
    }

    /// Counts one answered request.
    fn request(&self, method: &str, route: &str, status: u16, seconds: f64) {
        self.http_requests
            .with_label_values(&[method, route, &status.to_string()])
            .inc();
        self.http_duration
            .with_label_values(&[method, route])
            .observe(seconds);
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

/// Registers a collector built from fixed, valid and distinct definitions, so neither step
/// can fail (a unit test builds them all).
fn add<C: Collector + Clone + 'static>(registry: &Registry, collector: prometheus::Result<C>) -> C {
    let collector = collector.expect("a fixed metric definition is valid");
    registry
        .register(Box::new(collector.clone()))
        .expect("the shell's metric names are distinct");
    collector
}

/// The `method` label: the standard methods by name, anything else as `other`, so a client
/// cannot grow the label set.
fn method_label(method: &Method) -> &'static str {
    match *method {
        Method::GET => "GET",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::PATCH => "PATCH",
        Method::DELETE => "DELETE",
        Method::HEAD => "HEAD",
        Method::OPTIONS => "OPTIONS",
        _ => "other",
    }
}

/// Middleware (`App::wrap(from_fn(track_requests))`, outermost) that counts and times every
/// request by method, matched route pattern (`/orders/{id}`, not the path, so ids do not make
/// new series; [`UNMATCHED`] when no route matches) and status. Uses the [`Metrics`] in the
/// app data; without one it only passes requests on.
pub async fn track_requests(
    req: ServiceRequest,
    next: Next<impl MessageBody>,
) -> Result<ServiceResponse<impl MessageBody>, actix_web::Error> {
    let Some(metrics) = req.app_data::<web::Data<Metrics>>().cloned() else {
        return next.call(req).await;
    };
    let method = method_label(req.method());
    let route = req.match_pattern().unwrap_or_else(|| UNMATCHED.to_owned());
    let started = Instant::now();
    let result = next.call(req).await;
    let status = match &result {
        Ok(response) => response.status(),
        Err(e) => e.as_response_error().status_code(),
    };
    metrics.request(
        method,
        &route,
        status.as_u16(),
        started.elapsed().as_secs_f64(),
    );
    result
}

#[cfg(test)]
mod tests {
    use super::*;
    use actix_web::test as actix_test;
    use actix_web::{App, HttpResponse};

    async fn ok() -> HttpResponse {
        HttpResponse::Ok().finish()
    }

    /// The sample's value in `text`, for a line starting with `series` (name and labels).
    fn sample(text: &str, series: &str) -> Option<f64> {
        text.lines()
            .find_map(|line| line.strip_prefix(series)?.trim().parse().ok())
    }

    #[test]
    fn every_shell_metric_is_defined_and_exposed_with_help_and_type() {
        let m = Metrics::new();
        m.events_consumed.with_label_values(&["applied"]).inc_by(3);
        m.consumer_lag.with_label_values(&["2"]).set(7);
        m.outbox_backlog(4, 1.5);
        let text = m.render();
        assert!(
            text.contains("# TYPE mall_events_consumed_total counter"),
            "{text}"
        );
        assert!(text.contains("# HELP mall_relay_lag_seconds Age of the oldest"));
        assert_eq!(
            sample(&text, "mall_events_consumed_total{outcome=\"applied\"}"),
            Some(3.0)
        );
        assert_eq!(
            sample(&text, "mall_events_consumed_total{outcome=\"parked\"}"),
            Some(0.0),
            "every outcome is there from the start"
        );
        assert_eq!(
            sample(&text, "mall_consumer_lag{partition=\"2\"}"),
            Some(7.0)
        );
        assert_eq!(sample(&text, "mall_outbox_pending_rows"), Some(4.0));
        assert_eq!(sample(&text, "mall_relay_lag_seconds"), Some(1.5));
        for name in [
            "mall_event_retries_total",
            "mall_consumer_reopened_total",
            "mall_relay_published_total",
            "mall_relay_failures_total",
            "mall_relay_refused_total",
            "mall_producer_recreated_total",
        ] {
            assert_eq!(sample(&text, name), Some(0.0), "{name} in {text}");
        }
    }

    #[test]
    fn registries_are_per_service_and_a_name_cannot_be_registered_twice() {
        let (a, b) = (Metrics::new(), Metrics::new());
        a.event_retries.inc();
        assert_eq!(sample(&b.render(), "mall_event_retries_total"), Some(0.0));
        let own = || IntCounter::new("mall_own_total", "a service's own").unwrap();
        a.register(own()).unwrap();
        assert!(a.register(own()).is_err());
        assert!(
            b.register(own()).is_ok(),
            "another service's registry is apart"
        );
    }

    #[actix_web::test]
    async fn requests_are_labelled_by_route_pattern_method_and_status() {
        let metrics = web::Data::new(Metrics::new());
        let app = actix_test::init_service(
            App::new()
                .wrap(actix_web::middleware::from_fn(track_requests))
                .app_data(metrics.clone())
                .service(
                    web::resource("/orders/{id}")
                        .route(web::get().to(ok))
                        .default_service(web::to(|| async {
                            HttpResponse::MethodNotAllowed().finish()
                        })),
                )
                .service(web::scope("/deliveries").route("/{id}", web::patch().to(ok)))
                .default_service(web::to(|| async { HttpResponse::NotFound().finish() })),
        )
        .await;
        for (method, path, status) in [
            (Method::GET, "/orders/1", 200),
            (Method::GET, "/orders/2", 200),
            (Method::DELETE, "/orders/2", 405),
            (Method::PATCH, "/deliveries/9", 200),
            (Method::GET, "/nope/3", 404),
            (Method::from_bytes(b"BREW").unwrap(), "/orders/1", 405),
        ] {
            let req = actix_test::TestRequest::default()
                .method(method)
                .uri(path)
                .to_request();
            let response = actix_test::call_service(&app, req).await;
            assert_eq!(response.status().as_u16(), status, "{path}");
        }
        let text = metrics.render();
        let count = |labels: &str| sample(&text, &format!("mall_http_requests_total{{{labels}}}"));
        assert_eq!(
            count(r#"method="GET",route="/orders/{id}",status="200""#),
            Some(2.0),
            "{text}"
        );
        assert_eq!(
            count(r#"method="DELETE",route="/orders/{id}",status="405""#),
            Some(1.0)
        );
        assert_eq!(
            count(r#"method="PATCH",route="/deliveries/{id}",status="200""#),
            Some(1.0),
            "a scope's prefix is part of the pattern"
        );
        assert_eq!(
            count(r#"method="GET",route="unmatched",status="404""#),
            Some(1.0)
        );
        assert_eq!(
            count(r#"method="other",route="/orders/{id}",status="405""#),
            Some(1.0)
        );
        assert!(
            !text.contains("/orders/1"),
            "no path becomes a label: {text}"
        );
        assert_eq!(
            sample(
                &text,
                r#"mall_http_request_duration_seconds_count{method="GET",route="/orders/{id}"}"#
            ),
            Some(2.0)
        );
    }
}
