//! Runs the conformance suite against a deployed coordinator: `gantry-protocol-tests --endpoint URL`.

use clap::Parser;

#[derive(Parser)]
#[command(
    name = "gantry-protocol-tests",
    about = "Gantry coordinator conformance suite"
)]
struct Args {
    /// The coordinator to test. Use a dedicated one: the suite submits jobs and registers workers.
    #[arg(long)]
    endpoint: String,
    /// An admin token of that coordinator (the suite creates tokens of every role with it);
    /// none for a coordinator that runs --insecure.
    #[arg(long, env = "GANTRY_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// The coordinator's CA certificate (PEM), for an https:// endpoint.
    #[arg(long, env = "GANTRY_CA_CERT")]
    ca_cert: Option<std::path::PathBuf>,
}

#[tokio::main]
async fn main() {
    let args = Args::parse();
    let ca = match args.ca_cert.as_ref().map(std::fs::read).transpose() {
        Ok(ca) => ca,
        Err(e) => {
            eprintln!("--ca-cert: {e}");
            std::process::exit(2);
        }
    };
    let target = gantry_protocol_tests::Target {
        url: args.endpoint,
        token: args.token,
        ca,
    };
    let (mut passed, mut failed) = (0, 0);
    for (name, case) in gantry_protocol_tests::cases() {
        match case(&target).await {
            Ok(()) => {
                passed += 1;
                println!("ok     {name}");
            }
            Err(e) => {
                failed += 1;
                println!("FAILED {name}: {e:#}");
            }
        }
    }
    println!("{passed} passed, {failed} failed");
    std::process::exit(if failed == 0 { 0 } else { 1 });
}
