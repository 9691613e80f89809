//! Safe retries: a request carrying an `Idempotency-Key` is acted on once. The key, a
//! fingerprint of what was asked and the answer are stored in the same transaction as the
//! change itself, so a retry — after a timeout, a 503, or an answer lost with its connection —
//! finds either nothing (the first attempt did not commit: it is acted on now) or the stored
//! answer (it committed: the same answer again, nothing done). The same key with a different
//! request is a client bug: 422.
//!
//! Every keyed write of the mall uses it the same way: `POST /orders`, `PATCH /orders/{id}`,
//! `PATCH /products/{id}`, `PATCH /deliveries/{id}` — [`IdempotentRequest::from_headers`],
//! [`recall_before`] (a retry answered without waiting for the writer), then [`recall`] and
//! [`remember`] inside the write, which returns a [`Keyed`].
//!
//! Keys are scoped by what they act on (`POST /orders`, `PATCH /orders/7`) and, with tokens,
//! by the caller ([`scope`]), and kept as long as the dedup state (`RETENTION_DEDUP_WINDOW_S`, 8 days by default; [`crate::retention`] prunes
//! them). Only successes are stored: a refused request changed nothing, so its retry is
//! decided afresh.

use crate::auth::Principal;
use crate::db::{Database, DbConnection};
use actix_web::HttpResponse;
use actix_web::http::StatusCode;
use actix_web::http::header::HeaderMap;
use diesel::prelude::*;
use serde::Serialize;
use sha2::{Digest, Sha256};

diesel::table! {
    /// Keys of requests acted on, with their answers.
    idempotency_keys (id) {
        id -> BigInt,
        scope -> Text,
        idempotency_key -> Text,
        fingerprint -> Text,
        status -> Integer,
        location -> Nullable<Text>,
        response -> Text,
        created_at -> Text,
    }
}

/// The request header.
pub const HEADER: &str = "Idempotency-Key";
/// The longest key accepted.
pub const MAX_KEY_LEN: usize = 255;
/// Set on an answer served from a stored key.
pub const REPLAYED_HEADER: &str = "Idempotent-Replayed";

/// One request's key, where it applies and what it asked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdempotentRequest {
    /// The client's `Idempotency-Key`.
    key: String,
    /// What it acts on: `POST /orders`, `PATCH /orders/7`.
    scope: String,
    /// SHA-256 of the request as the service understood it.
    fingerprint: String,
}

impl IdempotentRequest {
    /// The request's key, if it sent one, for `scope` and the parsed `request`; a key that is
    /// empty, longer than [`MAX_KEY_LEN`] or not visible ASCII is an error naming the header.
    pub fn from_headers(
        headers: &HeaderMap,
        scope: impl Into<String>,
        request: &impl Serialize,
    ) -> Result<Option<Self>, String> {
        let Some(value) = headers.get(HEADER) else {
            return Ok(None);
        };
        let key = value
            .to_str()
            .ok()
            .filter(|k| !k.is_empty() && k.len() <= MAX_KEY_LEN)
            .filter(|k| k.bytes().all(|b| b.is_ascii_graphic()))
            .ok_or_else(|| {
                format!(
                    "{HEADER} must be 1 to {MAX_KEY_LEN} visible ASCII characters (a UUID, say)"
                )
            })?;
        let canonical = serde_json::to_vec(request).map_err(|e| e.to_string())?;
        Ok(Some(IdempotentRequest {
            key: key.to_owned(),
            scope: scope.into(),
            fingerprint: format!("{:x}", Sha256::digest(canonical)),
        }))
    }
}

/// A stored answer, served again to a retry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Replay {
    /// The first answer's status.
    pub status: u16,
    /// Its `Location` header, if it had one.
    pub location: Option<String>,
    /// Its JSON body.
    pub body: String,
}

impl Replay {
    /// The first answer again, marked `Idempotent-Replayed: true`.
    pub fn response(&self) -> HttpResponse {
        let status = StatusCode::from_u16(self.status).unwrap_or(StatusCode::OK);
        let mut response = HttpResponse::build(status);
        response
            .content_type("application/json")
            .insert_header((REPLAYED_HEADER, "true"));
        if let Some(location) = &self.location {
            response.insert_header(("Location", location.as_str()));
        }
        response.body(self.body.clone())
    }
}

/// Why a keyed request cannot be answered from its key.
#[derive(Debug, thiserror::Error)]
pub enum IdempotencyError {
    /// The key was used for a different request: 422.
    #[error(
        "Idempotency-Key {0:?} was already used with a different request; send a new key for \
         a new request"
    )]
    OtherRequest(String),
    /// The database failed.
    #[error(transparent)]
    Db(#[from] crate::db::DbError),
}

impl From<diesel::result::Error> for IdempotencyError {
    fn from(e: diesel::result::Error) -> Self {
        IdempotencyError::Db(crate::db::DbError::Query(e))
    }
}

/// The stored answer for `request`'s key, if any; [`IdempotencyError::OtherRequest`] when the
/// key was used for something else. Call it inside the write that acts on the request (and,
/// to answer a retry without waiting for the writer, before it).
pub fn recall(
    conn: &mut DbConnection,
    request: &IdempotentRequest,
) -> Result<Option<Replay>, IdempotencyError> {
    use idempotency_keys as k;
    // Two instances retrying one key at once take turns: the second finds the first's answer.
    crate::db::lock(
        conn,
        crate::db::Lock::Key(&format!("{}\n{}", request.scope, request.key)),
    )?;
    let stored: Option<(String, i32, Option<String>, String)> = k::table
        .filter(k::scope.eq(&request.scope))
        .filter(k::idempotency_key.eq(&request.key))
        .select((k::fingerprint, k::status, k::location, k::response))
        .first(conn)
        .optional()?;
    match stored {
        None => Ok(None),
        Some((fingerprint, ..)) if fingerprint != request.fingerprint => {
            Err(IdempotencyError::OtherRequest(request.key.clone()))
        }
        Some((_, status, location, body)) => Ok(Some(Replay {
            status: u16::try_from(status).unwrap_or(200),
            location,
            body,
        })),
    }
}

/// What a keyed write did: acted now, or found its key and answers as the first time.
#[derive(Debug)]
pub enum Keyed<T> {
    /// Acted on now; the answer was stored with the change (when a key was sent).
    Done(T),
    /// The key was there: the first answer again, nothing done.
    Replayed(Replay),
}

impl<T> Keyed<T> {
    /// The answer: `done`'s for a change made now, the stored one for a replay.
    pub fn respond(self, done: impl FnOnce(T) -> HttpResponse) -> HttpResponse {
        match self {
            Keyed::Done(value) => done(value),
            Keyed::Replayed(replay) => replay.response(),
        }
    }
}

/// `action` (`PATCH /products/7`) scoped to the caller when the mall has tokens, so one
/// caller's key never answers another's request.
pub fn scope(who: Option<&Principal>, action: impl Into<String>) -> String {
    match who {
        Some(p) => format!("{} {}", p.name, action.into()),
        None => action.into(),
    }
}

/// The answer stored for `keyed`, read before the write so a retry does not wait for the
/// writer (or count against a pending bound); the write checks again in its transaction
/// ([`recall`]), which decides.
pub async fn recall_before(
    db: &Database,
    keyed: &Option<IdempotentRequest>,
) -> Result<Option<Replay>, IdempotencyError> {
    let Some(keyed) = keyed.clone() else {
        return Ok(None);
    };
    db.read(move |conn| recall(conn, &keyed)).await
}

/// Stores `request`'s key with the answer it got, in the caller's transaction.
pub fn remember(
    conn: &mut DbConnection,
    request: &IdempotentRequest,
    status: StatusCode,
    location: Option<&str>,
    body: &impl Serialize,
) -> Result<(), IdempotencyError> {
    use idempotency_keys as k;
    let response = serde_json::to_string(body).unwrap_or_else(|_| "null".into());
    diesel::insert_into(k::table)
        .values((
            k::scope.eq(&request.scope),
            k::idempotency_key.eq(&request.key),
            k::fingerprint.eq(&request.fingerprint),
            k::status.eq(i32::from(status.as_u16())),
            k::location.eq(location),
            k::response.eq(response),
            k::created_at.eq(chrono::Utc::now().to_rfc3339()),
        ))
        .execute(conn)?;
    Ok(())
}

/// Deletes up to `limit` keys stored before `cutoff` ([`crate::retention`]).
pub fn prune(conn: &mut DbConnection, cutoff: &str, limit: i64) -> QueryResult<usize> {
    use idempotency_keys as k;
    let batch: Vec<i64> = k::table
        .filter(k::created_at.lt(cutoff))
        .select(k::id)
        .limit(limit)
        .load(conn)?;
    diesel::delete(k::table.filter(k::id.eq_any(&batch))).execute(conn)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::db::{Database, PLUMBING_MIGRATIONS};
    use actix_web::http::header::{HeaderName, HeaderValue};

    fn keyed(key: &str, body: serde_json::Value) -> Result<Option<IdempotentRequest>, String> {
        let mut headers = HeaderMap::new();
        headers.insert(
            HeaderName::from_static("idempotency-key"),
            HeaderValue::from_str(key).map_err(|e| e.to_string())?,
        );
        IdempotentRequest::from_headers(&headers, "POST /orders", &body)
    }

    #[test]
    fn keys_are_short_visible_ascii_and_the_error_names_the_header() {
        assert_eq!(
            IdempotentRequest::from_headers(&HeaderMap::new(), "x", &1),
            Ok(None)
        );
        assert!(keyed("9f1c-retry-1", serde_json::json!({})).is_ok_and(|k| k.is_some()));
        for bad in ["", "a b", &"k".repeat(MAX_KEY_LEN + 1)] {
            let e = keyed(bad, serde_json::json!({})).unwrap_err();
            assert!(e.contains(HEADER), "{bad:?}: {e}");
        }
    }

    #[tokio::test]
    async fn the_same_key_and_request_recall_the_answer_another_request_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k.db");
        let db = Database::open(path.to_str().unwrap(), PLUMBING_MIGRATIONS).unwrap();
        let first = keyed("k1", serde_json::json!({"quantity": 1}))
            .unwrap()
            .unwrap();
        let stored = first.clone();
        db.write(move |conn| {
            assert!(recall(conn, &stored)?.is_none());
            remember(
                conn,
                &stored,
                StatusCode::CREATED,
                Some("/orders/7"),
                &serde_json::json!({"id": 7}),
            )?;
            Ok::<_, IdempotencyError>(((), Vec::new()))
        })
        .await
        .unwrap();
        let again = first.clone();
        let replay = db
            .read(move |conn| recall(conn, &again))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(
            replay,
            Replay {
                status: 201,
                location: Some("/orders/7".into()),
                body: r#"{"id":7}"#.into()
            }
        );
        let other = keyed("k1", serde_json::json!({"quantity": 2}))
            .unwrap()
            .unwrap();
        let refused = db.read(move |conn| recall(conn, &other)).await;
        assert!(
            matches!(refused, Err(IdempotencyError::OtherRequest(ref k)) if k == "k1"),
            "{refused:?}"
        );
        let pruned = db
            .write(|conn| {
                let n = prune(conn, "9999", 10)?;
                Ok::<_, IdempotencyError>((n, Vec::new()))
            })
            .await
            .unwrap();
        assert_eq!(pruned, 1);
    }
}
