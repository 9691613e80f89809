//! Products' REST API: the catalog, with each change announced as ProductChanged.

use crate::domain::{MAX_PRICE, MAX_STOCK, ProductName, amount};
use crate::error::ProductsError;
use crate::store::{self, NewProduct};
use actix_web::http::StatusCode;
use actix_web::{HttpRequest, HttpResponse, web};
use events::{Envelope, Service};
use kafka::Database;
use kafka::auth::Principal;
use kafka::idempotency::{self, IdempotentRequest, Keyed};
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

/// `PATCH /products/{id}`; with an `Idempotency-Key` a retry gets the first answer and changes
/// nothing (a `stockDelta` is applied once), see [`kafka::idempotency`].
async fn update(
    db: web::Data<Database>,
    id: web::Path<i64>,
    http: HttpRequest,
    who: Option<web::ReqData<Principal>>,
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
    // The change as understood, so `"5"` and `5` are the same request.
    let understood = (
        name.as_ref().map(|n| n.as_str().to_owned()),
        price,
        stock,
        delta,
        expected,
    );
    let scope = idempotency::scope(who.as_deref(), format!("PATCH /products/{id}"));
    let keyed = IdempotentRequest::from_headers(http.headers(), scope, &understood)
        .map_err(ProductsError::BadHeader)?;
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
            let mut p = store::product_to_change(conn, id)?.ok_or(ProductsError::NotFound(id))?;
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
            if let Some(keyed) = &keyed {
                idempotency::remember(conn, keyed, StatusCode::OK, None, &p)?;
            }
            Ok::<_, ProductsError>((Keyed::Done(p), vec![event]))
        })
        .await?;
    Ok(done.respond(|p| HttpResponse::Ok().json(p)))
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

#[cfg(test)]
mod tests {
    use super::*;
    use actix_web::App;
    use actix_web::test::{self, TestRequest};

    /// `PATCH /products/1` with `body` and, when given, an `Idempotency-Key`.
    fn patch(key: Option<&str>, body: serde_json::Value) -> TestRequest {
        let request = TestRequest::patch().uri("/products/1").set_json(body);
        match key {
            Some(key) => request.insert_header(("Idempotency-Key", key)),
            None => request,
        }
    }

    /// A retried keyed PATCH gets the first answer and adds its `stockDelta` once (one
    /// ProductChanged in the outbox); the same key with another body is a 422 naming the
    /// header and changes nothing; a malformed key is a 400 naming it.
    #[actix_web::test]
    async fn a_retried_keyed_patch_changes_the_stock_once() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("products.db");
        let db = Database::open(path.to_str().unwrap(), crate::startup::MIGRATIONS).unwrap();
        let app = test::init_service(
            App::new()
                .app_data(web::Data::new(db.clone()))
                .configure(kafka::http::configure)
                .configure(routes),
        )
        .await;
        let created = test::call_service(
            &app,
            TestRequest::post()
                .uri("/products")
                .set_json(serde_json::json!({"name": "tv", "price": 100, "stock": 10}))
                .to_request(),
        )
        .await;
        assert_eq!(created.status(), 201);
        let outbox =
            || db.read(|conn| kafka::outbox::pending_count(conn).map_err(kafka::DbError::from));
        let before = outbox().await.unwrap();

        let add = serde_json::json!({"stockDelta": "5"});
        let first = test::call_service(&app, patch(Some("k-1"), add.clone()).to_request()).await;
        assert_eq!(first.status(), 200);
        assert!(first.headers().get("Idempotent-Replayed").is_none());
        let first: serde_json::Value = test::read_body_json(first).await;
        assert_eq!(first["stock"], 15);
        // The same change, the number as a number this time: the same request.
        let again = serde_json::json!({"stockDelta": 5});
        let retry = test::call_service(&app, patch(Some("k-1"), again).to_request()).await;
        assert_eq!(retry.status(), 200);
        assert_eq!(retry.headers().get("Idempotent-Replayed").unwrap(), "true");
        let retried: serde_json::Value = test::read_body_json(retry).await;
        assert_eq!(retried, first);

        let other = serde_json::json!({"stockDelta": 6});
        let misuse = test::call_service(&app, patch(Some("k-1"), other).to_request()).await;
        assert_eq!(misuse.status(), 422);
        let error: serde_json::Value = test::read_body_json(misuse).await;
        assert!(
            error["error"]
                .as_str()
                .is_some_and(|e| e.contains("Idempotency-Key")),
            "{error}"
        );
        let bad = test::call_service(&app, patch(Some(""), add.clone()).to_request()).await;
        assert_eq!(bad.status(), 400);
        let error: serde_json::Value = test::read_body_json(bad).await;
        assert!(error["error"].as_str().unwrap().contains("Idempotency-Key"));

        let now: serde_json::Value =
            test::call_and_read_body_json(&app, TestRequest::get().uri("/products/1").to_request())
                .await;
        assert_eq!(now["stock"], 15, "the delta was applied once: {now}");
        assert_eq!(outbox().await.unwrap(), before + 1, "one ProductChanged");

        // Without a key each PATCH acts: the key is what makes a retry safe.
        for _ in 0..2 {
            let plain = test::call_service(&app, patch(None, add.clone()).to_request()).await;
            assert_eq!(plain.status(), 200);
        }
        let now: serde_json::Value =
            test::call_and_read_body_json(&app, TestRequest::get().uri("/products/1").to_request())
                .await;
        assert_eq!(now["stock"], 25);
    }
}
