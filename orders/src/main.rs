//! `cargo run -p orders`: the orders service on :8081. `orders --rebuild` instead rebuilds its
//! read model from the topic into the (empty) database of `DATABASE_URL` and exits.

use std::process::ExitCode;

#[tokio::main]
async fn main() -> ExitCode {
    if std::env::args().skip(1).any(|a| a == "--rebuild") {
        return rebuild().await;
    }
    kafka::run_service("orders", async {
        orders::build(&orders::settings_from_env()?).await
    })
    .await
}

/// `orders --rebuild`: see [`orders::rebuild`].
async fn rebuild() -> ExitCode {
    kafka::init_logging();
    let settings = match orders::settings_from_env() {
        Ok(settings) => settings,
        Err(e) => {
            log::error!("orders --rebuild: {e}");
            return ExitCode::FAILURE;
        }
    };
    let url = &settings.service.database_url;
    let db = match kafka::Database::open(url, orders::startup::MIGRATIONS) {
        Ok(db) => db,
        Err(e) => {
            log::error!("orders --rebuild: cannot open the database: {e}");
            return ExitCode::FAILURE;
        }
    };
    match orders::rebuild::rebuild(&db, &settings.service.kafka).await {
        Ok(done) => {
            log::info!(
                "orders --rebuild: {} messages read, {} events applied; start orders on this \
                 database to go on from the topic's end",
                done.read,
                done.applied
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            log::error!("orders --rebuild: {e}");
            ExitCode::FAILURE
        }
    }
}
