//! Building the orders service from its settings.

use crate::dashboard::{Dashboard, Links};
use crate::history::OrderHistory;
use crate::pending::PendingOrders;
use crate::reactor::OrderReactor;
use crate::routes::routes;
use crate::{ids, retention, timeouts};
use diesel_migrations::embed_migrations;
use events::Service;
use kafka::{Database, ServiceHost, ServiceSettings, StartError};
use std::sync::Arc;
use std::time::Duration;

/// This service's tables, per backend.
pub const MIGRATIONS: kafka::db::Migrations = kafka::db::Migrations {
    sqlite: embed_migrations!("migrations/sqlite"),
    postgres: embed_migrations!("migrations/postgres"),
};

/// Orders' settings.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Port (default 8081), database and broker.
    pub service: ServiceSettings,
    /// `SAGA_TIMEOUT_S` (default 30): an order still pending this long is cancelled.
    pub saga_timeout: Duration,
    /// `ORDER_HISTORY_RETENTION_S` (default 30 days, at least `RETENTION_DEDUP_WINDOW_S`):
    /// a settled order and its history are deleted this long after their last change.
    pub order_history: Duration,
    /// `ORDERS_MAX_PENDING` (default 500): new orders are refused (503) while this many are
    /// still pending ([`crate::pending`]).
    pub max_pending: i64,
}

/// The default of `ORDERS_MAX_PENDING`: about 1.5 s of the saga rate this machine sustains,
/// so an accepted order's saga ends within about that long also under overload, and a
/// minutes-long outage of products or delivery (orders pending until the saga timeout) is
/// still far below it at the lab's rates.
pub const MAX_PENDING_DEFAULT: i64 = 500;

/// The default of `ORDER_HISTORY_RETENTION_S`: 30 days.
const ORDER_HISTORY_DEFAULT_S: u64 = 30 * 24 * 3600;

/// Reads the settings from the environment.
pub fn settings_from_env() -> Result<Settings, kafka::ConfigError> {
    let service = ServiceSettings::from_env(Service::Orders, 8081)?;
    let order_history = service
        .retention
        .window_from_env("ORDER_HISTORY_RETENTION_S", ORDER_HISTORY_DEFAULT_S)?;
    Ok(Settings {
        service,
        saga_timeout: Duration::from_secs(kafka::env_or("SAGA_TIMEOUT_S", 30)?),
        order_history,
        max_pending: kafka::env_or("ORDERS_MAX_PENDING", MAX_PENDING_DEFAULT)?,
    })
}

/// Opens the database and starts the service with its saga timeout, its retention rule and the
/// dashboard (whose links come from `PRODUCTS_URL` / `DELIVERY_URL`, see [`Links::from_env`],
/// and whose event streams replay at most `EVENT_STREAM_REPLAY_WINDOW` rows).
pub async fn build(settings: &Settings) -> Result<ServiceHost, StartError> {
    // Also when the settings were not read by settings_from_env.
    let order_history = settings
        .service
        .retention
        .check_window("ORDER_HISTORY_RETENTION_S", settings.order_history)?;
    let history = Arc::new(OrderHistory::new());
    let db = Database::open(&settings.service.database_url, MIGRATIONS)?
        .with_write_hook(history.clone());
    let dashboard = Dashboard::new(
        db.clone(),
        Links::from_env()?,
        crate::dashboard::replay_window_from_env()?,
    );
    let pages = dashboard.clone();
    let pending = PendingOrders::new(settings.max_pending);
    let pending_data = actix_web::web::Data::from(pending.clone());
    // Before any request is served: a new database beside an old topic is rebuilt from it,
    // and the topic must not hold ids this database would issue.
    let kafka = &settings.service.kafka;
    let rebuilt = kafka::rebuild::rebuild_if_new(&db, kafka, Arc::new(OrderReactor)).await?;
    let seen = rebuilt.and_then(|r| r.highest_id);
    ids::move_past_the_topic(&db, kafka, seen).await?;
    let mut host = ServiceHost::start(
        &settings.service,
        db.clone(),
        Arc::new(OrderReactor),
        retention::rules(order_history),
        move |cfg: &mut actix_web::web::ServiceConfig| {
            cfg.app_data(pending_data.clone());
            routes(cfg);
            pages.configure(cfg);
        },
    )
    .await?;
    host.metrics().register(history.saga_durations())?;
    host.metrics().register(pending.gauge())?;
    let counted = db.clone();
    host.spawn_task(move |stop| pending.run(counted, stop));
    let timeout = settings.saga_timeout;
    let (consumer, topic) = (host.consumer_status(), settings.service.kafka.topic.clone());
    host.spawn_task(move |stop| timeouts::run(db, timeout, consumer, topic, stop));
    host.spawn_stream_task(move |stop| dashboard.run(stop));
    Ok(host)
}
