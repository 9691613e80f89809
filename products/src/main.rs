//! `cargo run -p products`: the products service on :8085. `products --rebuild` instead
//! rebuilds its catalog and reservations from the topic into the (empty) database of
//! `DATABASE_URL` and exits ([`products::rebuild`]).

use std::process::ExitCode;

#[tokio::main]
async fn main() -> ExitCode {
    if std::env::args().skip(1).any(|a| a == "--rebuild") {
        let settings = products::Settings::from_env().map(|s| s.service);
        let rules = std::sync::Arc::new(products::reactor::StockReactor);
        return kafka::rebuild::main(settings, products::startup::MIGRATIONS, rules).await;
    }
    kafka::run_service("products", async {
        products::build(&products::Settings::from_env()?).await
    })
    .await
}
