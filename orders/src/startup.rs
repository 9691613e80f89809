//! Building the orders service from its settings.

use crate::reactor::OrderReactor;
use crate::routes::routes;
use diesel_migrations::{EmbeddedMigrations, embed_migrations};
use events::Service;
use kafka::{Database, ServiceHost, ServiceSettings, StartError};
use std::sync::Arc;

const MIGRATIONS: EmbeddedMigrations = embed_migrations!("migrations");

/// Orders' settings: port (default 8081), database and broker.
pub type Settings = ServiceSettings;

/// Reads the settings from the environment.
pub fn settings_from_env() -> Result<Settings, kafka::ConfigError> {
    ServiceSettings::from_env(Service::Orders, 8081)
}

/// Opens the database and starts the service.
pub async fn build(settings: &Settings) -> Result<ServiceHost, StartError> {
    let db = Database::open(&settings.database_url, MIGRATIONS)?;
    ServiceHost::start(settings, db, Arc::new(OrderReactor), routes).await
}
