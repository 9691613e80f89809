//! Delivery's HTTP errors: a 4xx with a plain message for the client's mistakes; internal causes
//! are logged, never sent.

use actix_web::http::StatusCode;
use actix_web::{HttpResponse, ResponseError};
use kafka::DbError;

/// Everything a delivery endpoint can answer besides success.
#[derive(Debug, thiserror::Error)]
pub enum DeliveryError {
    /// No delivery has this id.
    #[error("delivery {0} not found")]
    NotFound(i64),
    /// The request's values are not acceptable.
    #[error("{0}")]
    Invalid(String),
    /// The delivery's state does not allow the change.
    #[error(transparent)]
    Conflict(#[from] crate::saga::IllegalTransition),
    /// A header is malformed (an `Idempotency-Key` too long, say).
    #[error("{0}")]
    BadHeader(String),
    /// A bug or an unavailable database; details go to the log only.
    #[error("internal error, see the delivery service log")]
    Internal(#[source] DbError),
}

impl From<DbError> for DeliveryError {
    fn from(e: DbError) -> Self {
        DeliveryError::Internal(e)
    }
}

impl From<kafka::idempotency::IdempotencyError> for DeliveryError {
    fn from(e: kafka::idempotency::IdempotencyError) -> Self {
        use kafka::idempotency::IdempotencyError;
        match e {
            IdempotencyError::OtherRequest(_) => DeliveryError::Invalid(e.to_string()),
            IdempotencyError::Db(e) => DeliveryError::Internal(e),
        }
    }
}

impl From<diesel::result::Error> for DeliveryError {
    fn from(e: diesel::result::Error) -> Self {
        DeliveryError::Internal(DbError::Query(e))
    }
}

impl ResponseError for DeliveryError {
    fn status_code(&self) -> StatusCode {
        match self {
            DeliveryError::NotFound(_) => StatusCode::NOT_FOUND,
            DeliveryError::Invalid(_) => StatusCode::UNPROCESSABLE_ENTITY,
            DeliveryError::BadHeader(_) => StatusCode::BAD_REQUEST,
            DeliveryError::Conflict(_) => StatusCode::CONFLICT,
            DeliveryError::Internal(e) if e.is_transient() => StatusCode::SERVICE_UNAVAILABLE,
            DeliveryError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    fn error_response(&self) -> HttpResponse {
        if let DeliveryError::Internal(cause) = self {
            log::error!("request failed: {cause}");
        }
        kafka::http::error_json(self.status_code(), self)
    }
}
