//! Hosting a service: its HTTP API, its outbox relay, its consumer loop and its [`Retention`]
//! task, started together and stopped in the order that loses nothing, and the service's
//! [`Metrics`] they all count into (served at `/metrics`).

use crate::admission::{self, Admission};
use crate::connections::ConnectionLimit;
use crate::consumer::{ConsumerStatus, EventConsumer, create_probe};
use crate::db::Database;
use crate::http::Health;
use crate::inbox::Reactor;
use crate::metrics::{self, Metrics};
use crate::outbox::OutboxRelay;
use crate::producer::create_producer;
use crate::retention::{PruneRule, Retention};
use crate::settings::{KafkaSettings, ServiceSettings};
use crate::{admin, http};
use actix_web::dev::Server;
use actix_web::{App, HttpServer, web};
use rdkafka::consumer::{BaseConsumer, Consumer};
use std::future::Future;
use std::net::TcpListener;
use std::sync::Arc;
use std::time::Duration;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// A service could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// Settings are wrong.
    #[error(transparent)]
    Config(#[from] crate::settings::ConfigError),
    /// The database cannot be opened or migrated.
    #[error(transparent)]
    Db(#[from] crate::db::DbError),
    /// The broker is not reachable or refused a set-up step.
    #[error("broker at {brokers}: {reason}")]
    Broker {
        /// `KAFKA_BROKERS`.
        brokers: String,
        /// What failed.
        reason: String,
    },
    /// The broker is not the one the stored positions belong to ([`crate::identity`]).
    #[error("{0}")]
    Identity(String),
    /// A service's own metric could not be registered (its name is taken).
    #[error("metrics: {0}")]
    Metrics(#[from] prometheus::Error),
    /// The HTTP port cannot be bound.
    #[error("cannot listen on {address}: {source}")]
    Listen {
        /// The address asked for.
        address: String,
        /// The OS error.
        source: std::io::Error,
    },
}

/// Refuses to start when the stored positions belong to another cluster, or point past the
/// end of a partition ([`crate::identity`]). A broker that gives no cluster id (tansu) is
/// checked by the positions alone. Asks through the service's own `probe`.
async fn check_broker_identity(
    kafka: &KafkaSettings,
    db: &Database,
    probe: &Arc<BaseConsumer>,
) -> Result<(), StartError> {
    use crate::identity::{self, IdentityError, Known};
    let refused = |e: IdentityError| match e {
        IdentityError::Db(e) => StartError::Db(e),
        other => StartError::Identity(other.to_string()),
    };
    let asking = probe.clone();
    let cluster = tokio::task::spawn_blocking(move || {
        asking.client().fetch_cluster_id(Duration::from_secs(10))
    })
    .await
    .ok()
    .flatten();
    match cluster {
        Some(cluster) => {
            let (topic, brokers) = (kafka.topic.clone(), kafka.brokers.clone());
            db.write(move |conn| {
                if identity::check_cluster(conn, &topic, &cluster, &brokers)? == Known::Recorded {
                    log::info!("positions of {topic} belong to Kafka cluster {cluster}");
                }
                Ok::<_, IdentityError>(((), Vec::new()))
            })
            .await
            .map_err(refused)?;
        }
        None => log::warn!(
            "the broker at {} gives no cluster id; the stored positions are checked against \
             the partitions' ends only",
            kafka.brokers
        ),
    }
    let topic = kafka.topic.clone();
    let stored = db
        .read(move |conn| crate::offsets::load(conn, &topic).map_err(crate::db::DbError::from))
        .await?;
    if stored.is_empty() {
        return Ok(());
    }
    // Retried like the topics' creation: right after a leader moved, the ends can take a
    // few seconds to be served.
    let (asking, topic) = (probe.clone(), kafka.topic.clone());
    let ends = crate::consumer::read_retrying("reading the partitions' ends", move || {
        let partitions = crate::consumer::partitions_of(&asking, &topic)?;
        crate::consumer::watermarks(&asking, &topic, &partitions)
    })
    .await
    .map_err(|reason| StartError::Broker {
        brokers: kafka.brokers.clone(),
        reason: format!("cannot read the partitions' ends within 30 s: {reason}"),
    })?;
    let ends = ends.into_iter().map(|(p, (_, high))| (p, high)).collect();
    identity::check_positions(&kafka.topic, &kafka.brokers, &stored, &ends).map_err(refused)
}

/// How long the relay may keep publishing on the way out; with HTTP's and the consumer's
/// own bounds a stop takes at most ~12 s, under `scripts/down.sh`'s 15 s.
const RELAY_DRAIN: Duration = Duration::from_secs(5);
/// How often the write-ahead log is emptied ([`Database::checkpoint`]).
const CHECKPOINT_EVERY: Duration = Duration::from_secs(5);
/// How long a client may take to send a request's head; past it the connection is closed.
const HEAD_READ_TIMEOUT: Duration = Duration::from_secs(5);
/// How long in-flight HTTP requests may take to finish on the way out.
const HTTP_DRAIN_SECS: u64 = 5;

/// A running service: HTTP on its own listener (so tests can bind port 0), plus the relay,
/// consumer and retention tasks. They stop in this order: HTTP (no new requests; the tasks
/// feeding long-lived responses are told at once, so their streams end), then the
/// consumer, retention and the service's own tasks (the consumer finishes the event in hand
/// and saves its position), then the relay (it publishes what the others committed, for at
/// most [`RELAY_DRAIN`]).
pub struct ServiceHost {
    /// The bound HTTP port.
    port: u16,
    /// The service's metrics, served at `/metrics`.
    metrics: web::Data<Metrics>,
    /// The HTTP server; stopped first.
    server: Server,
    /// Cancelled as HTTP stops taking requests: ends the tasks behind long-lived responses (the
    /// dashboard's event streams), whose open connections the drain would otherwise wait out
    /// for all of [`HTTP_DRAIN_SECS`].
    stop_streams: CancellationToken,
    /// Stops the consumer; cancelled second.
    stop_consumer: CancellationToken,
    /// The consumer task.
    consumer: JoinHandle<()>,
    /// What the consumer has read, for the service's own tasks (orders' saga timeout).
    consumer_status: Arc<ConsumerStatus>,
    /// The retention task, the WAL checkpoints and the service's own tasks (see
    /// [`ServiceHost::spawn_task`]); stopped with the consumer.
    tasks: Vec<JoinHandle<()>>,
    /// Stops the relay; cancelled last, after the consumer's final commit.
    stop_relay: CancellationToken,
    /// The relay task.
    relay: JoinHandle<()>,
    /// Where the partitions are given up once the relay has stopped ([`EventConsumer::leave`]).
    leaving: (Database, KafkaSettings),
}

impl ServiceHost {
    /// Ensures the topics, then starts the relay, the consumer, the retention task and the HTTP
    /// server, all counting into a new [`Metrics`] of the service's own. `prune` are the
    /// service's own [`PruneRule`]s for its settled saga records; the retention task runs them
    /// after the plumbing's (outbox, processed ids). `routes` adds the service's own
    /// endpoints; `/health`, `/metrics` and JSON errors come with it.
    pub async fn start<F>(
        settings: &ServiceSettings,
        db: Database,
        reactor: Arc<dyn Reactor>,
        prune: Vec<PruneRule>,
        routes: F,
    ) -> Result<Self, StartError>
    where
        F: Fn(&mut web::ServiceConfig) + Clone + Send + 'static,
    {
        // Bind first: a taken port fails fast, before anything is started.
        let address = format!("{}:{}", settings.host, settings.port);
        let listener = TcpListener::bind(&address).map_err(|source| StartError::Listen {
            address: address.clone(),
            source,
        })?;
        let port = listener
            .local_addr()
            .map_err(|source| StartError::Listen {
                address: address.clone(),
                source,
            })?
            .port();
        let kafka = &settings.kafka;
        let broker = |reason: String| StartError::Broker {
            brokers: kafka.brokers.clone(),
            reason,
        };
        connect(kafka, &db).await?;
        let probe = Arc::new(create_probe(kafka).map_err(|e| broker(e.to_string()))?);
        check_broker_identity(kafka, &db, &probe).await?;
        let metrics = web::Data::new(Metrics::new());
        let producer_settings = kafka.clone();
        let relay = OutboxRelay::new(
            db.clone(),
            Box::new(move || create_producer(&producer_settings)),
            kafka.topic.clone(),
            crate::leases::Membership {
                me: kafka.instance.clone(),
                ttl: kafka.session_timeout,
            },
            &metrics,
        )
        .map_err(|e| broker(e.to_string()))?;
        let retention = Retention::new(db.clone(), &settings.retention, prune, &metrics);
        let checkpoints = db.clone();
        let db_for_leaving = db.clone();
        let consumer = EventConsumer::new(kafka, probe.clone(), db.clone(), reactor, &metrics);
        let consumer_status = consumer.status();
        let health = web::Data::new(Health {
            db: db.clone(),
            probe,
            topic: kafka.topic.clone(),
            consumer: consumer.status(),
            relay: relay.status(),
            stuck_after: kafka.session_timeout,
        });
        let db = web::Data::new(db);
        let served_metrics = metrics.clone();
        let admission = web::Data::new(Admission::default());
        let access = settings.access.clone();
        let served_access = web::Data::new(settings.access.clone());
        let tokens = web::Data::new(settings.tokens.clone());
        log::info!("{}", settings.tokens.summary());
        let connections = ConnectionLimit::new(settings.max_connections_per_address);
        let server = HttpServer::new(move || {
            App::new()
                // Innermost: a refused write is still logged, answered with CORS and counted.
                .wrap(actix_web::middleware::from_fn(admission::admit))
                // Inside CORS, so preflights (which carry no token) are answered first.
                .wrap(actix_web::middleware::from_fn(crate::auth::authenticate))
                // Method and path, never the query: the event stream's carries a token.
                .wrap(
                    actix_web::middleware::Logger::new("%{method}xi %U %s %Dms")
                        .custom_request_replace("method", |req| req.method().to_string()),
                )
                // The dashboard on orders' port calls products and delivery: CORS_ORIGINS.
                .wrap(access.cors())
                // Before CORS: a foreign host, origin or media type is refused outright.
                .wrap(actix_web::middleware::from_fn(crate::access::guard))
                // Before anything else reads the request: a connection over its address's cap.
                .wrap(actix_web::middleware::from_fn(crate::connections::limit))
                // Outermost, so it counts every answer, CORS preflights and 404s too.
                .wrap(actix_web::middleware::from_fn(metrics::track_requests))
                .app_data(db.clone())
                .app_data(health.clone())
                .app_data(admission.clone())
                .app_data(served_access.clone())
                .app_data(tokens.clone())
                .app_data(served_metrics.clone())
                .configure(http::configure)
                .configure(routes.clone())
                .default_service(web::to(http::not_found))
        })
        .workers(2)
        // Counts each connection under its client's address (HTTP_MAX_CONNECTIONS_PER_ADDRESS).
        .on_connect(move |conn, data| connections.on_connect(conn, data))
        // A request head must arrive within this (bodies: admission's BODY_READ_TIMEOUT).
        .client_request_timeout(HEAD_READ_TIMEOUT)
        .disable_signals()
        .shutdown_timeout(HTTP_DRAIN_SECS)
        .listen(listener)
        .map_err(|source| StartError::Listen { address, source })?
        .run();
        let (stop_consumer, stop_relay) = (CancellationToken::new(), CancellationToken::new());
        let relay = tokio::spawn(relay.run(stop_relay.clone(), RELAY_DRAIN));
        let consumer = tokio::spawn(consumer.run(stop_consumer.clone()));
        let retention = tokio::spawn(retention.run(stop_consumer.clone()));
        let checkpoints =
            tokio::spawn(checkpoints.checkpoint_every(CHECKPOINT_EVERY, stop_consumer.clone()));
        Ok(ServiceHost {
            port,
            metrics,
            server,
            stop_streams: CancellationToken::new(),
            stop_consumer,
            consumer,
            consumer_status,
            tasks: vec![retention, checkpoints],
            stop_relay,
            relay,
            leaving: (db_for_leaving, kafka.clone()),
        })
    }

    /// Runs a service's own background task (orders' saga timeout, say). It is told to stop
    /// together with the consumer, and the relay publishes what it committed before exiting.
    pub fn spawn_task<F, Fut>(&mut self, task: F)
    where
        F: FnOnce(CancellationToken) -> Fut,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let stop = self.stop_consumer.clone();
        self.tasks.push(tokio::spawn(task(stop)));
    }

    /// Runs a task that feeds long-lived HTTP responses (orders' event stream). It is told to
    /// stop as HTTP stops taking requests, so the drain does not wait for its streams.
    pub fn spawn_stream_task<F, Fut>(&mut self, task: F)
    where
        F: FnOnce(CancellationToken) -> Fut,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let stop = self.stop_streams.clone();
        self.tasks.push(tokio::spawn(task(stop)));
    }

    /// The service's metrics: [`Metrics::register`] adds the service's own (orders' saga
    /// durations) to what `/metrics` serves.
    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// What the consumer has read ([`ConsumerStatus::read_through`]).
    pub fn consumer_status(&self) -> Arc<ConsumerStatus> {
        self.consumer_status.clone()
    }

    /// The port the HTTP server listens on.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Serves until `shutdown` resolves, then stops taking requests, lets the consumer finish the
    /// event in hand and commit, and lets the relay publish what is committed and flush.
    pub async fn run_until_stopped(
        self,
        shutdown: impl Future<Output = ()>,
    ) -> std::io::Result<()> {
        let handle = self.server.handle();
        let mut server = tokio::spawn(self.server);
        let served = tokio::select! {
            result = &mut server => result,
            _ = shutdown => {
                log::info!("shutting down: no new requests");
                self.stop_streams.cancel();
                handle.stop(true).await;
                server.await
            }
        };
        self.stop_streams.cancel();
        self.stop_consumer.cancel();
        let _ = self.consumer.await;
        for task in self.tasks {
            let _ = task.await;
        }
        self.stop_relay.cancel();
        let _ = self.relay.await;
        let (db, kafka) = &self.leaving;
        EventConsumer::leave(db, kafka).await;
        log::info!("stopped");
        served.map_err(std::io::Error::other)?
    }
}

/// Resolves on SIGINT (Ctrl-C) or SIGTERM.
pub async fn shutdown_signal() {
    let interrupt = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut terminate) => {
                tokio::select! {
                    _ = interrupt => {}
                    _ = terminate.recv() => {}
                }
            }
            Err(_) => {
                let _ = interrupt.await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = interrupt.await;
    }
}

/// The whole of a service's `main`: logging, start-up, serving until SIGINT/SIGTERM, and an exit
/// code with the reason logged when start-up fails.
pub async fn run_service<F>(name: &str, start: F) -> std::process::ExitCode
where
    F: Future<Output = Result<ServiceHost, StartError>>,
{
    crate::init_logging();
    let host = match start.await {
        Ok(host) => host,
        Err(e) => {
            log::error!("{name} cannot start: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    log::info!("{name} listening on port {}", host.port());
    match host.run_until_stopped(shutdown_signal()).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            log::error!("{name} stopped with an error: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// Makes sure the saga topics exist ([`ensure_topics_at_start`]) and tells `db` how many
/// partitions the saga topic has, so every outbox row written from now on carries its
/// partition ([`crate::routing`]). Before anything is written: a service calls it before
/// rebuilding or seeding, and [`ServiceHost::start`] again.
pub async fn connect(kafka: &crate::KafkaSettings, db: &Database) -> Result<(), StartError> {
    ensure_topics_at_start(kafka).await?;
    let probing = kafka.clone();
    let partitions = crate::consumer::read_retrying("reading the topic's partitions", move || {
        let probe = create_probe(&probing).map_err(|e| e.to_string())?;
        crate::consumer::partitions_of(&probe, &probing.topic)
    })
    .await
    .map_err(|reason| StartError::Broker {
        brokers: kafka.brokers.clone(),
        reason: format!("cannot read the partitions of {}: {reason}", kafka.topic),
    })?;
    db.routing()
        .set_partitions(i32::try_from(partitions.len()).unwrap_or(i32::MAX));
    Ok(())
}

/// Makes sure the saga topics exist before a service starts (or rebuilds from them): a broker
/// not reachable within 30 s, or one that refuses this client, fails the start with what to
/// check.
pub async fn ensure_topics_at_start(kafka: &crate::KafkaSettings) -> Result<(), StartError> {
    let broker = |reason: String| StartError::Broker {
        brokers: kafka.brokers.clone(),
        reason,
    };
    tokio::time::timeout(
        std::time::Duration::from_secs(30),
        admin::ensure_topics(kafka),
    )
    .await
    .map_err(|_| broker("not reachable within 30 s".into()))?
    .map_err(|e| match e.refused {
        Some(_) => broker(format!(
            "{e}: check KAFKA_CLIENT_SECURITY_PROTOCOL, KAFKA_CLIENT_SASL_MECHANISMS, \
             KAFKA_CLIENT_SASL_USERNAME, KAFKA_SASL_PASSWORD_FILE and (TLS) \
             KAFKA_CLIENT_SSL_CA_LOCATION"
        )),
        None => broker(format!(
            "not reachable or refused to create the topics ({e}); \
             is a broker running? scripts/up.sh starts one"
        )),
    })?;
    Ok(())
}
