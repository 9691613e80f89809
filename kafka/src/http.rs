//! HTTP pieces every service shares: JSON error bodies for every rejection (never actix's plain
//! text), `/health`, and `/metrics` (the service's [`Metrics`] in the Prometheus text format).

use crate::consumer::ConsumerStatus;
use crate::db::{Database, DbError};
use crate::metrics::Metrics;
use crate::outbox::RelayStatus;
use crate::parking;
use actix_web::error::{InternalError, JsonPayloadError, PathError, QueryPayloadError};
use actix_web::http::StatusCode;
use actix_web::{HttpRequest, HttpResponse, web};
use rdkafka::consumer::{BaseConsumer, Consumer};
use std::fmt::Display;
use std::sync::Arc;
use std::time::Duration;

/// The error body every endpoint returns: `{"error": "..."}`.
pub fn error_json(status: StatusCode, message: impl Display) -> HttpResponse {
    HttpResponse::build(status).json(serde_json::json!({ "error": message.to_string() }))
}

/// A refusal to take more work now: 503, the error body, and `Retry-After: 1`, which a
/// client can act on.
pub fn too_busy(message: impl Display) -> HttpResponse {
    let mut refused = error_json(StatusCode::SERVICE_UNAVAILABLE, message);
    refused.headers_mut().insert(
        actix_web::http::header::RETRY_AFTER,
        actix_web::http::header::HeaderValue::from_static("1"),
    );
    refused
}

/// Registers the extractor settings, `/health`, `/metrics` and `/dead-letters` (list,
/// inspect, redrive, discard).
pub fn configure(cfg: &mut web::ServiceConfig) {
    cfg.app_data(
        web::JsonConfig::default()
            .limit(64 * 1024)
            .error_handler(json_error),
    )
    .app_data(web::PathConfig::default().error_handler(path_error))
    .app_data(web::QueryConfig::default().error_handler(query_error))
    .route("/health", web::get().to(health))
    .route("/metrics", web::get().to(metrics))
    .route("/dead-letters", web::get().to(dead_letters))
    .route("/dead-letters/{id}", web::get().to(dead_letter))
    .route("/dead-letters/{id}/redrive", web::post().to(redrive))
    .route("/dead-letters/{id}/discard", web::post().to(discard));
}

#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct DeadLetterQuery {
    after: Option<i64>,
    limit: Option<i64>,
    /// `parked`, `redriven` or `discarded`.
    status: Option<String>,
}

/// `GET /dead-letters[?after=&limit=&status=]`: the messages this service parked, with the
/// reason and what became of them.
async fn dead_letters(db: web::Data<Database>, query: web::Query<DeadLetterQuery>) -> HttpResponse {
    let page = match Page::parse(query.after, query.limit) {
        Ok(page) => page,
        Err(e) => return error_json(StatusCode::UNPROCESSABLE_ENTITY, e),
    };
    let statuses = [parking::PARKED, parking::REDRIVEN, parking::DISCARDED];
    let status = match query.status.as_deref() {
        None => None,
        Some(s) if statuses.contains(&s) => Some(s.to_owned()),
        Some(other) => {
            return error_json(
                StatusCode::UNPROCESSABLE_ENTITY,
                format!("status must be one of parked, redriven, discarded, got {other:?}"),
            );
        }
    };
    let rows = db
        .read(move |conn| parking::list(conn, page, status.as_deref()).map_err(DbError::from))
        .await;
    match rows {
        Ok(rows) => HttpResponse::Ok().json(rows),
        Err(e) => db_failure("GET /dead-letters", &e),
    }
}

/// `GET /dead-letters/{id}`: one parked message with the event itself when it decoded.
async fn dead_letter(db: web::Data<Database>, id: web::Path<i64>) -> HttpResponse {
    let id = id.into_inner();
    match db
        .read(move |conn| parking::get(conn, id).map_err(DbError::from))
        .await
    {
        Ok(Some(message)) => HttpResponse::Ok().json(message),
        Ok(None) => error_json(StatusCode::NOT_FOUND, parking::ResolveError::NotFound(id)),
        Err(e) => db_failure("GET /dead-letters/{id}", &e),
    }
}

/// `POST /dead-letters/{id}/redrive`: the parked event goes back to the saga topic with a new
/// event id, for this service alone; recorded, and announced to its order (orders shows it).
async fn redrive(
    db: web::Data<Database>,
    health: web::Data<Health>,
    id: web::Path<i64>,
) -> HttpResponse {
    let (id, group) = (id.into_inner(), health.consumer.group().to_owned());
    resolve(&db, "redrive", move |conn| {
        parking::redrive(conn, &group, id)
    })
    .await
}

#[derive(Debug, serde::Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
struct DiscardBody {
    /// Why the message is given up; required, so the record says.
    reason: String,
}

/// `POST /dead-letters/{id}/discard {"reason": "..."}`: the parked message is given up;
/// recorded with the reason, and announced to its order.
async fn discard(
    db: web::Data<Database>,
    health: web::Data<Health>,
    id: web::Path<i64>,
    body: web::Json<DiscardBody>,
) -> HttpResponse {
    if let Err(e) = refuse_nul(&*body) {
        return error_json(StatusCode::UNPROCESSABLE_ENTITY, e);
    }
    let reason = body.into_inner().reason.trim().to_owned();
    if reason.is_empty() {
        return error_json(
            StatusCode::UNPROCESSABLE_ENTITY,
            "reason must say why the message is discarded",
        );
    }
    let (id, group) = (id.into_inner(), health.consumer.group().to_owned());
    resolve(&db, "discard", move |conn| {
        parking::discard(conn, &group, id, &reason)
    })
    .await
}

/// Runs a redrive or a discard as one write (the record, the copy and the announcement
/// commit together) and answers for it.
async fn resolve<F>(db: &Database, what: &str, f: F) -> HttpResponse
where
    F: FnOnce(
            &mut crate::db::DbConnection,
        )
            -> Result<(parking::Resolved, Option<events::Envelope>), parking::ResolveError>
        + Send
        + 'static,
{
    let done = db
        .write(move |conn| {
            let (resolved, announced) = f(conn)?;
            Ok::<_, parking::ResolveError>((resolved, announced.into_iter().collect()))
        })
        .await;
    match done {
        Ok(resolved) => {
            db.wake_relay();
            log::info!(
                "dead letter {}: {} ({})",
                resolved.id,
                resolved.status,
                resolved.resolution
            );
            HttpResponse::Ok().json(resolved)
        }
        Err(parking::ResolveError::NotFound(id)) => {
            error_json(StatusCode::NOT_FOUND, parking::ResolveError::NotFound(id))
        }
        Err(parking::ResolveError::Conflict(why)) => error_json(StatusCode::CONFLICT, why),
        Err(parking::ResolveError::Db(e)) => db_failure(what, &e),
    }
}

/// The answer to a database failure: 503 when it may pass, 500 otherwise; the cause is logged,
/// never sent.
fn db_failure(what: &str, e: &DbError) -> HttpResponse {
    log::error!("{what}: {e}");
    let status = if e.is_transient() {
        StatusCode::SERVICE_UNAVAILABLE
    } else {
        StatusCode::INTERNAL_SERVER_ERROR
    };
    error_json(
        status,
        format!("{what}: the database failed; see the service log"),
    )
}

fn json_error(err: JsonPayloadError, _: &HttpRequest) -> actix_web::Error {
    let (status, message) = match &err {
        JsonPayloadError::ContentType => (
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "the body must be JSON with Content-Type: application/json".to_string(),
        ),
        JsonPayloadError::Overflow { limit }
        | JsonPayloadError::OverflowKnownLength { limit, .. } => (
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("the body is larger than {limit} bytes"),
        ),
        JsonPayloadError::Deserialize(e) if e.is_data() => (
            StatusCode::UNPROCESSABLE_ENTITY,
            format!("invalid request body: {e}"),
        ),
        other => (
            StatusCode::BAD_REQUEST,
            format!("invalid JSON body: {other}"),
        ),
    };
    InternalError::from_response(err, error_json(status, message)).into()
}

fn path_error(err: PathError, _: &HttpRequest) -> actix_web::Error {
    let message = format!("invalid path: {err}; ids are whole numbers");
    InternalError::from_response(err, error_json(StatusCode::BAD_REQUEST, message)).into()
}

fn query_error(err: QueryPayloadError, _: &HttpRequest) -> actix_web::Error {
    let message = format!("invalid query string: {err}");
    InternalError::from_response(err, error_json(StatusCode::BAD_REQUEST, message)).into()
}

/// The JSON 404 for paths no service route matches.
pub async fn not_found(req: HttpRequest) -> HttpResponse {
    error_json(
        StatusCode::NOT_FOUND,
        format!("no such endpoint: {} {}", req.method(), req.path()),
    )
}

/// What `/health` checks: the database, the broker, and whether the consumer and the relay
/// make progress.
pub struct Health {
    /// The service's database.
    pub db: Database,
    /// A group-less client for broker metadata.
    pub probe: Arc<BaseConsumer>,
    /// The saga topic.
    pub topic: String,
    /// The consumer's progress.
    pub consumer: Arc<ConsumerStatus>,
    /// The relay's progress.
    pub relay: Arc<RelayStatus>,
    /// How long a part may make no progress before it counts as stuck.
    pub stuck_after: Duration,
}

impl Health {
    async fn broker(&self) -> Result<(), String> {
        let probe = self.probe.clone();
        let topic = self.topic.clone();
        tokio::task::spawn_blocking(move || {
            probe
                .fetch_metadata(Some(&topic), Duration::from_secs(2))
                .map(|_| ())
                .map_err(|e| e.to_string())
        })
        .await
        .map_err(|e| e.to_string())?
    }
}

/// `GET /health`: 200 when the database and broker answer and the consumer and relay make
/// progress; else 503 naming every part that does not, and why (also logged).
pub async fn health(health: web::Data<Health>) -> HttpResponse {
    let (db, broker) = tokio::join!(health.db.ping(), health.broker());
    // Parked messages do not make a service unhealthy (it goes on), but their sagas may
    // wait on them: the count is here and on the dashboard until they are resolved.
    let open_dead_letters = health
        .db
        .read(|conn| parking::count_open(conn).map_err(DbError::from))
        .await
        .ok();
    let mut problems = Vec::new();
    if let Err(e) = &db {
        problems.push(format!("database unreachable: {e}"));
    }
    if let Err(e) = &broker {
        problems.push(format!("broker unreachable: {e}"));
    }
    problems.extend(health.consumer.problem());
    problems.extend(health.relay.problem(health.stuck_after));
    let status = |r: &Result<(), String>| match r {
        Ok(()) => "ok".to_string(),
        Err(e) => format!("unreachable: {e}"),
    };
    let mut body = serde_json::json!({
        "database": status(&db.map_err(|e| e.to_string())),
        "broker": status(&broker),
        "consumer": health.consumer.snapshot(),
        "relay": health.relay.snapshot(),
        "deadLetters": { "open": open_dead_letters },
    });
    if problems.is_empty() {
        return HttpResponse::Ok().json(body);
    }
    for problem in &problems {
        log::warn!("/health: {problem}");
    }
    body["error"] = problems.join("; ").into();
    HttpResponse::ServiceUnavailable().json(body)
}

/// `GET /metrics`: the service's [`Metrics`] in the Prometheus text exposition format, with
/// the outbox backlog read now. When the database cannot be read the backlog gauges keep their
/// last values (logged) and everything else is still served.
pub async fn metrics(metrics: web::Data<Metrics>, db: web::Data<Database>) -> HttpResponse {
    match db
        .read(|conn| crate::outbox::backlog(conn).map_err(crate::DbError::from))
        .await
    {
        Ok(backlog) => metrics.outbox_backlog(
            backlog.pending,
            backlog.oldest_age_seconds(chrono::Utc::now()),
        ),
        Err(e) => log::warn!("/metrics: cannot read the outbox backlog: {e}"),
    }
    match db
        .read(|conn| parking::count_open(conn).map_err(DbError::from))
        .await
    {
        Ok(open) => metrics.dead_letters_open(open),
        Err(e) => log::warn!("/metrics: cannot count the open dead letters: {e}"),
    }
    HttpResponse::Ok()
        .content_type(crate::metrics::CONTENT_TYPE)
        .body(metrics.render())
}

/// The JSON 405 for a known path with a method it does not take.
pub async fn method_not_allowed(req: HttpRequest) -> HttpResponse {
    error_json(
        StatusCode::METHOD_NOT_ALLOWED,
        format!("{} is not allowed on {}", req.method(), req.path()),
    )
}

/// Refuses a request (body or query) with a NUL character in any text field, naming the
/// field: PostgreSQL text cannot hold one, and SQLite refuses it too so both backends answer
/// alike (a 422, never a 503 from a failed write).
pub fn refuse_nul<T: serde::Serialize>(request: &T) -> Result<(), String> {
    let value = serde_json::to_value(request).map_err(|e| e.to_string())?;
    match events::find_nul(&value) {
        Some(field) => Err(format!(
            "{field} must not contain a NUL character (\\u0000)"
        )),
        None => Ok(()),
    }
}

/// Reads a whole number from a JSON number or a string holding one (`"1"`): httpie's
/// `key=value` sends strings, and the seed lab's Java services accepted them. The error names
/// the field: `quantity must be a whole number, got "abc"`.
pub fn whole_number(field: &str, value: &serde_json::Value) -> Result<i64, String> {
    let parsed = match value {
        serde_json::Value::Number(n) => n.as_i64(),
        serde_json::Value::String(text) => text.trim().parse::<i64>().ok(),
        _ => None,
    };
    parsed.ok_or_else(|| format!("{field} must be a whole number, got {value}"))
}

/// [`whole_number`] for an optional field.
pub fn optional_whole_number(
    field: &str,
    value: Option<&serde_json::Value>,
) -> Result<Option<i64>, String> {
    value
        .filter(|v| !v.is_null())
        .map(|v| whole_number(field, v))
        .transpose()
}

/// One page of a list endpoint: ids after `after`, at most `limit` of them
/// (`?after=<last id seen>&limit=<n>`; a page shorter than `limit` is the last).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Page {
    /// Only ids greater than this.
    pub after: i64,
    /// At most this many.
    pub limit: i64,
}

impl Page {
    /// The page when no `limit` is given.
    pub const DEFAULT_LIMIT: i64 = 100;
    /// The largest `limit` accepted.
    pub const MAX_LIMIT: i64 = 1000;

    /// Validates the query parameters; the error names the parameter.
    pub fn parse(after: Option<i64>, limit: Option<i64>) -> Result<Page, String> {
        let after = after.unwrap_or(0);
        if after < 0 {
            return Err(format!("after must be an id (0 or more), got {after}"));
        }
        let limit = limit.unwrap_or(Self::DEFAULT_LIMIT);
        if !(1..=Self::MAX_LIMIT).contains(&limit) {
            return Err(format!(
                "limit must be between 1 and {}, got {limit}",
                Self::MAX_LIMIT
            ));
        }
        Ok(Page { after, limit })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn whole_numbers_come_as_numbers_or_strings_and_errors_name_the_field() {
        use serde_json::json;
        assert_eq!(whole_number("quantity", &json!(3)), Ok(3));
        assert_eq!(whole_number("quantity", &json!("3")), Ok(3));
        assert_eq!(whole_number("quantity", &json!(" 12 ")), Ok(12));
        assert_eq!(
            whole_number("quantity", &json!("abc")),
            Err("quantity must be a whole number, got \"abc\"".into())
        );
        assert!(
            whole_number("price", &json!(1.5))
                .unwrap_err()
                .starts_with("price")
        );
        assert!(whole_number("price", &json!(true)).is_err());
        assert_eq!(optional_whole_number("stock", None), Ok(None));
        assert_eq!(optional_whole_number("stock", Some(&json!(null))), Ok(None));
    }

    #[actix_web::test]
    async fn metrics_are_served_as_text_with_the_outbox_backlog_read_at_scrape_time() {
        use actix_web::test as actix_test;
        use events::{Envelope, Event, OrderCompleted, Service};
        const PLUMBING: crate::db::Migrations = crate::db::PLUMBING_MIGRATIONS;
        let dir = tempfile::tempdir().unwrap();
        let db = Database::open(dir.path().join("m.db").to_str().unwrap(), PLUMBING).unwrap();
        let event = Envelope::new(
            Service::Orders,
            Event::OrderCompleted(OrderCompleted {
                order_id: 1,
                product_id: 1,
                quantity: 1,
                customer_id: "c".into(),
            }),
        );
        db.write(move |_| Ok::<_, crate::DbError>(((), vec![event])))
            .await
            .unwrap();
        let metrics = web::Data::new(Metrics::new());
        let app = actix_test::init_service(
            actix_web::App::new()
                .wrap(actix_web::middleware::from_fn(
                    crate::metrics::track_requests,
                ))
                .app_data(web::Data::new(db))
                .app_data(metrics.clone())
                .configure(configure),
        )
        .await;
        let scrape = || actix_test::TestRequest::get().uri("/metrics").to_request();
        let first = actix_test::call_service(&app, scrape()).await;
        assert_eq!(first.status(), StatusCode::OK);
        assert_eq!(
            first
                .headers()
                .get("content-type")
                .and_then(|v| v.to_str().ok()),
            Some("text/plain; version=0.0.4; charset=utf-8")
        );
        let text = String::from_utf8(actix_test::read_body(first).await.to_vec()).unwrap();
        assert!(
            text.lines().any(|l| l == "mall_outbox_pending_rows 1"),
            "{text}"
        );
        assert!(text.contains("# TYPE mall_relay_lag_seconds gauge"));
        let second = actix_test::call_service(&app, scrape()).await;
        let text = String::from_utf8(actix_test::read_body(second).await.to_vec()).unwrap();
        assert!(
            text.lines().any(|l| l
                == r#"mall_http_requests_total{method="GET",route="/metrics",status="200"} 1"#),
            "the first scrape was counted: {text}"
        );
    }

    #[test]
    fn pages_default_and_bad_values_name_the_parameter() {
        assert_eq!(
            Page::parse(None, None),
            Ok(Page {
                after: 0,
                limit: Page::DEFAULT_LIMIT
            })
        );
        assert!(Page::parse(None, Some(0)).unwrap_err().contains("limit"));
        assert!(Page::parse(None, Some(1001)).unwrap_err().contains("limit"));
        assert!(Page::parse(Some(-1), None).unwrap_err().contains("after"));
    }
}
