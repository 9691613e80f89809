//! The three services in this process on port 0, with temporary SQLite databases (or fresh
//! PostgreSQL databases when `TEST_POSTGRES_URL` is set), against rdkafka's in-process
//! `MockCluster` broker: each test gets its own cluster.

use e2e::{InProcessMall, scenarios, spawn_in_process};
use rdkafka::mocking::MockCluster;
use rdkafka::producer::DefaultProducerContext;

const TOPIC: &str = "eventTopic";

async fn mall() -> (MockCluster<'static, DefaultProducerContext>, InProcessMall) {
    if std::env::var_os("RUST_LOG").is_some() {
        kafka::init_logging();
    }
    let cluster = MockCluster::new(1).expect("mock cluster");
    // The mock broker does not implement CreateTopics; the services find these and go on.
    cluster.create_topic(TOPIC, 3, 1).expect("saga topic");
    cluster
        .create_topic(&format!("{TOPIC}.DLT"), 1, 1)
        .expect("dead-letter topic");
    let mall = spawn_in_process(&cluster.bootstrap_servers(), TOPIC)
        .await
        .unwrap_or_else(|e| panic!("mall did not start: {e}"));
    (cluster, mall)
}

macro_rules! scenario {
    ($name:ident, $body:expr) => {
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn $name() {
            let (_cluster, running) = mall().await;
            let m = &running.mall;
            if let Err(e) = $body(m).await {
                panic!("{}: {e}", stringify!($name));
            }
        }
    };
}

scenario!(happy_path, scenarios::happy_path);
scenario!(out_of_stock, scenarios::out_of_stock);
scenario!(customer_cancel, scenarios::customer_cancel);
scenario!(courier_cancel, scenarios::courier_cancel);
scenario!(
    malformed_message_is_parked,
    scenarios::malformed_message_is_parked
);
scenario!(
    delivered_order_cancel_race,
    scenarios::delivered_order_cancel_race
);
scenario!(
    bad_input_gets_clear_errors,
    scenarios::bad_input_gets_clear_errors
);
scenario!(metrics_are_exposed, scenarios::metrics_are_exposed);
scenario!(
    a_stock_write_based_on_an_old_read_is_refused,
    scenarios::a_stock_write_based_on_an_old_read_is_refused
);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_event_twice() {
    let (_cluster, running) = mall().await;
    let m = &running.mall;
    let stop = tokio_util::sync::CancellationToken::new();
    let replayer = tokio::spawn(e2e::replay_everything_twice(
        m.brokers.clone(),
        m.topic.clone(),
        stop.clone(),
    ));
    let result = scenarios::every_event_twice(m).await;
    stop.cancel();
    let _ = replayer.await;
    if let Err(e) = result {
        panic!("every_event_twice: {e}");
    }
}

/// A topic the broker does not have reads as an error, never as an empty list (which would
/// pass every "at most once" check on no data).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reading_a_missing_topic_fails() {
    let cluster = MockCluster::new(1).expect("mock cluster");
    cluster.create_topic(TOPIC, 3, 1).expect("saga topic");
    let brokers = cluster.bootstrap_servers();
    let missing = e2e::read_topic(&brokers, "no-such-topic").await;
    assert!(missing.is_err(), "{missing:?}");
    assert_eq!(
        e2e::read_topic(&brokers, TOPIC).await.map(|m| m.len()),
        Ok(0)
    );
}
