use clap::Parser;
use gantry_coordinator::{Coordinator, config::Args};
use tokio_util::sync::CancellationToken;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    let args = Args::parse();
    let options = args.options()?;
    if args.print_config {
        println!("{options:#?}");
        return Ok(());
    }
    let shutdown = CancellationToken::new();
    let coordinator = Coordinator::start(options, shutdown.clone()).await?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => tracing::info!("shutting down"),
        result = terminate() => result?,
    }
    shutdown.cancel();
    coordinator.task.await??;
    Ok(())
}

async fn terminate() -> anyhow::Result<()> {
    tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?
        .recv()
        .await;
    tracing::info!("terminated, shutting down");
    Ok(())
}
