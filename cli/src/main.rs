//! `gantry`: submit and follow training jobs, inspect the cluster, run a local one.
//!
//! Exit codes: 0 ok; 1 the job failed or was cancelled (`--wait`); 2 bad usage or invalid
//! input; 3 coordinator unreachable.

mod local;
mod render;

use clap::{Parser, Subcommand};
use gantry_core::JobSpec;
use gantry_proto::v1 as pb;
use pb::job_service_client::JobServiceClient;
use render::Output;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;

const EXAMPLE_GPT_DP2: &str = include_str!("../../deploy/examples/gpt-dp2.toml");

#[derive(Debug, Parser)]
#[command(name = "gantry", version, about = "Distributed training orchestrator")]
struct Cli {
    /// The coordinator's URL.
    #[arg(
        long,
        global = true,
        env = "GANTRY_COORDINATOR",
        default_value = "http://127.0.0.1:7070"
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
        #[arg(long, default_value = "127.0.0.1:7070")]
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
        /// The file to write, e.g. `model.safetensors`.
        #[arg(long)]
        out: PathBuf,
        /// This checkpoint step instead of the newest verified one.
        #[arg(long)]
        step: Option<u64>,
    },
    /// Run one rank (started by a worker daemon, not by hand).
    #[command(hide = true)]
    Rank {
        #[arg(long)]
        assignment: PathBuf,
    },
}

/// An error with the exit code it maps to.
#[derive(Debug)]
struct Failure {
    code: i32,
    message: String,
}

impl Failure {
    fn usage(message: impl Into<String>) -> Self {
        Self {
            code: 2,
            message: message.into(),
        }
    }
}

impl From<tonic::Status> for Failure {
    fn from(s: tonic::Status) -> Self {
        use tonic::Code;
        let code = match s.code() {
            Code::Unavailable | Code::DeadlineExceeded => 3,
            Code::InvalidArgument
            | Code::NotFound
            | Code::FailedPrecondition
            | Code::AlreadyExists => 2,
            _ => 1,
        };
        Self {
            code,
            message: s.message().to_string(),
        }
    }
}

impl From<anyhow::Error> for Failure {
    fn from(e: anyhow::Error) -> Self {
        Self {
            code: 1,
            message: format!("{e:#}"),
        }
    }
}

fn main() {
    let cli = Cli::parse();
    if let Command::Rank { assignment } = &cli.command {
        std::process::exit(gantry_worker::runtime::rank::run(assignment));
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

async fn connect(url: &str) -> Result<JobServiceClient<Channel>, Failure> {
    let endpoint = tonic::transport::Endpoint::from_shared(url.to_string())
        .map_err(|e| Failure::usage(format!("--coordinator: {url:?}: {e}")))?
        .connect_timeout(Duration::from_secs(5));
    let channel = endpoint.connect().await.map_err(|e| Failure {
        code: 3,
        message: format!("cannot reach the coordinator at {url}: {e}"),
    })?;
    Ok(JobServiceClient::new(channel))
}

async fn run(cli: Cli) -> Result<i32, Failure> {
    let out = cli.output;
    match cli.command {
        Command::Up {
            workers,
            slots_per_worker,
            state_dir,
            listen,
        } => {
            let shutdown = CancellationToken::new();
            let cluster = local::LocalCluster::start(
                listen,
                &state_dir,
                workers,
                slots_per_worker,
                shutdown.clone(),
            )
            .await
            .map_err(|e| Failure::usage(format!("{e:#}")))?;
            println!(
                "gantry is up: coordinator {} with {workers} worker(s) × {slots_per_worker} slot(s); state in {}",
                cluster.url,
                state_dir.display()
            );
            println!(
                "submit with: gantry --coordinator {} submit deploy/examples/mlp-dp2.toml --wait",
                cluster.url
            );
            tokio::signal::ctrl_c().await.ok();
            println!("stopping");
            shutdown.cancel();
            cluster.stopped().await?;
            Ok(0)
        }
        Command::Demo { state_dir, set } => demo(&state_dir, &set).await,
        Command::Submit {
            spec,
            set,
            wait,
            follow,
        } => {
            let spec = JobSpec::load(&spec, &set).map_err(|e| Failure::usage(e.to_string()))?;
            let mut client = connect(&cli.coordinator).await?;
            let job = client
                .submit_job(pb::SubmitJobRequest {
                    spec_json: spec.to_json(),
                })
                .await?
                .into_inner();
            if !(wait || follow) {
                match out {
                    Output::Json => render::print_json(&render::job_json(&job)),
                    Output::Table => println!("{}", job.id),
                }
                return Ok(0);
            }
            if out == Output::Table {
                eprintln!("submitted {}", job.id);
            }
            let end = follow_job(&mut client, &job.id, follow).await?;
            match out {
                Output::Json => render::print_json(&render::job_json(&end)),
                Output::Table => println!("{}", render::summary(&end)),
            }
            Ok(if end.state == pb::JobState::Succeeded as i32 {
                0
            } else {
                1
            })
        }
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
        } => {
            let mut client = connect(&cli.coordinator).await?;
            // The store is the truth about what is committed: check the step there when this
            // machine can read it, and fall back to the coordinator's records otherwise.
            let from_step_in_store = match from_step {
                Some(step) => {
                    let found = client
                        .get_job(pb::GetJobRequest {
                            job_id: job.clone(),
                        })
                        .await?
                        .into_inner();
                    committed_in_store(&found, step).await?
                }
                None => false,
            };
            let job = client
                .resume_job(pb::ResumeJobRequest {
                    job_id: job,
                    from_step,
                    set,
                    from_step_in_store,
                })
                .await?
                .into_inner();
            render::status(&job, out);
            Ok(0)
        }
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
            let mut client = connect(&cli.coordinator).await?;
            let recorded = client
                .list_checkpoints(pb::ListCheckpointsRequest {
                    job_id: job.clone(),
                })
                .await?
                .into_inner()
                .checkpoints;
            let job = client
                .get_job(pb::GetJobRequest { job_id: job })
                .await?
                .into_inner();
            // What the store holds: committed, partial or corrupt. Without access to the store
            // (no credentials here), the coordinator's record of commits.
            let checkpoints = match stored_checkpoints(&job, &recorded, verify).await {
                Ok(listed) => listed,
                Err(e) => {
                    eprintln!("showing the coordinator's records; cannot read the store: {e:#}");
                    recorded
                }
            };
            render::checkpoints(&checkpoints, out);
            Ok(0)
        }
        Command::Export { job, out, step } => {
            let job = connect(&cli.coordinator)
                .await?
                .get_job(pb::GetJobRequest { job_id: job })
                .await?
                .into_inner();
            export(&job, step, &out).await?;
            Ok(0)
        }
        Command::Rank { .. } => unreachable!("handled before the runtime starts"),
    }
}

/// Whether `step` is committed in `job`'s checkpoint store: an error when the store says it is
/// not, `false` when this machine cannot read the store (no credentials, no shared volume).
async fn committed_in_store(job: &pb::Job, step: u64) -> Result<bool, Failure> {
    use gantry_worker::runtime::checkpoint::CheckpointStore;
    let spec = JobSpec::from_json(&job.spec_json).map_err(anyhow::Error::from)?;
    let Ok(store) = CheckpointStore::for_job(&spec.checkpoint, &job.id, &Default::default()) else {
        return Ok(false);
    };
    match store.committed(step).await {
        Ok(_) => Ok(true),
        // A store that holds no step at all is one this machine does not see (a file:// store
        // on another machine's disk): the coordinator's records decide.
        Err(e) if store.is_damage(&e) && !store.steps().await.unwrap_or_default().is_empty() => {
            Err(Failure::usage(format!(
                "from_step: job {} has no usable checkpoint at step {step}: {e}",
                job.id
            )))
        }
        Err(_) => Ok(false),
    }
}

/// Every step directory in `job`'s checkpoint store, oldest first, checked (every byte when
/// `verify`).
async fn stored_checkpoints(
    job: &pb::Job,
    recorded: &[pb::Checkpoint],
    verify: bool,
) -> anyhow::Result<Vec<pb::Checkpoint>> {
    use gantry_worker::runtime::checkpoint::CheckpointStore;
    let spec = JobSpec::from_json(&job.spec_json)?;
    let store = CheckpointStore::for_job(&spec.checkpoint, &job.id, &Default::default())?;
    let mut listed: Vec<pb::Checkpoint> = store
        .list(verify)
        .await?
        .into_iter()
        .map(|l| {
            let record = recorded.iter().find(|r| r.step == l.step);
            let state = match l.state {
                "committed" => pb::CheckpointState::Committed,
                "partial" => pb::CheckpointState::Partial,
                _ => pb::CheckpointState::Corrupt,
            };
            pb::Checkpoint {
                step: l.step,
                url: store.step_url(l.step),
                attempt: l.attempt.or(record.map(|r| r.attempt)).unwrap_or(0),
                size_bytes: l.bytes,
                committed_at_ms: record.map_or(0, |r| r.committed_at_ms),
                state: state as i32,
            }
        })
        .collect();
    if listed.is_empty() && !recorded.is_empty() {
        // A file:// store on another machine's disk looks empty from here.
        anyhow::bail!(
            "it holds none of the {} checkpoints the coordinator recorded",
            recorded.len()
        );
    }
    listed.sort_by_key(|c| c.step);
    Ok(listed)
}

/// Reads a checkpoint of `job` straight from its object store and writes the whole model.
async fn export(job: &pb::Job, step: Option<u64>, out: &std::path::Path) -> anyhow::Result<()> {
    use gantry_worker::runtime::checkpoint::{CheckpointError, CheckpointStore};
    use gantry_worker::runtime::export;
    let spec = JobSpec::from_json(&job.spec_json)?;
    let store = CheckpointStore::for_job(&spec.checkpoint, &job.id, &Default::default())?;
    // The shards are checked as they are read; without --step, a step whose shards are torn
    // or damaged is skipped for the one before (a store that cannot be read is an error).
    let candidates = match step {
        Some(step) => vec![step],
        None => store.steps().await?,
    };
    let mut exported = None;
    for candidate in candidates {
        let read = async {
            let manifest = store.committed(candidate).await?;
            let params = export::whole_model(&spec, &store, &manifest).await?;
            Ok::<_, anyhow::Error>((manifest, params))
        };
        match read.await {
            Ok(found) => {
                exported = Some(found);
                break;
            }
            Err(e)
                if step.is_none()
                    && e.downcast_ref::<CheckpointError>()
                        .is_some_and(|e| store.is_damage(e)) =>
            {
                eprintln!("skipping step {candidate}: {e:#}")
            }
            Err(e) => return Err(e),
        }
    }
    let (manifest, params) =
        exported.ok_or_else(|| anyhow::anyhow!("{} has no usable checkpoint", job.id))?;
    let metadata = [
        ("format", "pt".to_string()),
        ("gantry.job", job.id.clone()),
        ("gantry.step", manifest.step.to_string()),
        ("gantry.model", serde_json::to_string(&spec.model)?),
        (
            "gantry.layout",
            format!("dp={} tp={} pp={}", manifest.dp, manifest.tp, manifest.pp),
        ),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    export::write_safetensors(&params, metadata, out)?;
    let bytes: usize = params.values().map(|t| t.values.len() * 4).sum();
    println!(
        "wrote {} tensors ({:.1} MiB) of {} at step {} to {}",
        params.len(),
        bytes as f64 / (1 << 20) as f64,
        job.id,
        manifest.step,
        out.display()
    );
    Ok(())
}

/// Follows a job to its end with a progress bar; with `show_events`, prints its history lines
/// (state changes, restarts, checkpoints) above the bar. Returns the job as it ended.
async fn follow_job(
    client: &mut JobServiceClient<Channel>,
    job_id: &str,
    show_events: bool,
) -> Result<pb::Job, Failure> {
    let bar = indicatif::ProgressBar::new(0);
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{spinner} [{elapsed_precise}] {bar:40} {pos}/{len} {msg}",
        )
        .expect("valid template"),
    );
    let mut stream = client
        .watch_job(pb::WatchJobRequest {
            job_id: job_id.to_string(),
            after_seq: 0,
            follow: true,
        })
        .await?
        .into_inner();
    let mut last = None;
    while let Some(event) = stream.message().await? {
        match event.kind {
            Some(pb::job_event::Kind::Job(job)) => {
                bar.set_length(job.total_steps);
                bar.set_position(job.step);
                let mut msg = render::state_name(job.state).to_string();
                if let Some(loss) = job.loss {
                    msg.push_str(&format!(" loss {loss:.4}"));
                }
                if let Some(eval) = job.eval_loss {
                    msg.push_str(&format!(" eval {eval:.4}"));
                }
                if let Some(reason) = &job.pending_reason {
                    msg.push_str(&format!(" ({reason})"));
                }
                bar.set_message(msg);
                let done = [
                    pb::JobState::Succeeded,
                    pb::JobState::Failed,
                    pb::JobState::Cancelled,
                ]
                .iter()
                .any(|s| *s as i32 == job.state);
                last = Some(job);
                if done {
                    break;
                }
            }
            Some(pb::job_event::Kind::Log(line)) => {
                let is_step_line = line.rank >= 0 && line.line.starts_with("step ");
                if show_events && !is_step_line {
                    // `println` on a hidden bar (not a terminal) would drop the line.
                    bar.suspend(|| println!("{}", render::log_line(&line)));
                }
            }
            None => {}
        }
    }
    bar.finish_and_clear();
    match last {
        Some(job) => Ok(job),
        None => Err(Failure {
            code: 3,
            message: "the coordinator closed the stream before the job ended".into(),
        }),
    }
}

async fn demo(state_dir: &std::path::Path, set: &[String]) -> Result<i32, Failure> {
    let shutdown = CancellationToken::new();
    let cluster = local::LocalCluster::start(
        "127.0.0.1:0".parse().expect("valid"),
        state_dir,
        2,
        1,
        shutdown.clone(),
    )
    .await
    .map_err(|e| Failure::usage(format!("{e:#}")))?;
    println!(
        "local cluster up: coordinator {} with 2 workers; state in {}",
        cluster.url,
        state_dir.display()
    );
    let spec_path = state_dir.join("gpt-dp2.toml");
    std::fs::write(&spec_path, EXAMPLE_GPT_DP2).map_err(|e| Failure::usage(e.to_string()))?;
    let spec = JobSpec::load(&spec_path, set).map_err(|e| Failure::usage(e.to_string()))?;
    println!(
        "training {} ({:?}, {} layers, d_model {}) for {} steps, dp={}",
        spec.name,
        spec.model.kind,
        spec.model.layers,
        spec.model.d_model,
        spec.train.steps,
        spec.parallel.dp
    );
    let mut client = connect(&cluster.url).await?;
    let started = Instant::now();
    let job = client
        .submit_job(pb::SubmitJobRequest {
            spec_json: spec.to_json(),
        })
        .await?
        .into_inner();
    let end = follow_job(&mut client, &job.id, true).await?;
    // The first step's loss, from the job's history, to show how far training got.
    let mut history = client
        .watch_job(pb::WatchJobRequest {
            job_id: job.id.clone(),
            after_seq: 0,
            follow: false,
        })
        .await?
        .into_inner();
    let mut first_loss = None;
    while let Some(event) = history.message().await? {
        if let Some(pb::job_event::Kind::Log(line)) = event.kind
            && first_loss.is_none()
        {
            first_loss = render::step_loss(&line.line).map(|(_, loss)| loss);
        }
    }
    println!("{}", render::summary(&end));
    if let (Some(first), Some(last)) = (first_loss, end.loss) {
        println!(
            "training loss {first:.4} → {last:.4} ({:.2}× lower) in {:.0?}",
            first / last,
            started.elapsed()
        );
    }
    shutdown.cancel();
    cluster.stopped().await?;
    Ok(if end.state == pb::JobState::Succeeded as i32 {
        0
    } else {
        1
    })
}
