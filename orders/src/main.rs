//! `cargo run -p orders`: the orders service on :8081. `orders --rebuild` instead rebuilds its
//! read model from the topic into the (empty) database of `DATABASE_URL` and exits
//! ([`kafka::rebuild`]).

use std::process::ExitCode;

#[tokio::main]
async fn main() -> ExitCode {
    if std::env::args().skip(1).any(|a| a == "--rebuild") {
        let settings = orders::settings_from_env().map(|s| s.service);
        let rules = std::sync::Arc::new(orders::reactor::OrderReactor);
        return kafka::rebuild::main(settings, orders::startup::MIGRATIONS, rules).await;
    }
    kafka::run_service("orders", async {
        orders::build(&orders::settings_from_env()?).await
    })
    .await
}
