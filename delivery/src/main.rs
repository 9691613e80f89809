//! `cargo run -p delivery`: the delivery service on :8082.

#[tokio::main]
async fn main() -> std::process::ExitCode {
    kafka::run_service("delivery", async {
        delivery::build(&delivery::settings_from_env()?).await
    })
    .await
}
