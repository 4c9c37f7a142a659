//! `gantry`: submit and follow training jobs, inspect the cluster, run a local one.
//!
//! Exit codes: 0 ok; 1 the job failed or was cancelled (`--wait`); 2 bad usage or invalid
//! input; 3 coordinator unreachable.

mod cluster;
mod data;
mod failure;
mod follow;
mod generate;
mod local;
mod render;
mod resume;
mod store;
mod submit;

use clap::{Parser, Subcommand};
use failure::{Failure, connect};
use gantry_proto::v1 as pb;
use render::Output;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

#[derive(Debug, Parser)]
#[command(name = "gantry", version, about = "Distributed training orchestrator")]
struct Cli {
    /// The coordinator's URL.
    #[arg(
        long,
        global = true,
        env = "GANTRY_COORDINATOR",
        default_value = gantry_core::defaults::COORDINATOR_URL
    )]
    coordinator: String,
    /// Output format of the listing commands.
    #[arg(short = 'o', long, global = true, value_enum, default_value = "table")]
    output: Output,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run a coordinator and local worker daemons in the foreground (Ctrl-C stops everything).
    Up {
        #[arg(long, default_value_t = 2)]
        workers: u32,
        /// Ranks each worker runs at once (`--workers 4` then holds a dp × tp × pp = 8 job).
        #[arg(long, default_value_t = 2)]
        slots_per_worker: u32,
        #[arg(long, default_value = ".gantry")]
        state_dir: PathBuf,
        #[arg(long, default_value = gantry_core::defaults::COORDINATOR_LISTEN)]
        listen: SocketAddr,
    },
    /// Start a local cluster, train the example GPT with dp=2 to the end, print a summary.
    Demo {
        #[arg(long, default_value = ".gantry/demo")]
        state_dir: PathBuf,
        /// Overrides of the example spec, e.g. `--set train.steps=100`.
        #[arg(long = "set", value_name = "KEY=VALUE")]
        set: Vec<String>,
    },
    /// Submit a job spec (TOML or JSON).
    Submit {
        spec: PathBuf,
        #[arg(long = "set", value_name = "KEY=VALUE")]
        set: Vec<String>,
        /// Wait for the job to end; exit 1 unless it succeeded.
        #[arg(long)]
        wait: bool,
        /// Follow the job's progress and events until it ends.
        #[arg(long)]
        follow: bool,
    },
    /// List jobs.
    Jobs,
    /// Show one job.
    Status { job: String },
    /// Show a job's history and rank output.
    Logs {
        job: String,
        #[arg(short, long)]
        follow: bool,
    },
    /// Cancel a job.
    Cancel { job: String },
    /// Resume a failed or cancelled job from its newest verified checkpoint.
    Resume {
        job: String,
        /// Resume from this committed step (checked in the store) instead of the newest
        /// verified one.
        #[arg(long)]
        from_step: Option<u64>,
        /// Change the layout (the checkpoint is resharded), how or how long it trains, e.g.
        /// `--set parallel.dp=1` or `--set parallel.tp=2`. The model, data, seed and learning
        /// rate stay.
        #[arg(long = "set", value_name = "KEY=VALUE")]
        set: Vec<String>,
    },
    /// List worker daemons.
    Workers,
    /// List a job's checkpoints, read from its store: committed, partial or corrupt.
    Checkpoints {
        job: String,
        /// Read every byte and check it against its checksum (by default only the manifest and
        /// every file's size are checked, which does not read the shards).
        #[arg(long)]
        verify: bool,
    },
    /// Write a checkpoint's whole-model parameters (shards joined) to a safetensors file.
    Export {
        job: String,
        /// The file to write, e.g. `model.safetensors` (with `--format hf`, a folder).
        #[arg(long)]
        out: PathBuf,
        /// `safetensors`: one file, Gantry's parameter names. `hf`: a Hugging Face model folder
        /// (`config.json`, `model.safetensors` in `transformers`' names and layouts, and the
        /// dataset's `tokenizer.json`), for the llama family.
        #[arg(long, value_enum, default_value = "safetensors")]
        format: store::ExportFormat,
        /// This checkpoint step instead of the newest verified one.
        #[arg(long)]
        step: Option<u64>,
    },
    /// Continue a prompt with a trained llama, on this machine's CPU (key/value cache), from the
    /// job's newest verified checkpoint.
    Generate {
        job: String,
        #[arg(long)]
        prompt: String,
        /// Tokens to write after the prompt.
        #[arg(long, default_value_t = 64)]
        max_tokens: usize,
        /// 0 writes the most likely token each time; above 0, tokens are sampled from the
        /// logits divided by it.
        #[arg(long, default_value_t = 0.0)]
        temperature: f64,
        /// Sample among the K most likely tokens only (0: all).
        #[arg(long, default_value_t = 0)]
        top_k: usize,
        /// The sampler's seed.
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// This checkpoint step instead of the newest verified one.
        #[arg(long)]
        step: Option<u64>,
    },
    /// Datasets: `gantry data prepare INPUT… --out DIR` cleans, splits and tokenizes text.
    Data {
        #[command(subcommand)]
        command: DataCommand,
    },
    /// Run one rank (started by a worker daemon, not by hand).
    #[command(hide = true)]
    Rank {
        #[arg(long)]
        assignment: PathBuf,
    },
}

#[derive(Debug, Subcommand)]
enum DataCommand {
    /// Read `.txt`/`.jsonl` text, clean it (normalise, deduplicate, filter), split it 8:1:1 by
    /// document, tokenize it, and write token shards with a manifest.
    Prepare(data::PrepareArgs),
}

fn main() {
    let cli = Cli::parse();
    if let Command::Rank { assignment } = &cli.command {
        std::process::exit(gantry_trainer::rank::run(assignment));
    }
    let quiet_daemons = !matches!(cli.command, Command::Up { .. });
    if !matches!(cli.command, Command::Up { .. } | Command::Demo { .. }) {
        // A client command piped into `head` ends quietly when the pipe closes, as Unix tools
        // do. (Not for the commands that run servers: their sockets must not raise SIGPIPE.)
        // SAFETY: restores the default disposition before any other thread exists.
        unsafe {
            libc::signal(libc::SIGPIPE, libc::SIG_DFL);
        }
    }
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| if quiet_daemons { "warn" } else { "info" }.into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let runtime = tokio::runtime::Runtime::new().expect("tokio runtime");
    let code = match runtime.block_on(run(cli)) {
        Ok(code) => code,
        Err(f) => {
            eprintln!("error: {}", f.message);
            f.code
        }
    };
    runtime.shutdown_timeout(Duration::from_secs(2));
    std::process::exit(code);
}

async fn run(cli: Cli) -> Result<i32, Failure> {
    let out = cli.output;
    match cli.command {
        Command::Up {
            workers,
            slots_per_worker,
            state_dir,
            listen,
        } => cluster::up(workers, slots_per_worker, &state_dir, listen).await,
        Command::Demo { state_dir, set } => cluster::demo(&state_dir, &set).await,
        Command::Submit {
            spec,
            set,
            wait,
            follow,
        } => submit::submit(&cli.coordinator, out, &spec, &set, wait, follow).await,
        Command::Jobs => {
            let jobs = connect(&cli.coordinator)
                .await?
                .list_jobs(pb::ListJobsRequest {})
                .await?
                .into_inner()
                .jobs;
            render::jobs(&jobs, out);
            Ok(0)
        }
        Command::Status { job } => {
            let job = connect(&cli.coordinator)
                .await?
                .get_job(pb::GetJobRequest { job_id: job })
                .await?
                .into_inner();
            render::status(&job, out);
            Ok(0)
        }
        Command::Logs { job, follow } => {
            let mut client = connect(&cli.coordinator).await?;
            let mut stream = client
                .watch_job(pb::WatchJobRequest {
                    job_id: job,
                    after_seq: 0,
                    follow,
                })
                .await?
                .into_inner();
            while let Some(event) = stream.message().await? {
                if let Some(pb::job_event::Kind::Log(line)) = &event.kind {
                    println!("{}", render::log_line(line));
                }
            }
            Ok(0)
        }
        Command::Cancel { job } => {
            let job = connect(&cli.coordinator)
                .await?
                .cancel_job(pb::CancelJobRequest { job_id: job })
                .await?
                .into_inner();
            render::status(&job, out);
            Ok(0)
        }
        Command::Resume {
            job,
            from_step,
            set,
        } => resume::resume(&cli.coordinator, out, job, from_step, set).await,
        Command::Workers => {
            let workers = connect(&cli.coordinator)
                .await?
                .list_workers(pb::ListWorkersRequest {})
                .await?
                .into_inner()
                .workers;
            render::workers(&workers, out);
            Ok(0)
        }
        Command::Checkpoints { job, verify } => {
            store::checkpoints(&cli.coordinator, out, job, verify).await
        }
        Command::Export {
            job,
            out,
            step,
            format,
        } => {
            let job = connect(&cli.coordinator)
                .await?
                .get_job(pb::GetJobRequest { job_id: job })
                .await?
                .into_inner();
            store::export(&job, step, &out, format).await?;
            Ok(0)
        }
        Command::Generate {
            job,
            prompt,
            max_tokens,
            temperature,
            top_k,
            seed,
            step,
        } => {
            if !temperature.is_finite() || temperature < 0.0 {
                return Err(Failure::usage(format!(
                    "--temperature: {temperature} must be 0 (greedy) or positive"
                )));
            }
            let job = connect(&cli.coordinator)
                .await?
                .get_job(pb::GetJobRequest { job_id: job })
                .await?
                .into_inner();
            let request = generate::Request {
                prompt,
                max_tokens,
                sampling: gantry_trainer::llama::Sampling {
                    temperature,
                    top_k,
                    seed,
                },
                step,
            };
            generate::generate(&job, request).await?;
            Ok(0)
        }
        Command::Data {
            command: DataCommand::Prepare(args),
        } => data::prepare(args).await,
        Command::Rank { .. } => unreachable!("handled before the runtime starts"),
    }
}
