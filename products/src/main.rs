//! `cargo run -p products`: the products service on :8085.

#[tokio::main]
async fn main() -> std::process::ExitCode {
    kafka::run_service("products", async {
        products::build(&products::Settings::from_env()?).await
    })
    .await
}
