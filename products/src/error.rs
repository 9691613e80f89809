//! Products' HTTP errors: what a client did wrong gets a 4xx and a plain message; internal
//! causes are logged and never sent.

use actix_web::http::StatusCode;
use actix_web::{HttpResponse, ResponseError};
use kafka::DbError;

/// Everything a products endpoint can answer besides success.
#[derive(Debug, thiserror::Error)]
pub enum ProductsError {
    /// No product has this id.
    #[error("product {0} not found")]
    NotFound(i64),
    /// Products has decided nothing for this order (yet).
    #[error("no reservation for order {0}")]
    NoReservation(i64),
    /// The product changed since the client read it (`expectedStock`).
    #[error("{0}")]
    Conflict(String),
    /// The request is well-formed JSON but its values are not acceptable.
    #[error("{0}")]
    Invalid(String),
    /// A header is malformed (an `Idempotency-Key` too long, say).
    #[error("{0}")]
    BadHeader(String),
    /// A bug or an unavailable database; details go to the log only.
    #[error("internal error, see the products service log")]
    Internal(#[source] DbError),
}

impl From<DbError> for ProductsError {
    fn from(e: DbError) -> Self {
        ProductsError::Internal(e)
    }
}

impl From<kafka::idempotency::IdempotencyError> for ProductsError {
    fn from(e: kafka::idempotency::IdempotencyError) -> Self {
        use kafka::idempotency::IdempotencyError;
        match e {
            IdempotencyError::OtherRequest(_) => ProductsError::Invalid(e.to_string()),
            IdempotencyError::Db(e) => ProductsError::Internal(e),
        }
    }
}

impl From<diesel::result::Error> for ProductsError {
    fn from(e: diesel::result::Error) -> Self {
        ProductsError::Internal(DbError::Query(e))
    }
}

impl ResponseError for ProductsError {
    fn status_code(&self) -> StatusCode {
        match self {
            ProductsError::NotFound(_) | ProductsError::NoReservation(_) => StatusCode::NOT_FOUND,
            ProductsError::Conflict(_) => StatusCode::CONFLICT,
            ProductsError::Invalid(_) => StatusCode::UNPROCESSABLE_ENTITY,
            ProductsError::BadHeader(_) => StatusCode::BAD_REQUEST,
            ProductsError::Internal(e) if e.is_transient() => StatusCode::SERVICE_UNAVAILABLE,
            ProductsError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    fn error_response(&self) -> HttpResponse {
        if let ProductsError::Internal(cause) = self {
            log::error!("request failed: {cause}");
        }
        kafka::http::error_json(self.status_code(), self)
    }
}
