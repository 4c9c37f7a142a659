//! The worker daemon: registers its slots, keeps one session stream with the coordinator,
//! launches one OS process per assigned rank, relays their progress, logs and exits, and kills
//! them when told. When the coordinator goes away the ranks keep running; the daemon reconnects
//! with backoff and reports what it is running and what exited meanwhile.

use crate::gpus::{self, Gpu};
use crate::metrics::WorkerMetrics;
use backon::{ExponentialBuilder, Retryable};
use gantry_core::{Attempt, ExitCode, JobId, Rank, RankAssignment, RankEvent};
use gantry_proto::PROTOCOL_VERSION;
use gantry_proto::v1 as pb;
use pb::worker_message::Body;
use std::collections::HashMap;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::mpsc;
use tokio_stream::wrappers::UnboundedReceiverStream;
use tokio_util::sync::CancellationToken;

#[derive(Debug, Clone, serde::Serialize)]
pub struct AgentOptions {
    pub coordinator: String,
    pub slots: u32,
    /// The GPUs cuda ranks may be placed on; empty on a cpu worker.
    pub gpus: Vec<Gpu>,
    pub work_dir: PathBuf,
    pub hostname: String,
    /// The address other ranks use to reach this worker's ranks.
    pub advertise_host: String,
    /// The program (and leading arguments) that runs a rank: `PROGRAM ARGS… --assignment FILE`.
    pub rank_command: Vec<String>,
    /// Where to serve `/metrics`, `/healthz` and `/readyz` over HTTP; none when unset.
    pub metrics_listen: Option<std::net::SocketAddr>,
    /// How long a drain (SIGTERM) waits for ranks to checkpoint and stop.
    pub drain_timeout_secs: u64,
    /// Checkpoint store options for the ranks (endpoints, regions; never credentials), by
    /// object_store's configuration key; a job's `checkpoint.options` go over them.
    pub store_options: std::collections::BTreeMap<String, String>,
    /// How this daemon logs; its ranks log the same way.
    pub log_format: gantry_ops::LogFormat,
    /// The cluster's join token, presented on every call to the coordinator (never printed).
    #[serde(skip)]
    pub join_token: Option<String>,
    /// The coordinator's CA certificate (PEM), for an `https://` coordinator; its ranks get it
    /// too.
    #[serde(skip)]
    pub ca_cert: Option<Vec<u8>>,
}

/// A rank this daemon runs: its job, attempt and rank.
type Key = (JobId, Attempt, Rank);

fn key_of(k: &pb::RankKey) -> Key {
    (JobId(k.job_id.clone()), Attempt(k.attempt), Rank(k.rank))
}

struct RankProcess {
    kill: CancellationToken,
    pid: Option<u32>,
}

/// Runs the daemon until `shutdown`, then kills its ranks. `drain` starts a graceful stop:
/// the coordinator is told to place nothing more here, every rank is asked (SIGTERM) to save a
/// checkpoint and stop at its next step, and the daemon returns once they have exited and
/// their exits are reported, or after `drain_timeout`, killing what is left.
pub async fn run(
    options: AgentOptions,
    shutdown: CancellationToken,
    drain: CancellationToken,
) -> anyhow::Result<()> {
    anyhow::ensure!(!options.rank_command.is_empty(), "rank command is empty");
    std::fs::create_dir_all(&options.work_dir)?;
    // Ranks run in their own directories: every path handed to them must be absolute.
    let mut options = options;
    options.work_dir = std::fs::canonicalize(&options.work_dir)?;
    let metrics = WorkerMetrics::default();
    let readiness = gantry_ops::Readiness::ready();
    if let Some(listen) = options.metrics_listen {
        gantry_ops::serve_http(
            listen,
            metrics.collector(options.slots),
            readiness.clone(),
            shutdown.clone(),
        )
        .await?;
    }
    // Set once `drain` fires: the deadline after which remaining ranks are killed.
    let mut drain_deadline: Option<tokio::time::Instant> = None;
    let (events_tx, mut events) = mpsc::unbounded_channel::<Body>();
    let mut ranks: HashMap<Key, RankProcess> = HashMap::new();
    let mut worker_id = String::new();
    // This worker's own credential, once registration gave one (the join token until then).
    let mut credential: Option<String> = None;
    // Exits and checkpoint commits not yet delivered to a coordinator.
    let mut undelivered: Vec<Body> = Vec::new();

    'connect: loop {
        // Registering retries until the coordinator answers. Meanwhile the daemon still
        // drains when asked (a pod terminated during a coordinator outage checkpoints its
        // ranks), keeps track of its ranks' exits, and ends a drain once they are gone.
        let registered = {
            let registering = register(&options, &worker_id, credential.as_deref());
            tokio::pin!(registering);
            loop {
                let deadline = drain_deadline
                    .unwrap_or_else(|| tokio::time::Instant::now() + Duration::from_secs(3600));
                tokio::select! {
                    _ = shutdown.cancelled() => break 'connect,
                    _ = drain.cancelled(), if drain_deadline.is_none() => {
                        drain_deadline = Some(start_drain(&ranks, &readiness, &options));
                    }
                    _ = tokio::time::sleep_until(deadline), if drain_deadline.is_some() => {
                        tracing::warn!(ranks = ranks.len(), "drain timed out; killing the ranks left");
                        break 'connect;
                    }
                    Some(body) = events.recv() => {
                        if settle(&mut ranks, &body) {
                            keep_undelivered(&mut undelivered, body);
                        }
                    }
                    r = &mut registering => break r,
                }
                if drain_deadline.is_some() && ranks.is_empty() {
                    tracing::info!(
                        "drained while the coordinator is unreachable: every rank has stopped"
                    );
                    break 'connect;
                }
            }
        };
        let (channel, reg) = match registered {
            Ok(ok) => ok,
            Err(e) => {
                kill_all(&mut ranks);
                return Err(e);
            }
        };
        if !reg.credential.is_empty() {
            credential = Some(reg.credential.clone());
        }
        let bearer =
            gantry_proto::Bearer::new(credential.as_deref().or(options.join_token.as_deref()))
                .map_err(anyhow::Error::msg)?;
        let mut client = gantry_proto::worker_client(channel, bearer);
        if worker_id != reg.worker_id {
            tracing::info!(worker = %reg.worker_id, coordinator = %options.coordinator, "registered");
        }
        worker_id = reg.worker_id.clone();

        // Fold in whatever happened while disconnected.
        while let Ok(body) = events.try_recv() {
            if settle(&mut ranks, &body) {
                keep_undelivered(&mut undelivered, body);
            }
        }
        let (out, out_rx) = mpsc::unbounded_channel::<pb::WorkerMessage>();
        let message = |body: Body| pb::WorkerMessage {
            protocol_version: PROTOCOL_VERSION,
            worker_id: worker_id.clone(),
            body: Some(body),
        };
        let running = pb::RunningRanks {
            ranks: ranks
                .keys()
                .map(|(job_id, attempt, rank)| pb::RankKey {
                    job_id: job_id.to_string(),
                    attempt: attempt.get(),
                    rank: rank.get(),
                })
                .collect(),
            exited: undelivered
                .iter()
                .filter_map(|b| match b {
                    Body::Exited(e) => Some(e.clone()),
                    _ => None,
                })
                .collect(),
        };
        // Results first, while their attempt is still live on the coordinator; then the report
        // of what runs and what exited, which may end the attempt.
        for body in undelivered.drain(..) {
            if !matches!(body, Body::Exited(_)) {
                let _ = out.send(message(body));
            }
        }
        let _ = out.send(message(Body::Running(running)));
        if drain_deadline.is_some() {
            let _ = out.send(message(Body::Draining(pb::Draining {})));
        }
        let mut inbound = match client.session(UnboundedReceiverStream::new(out_rx)).await {
            Ok(r) => r.into_inner(),
            Err(status) => {
                tracing::warn!(error = %status, "session refused; reconnecting");
                tokio::time::sleep(Duration::from_millis(500)).await;
                continue 'connect;
            }
        };
        let mut heartbeat =
            tokio::time::interval(Duration::from_millis(reg.heartbeat_interval_ms.max(50)));
        loop {
            if drain_deadline.is_some() && ranks.is_empty() && undelivered.is_empty() {
                tracing::info!("drained: every rank has stopped");
                // End our side of the session; the coordinator closes its side once it has
                // handled everything before, so the last exits are known when it does.
                drop(out);
                let closed = async { while let Ok(Some(_)) = inbound.message().await {} };
                let _ = tokio::time::timeout(Duration::from_secs(5), closed).await;
                break 'connect;
            }
            let deadline = drain_deadline
                .unwrap_or_else(|| tokio::time::Instant::now() + Duration::from_secs(3600));
            tokio::select! {
                _ = shutdown.cancelled() => break 'connect,
                _ = drain.cancelled(), if drain_deadline.is_none() => {
                    drain_deadline = Some(start_drain(&ranks, &readiness, &options));
                    let _ = out.send(message(Body::Draining(pb::Draining {})));
                }
                _ = tokio::time::sleep_until(deadline), if drain_deadline.is_some() => {
                    tracing::warn!(ranks = ranks.len(), "drain timed out; killing the ranks left");
                    break 'connect;
                }
                _ = heartbeat.tick() => {
                    if out.send(message(Body::Heartbeat(pb::Heartbeat {}))).is_err() {
                        continue 'connect;
                    }
                }
                msg = inbound.message() => match msg {
                    Ok(Some(msg)) => match msg.body {
                        Some(pb::coordinator_message::Body::Assign(a)) if drain_deadline.is_some() => {
                            // Placed before the coordinator heard of the drain: hand it back.
                            if let Some(key) = a.key {
                                let _ = events_tx.send(Body::Exited(pb::RankExited {
                                    key: Some(key),
                                    exit_code: Some(ExitCode::Drained.code()),
                                    signal: None,
                                    message: "not started: the worker is draining".into(),
                                    stopped: false,
                                }));
                            }
                        }
                        Some(pb::coordinator_message::Body::Assign(a)) => {
                            if let Err(e) = launch(&options, &a, &mut ranks, &events_tx, &metrics) {
                                tracing::error!(error = %e, "cannot launch rank");
                                if let Some(key) = a.key {
                                    let _ = events_tx.send(Body::Exited(pb::RankExited {
                                        key: Some(key),
                                        exit_code: Some(127),
                                        signal: None,
                                        message: format!("launch failed: {e}"),
                                        stopped: false,
                                    }));
                                }
                            }
                        }
                        Some(pb::coordinator_message::Body::Stop(stop)) => {
                            for ((job, attempt, rank), proc) in &ranks {
                                if job.as_str() == stop.job_id && attempt.get() < stop.below_attempt {
                                    tracing::info!(%job, %attempt, %rank, reason = %stop.reason, "stopping rank");
                                    proc.kill.cancel();
                                }
                            }
                        }
                        None => {}
                    },
                    Ok(None) | Err(_) => {
                        tracing::warn!("coordinator session lost; reconnecting");
                        continue 'connect;
                    }
                },
                Some(body) = events.recv() => {
                    let keep = settle(&mut ranks, &body);
                    if let Err(failed) = out.send(message(body))
                        && keep
                        && let Some(body) = failed.0.body
                    {
                        keep_undelivered(&mut undelivered, body);
                    }
                }
            }
        }
    }
    kill_all(&mut ranks);
    Ok(())
}

/// Starts a drain: this daemon takes no more work, and every rank is asked (SIGTERM) to save a
/// checkpoint and stop at its next step. Returns when the drain gives up on them.
fn start_drain(
    ranks: &HashMap<Key, RankProcess>,
    readiness: &gantry_ops::Readiness,
    options: &AgentOptions,
) -> tokio::time::Instant {
    tracing::info!(ranks = ranks.len(), "draining: ranks checkpoint and stop");
    readiness.set(false);
    for proc in ranks.values() {
        if let Some(pid) = proc.pid {
            // SAFETY: a plain kill(2) of a child this daemon started.
            unsafe { libc::kill(pid as libc::pid_t, libc::SIGTERM) };
        }
    }
    tokio::time::Instant::now() + Duration::from_secs(options.drain_timeout_secs)
}

/// Forgets a rank that exited, and says whether `body` must reach a coordinator even across a
/// lost session: exits, checkpoint commits, test results and the latest progress must (a job
/// that finishes while the coordinator is down still ends with its final step, loss and
/// checkpoint), and so must what ranks write to stderr (why a rank failed meanwhile), up to
/// [`KEPT_STDERR`] messages; stdout may be dropped.
fn settle(ranks: &mut HashMap<Key, RankProcess>, body: &Body) -> bool {
    if let Body::Exited(e) = body
        && let Some(k) = &e.key
    {
        ranks.remove(&key_of(k));
    }
    match body {
        Body::Logs(logs) => logs.stream == "stderr",
        Body::Heartbeat(_) => false,
        _ => true,
    }
}

/// How long a rank told to stop may take to end by itself before it is killed.
const STOP_GRACE: Duration = Duration::from_millis(250);

/// How many stderr messages of ranks a worker keeps while its coordinator is away (the newest).
const KEPT_STDERR: usize = 256;

/// Buffers `body` for the next session; a rank's newer progress replaces its older one, and
/// the oldest stderr messages go beyond [`KEPT_STDERR`].
fn keep_undelivered(undelivered: &mut Vec<Body>, body: Body) {
    match &body {
        Body::Progress(p) => {
            undelivered.retain(|b| !matches!(b, Body::Progress(old) if old.key == p.key));
        }
        Body::Logs(_) => {
            let kept = undelivered
                .iter()
                .filter(|b| matches!(b, Body::Logs(_)))
                .count();
            if kept >= KEPT_STDERR
                && let Some(oldest) = undelivered.iter().position(|b| matches!(b, Body::Logs(_)))
            {
                undelivered.remove(oldest);
            }
        }
        _ => {}
    }
    undelivered.push(body);
}

fn kill_all(ranks: &mut HashMap<Key, RankProcess>) {
    for proc in ranks.values() {
        proc.kill.cancel();
    }
}

/// Registers (again), retrying with backoff while the coordinator is unreachable, with the
/// worker's own `credential` once it has one, the join token before.
async fn register(
    options: &AgentOptions,
    worker_id: &str,
    credential: Option<&str>,
) -> anyhow::Result<(tonic::transport::Channel, pb::RegisterResponse)> {
    let request = pb::RegisterRequest {
        protocol_version: PROTOCOL_VERSION,
        worker_id: worker_id.to_string(),
        hostname: options.hostname.clone(),
        slots: options.slots,
        devices: gpus::devices(&options.gpus),
        memory_bytes: total_memory(),
        gpus: options.gpus.iter().map(Gpu::to_proto).collect(),
    };
    let attempt = || async {
        let bearer = gantry_proto::Bearer::new(credential.or(options.join_token.as_deref()))
            .map_err(|e| tonic::Status::invalid_argument(format!("join token: {e}")))?;
        let channel = gantry_proto::endpoint(&options.coordinator, options.ca_cert.as_deref())
            .map_err(|e| tonic::Status::invalid_argument(format!("coordinator: {e}")))?
            .connect()
            .await
            .map_err(|e| tonic::Status::unavailable(e.to_string()))?;
        let mut client = gantry_proto::worker_client(channel.clone(), bearer);
        let reply = client.register(request.clone()).await?;
        Ok::<_, tonic::Status>((channel, reply.into_inner()))
    };
    let backoff = ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(100))
        .with_max_delay(Duration::from_secs(2))
        .without_max_times();
    let result = attempt
        .retry(backoff)
        .when(|s| matches!(s.code(), tonic::Code::Unavailable | tonic::Code::Unknown | tonic::Code::Internal | tonic::Code::ResourceExhausted))
        .notify(|s, delay| tracing::warn!(error = %s.message(), ?delay, "coordinator unreachable; retrying"))
        .await;
    result.map_err(|s| anyhow::anyhow!("registration refused: {} ({:?})", s.message(), s.code()))
}

fn launch(
    options: &AgentOptions,
    a: &pb::Assignment,
    ranks: &mut HashMap<Key, RankProcess>,
    events: &mpsc::UnboundedSender<Body>,
    metrics: &WorkerMetrics,
) -> anyhow::Result<()> {
    let key = a
        .key
        .clone()
        .ok_or_else(|| anyhow::anyhow!("assignment without a key"))?;
    let k = key_of(&key);
    if ranks.contains_key(&k) {
        return Ok(()); // a re-sent assignment we already run
    }
    let dir = options
        .work_dir
        .join(&key.job_id)
        .join(format!("attempt-{}", key.attempt));
    std::fs::create_dir_all(&dir)?;
    let file = dir.join(format!("rank-{}.json", key.rank));
    let assignment = RankAssignment {
        coordinator: options.coordinator.clone(),
        advertise_host: options.advertise_host.clone(),
        job_id: JobId(key.job_id.clone()),
        attempt: Attempt(key.attempt),
        rank: Rank(key.rank),
        world_size: a.world_size,
        spec_json: a.spec_json.clone(),
        resume_step: a.resume_step,
        attempt_secret: gantry_core::AttemptSecret(a.attempt_secret.clone()),
        coordinator_ca: options
            .ca_cert
            .as_ref()
            .map(|pem| String::from_utf8_lossy(pem).into_owned()),
        store_options: options.store_options.clone(),
        log_json: options.log_format == gantry_ops::LogFormat::Json,
    };
    let gpu = a
        .gpu
        .map(|i| gpus::assigned(&options.gpus, i))
        .transpose()?;
    // The assignment holds the attempt's secret: readable by this user alone.
    gantry_ops::write_private(&file, &serde_json::to_vec_pretty(&assignment)?)?;
    let mut command = Command::new(&options.rank_command[0]);
    if let Some(gpu) = gpu {
        // The rank sees its GPU alone, as device 0.
        command.env("CUDA_VISIBLE_DEVICES", &gpu.visible_as);
    }
    let child = command
        .args(&options.rank_command[1..])
        .arg("--assignment")
        .arg(&file)
        .current_dir(&dir)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()?;
    let pid = child.id();
    tracing::info!(job = %key.job_id, attempt = key.attempt, rank = key.rank, pid, gpu = a.gpu, "rank started");
    let kill = CancellationToken::new();
    metrics.rank_started();
    tokio::spawn(supervise(
        key,
        child,
        kill.clone(),
        events.clone(),
        metrics.clone(),
    ));
    ranks.insert(k, RankProcess { kill, pid });
    Ok(())
}

/// Relays one rank's output and reports its exit.
async fn supervise(
    key: pb::RankKey,
    mut child: Child,
    kill: CancellationToken,
    events: mpsc::UnboundedSender<Body>,
    metrics: WorkerMetrics,
) {
    // Held until the rank exits: the rank treats EOF on stdin as "the daemon died".
    let stdin = child.stdin.take();
    let relay = |stream: &'static str,
                 reader: Option<Box<dyn tokio::io::AsyncRead + Send + Unpin>>| {
        let events = events.clone();
        let key = key.clone();
        let metrics = metrics.clone();
        tokio::spawn(async move {
            let Some(reader) = reader else { return };
            let mut lines = BufReader::new(reader).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                let body = match RankEvent::parse(&line) {
                    Some(RankEvent::Progress {
                        step,
                        loss,
                        eval_loss,
                        samples_per_sec,
                        step_seconds,
                        allreduce_gbps,
                        eval_metrics,
                    }) => {
                        metrics.progress(
                            &key.job_id,
                            step,
                            loss,
                            samples_per_sec,
                            step_seconds,
                            allreduce_gbps,
                        );
                        Body::Progress(pb::RankProgress {
                            key: Some(key.clone()),
                            step,
                            loss,
                            eval_loss,
                            samples_per_sec,
                            eval_metrics: eval_metrics.map(Into::into),
                        })
                    }
                    Some(RankEvent::Checkpoint {
                        step,
                        url,
                        size_bytes,
                        deleted_steps,
                        seconds,
                    }) => {
                        metrics.checkpoint(seconds, size_bytes);
                        Body::Checkpoint(pb::CheckpointCommitted {
                            key: Some(key.clone()),
                            step,
                            url,
                            size_bytes,
                            deleted_steps,
                        })
                    }
                    Some(RankEvent::Test {
                        loss,
                        accuracy,
                        metrics,
                    }) => Body::Test(pb::TestResult {
                        key: Some(key.clone()),
                        loss,
                        accuracy,
                        metrics: metrics.map(Into::into),
                    }),
                    None => Body::Logs(pb::RankLogs {
                        key: Some(key.clone()),
                        lines: vec![line],
                        stream: stream.into(),
                    }),
                };
                let _ = events.send(body);
            }
        })
    };
    let out = relay("stdout", child.stdout.take().map(|s| Box::new(s) as _));
    let err = relay("stderr", child.stderr.take().map(|s| Box::new(s) as _));
    // `stopped` only when this daemon ended the rank: a stop order that comes in after the
    // rank died by itself (or by someone's kill -9) must not hide the real cause.
    let (status, stopped) = tokio::select! {
        biased;
        status = child.wait() => (status, false),
        _ = kill.cancelled() => {
            // A rank killed by someone else closes its sockets before it can be reaped, and its
            // peers' failure can bring the stop order within that window: give it a moment to
            // end by itself, so its own cause is what gets reported.
            match tokio::time::timeout(STOP_GRACE, child.wait()).await {
                Ok(status) => (status, false),
                Err(_) => {
                    let _ = child.start_kill();
                    (child.wait().await, true)
                }
            }
        }
    };
    let _ = tokio::join!(out, err);
    drop(stdin);
    let (exit_code, signal, message) = match status {
        Ok(s) => {
            use std::os::unix::process::ExitStatusExt;
            (s.code(), s.signal(), String::new())
        }
        Err(e) => (None, None, format!("wait failed: {e}")),
    };
    tracing::info!(job = %key.job_id, attempt = key.attempt, rank = key.rank, ?exit_code, ?signal, "rank exited");
    metrics.rank_exited(match (stopped, exit_code) {
        (true, _) => "stopped",
        (false, Some(0)) => "succeeded",
        _ => "failed",
    });
    let _ = events.send(Body::Exited(pb::RankExited {
        key: Some(key),
        exit_code,
        signal,
        message,
        stopped,
    }));
}

/// This machine's memory (MemTotal in /proc/meminfo), or 0 where it cannot be read.
fn total_memory() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            let line = m.lines().find(|l| l.starts_with("MemTotal:"))?;
            let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
            Some(kib * 1024)
        })
        .unwrap_or(0)
}
