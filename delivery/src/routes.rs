//! Delivery's REST API: list and show deliveries; the courier completes or cancels one.

use crate::error::DeliveryError;
use crate::saga::{self, Delivery, DeliveryState};
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

/// A delivery as the API shows it.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
#[allow(missing_docs)]
pub struct DeliveryJson {
    pub id: i64,
    pub order_id: i64,
    pub product_id: i64,
    pub quantity: i64,
    pub customer_id: String,
    pub customer_name: Option<String>,
    pub delivery_address: Option<String>,
    pub delivery_state: String,
    pub order_confirmed: bool,
    pub state_message: Option<String>,
}

impl From<Delivery> for DeliveryJson {
    fn from(d: Delivery) -> Self {
        DeliveryJson {
            id: d.id,
            order_id: d.order_id,
            product_id: d.product_id,
            quantity: d.quantity,
            customer_id: d.customer_id,
            customer_name: d.customer_name,
            delivery_address: d.delivery_address,
            delivery_state: d.state.to_string(),
            order_confirmed: d.order_confirmed,
            state_message: d.state_message,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct ListQuery {
    order_id: Option<i64>,
}

/// `PATCH /deliveries/{id}` body.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct CourierUpdate {
    delivery_state: String,
}

async fn list(
    db: web::Data<Database>,
    query: web::Query<ListQuery>,
) -> Result<HttpResponse, DeliveryError> {
    let order_id = query.into_inner().order_id;
    let deliveries = db
        .read(move |conn| store::list(conn, order_id).map_err(DeliveryError::from))
        .await?;
    Ok(HttpResponse::Ok().json(
        deliveries
            .into_iter()
            .map(DeliveryJson::from)
            .collect::<Vec<_>>(),
    ))
}

async fn get_one(
    db: web::Data<Database>,
    id: web::Path<i64>,
) -> Result<HttpResponse, DeliveryError> {
    let id = id.into_inner();
    let delivery = db
        .read(move |conn| store::by_id(conn, id)?.ok_or(DeliveryError::NotFound(id)))
        .await?;
    Ok(HttpResponse::Ok().json(DeliveryJson::from(delivery)))
}

async fn update(
    db: web::Data<Database>,
    id: web::Path<i64>,
    body: web::Json<CourierUpdate>,
) -> Result<HttpResponse, DeliveryError> {
    let id = id.into_inner();
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
    Ok(HttpResponse::Ok().json(DeliveryJson::from(delivery)))
}
