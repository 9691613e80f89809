//! HTTP pieces every service shares: JSON error bodies for every rejection (never actix's plain
//! text), and `/health`.

use crate::db::Database;
use actix_web::error::{InternalError, JsonPayloadError, PathError, QueryPayloadError};
use actix_web::http::StatusCode;
use actix_web::{HttpRequest, HttpResponse, web};
use rdkafka::producer::{FutureProducer, Producer};
use std::fmt::Display;
use std::time::Duration;

/// The error body every endpoint returns: `{"error": "..."}`.
pub fn error_json(status: StatusCode, message: impl Display) -> HttpResponse {
    HttpResponse::build(status).json(serde_json::json!({ "error": message.to_string() }))
}

/// Registers the extractor settings and `/health`.
pub fn configure(cfg: &mut web::ServiceConfig) {
    cfg.app_data(
        web::JsonConfig::default()
            .limit(64 * 1024)
            .error_handler(json_error),
    )
    .app_data(web::PathConfig::default().error_handler(path_error))
    .app_data(web::QueryConfig::default().error_handler(query_error))
    .route("/health", web::get().to(health));
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

/// What `/health` checks: the service's database and its broker.
pub struct Health {
    db: Database,
    producer: FutureProducer,
    topic: String,
}

impl Health {
    /// A health check for `db` and the broker behind `producer`.
    pub fn new(db: Database, producer: FutureProducer, topic: String) -> Self {
        Health {
            db,
            producer,
            topic,
        }
    }

    async fn broker(&self) -> Result<(), String> {
        let producer = self.producer.clone();
        let topic = self.topic.clone();
        tokio::task::spawn_blocking(move || {
            producer
                .client()
                .fetch_metadata(Some(&topic), Duration::from_secs(2))
                .map(|_| ())
                .map_err(|e| e.to_string())
        })
        .await
        .map_err(|e| e.to_string())?
    }
}

/// `GET /health`: 200 when the database and broker answer, else 503 naming what does not.
pub async fn health(health: web::Data<Health>) -> HttpResponse {
    let (db, broker) = tokio::join!(health.db.ping(), health.broker());
    let db = db.map_err(|e| e.to_string());
    let status = |r: &Result<(), String>| match r {
        Ok(()) => "ok".to_string(),
        Err(e) => format!("unreachable: {e}"),
    };
    let body = serde_json::json!({ "database": status(&db), "broker": status(&broker) });
    if db.is_ok() && broker.is_ok() {
        HttpResponse::Ok().json(body)
    } else {
        let mut down = Vec::new();
        if db.is_err() {
            down.push("database");
        }
        if broker.is_err() {
            down.push("broker");
        }
        HttpResponse::ServiceUnavailable().json(serde_json::json!({
            "error": format!("{} not reachable", down.join(" and ")),
            "database": body["database"],
            "broker": body["broker"],
        }))
    }
}

/// The JSON 405 for a known path with a method it does not take.
pub async fn method_not_allowed(req: HttpRequest) -> HttpResponse {
    error_json(
        StatusCode::METHOD_NOT_ALLOWED,
        format!("{} is not allowed on {}", req.method(), req.path()),
    )
}
