//! Building the orders service from its settings.

use crate::dashboard::{Dashboard, Links};
use crate::reactor::OrderReactor;
use crate::routes::routes;
use crate::timeouts;
use diesel_migrations::{EmbeddedMigrations, embed_migrations};
use events::Service;
use kafka::{Database, ServiceHost, ServiceSettings, StartError};
use std::sync::Arc;
use std::time::Duration;

const MIGRATIONS: EmbeddedMigrations = embed_migrations!("migrations");

/// Orders' settings.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Port (default 8081), database and broker.
    pub service: ServiceSettings,
    /// `SAGA_TIMEOUT_S` (default 30): an order still pending this long is cancelled.
    pub saga_timeout: Duration,
}

/// Reads the settings from the environment.
pub fn settings_from_env() -> Result<Settings, kafka::ConfigError> {
    Ok(Settings {
        service: ServiceSettings::from_env(Service::Orders, 8081)?,
        saga_timeout: Duration::from_secs(kafka::env_or("SAGA_TIMEOUT_S", 30)?),
    })
}

/// Opens the database and starts the service with its saga timeout and the dashboard (whose
/// links come from `PRODUCTS_URL` / `DELIVERY_URL`, see [`Links::from_env`]).
pub async fn build(settings: &Settings) -> Result<ServiceHost, StartError> {
    let db = Database::open(&settings.service.database_url, MIGRATIONS)?;
    let dashboard = Dashboard::new(db.clone(), Links::from_env()?);
    let pages = dashboard.clone();
    let reactor = Arc::new(OrderReactor::new());
    let mut host = ServiceHost::start(
        &settings.service,
        db.clone(),
        reactor.clone(),
        move |cfg: &mut actix_web::web::ServiceConfig| {
            routes(cfg);
            pages.configure(cfg);
        },
    )
    .await?;
    host.metrics().register(reactor.saga_durations())?;
    let timeout = settings.saga_timeout;
    host.spawn_task(move |stop| timeouts::run(db, timeout, stop));
    host.spawn_task(move |stop| dashboard.run(stop));
    Ok(host)
}
