//! Products' REST API: the catalog, with each change announced as ProductChanged.

use crate::domain::{MAX_PRICE, MAX_STOCK, ProductName, amount};
use crate::error::ProductsError;
use crate::saga::Product;
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
    );
}

/// A product as the API shows it, with `reserved`: units held for orders in flight.
#[derive(Debug, Serialize)]
pub struct ProductJson {
    #[serde(flatten)]
    product: Product,
    reserved: i64,
}

impl ProductJson {
    fn new(product: Product, reserved: i64) -> Self {
        ProductJson { product, reserved }
    }
}

/// `POST /products` body; `productName` is accepted as in the seed lab.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateProduct {
    #[serde(alias = "productName")]
    name: String,
    price: i64,
    stock: i64,
}

/// `PATCH /products/{id}` body: any of the fields.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct UpdateProduct {
    #[serde(default, alias = "productName")]
    name: Option<String>,
    #[serde(default)]
    price: Option<i64>,
    #[serde(default)]
    stock: Option<i64>,
}

async fn list(db: web::Data<Database>) -> Result<HttpResponse, ProductsError> {
    let products = db
        .read(|conn| {
            let reserved = store::reserved_by_product(conn)?;
            let products = store::all_products(conn)?;
            Ok::<_, ProductsError>(
                products
                    .into_iter()
                    .map(|p| {
                        let held = reserved.get(&p.id).copied().unwrap_or(0);
                        ProductJson::new(p, held)
                    })
                    .collect::<Vec<_>>(),
            )
        })
        .await?;
    Ok(HttpResponse::Ok().json(products))
}

async fn get_one(
    db: web::Data<Database>,
    id: web::Path<i64>,
) -> Result<HttpResponse, ProductsError> {
    let id = id.into_inner();
    let product = db
        .read(move |conn| {
            let p = store::product(conn, id)?.ok_or(ProductsError::NotFound(id))?;
            let reserved = store::reserved_units(conn, id)?;
            Ok::<_, ProductsError>(ProductJson::new(p, reserved))
        })
        .await?;
    Ok(HttpResponse::Ok().json(product))
}

async fn create(
    db: web::Data<Database>,
    body: web::Json<CreateProduct>,
) -> Result<HttpResponse, ProductsError> {
    let body = body.into_inner();
    let name = ProductName::parse(&body.name)?;
    let price = amount("price", body.price, MAX_PRICE)?;
    let stock = amount("stock", body.stock, MAX_STOCK)?;
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
        .json(ProductJson::new(product, 0)))
}

async fn update(
    db: web::Data<Database>,
    id: web::Path<i64>,
    body: web::Json<UpdateProduct>,
) -> Result<HttpResponse, ProductsError> {
    let id = id.into_inner();
    let body = body.into_inner();
    if body.name.is_none() && body.price.is_none() && body.stock.is_none() {
        return Err(ProductsError::Invalid(
            "give at least one of name, price, stock".into(),
        ));
    }
    let name = body.name.as_deref().map(ProductName::parse).transpose()?;
    let price = body
        .price
        .map(|p| amount("price", p, MAX_PRICE))
        .transpose()?;
    let stock = body
        .stock
        .map(|s| amount("stock", s, MAX_STOCK))
        .transpose()?;
    let product = db
        .write(move |conn| {
            let mut p = store::product(conn, id)?.ok_or(ProductsError::NotFound(id))?;
            if let Some(name) = name {
                p.name = name.as_str().to_owned();
            }
            p.price = price.unwrap_or(p.price);
            p.stock = stock.unwrap_or(p.stock);
            store::save_product(conn, &p)?;
            let reserved = store::reserved_units(conn, id)?;
            let event = Envelope::new(Service::Products, p.changed());
            Ok::<_, ProductsError>((ProductJson::new(p, reserved), vec![event]))
        })
        .await?;
    Ok(HttpResponse::Ok().json(product))
}
