//! Delivery's REST API: list and show deliveries; the courier completes or cancels one.

use crate::error::DeliveryError;
use crate::saga::{self, DeliveryState};
use crate::store;
use actix_web::{HttpResponse, web};
use kafka::Database;
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

async fn update(
    db: web::Data<Database>,
    id: web::Path<i64>,
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
    let delivery = db
        .write(move |conn| {
            let current = store::by_id(conn, id)?.ok_or(DeliveryError::NotFound(id))?;
            let (delivery, event) = saga::courier_update(current, target)?;
            store::save(conn, &delivery)?;
            Ok::<_, DeliveryError>((delivery, vec![event]))
        })
        .await?;
    Ok(HttpResponse::Ok().json(delivery))
}
