use clap::Parser;
use gantry_worker::config::{Cli, Command};
use tokio_util::sync::CancellationToken;

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    if let Some(Command::Rank(args)) = cli.command {
        std::process::exit(gantry_worker::runtime::rank::run(&args.assignment));
    }
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    let options = cli.daemon.options()?;
    if cli.daemon.print_config {
        println!("{options:#?}");
        return Ok(());
    }
    let runtime = tokio::runtime::Runtime::new()?;
    runtime.block_on(async {
        let shutdown = CancellationToken::new();
        let agent = tokio::spawn(gantry_worker::agent::run(options, shutdown.clone()));
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
        tracing::info!("shutting down: stopping ranks");
        shutdown.cancel();
        agent.await??;
        Ok(())
    })
}
