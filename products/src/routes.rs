//! Products' REST API: the catalog, with each change announced as ProductChanged.

use crate::domain::{MAX_PRICE, MAX_STOCK, ProductName, amount};
use crate::error::ProductsError;
use crate::store::{self, NewProduct};
use actix_web::{HttpResponse, web};
use events::{Envelope, Service};
use kafka::Database;
use serde::{Deserialize, Serialize};

/// Registers the products endpoints.
pub fn routes(cfg: &mut web::ServiceConfig) {
    cfg.service(
        web::resource("/products")
            .route(web::get().to(list))
            .route(web::post().to(create))
            .default_service(web::to(kafka::http::method_not_allowed)),
    )
    .service(
        web::resource("/products/{id}")
            .route(web::get().to(get_one))
            .route(web::patch().to(update))
            .default_service(web::to(kafka::http::method_not_allowed)),
    )
    .service(
        web::resource("/reservations")
            .route(web::get().to(reservations))
            .default_service(web::to(kafka::http::method_not_allowed)),
    )
    .service(
        web::resource("/reservations/{order_id}")
            .route(web::get().to(reservation))
            .default_service(web::to(kafka::http::method_not_allowed)),
    );
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PageQuery {
    after: Option<i64>,
    limit: Option<i64>,
}

/// `POST /products` body; `productName` is accepted as in the seed lab.
#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
struct CreateProduct {
    #[serde(alias = "productName")]
    name: String,
    /// A number or a string holding one, as httpie's `price=1000` sends.
    price: serde_json::Value,
    /// A number or a string holding one.
    stock: serde_json::Value,
}

/// `PATCH /products/{id}` body: any of the fields. `stockDelta` adjusts the stock relative to
/// what it is at the moment of the write, so reservations made since the client's GET are
/// kept; `stock` sets it outright. `expectedStock` makes the change conditional: the stock
/// the client read; if it moved since (a reservation, another change) the answer is a 409 and
/// nothing changes, so a `stock` based on an old GET cannot create or destroy units.
#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct UpdateProduct {
    #[serde(default, alias = "productName")]
    name: Option<String>,
    #[serde(default)]
    price: Option<serde_json::Value>,
    #[serde(default)]
    stock: Option<serde_json::Value>,
    #[serde(default)]
    stock_delta: Option<serde_json::Value>,
    #[serde(default)]
    expected_stock: Option<serde_json::Value>,
}

/// `GET /products?after=&limit=`: one page of the catalog by id (100 by default, at most
/// 1,000), each with its stock, reserved and delivered units from its own row.
async fn list(
    db: web::Data<Database>,
    query: web::Query<PageQuery>,
) -> Result<HttpResponse, ProductsError> {
    let q = query.into_inner();
    let page = kafka::http::Page::parse(q.after, q.limit).map_err(ProductsError::Invalid)?;
    let products = db
        .read(move |conn| store::products_page(conn, page).map_err(ProductsError::from))
        .await?;
    Ok(HttpResponse::Ok().json(products))
}

async fn get_one(
    db: web::Data<Database>,
    id: web::Path<i64>,
) -> Result<HttpResponse, ProductsError> {
    let id = id.into_inner();
    let product = db
        .read(move |conn| store::product(conn, id)?.ok_or(ProductsError::NotFound(id)))
        .await?;
    Ok(HttpResponse::Ok().json(product))
}

async fn create(
    db: web::Data<Database>,
    body: web::Json<CreateProduct>,
) -> Result<HttpResponse, ProductsError> {
    let body = body.into_inner();
    kafka::http::refuse_nul(&body).map_err(ProductsError::Invalid)?;
    let name = ProductName::parse(&body.name)?;
    let number =
        |field, value| kafka::http::whole_number(field, value).map_err(ProductsError::Invalid);
    let price = amount("price", number("price", &body.price)?, MAX_PRICE)?;
    let stock = amount("stock", number("stock", &body.stock)?, MAX_STOCK)?;
    let product = db
        .write(move |conn| {
            let new = NewProduct {
                name: name.as_str(),
                price,
                stock,
            };
            let product = store::insert_product(conn, &new)?;
            let event = Envelope::new(Service::Products, product.changed());
            Ok::<_, ProductsError>((product, vec![event]))
        })
        .await?;
    Ok(HttpResponse::Created()
        .insert_header(("Location", format!("/products/{}", product.id)))
        .json(product))
}

async fn update(
    db: web::Data<Database>,
    id: web::Path<i64>,
    body: web::Json<UpdateProduct>,
) -> Result<HttpResponse, ProductsError> {
    let id = id.into_inner();
    let body = body.into_inner();
    kafka::http::refuse_nul(&body).map_err(ProductsError::Invalid)?;
    let number = |field, value: &Option<serde_json::Value>| {
        kafka::http::optional_whole_number(field, value.as_ref()).map_err(ProductsError::Invalid)
    };
    let (price_in, stock_in, delta_in, expected) = (
        number("price", &body.price)?,
        number("stock", &body.stock)?,
        number("stockDelta", &body.stock_delta)?,
        number("expectedStock", &body.expected_stock)?,
    );
    if body.name.is_none()
        && body.price.is_none()
        && body.stock.is_none()
        && body.stock_delta.is_none()
    {
        return Err(ProductsError::Invalid(
            "give at least one of name, price, stock, stockDelta".into(),
        ));
    }
    if body.stock.is_some() && body.stock_delta.is_some() {
        return Err(ProductsError::Invalid(
            "give stock or stockDelta, not both".into(),
        ));
    }
    let delta = delta_in;
    let name = body.name.as_deref().map(ProductName::parse).transpose()?;
    let price = price_in
        .map(|p| amount("price", p, MAX_PRICE))
        .transpose()?;
    let stock = stock_in
        .map(|s| amount("stock", s, MAX_STOCK))
        .transpose()?;
    let product = db
        .write(move |conn| {
            let mut p = store::product(conn, id)?.ok_or(ProductsError::NotFound(id))?;
            if let Some(expected) = expected.filter(|e| *e != p.stock) {
                return Err(ProductsError::Conflict(format!(
                    "expectedStock is {expected} but the stock is {} now (reservations or \
                     another change since it was read): read it again, or adjust with stockDelta",
                    p.stock
                )));
            }
            if let Some(name) = name {
                p.name = name.as_str().to_owned();
            }
            p.price = price.unwrap_or(p.price);
            p.stock = stock.unwrap_or(p.stock);
            if let Some(delta) = delta {
                let adjusted = p.stock.checked_add(delta).unwrap_or(-1);
                p.stock = amount("stock + stockDelta", adjusted, MAX_STOCK).map_err(|_| {
                    ProductsError::Invalid(format!(
                        "stockDelta {delta} would make the stock {} (it is {} now; the \
                         result must be between 0 and {MAX_STOCK})",
                        p.stock.saturating_add(delta),
                        p.stock
                    ))
                })?;
            }
            store::save_product(conn, &p)?;
            let event = Envelope::new(Service::Products, p.changed());
            Ok::<_, ProductsError>((p, vec![event]))
        })
        .await?;
    Ok(HttpResponse::Ok().json(product))
}

async fn reservations(
    db: web::Data<Database>,
    query: web::Query<PageQuery>,
) -> Result<HttpResponse, ProductsError> {
    let q = query.into_inner();
    let page = kafka::http::Page::parse(q.after, q.limit).map_err(ProductsError::Invalid)?;
    let list = db
        .read(move |conn| store::reservations(conn, page).map_err(ProductsError::from))
        .await?;
    Ok(HttpResponse::Ok().json(list))
}

async fn reservation(
    db: web::Data<Database>,
    order_id: web::Path<i64>,
) -> Result<HttpResponse, ProductsError> {
    let order_id = order_id.into_inner();
    let found = db
        .read(move |conn| {
            store::reservation(conn, order_id)
                .map_err(|e| match e {
                    kafka::ReactError::Db(e) => ProductsError::Internal(e),
                    kafka::ReactError::Rejected(why) => {
                        ProductsError::Internal(kafka::DbError::Setup(why))
                    }
                })?
                .ok_or(ProductsError::NoReservation(order_id))
        })
        .await?;
    Ok(HttpResponse::Ok().json(found))
}
