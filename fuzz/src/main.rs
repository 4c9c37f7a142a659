//! `gantry-fuzz TARGET --seconds N`: a fuzzing campaign against one target, seeded from
//! `fuzz/corpus/TARGET/`; prints its figures, and every panicking input (written to
//! `fuzz/findings/TARGET/`). Exit code 1 when it found anything.

use clap::Parser;
use gantry_fuzz::{Target, campaign, seeds};
use std::path::PathBuf;
use std::time::Duration;

#[derive(Parser)]
#[command(name = "gantry-fuzz", about = "Fuzz what Gantry reads from outside")]
struct Args {
    #[arg(value_enum)]
    target: Target,
    /// How long to run.
    #[arg(long, default_value_t = 60)]
    seconds: u64,
    /// The seed of the mutation generator.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Where the corpus and the findings live.
    #[arg(long, default_value = concat!(env!("CARGO_MANIFEST_DIR")))]
    dir: PathBuf,
    /// An input running longer than this is a hang.
    #[arg(long, default_value_t = 10)]
    hang_secs: u64,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let name = args.target.name();
    let findings = args.dir.join("findings").join(name);
    std::fs::create_dir_all(&findings)?;
    let seeds = seeds(args.target, Some(&args.dir.join("corpus").join(name)))?;
    let n = seeds.len();
    let report = campaign(
        args.target,
        seeds,
        Duration::from_secs(args.seconds),
        args.seed,
        Duration::from_secs(args.hang_secs),
        Some(findings.join("hang")),
    );
    println!(
        "{name}: {} execs in {:.0?} ({:.0}/s), {n} seeds, {} inputs with new outcomes, {} distinct outcomes, slowest input {:.1?}, {} panics, 0 hangs",
        report.execs,
        report.elapsed,
        report.execs_per_sec(),
        report.corpus,
        report.outcomes,
        report.slowest,
        report.panics.len()
    );
    for (i, (input, why)) in report.panics.iter().enumerate() {
        let file = findings.join(format!("panic-{i}"));
        std::fs::write(&file, input)?;
        println!("PANIC ({}): {why}", file.display());
    }
    std::process::exit(i32::from(!report.panics.is_empty()));
}
