//! `cargo run -p delivery`: the delivery service on :8082. `delivery --rebuild` instead
//! rebuilds its deliveries from the topic into the (empty) database of `DATABASE_URL` and
//! exits ([`delivery::rebuild`]).

use std::process::ExitCode;

#[tokio::main]
async fn main() -> ExitCode {
    if std::env::args().skip(1).any(|a| a == "--rebuild") {
        let settings = delivery::settings_from_env();
        let rules = std::sync::Arc::new(delivery::reactor::DeliveryReactor);
        return kafka::rebuild::main(settings, delivery::startup::MIGRATIONS, rules).await;
    }
    kafka::run_service("delivery", async {
        delivery::build(&delivery::settings_from_env()?).await
    })
    .await
}
