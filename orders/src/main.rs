//! `cargo run -p orders`: the orders service on :8081.

#[tokio::main]
async fn main() -> std::process::ExitCode {
    kafka::run_service("orders", async {
        orders::build(&orders::settings_from_env()?).await
    })
    .await
}
