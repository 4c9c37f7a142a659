use clap::Parser;
use gantry_worker::config::{Cli, Command};
use tokio_util::sync::CancellationToken;

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    if let Some(Command::Rank(args)) = cli.command {
        std::process::exit(gantry_worker::runtime::rank::run(&args.assignment));
    }
    let options = cli.daemon.options()?;
    let log_format = cli.daemon.log_format()?;
    if cli.daemon.print_config {
        let mut shown = serde_json::to_value(&options)?;
        shown["log_format"] = serde_json::to_value(log_format)?;
        println!("{}", serde_json::to_string_pretty(&shown)?);
        return Ok(());
    }
    gantry_worker::config::load_secret_files()?;
    gantry_ops::init_logging(log_format, "info");
    let runtime = tokio::runtime::Runtime::new()?;
    runtime.block_on(async {
        let shutdown = CancellationToken::new();
        let drain = CancellationToken::new();
        let mut agent = tokio::spawn(gantry_worker::agent::run(
            options,
            shutdown.clone(),
            drain.clone(),
        ));
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        tokio::select! {
            // Ctrl-C: stop now. SIGTERM (Kubernetes, systemd): drain, so ranks checkpoint first.
            _ = tokio::signal::ctrl_c() => {
                tracing::info!("interrupted: stopping ranks");
                shutdown.cancel();
            }
            _ = term.recv() => {
                tracing::info!("terminated: draining");
                drain.cancel();
            }
            done = &mut agent => return done?,
        }
        agent.await??;
        Ok(())
    })
}
