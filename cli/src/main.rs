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
use failure::{Failure, Remote, connect};
use gantry_proto::Bearer;
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
    /// The bearer token to present (it shows in `ps`: prefer GANTRY_TOKEN or --token-file).
    #[arg(long, global = true, env = "GANTRY_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// A file holding the token. Without --token or this, the CLI reads .gantry/admin.token when
    /// it exists (the admin token `gantry up` writes).
    #[arg(long, global = true, env = "GANTRY_TOKEN_FILE")]
    token_file: Option<PathBuf>,
    /// The coordinator's CA certificate (PEM), to verify an https:// coordinator. Default:
    /// .gantry/tls/ca.pem when it exists (the one `gantry up` makes).
    #[arg(long, global = true, env = "GANTRY_CA_CERT")]
    ca_cert: Option<PathBuf>,
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
        /// Plain TCP and no tokens: anyone who can reach the port controls the cluster and runs
        /// code on this machine. Clients then use http://.
        #[arg(long)]
        insecure: bool,
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
    /// Tokens for clients and workers (admin only): create, list, revoke.
    Token {
        #[command(subcommand)]
        command: TokenCommand,
    },
    /// Run one rank (started by a worker daemon, not by hand).
    #[command(hide = true)]
    Rank {
        #[arg(long)]
        assignment: PathBuf,
    },
}

#[derive(Debug, Subcommand)]
enum TokenCommand {
    /// Create a token and print it (it is shown once; the coordinator keeps only its hash).
    Create {
        /// Who holds it, e.g. `alice` or `ci`: jobs record it as who submitted, cancelled or
        /// resumed them, and a submitter may change only the jobs its name submitted.
        name: String,
        /// admin (everything), submitter (submit; cancel and resume its own jobs), viewer (read
        /// only) or worker (a worker daemon's join token).
        #[arg(long, default_value = "submitter")]
        role: String,
    },
    /// List tokens (never the tokens themselves).
    List,
    /// Revoke a token by its id: it stops working at once.
    Revoke { id: String },
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
    // A client command piped into `head` ends quietly when the pipe closes, as Unix tools do:
    // printing to a closed stdout panics with "Broken pipe", which ends the process quietly.
    // (SIGPIPE itself stays ignored: a socket write to a coordinator that hung up, or that
    // speaks TLS to a plain-TCP client, must be an error the CLI explains, not a silent death.)
    let default_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let payload = info.payload();
        let message = payload
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| payload.downcast_ref::<&str>().copied())
            .unwrap_or_default();
        if message.contains("failed printing to stdout") && message.contains("Broken pipe") {
            std::process::exit(0);
        }
        default_hook(info);
    }));
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

/// The token file read when none is named: the admin token of `gantry up`'s default state dir.
const DEFAULT_TOKEN_FILE: &str = ".gantry/admin.token";

impl Cli {
    /// The coordinator and the credential to present: `--token`/`GANTRY_TOKEN`, else
    /// `--token-file`/`GANTRY_TOKEN_FILE`, else `.gantry/admin.token` if it exists, else none.
    fn remote(&self) -> Result<Remote, Failure> {
        let token = match (&self.token, &self.token_file) {
            (Some(token), _) => Some(token.clone()),
            (None, Some(file)) => Some(
                gantry_ops::read_token_file(file, "--token-file")
                    .map_err(|e| Failure::usage(format!("{e:#}")))?,
            ),
            (None, None) => std::fs::read_to_string(DEFAULT_TOKEN_FILE).ok(),
        };
        let bearer = Bearer::new(token.as_deref().map(str::trim))
            .map_err(|e| Failure::usage(format!("--token: {e}")))?;
        let ca = match &self.ca_cert {
            Some(file) => Some(
                std::fs::read(file)
                    .map_err(|e| Failure::usage(format!("--ca-cert {}: {e}", file.display())))?,
            ),
            None => std::fs::read(gantry_core::defaults::CA_CERT_FILE).ok(),
        };
        Ok(Remote {
            url: self.coordinator.clone(),
            bearer,
            ca,
        })
    }
}

async fn run(cli: Cli) -> Result<i32, Failure> {
    let out = cli.output;
    let remote = match cli.command {
        // Local clusters make their own credentials.
        Command::Up { .. } | Command::Demo { .. } | Command::Data { .. } | Command::Rank { .. } => {
            None
        }
        _ => Some(cli.remote()?),
    };
    let remote = remote.as_ref();
    let coordinator = || remote.expect("a client command has a remote");
    match cli.command {
        Command::Up {
            workers,
            slots_per_worker,
            state_dir,
            listen,
            insecure,
        } => cluster::up(workers, slots_per_worker, &state_dir, listen, insecure).await,
        Command::Demo { state_dir, set } => cluster::demo(&state_dir, &set).await,
        Command::Submit {
            spec,
            set,
            wait,
            follow,
        } => submit::submit(coordinator(), out, &spec, &set, wait, follow).await,
        Command::Jobs => {
            let jobs = connect(coordinator())
                .await?
                .list_jobs(pb::ListJobsRequest {})
                .await?
                .into_inner()
                .jobs;
            render::jobs(&jobs, out);
            Ok(0)
        }
        Command::Status { job } => {
            let job = connect(coordinator())
                .await?
                .get_job(pb::GetJobRequest { job_id: job })
                .await?
                .into_inner();
            render::status(&job, out);
            Ok(0)
        }
        Command::Logs { job, follow } => {
            let mut client = connect(coordinator()).await?;
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
            let job = connect(coordinator())
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
        } => resume::resume(coordinator(), out, job, from_step, set).await,
        Command::Workers => {
            let workers = connect(coordinator())
                .await?
                .list_workers(pb::ListWorkersRequest {})
                .await?
                .into_inner()
                .workers;
            render::workers(&workers, out);
            Ok(0)
        }
        Command::Checkpoints { job, verify } => {
            store::checkpoints(coordinator(), out, job, verify).await
        }
        Command::Export {
            job,
            out,
            step,
            format,
        } => {
            let job = connect(coordinator())
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
            let job = connect(coordinator())
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
        Command::Token { command } => {
            let mut client = connect(coordinator()).await?;
            match command {
                TokenCommand::Create { name, role } => {
                    let created = client
                        .create_token(pb::CreateTokenRequest { name, role })
                        .await?
                        .into_inner();
                    render::created_token(&created, out);
                }
                TokenCommand::List => {
                    let tokens = client
                        .list_tokens(pb::ListTokensRequest {})
                        .await?
                        .into_inner()
                        .tokens;
                    render::tokens(&tokens, out);
                }
                TokenCommand::Revoke { id } => {
                    let token = client
                        .revoke_token(pb::RevokeTokenRequest { id })
                        .await?
                        .into_inner();
                    render::tokens(&[token], out);
                }
            }
            Ok(0)
        }
        Command::Rank { .. } => unreachable!("handled before the runtime starts"),
    }
}
