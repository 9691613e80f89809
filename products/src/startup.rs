//! Building the products service from its settings.

use crate::reactor::StockReactor;
use crate::retention;
use crate::routes::routes;
use crate::store::{self, NewProduct};
use diesel_migrations::embed_migrations;
use events::{Envelope, Service};
use kafka::{Database, DbError, ServiceHost, ServiceSettings, StartError};
use std::sync::Arc;

/// This service's tables, per backend.
pub const MIGRATIONS: kafka::db::Migrations = kafka::db::Migrations {
    sqlite: embed_migrations!("migrations/sqlite"),
    postgres: embed_migrations!("migrations/postgres"),
};

/// Products' settings.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Port, database and broker.
    pub service: ServiceSettings,
    /// `SEED_CATALOG`: fill an empty catalog with the seed lab's five products.
    pub seed_catalog: bool,
}

impl Settings {
    /// Reads the settings from the environment (default port 8085).
    pub fn from_env() -> Result<Self, kafka::ConfigError> {
        Ok(Settings {
            service: ServiceSettings::from_env(Service::Products, 8085)?,
            seed_catalog: kafka::env_flag("SEED_CATALOG", true)?,
        })
    }
}

/// Opens the database, rebuilds it from the topic if it is new and the topic is not, seeds it
/// if asked and starts the service with its retention rule.
pub async fn build(settings: &Settings) -> Result<ServiceHost, StartError> {
    // No live views here: its commits need no announcing to the other instances.
    let db = Database::open(&settings.service.database_url, MIGRATIONS)?.without_commit_notices();
    // Before the seed: a new database beside an old topic gets its catalog and reservations
    // back from the topic, so the seed (into an empty catalog only) adds nothing then.
    kafka::rebuild::rebuild_if_new(&db, &settings.service.kafka, Arc::new(StockReactor)).await?;
    if settings.seed_catalog {
        seed_catalog(&db).await?;
    }
    let prune = retention::rules(settings.service.retention.dedup_window);
    ServiceHost::start(&settings.service, db, Arc::new(StockReactor), prune, routes).await
}

/// The seed lab's catalog: TV, MASK, NOTEBOOK, TABLE, CLOCK with ids 1–5, price i×10000 and
/// stock i×10, written only into an empty catalog and announced like any other change.
async fn seed_catalog(db: &Database) -> Result<(), DbError> {
    db.write(|conn| {
        kafka::db::lock(conn, kafka::db::Lock::Once("seed the catalog"))?;
        let first = kafka::http::Page { after: 0, limit: 1 };
        if !store::products_page(conn, first)?.is_empty() {
            return Ok((0, Vec::new()));
        }
        let mut events = Vec::new();
        for (i, name) in (1i64..).zip(["TV", "MASK", "NOTEBOOK", "TABLE", "CLOCK"]) {
            let new = NewProduct {
                name,
                price: i * 10_000,
                stock: i * 10,
            };
            let product = store::insert_product(conn, &new)?;
            events.push(Envelope::new(Service::Products, product.changed()));
        }
        log::info!("seeded the catalog with {} products", events.len());
        Ok::<_, DbError>((events.len(), events))
    })
    .await
    .map(|_| ())
}
