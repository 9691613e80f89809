//! Building the delivery service from its settings.

use crate::reactor::DeliveryReactor;
use crate::retention;
use crate::routes::routes;
use diesel_migrations::embed_migrations;
use events::Service;
use kafka::{Database, ServiceHost, ServiceSettings, StartError};
use std::sync::Arc;

/// This service's tables, per backend.
pub const MIGRATIONS: kafka::db::Migrations = kafka::db::Migrations {
    sqlite: embed_migrations!("migrations/sqlite"),
    postgres: embed_migrations!("migrations/postgres"),
};

/// Delivery's settings: port (default 8082), database and broker.
pub type Settings = ServiceSettings;

/// Reads the settings from the environment.
pub fn settings_from_env() -> Result<Settings, kafka::ConfigError> {
    ServiceSettings::from_env(Service::Delivery, 8082)
}

/// Opens the database, rebuilds it from the topic if it is new and the topic is not, and
/// starts the service with its retention rule.
pub async fn build(settings: &Settings) -> Result<ServiceHost, StartError> {
    // No live views here: its commits need no announcing to the other instances.
    let db = Database::open(&settings.database_url, MIGRATIONS)?.without_commit_notices();
    kafka::rebuild::rebuild_if_new(&db, &settings.kafka, Arc::new(DeliveryReactor)).await?;
    let prune = retention::rules(settings.retention.dedup_window);
    ServiceHost::start(settings, db, Arc::new(DeliveryReactor), prune, routes).await
}
