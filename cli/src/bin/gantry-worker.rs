//! `gantry-worker`: the worker daemon, and (as its hidden `rank` subcommand) the rank
//! processes it starts. The daemon library has no burn in it; this binary joins it to the
//! trainer, so one executable serves both roles and every rank runs the daemon's own build.

use clap::Parser;
use gantry_worker::config::{Cli, Command};
use tokio_util::sync::CancellationToken;

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    if let Some(Command::Rank(args)) = cli.command {
        std::process::exit(gantry_trainer::rank::run(&args.assignment));
    }
    let options = cli.daemon.options()?;
    if cli.daemon.print_config {
        println!("{}", serde_json::to_string_pretty(&options)?);
        return Ok(());
    }
    gantry_worker::config::load_secret_files()?;
    gantry_ops::init_logging(options.log_format, "info");
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
