//! Orders' REST API: place, list, show and cancel orders; an order's saga history; the catalog
//! replica.

use crate::domain::OrderRequest;
use crate::error::OrdersError;
use crate::pending::PendingOrders;
use crate::saga::{self, CustomerCancel, Order, OrderState};
use crate::store::{self, HistoryRow, StoredOrder};
use actix_web::http::StatusCode;
use actix_web::{HttpRequest, HttpResponse, web};
use events::DeadLetterNote;
use kafka::Database;
use kafka::auth::Principal;
use kafka::db::DbConnection;
use kafka::idempotency::{self, IdempotentRequest, Keyed};
use serde::{Deserialize, Serialize};

/// Registers the orders endpoints.
pub fn routes(cfg: &mut web::ServiceConfig) {
    let not_allowed = || web::to(kafka::http::method_not_allowed);
    cfg.service(
        web::resource("/orders")
            .route(web::get().to(list))
            .route(web::post().to(place))
            .default_service(not_allowed()),
    )
    .service(
        web::resource("/orders/{id}")
            .route(web::get().to(get_one))
            .route(web::patch().to(update))
            .default_service(not_allowed()),
    )
    .service(
        web::resource("/orders/{id}/events")
            .route(web::get().to(events))
            .default_service(not_allowed()),
    )
    .service(
        web::resource("/products")
            .route(web::get().to(products))
            .default_service(not_allowed()),
    )
    .service(
        web::resource("/products/{id}")
            .route(web::get().to(product))
            .default_service(not_allowed()),
    );
}

/// An order as the API shows it: the order's fields plus when it was placed and last changed.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct OrderJson {
    #[serde(flatten)]
    order: Order,
    created_at: String,
    updated_at: String,
    /// Saga events of this order that a service parked and nobody has redriven or discarded
    /// yet: its saga may wait on them (see the service's `/dead-letters/{deadLetterId}`).
    parked_events: Vec<DeadLetterNote>,
}

impl From<StoredOrder> for OrderJson {
    fn from(s: StoredOrder) -> Self {
        OrderJson {
            order: s.order,
            created_at: s.created_at,
            updated_at: s.updated_at,
            parked_events: Vec::new(),
        }
    }
}

/// `orders` as the API shows them, each with the parked events it waits on.
fn with_parked(
    conn: &mut DbConnection,
    orders: Vec<StoredOrder>,
) -> Result<Vec<OrderJson>, OrdersError> {
    let ids: Vec<i64> = orders.iter().map(|o| o.order.id).collect();
    let mut parked = store::open_parked_events(conn, &ids)?;
    Ok(orders
        .into_iter()
        .map(|stored| {
            let id = stored.order.id;
            OrderJson {
                parked_events: parked.remove(&id).unwrap_or_default(),
                ..OrderJson::from(stored)
            }
        })
        .collect())
}

/// One entry of an order's timeline.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
#[allow(missing_docs)]
pub struct HistoryEntry {
    pub event_type: String,
    pub source: String,
    pub event_id: String,
    pub causation_id: Option<String>,
    pub initiator: Option<String>,
    pub timestamp: String,
    pub payload: serde_json::Value,
}

impl From<HistoryRow> for HistoryEntry {
    fn from(r: HistoryRow) -> Self {
        HistoryEntry {
            payload: serde_json::from_str(&r.payload)
                .unwrap_or(serde_json::Value::String(r.payload)),
            event_type: r.event_type,
            source: r.source,
            event_id: r.event_id,
            causation_id: r.causation_id,
            initiator: r.initiator,
            timestamp: r.timestamp,
        }
    }
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct PlaceOrder {
    /// A number or a string holding one (the seed lab's httpie `productId=1`).
    product_id: serde_json::Value,
    /// A number or a string holding one.
    quantity: serde_json::Value,
    customer_id: String,
    #[serde(default)]
    customer_name: Option<String>,
    #[serde(default)]
    customer_addr: Option<String>,
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct ListQuery {
    customer_id: Option<String>,
    after: Option<i64>,
    limit: Option<i64>,
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
struct PageQuery {
    after: Option<i64>,
    limit: Option<i64>,
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
struct UpdateOrder {
    state: String,
}

/// The caller, when the mall has tokens.
type Caller = Option<web::ReqData<Principal>>;

/// Refuses a customer's token for someone else's order.
fn check_owner(who: &Caller, order: &crate::saga::Order) -> Result<(), OrdersError> {
    match Principal::customer(who.as_deref()) {
        Some(me) if me != order.customer_id => Err(OrdersError::Forbidden(format!(
            "order {} belongs to another customer",
            order.id
        ))),
        _ => Ok(()),
    }
}

async fn place(
    db: web::Data<Database>,
    pending: web::Data<PendingOrders>,
    http: HttpRequest,
    who: Caller,
    body: web::Json<PlaceOrder>,
) -> Result<HttpResponse, OrdersError> {
    kafka::http::refuse_nul(&*body).map_err(OrdersError::Invalid)?;
    let b = body.into_inner();
    let number =
        |field, value| kafka::http::whole_number(field, value).map_err(OrdersError::Invalid);
    let request = OrderRequest::parse(
        number("productId", &b.product_id)?,
        number("quantity", &b.quantity)?,
        &b.customer_id,
        b.customer_name.as_deref(),
        b.customer_addr.as_deref(),
    )?;
    if let Some(me) = Principal::customer(who.as_deref())
        && me != request.customer_id
    {
        return Err(OrdersError::Forbidden(format!(
            "a customer places orders as themselves: customerId must be {me:?}"
        )));
    }
    // The order as understood, so `"1"` and `1` are the same request.
    let scope = idempotency::scope(who.as_deref(), "POST /orders");
    let keyed = IdempotentRequest::from_headers(http.headers(), scope, &request)
        .map_err(OrdersError::BadHeader)?;
    if let Some(replay) = idempotency::recall_before(&db, &keyed).await? {
        return Ok(replay.response());
    }
    pending.admit()?;
    let done = db
        .write(move |conn| {
            if let Some(keyed) = &keyed
                && let Some(replay) = idempotency::recall(conn, keyed)?
            {
                return Ok((Keyed::Replayed(replay), Vec::new()));
            }
            let stored = store::place_order(conn, request)?;
            let event = saga::placed(&stored.order);
            let location = format!("/orders/{}", stored.order.id);
            let answer = OrderJson::from(stored);
            if let Some(keyed) = &keyed {
                idempotency::remember(conn, keyed, StatusCode::CREATED, Some(&location), &answer)?;
            }
            Ok::<_, OrdersError>((Keyed::Done((location, answer)), vec![event]))
        })
        .await?;
    Ok(done.respond(|(location, answer)| {
        HttpResponse::Created()
            .insert_header(("Location", location))
            .json(answer)
    }))
}

async fn list(
    db: web::Data<Database>,
    who: Caller,
    query: web::Query<ListQuery>,
) -> Result<HttpResponse, OrdersError> {
    let query = query.into_inner();
    kafka::http::refuse_nul(&query).map_err(OrdersError::Invalid)?;
    let page = kafka::http::Page::parse(query.after, query.limit).map_err(OrdersError::Invalid)?;
    // A customer's token lists that customer's orders only.
    let customer = match (Principal::customer(who.as_deref()), query.customer_id) {
        (Some(me), Some(asked)) if asked != me => {
            return Err(OrdersError::Forbidden(format!(
                "a customer lists their own orders only: customerId must be {me:?}"
            )));
        }
        (Some(me), _) => Some(me.to_owned()),
        (None, asked) => asked,
    };
    let orders = db
        .read_snapshot(move |conn| {
            let orders = store::list_orders(conn, customer.as_deref(), page)?;
            with_parked(conn, orders)
        })
        .await?;
    Ok(HttpResponse::Ok().json(orders))
}

async fn get_one(
    db: web::Data<Database>,
    who: Caller,
    id: web::Path<i64>,
) -> Result<HttpResponse, OrdersError> {
    let id = id.into_inner();
    let (order, shown) = db
        .read_snapshot(move |conn| {
            let stored = store::order(conn, id)?.ok_or(OrdersError::OrderNotFound(id))?;
            let order = stored.order.clone();
            Ok::<_, OrdersError>((order, with_parked(conn, vec![stored])?))
        })
        .await?;
    check_owner(&who, &order)?;
    Ok(HttpResponse::Ok().json(&shown[0]))
}

async fn update(
    db: web::Data<Database>,
    id: web::Path<i64>,
    http: HttpRequest,
    who: Caller,
    body: web::Json<UpdateOrder>,
) -> Result<HttpResponse, OrdersError> {
    let id = id.into_inner();
    kafka::http::refuse_nul(&*body).map_err(OrdersError::Invalid)?;
    if OrderState::parse(&body.state) != Some(OrderState::Cancelled) {
        return Err(OrdersError::Invalid(format!(
            "only {{\"state\": \"OrderCancelled\"}} can be requested, got {:?}",
            body.state
        )));
    }
    let scope = idempotency::scope(who.as_deref(), format!("PATCH /orders/{id}"));
    let keyed = IdempotentRequest::from_headers(http.headers(), scope, &*body)
        .map_err(OrdersError::BadHeader)?;
    let owner = who.as_deref().cloned();
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
            let mut stored =
                store::order_to_change(conn, id)?.ok_or(OrdersError::OrderNotFound(id))?;
            if let Some(me) = Principal::customer(owner.as_ref())
                && me != stored.order.customer_id
            {
                return Err(OrdersError::Forbidden(format!(
                    "order {id} belongs to another customer"
                )));
            }
            let (order, event, decided) = match saga::cancel_by_customer(stored.order)? {
                CustomerCancel::Cancelled(order, event) => (order, event, true),
                CustomerCancel::Requested(order, event) => (order, event, false),
            };
            store::save_order(conn, &order)?;
            stored.order = order;
            // 200: cancelled now. 202: requested; the order's stateMessage says what will
            // happen, and GET /orders/{id} shows delivery's answer.
            let status = if decided {
                StatusCode::OK
            } else {
                StatusCode::ACCEPTED
            };
            let answer = OrderJson::from(stored);
            if let Some(keyed) = &keyed {
                idempotency::remember(conn, keyed, status, None, &answer)?;
            }
            Ok::<_, OrdersError>((Keyed::Done((status, answer)), vec![event]))
        })
        .await?;
    Ok(done.respond(|(status, answer)| HttpResponse::build(status).json(answer)))
}

async fn events(
    db: web::Data<Database>,
    who: Caller,
    id: web::Path<i64>,
) -> Result<HttpResponse, OrdersError> {
    let id = id.into_inner();
    let (stored, history) = db
        .read(move |conn| {
            let stored = store::order(conn, id)?.ok_or(OrdersError::OrderNotFound(id))?;
            Ok::<_, OrdersError>((stored, store::history(conn, id)?))
        })
        .await?;
    check_owner(&who, &stored.order)?;
    Ok(HttpResponse::Ok().json(
        history
            .into_iter()
            .map(HistoryEntry::from)
            .collect::<Vec<_>>(),
    ))
}

/// `GET /products?after=&limit=`: a page of the catalog replica, like products' own list.
async fn products(
    db: web::Data<Database>,
    query: web::Query<PageQuery>,
) -> Result<HttpResponse, OrdersError> {
    let page = kafka::http::Page::parse(query.after, query.limit).map_err(OrdersError::Invalid)?;
    let replica = db
        .read(move |conn| store::replica(conn, page).map_err(OrdersError::from))
        .await?;
    Ok(HttpResponse::Ok().json(replica))
}

async fn product(db: web::Data<Database>, id: web::Path<i64>) -> Result<HttpResponse, OrdersError> {
    let id = id.into_inner();
    let p = db
        .read(move |conn| store::replica_product(conn, id)?.ok_or(OrdersError::ProductNotFound(id)))
        .await?;
    Ok(HttpResponse::Ok().json(p))
}
