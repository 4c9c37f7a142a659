use clap::Parser;
use gantry_coordinator::{Coordinator, config::Args};
use tokio_util::sync::CancellationToken;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let settings = args.settings()?;
    if args.print_config {
        println!("{}", serde_json::to_string_pretty(&settings)?);
        return Ok(());
    }
    gantry_ops::init_logging(settings.log_format, "info");
    let shutdown = CancellationToken::new();
    let coordinator = Coordinator::start(settings.options, shutdown.clone()).await?;
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
