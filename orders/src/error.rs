//! Orders' HTTP errors: a 4xx with a plain message for the client's mistakes; internal causes
//! are logged, never sent.

use actix_web::http::StatusCode;
use actix_web::{HttpResponse, ResponseError};
use kafka::DbError;

/// Everything an orders endpoint can answer besides success.
#[derive(Debug, thiserror::Error)]
pub enum OrdersError {
    /// No order has this id.
    #[error("order {0} not found")]
    OrderNotFound(i64),
    /// The replica has no product with this id.
    #[error("product {0} not found")]
    ProductNotFound(i64),
    /// The request's values are not acceptable.
    #[error("{0}")]
    Invalid(String),
    /// The caller's token does not cover this order (a customer's, someone else's order).
    #[error("{0}")]
    Forbidden(String),
    /// A header is malformed (an `Idempotency-Key` too long, say).
    #[error("{0}")]
    BadHeader(String),
    /// The order's state does not allow the change.
    #[error(transparent)]
    Conflict(#[from] crate::saga::CancelRefused),
    /// Too many orders are still in progress to take another now.
    #[error(transparent)]
    Busy(#[from] crate::pending::TooManyPending),
    /// A bug or an unavailable database; details go to the log only.
    #[error("internal error, see the orders service log")]
    Internal(#[source] DbError),
}

impl From<DbError> for OrdersError {
    fn from(e: DbError) -> Self {
        OrdersError::Internal(e)
    }
}

impl From<kafka::idempotency::IdempotencyError> for OrdersError {
    fn from(e: kafka::idempotency::IdempotencyError) -> Self {
        use kafka::idempotency::IdempotencyError;
        match e {
            IdempotencyError::OtherRequest(_) => OrdersError::Invalid(e.to_string()),
            IdempotencyError::Db(e) => OrdersError::Internal(e),
        }
    }
}

impl From<diesel::result::Error> for OrdersError {
    fn from(e: diesel::result::Error) -> Self {
        OrdersError::Internal(DbError::Query(e))
    }
}

impl ResponseError for OrdersError {
    fn status_code(&self) -> StatusCode {
        match self {
            OrdersError::OrderNotFound(_) | OrdersError::ProductNotFound(_) => {
                StatusCode::NOT_FOUND
            }
            OrdersError::Invalid(_) => StatusCode::UNPROCESSABLE_ENTITY,
            OrdersError::BadHeader(_) => StatusCode::BAD_REQUEST,
            OrdersError::Forbidden(_) => StatusCode::FORBIDDEN,
            OrdersError::Conflict(_) => StatusCode::CONFLICT,
            OrdersError::Busy(_) => StatusCode::SERVICE_UNAVAILABLE,
            OrdersError::Internal(e) if e.is_transient() => StatusCode::SERVICE_UNAVAILABLE,
            OrdersError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    fn error_response(&self) -> HttpResponse {
        if let OrdersError::Internal(cause) = self {
            log::error!("request failed: {cause}");
        }
        match self {
            OrdersError::Busy(refused) => kafka::http::too_busy(refused),
            _ => kafka::http::error_json(self.status_code(), self),
        }
    }
}
