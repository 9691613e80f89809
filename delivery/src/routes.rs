//! Delivery's REST API: list and show deliveries; the courier completes or cancels one.

use crate::error::DeliveryError;
use crate::saga::{self, DeliveryState};
use crate::store;
use actix_web::http::StatusCode;
use actix_web::{HttpRequest, HttpResponse, web};
use kafka::Database;
use kafka::auth::Principal;
use kafka::idempotency::{self, IdempotentRequest, Keyed};
use serde::{Deserialize, Serialize};

/// Registers the delivery endpoints.
pub fn routes(cfg: &mut web::ServiceConfig) {
    cfg.service(
        web::resource("/deliveries")
            .route(web::get().to(list))
            .default_service(web::to(kafka::http::method_not_allowed)),
    )
    .service(
        web::resource("/deliveries/{id}")
            .route(web::get().to(get_one))
            .route(web::patch().to(update))
            .default_service(web::to(kafka::http::method_not_allowed)),
    );
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct ListQuery {
    order_id: Option<i64>,
    after: Option<i64>,
    limit: Option<i64>,
}

/// `PATCH /deliveries/{id}` body.
#[derive(Debug, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct CourierUpdate {
    delivery_state: String,
}

async fn list(
    db: web::Data<Database>,
    query: web::Query<ListQuery>,
) -> Result<HttpResponse, DeliveryError> {
    let query = query.into_inner();
    let page =
        kafka::http::Page::parse(query.after, query.limit).map_err(DeliveryError::Invalid)?;
    let order_id = query.order_id;
    let deliveries = db
        .read(move |conn| store::list(conn, order_id, page).map_err(DeliveryError::from))
        .await?;
    Ok(HttpResponse::Ok().json(deliveries))
}

async fn get_one(
    db: web::Data<Database>,
    id: web::Path<i64>,
) -> Result<HttpResponse, DeliveryError> {
    let id = id.into_inner();
    let delivery = db
        .read(move |conn| store::by_id(conn, id)?.ok_or(DeliveryError::NotFound(id)))
        .await?;
    Ok(HttpResponse::Ok().json(delivery))
}

/// `PATCH /deliveries/{id}`; with an `Idempotency-Key` a retry gets the first answer (not a
/// 409 for a delivery it already completed) and changes nothing, see [`kafka::idempotency`].
async fn update(
    db: web::Data<Database>,
    id: web::Path<i64>,
    http: HttpRequest,
    who: Option<web::ReqData<Principal>>,
    body: web::Json<CourierUpdate>,
) -> Result<HttpResponse, DeliveryError> {
    let id = id.into_inner();
    kafka::http::refuse_nul(&*body).map_err(DeliveryError::Invalid)?;
    let target = match DeliveryState::parse(&body.delivery_state) {
        Some(state @ (DeliveryState::Completed | DeliveryState::Cancelled)) => state,
        _ => {
            return Err(DeliveryError::Invalid(format!(
                "deliveryState must be \"DeliveryCompleted\" or \"DeliveryCancelled\", got {:?}",
                body.delivery_state
            )));
        }
    };
    let scope = idempotency::scope(who.as_deref(), format!("PATCH /deliveries/{id}"));
    let keyed = IdempotentRequest::from_headers(http.headers(), scope, &*body)
        .map_err(DeliveryError::BadHeader)?;
    if let Some(replay) = idempotency::recall_before(&db, &keyed).await? {
        return Ok(replay.response());
    }
    let done = db
        .write(move |conn| {
            if let Some(keyed) = &keyed
                && let Some(replay) = idempotency::recall(conn, keyed)?
            {
                return Ok((Keyed::Replayed(replay), Vec::new()));
            }
            let current = store::by_id_to_change(conn, id)?.ok_or(DeliveryError::NotFound(id))?;
            let (delivery, event) = saga::courier_update(current, target)?;
            store::save(conn, &delivery)?;
            if let Some(keyed) = &keyed {
                idempotency::remember(conn, keyed, StatusCode::OK, None, &delivery)?;
            }
            Ok::<_, DeliveryError>((Keyed::Done(delivery), vec![event]))
        })
        .await?;
    Ok(done.respond(|delivery| HttpResponse::Ok().json(delivery)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::saga::Delivery;
    use actix_web::App;
    use actix_web::test::{self, TestRequest};

    /// `PATCH /deliveries/1` with `state` and an `Idempotency-Key`.
    fn patch(key: &str, state: &str) -> TestRequest {
        TestRequest::patch()
            .uri("/deliveries/1")
            .insert_header(("Idempotency-Key", key))
            .set_json(serde_json::json!({"deliveryState": state}))
    }

    /// A courier's keyed completion retried (its answer lost) gets the first answer, not a
    /// 409 for a delivery already completed, and one DeliveryCompleted is in the outbox; the
    /// same key with another state is a 422 naming the header.
    #[actix_web::test]
    async fn a_retried_keyed_completion_answers_as_the_first_and_acts_once() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("delivery.db");
        let db = Database::open(path.to_str().unwrap(), crate::startup::MIGRATIONS).unwrap();
        db.write(|conn| {
            let started = Delivery {
                id: 1,
                order_id: 1,
                product_id: 1,
                quantity: 1,
                customer_id: "c".into(),
                customer_name: None,
                delivery_address: None,
                state: DeliveryState::Started,
                order_confirmed: true,
                state_message: None,
            };
            store::save(conn, &started)?;
            Ok::<_, kafka::DbError>(((), Vec::new()))
        })
        .await
        .unwrap();
        let app = test::init_service(
            App::new()
                .app_data(web::Data::new(db.clone()))
                .configure(kafka::http::configure)
                .configure(routes),
        )
        .await;
        let outbox =
            || db.read(|conn| kafka::outbox::pending_count(conn).map_err(kafka::DbError::from));

        let first =
            test::call_service(&app, patch("done-1", "DeliveryCompleted").to_request()).await;
        assert_eq!(first.status(), 200);
        let first: serde_json::Value = test::read_body_json(first).await;
        let retry =
            test::call_service(&app, patch("done-1", "DeliveryCompleted").to_request()).await;
        assert_eq!(retry.status(), 200, "a retry is answered as the first time");
        assert_eq!(retry.headers().get("Idempotent-Replayed").unwrap(), "true");
        let retried: serde_json::Value = test::read_body_json(retry).await;
        assert_eq!(retried, first);
        assert_eq!(outbox().await.unwrap(), 1, "one DeliveryCompleted");

        let misuse =
            test::call_service(&app, patch("done-1", "DeliveryCancelled").to_request()).await;
        assert_eq!(misuse.status(), 422);
        let error: serde_json::Value = test::read_body_json(misuse).await;
        assert!(
            error["error"]
                .as_str()
                .is_some_and(|e| e.contains("Idempotency-Key")),
            "{error}"
        );
        // Without the key, completing again is the conflict it always was.
        let unkeyed = test::call_service(
            &app,
            TestRequest::patch()
                .uri("/deliveries/1")
                .set_json(serde_json::json!({"deliveryState": "DeliveryCompleted"}))
                .to_request(),
        )
        .await;
        assert_eq!(unkeyed.status(), 409);
        assert_eq!(outbox().await.unwrap(), 1);
    }
}
