//! A conformance suite for a Gantry coordinator, driven only through its gRPC API with scripted
//! fake workers. `cargo test -p gantry-protocol-tests` runs it against an in-process coordinator;
//! `gantry-protocol-tests --endpoint URL` runs it against a deployed one.

mod auth;
mod gpus;

pub use auth::{
    every_method_checks_its_callers_token_and_role, submitters_change_only_their_own_jobs,
    workers_hold_credentials_of_their_own,
};
pub use gpus::{cuda_ranks_get_gpus_of_their_own, nccl_ids_reach_every_rank};

use anyhow::{Context, bail, ensure};
use gantry_proto::PROTOCOL_VERSION;
use gantry_proto::v1 as pb;
use gantry_proto::{Authed, Bearer};
use pb::job_service_client::JobServiceClient;
use pb::worker_message::Body;
use pb::worker_service_client::WorkerServiceClient;
use std::time::Duration;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Code;
use tonic::transport::Channel;

/// A coordinator under test, an admin token for it and its CA certificate (none of either for
/// an `--insecure` one).
#[derive(Clone)]
pub struct Target {
    pub url: String,
    pub token: Option<String>,
    /// The coordinator's CA certificate (PEM), for an `https://` URL.
    pub ca: Option<Vec<u8>>,
}

impl Target {
    async fn channel(&self) -> anyhow::Result<Channel> {
        let endpoint =
            gantry_proto::endpoint(&self.url, self.ca.as_deref()).map_err(anyhow::Error::msg)?;
        Ok(endpoint.connect().await?)
    }

    /// A job-service client presenting the admin token.
    pub async fn jobs(&self) -> anyhow::Result<JobServiceClient<Authed>> {
        self.jobs_as(self.token.as_deref()).await
    }

    /// A worker-service client presenting the admin token (an admin may do what a worker does).
    pub async fn workers(&self) -> anyhow::Result<WorkerServiceClient<Authed>> {
        self.workers_as(self.token.as_deref()).await
    }

    /// A job-service client presenting `token` (none: no credential at all).
    pub async fn jobs_as(&self, token: Option<&str>) -> anyhow::Result<JobServiceClient<Authed>> {
        let bearer = Bearer::new(token).map_err(anyhow::Error::msg)?;
        Ok(gantry_proto::job_client(self.channel().await?, bearer))
    }

    /// A worker-service client presenting `token`.
    pub async fn workers_as(
        &self,
        token: Option<&str>,
    ) -> anyhow::Result<WorkerServiceClient<Authed>> {
        let bearer = Bearer::new(token).map_err(anyhow::Error::msg)?;
        Ok(gantry_proto::worker_client(self.channel().await?, bearer))
    }
}

/// A scripted worker: registers, holds a session, and says exactly what the test tells it.
pub struct FakeWorker {
    pub id: String,
    pub lease_ttl_ms: u64,
    tx: mpsc::Sender<pb::WorkerMessage>,
    inbound: tonic::Streaming<pb::CoordinatorMessage>,
    heartbeats: tokio::task::JoinHandle<()>,
}

impl Drop for FakeWorker {
    /// A dropped worker goes silent: no more heartbeats, and its session closes.
    fn drop(&mut self) {
        self.heartbeats.abort();
    }
}

impl FakeWorker {
    pub async fn join(target: &Target, slots: u32) -> anyhow::Result<Self> {
        Self::join_with_gpus(target, slots, 0).await
    }

    /// Joins as a worker with `gpus` GPUs (indices 0…, size not said).
    pub async fn join_with_gpus(target: &Target, slots: u32, gpus: u32) -> anyhow::Result<Self> {
        let mut client = target.workers().await?;
        let gpus: Vec<pb::Gpu> = (0..gpus)
            .map(|index| pb::Gpu {
                index,
                name: "fake".into(),
                memory_bytes: 0,
            })
            .collect();
        let mut devices = vec!["cpu".to_string()];
        if !gpus.is_empty() {
            devices.push("cuda".into());
        }
        let reg = client
            .register(pb::RegisterRequest {
                protocol_version: PROTOCOL_VERSION,
                worker_id: String::new(),
                hostname: "fake".into(),
                slots,
                devices,
                memory_bytes: 0,
                gpus,
            })
            .await?
            .into_inner();
        let (tx, rx) = mpsc::channel(64);
        let first = pb::WorkerMessage {
            protocol_version: PROTOCOL_VERSION,
            worker_id: reg.worker_id.clone(),
            body: Some(Body::Running(pb::RunningRanks::default())),
        };
        tx.send(first).await?;
        let inbound = client.session(ReceiverStream::new(rx)).await?.into_inner();
        let beat = tx.clone();
        let worker_id = reg.worker_id.clone();
        let every = Duration::from_millis(reg.heartbeat_interval_ms.max(10));
        let heartbeats = tokio::spawn(async move {
            loop {
                tokio::time::sleep(every).await;
                let msg = pb::WorkerMessage {
                    protocol_version: PROTOCOL_VERSION,
                    worker_id: worker_id.clone(),
                    body: Some(Body::Heartbeat(pb::Heartbeat {})),
                };
                if beat.send(msg).await.is_err() {
                    return;
                }
            }
        });
        Ok(Self {
            id: reg.worker_id,
            lease_ttl_ms: reg.lease_ttl_ms,
            tx,
            inbound,
            heartbeats,
        })
    }

    pub async fn send(&self, body: Body) -> anyhow::Result<()> {
        self.tx
            .send(pb::WorkerMessage {
                protocol_version: PROTOCOL_VERSION,
                worker_id: self.id.clone(),
                body: Some(body),
            })
            .await?;
        Ok(())
    }

    /// The next order from the coordinator, skipping nothing.
    pub async fn next(&mut self) -> anyhow::Result<pb::coordinator_message::Body> {
        let msg = tokio::time::timeout(Duration::from_secs(10), self.inbound.message())
            .await
            .context("no message from the coordinator within 10 s")??
            .context("the session ended")?;
        msg.body.context("a message without a body")
    }

    pub async fn next_assignment(&mut self) -> anyhow::Result<pb::Assignment> {
        loop {
            if let pb::coordinator_message::Body::Assign(a) = self.next().await? {
                return Ok(a);
            }
        }
    }

    pub async fn exit(&self, key: &pb::RankKey, code: i32) -> anyhow::Result<()> {
        self.send(Body::Exited(pb::RankExited {
            key: Some(key.clone()),
            exit_code: Some(code),
            signal: None,
            message: String::new(),
            stopped: false,
        }))
        .await
    }
}

fn spec(name: &str, dp: u32) -> String {
    format!(
        r#"{{"name":"{name}","model":{{"kind":"mlp"}},"train":{{"steps":10,"global_batch":8,"lr":0.01}},"parallel":{{"dp":{dp}}}}}"#
    )
}

async fn job(target: &Target, id: &str) -> anyhow::Result<pb::Job> {
    Ok(target
        .jobs()
        .await?
        .get_job(pb::GetJobRequest { job_id: id.into() })
        .await?
        .into_inner())
}

async fn submit(target: &Target, name: &str, dp: u32) -> anyhow::Result<pb::Job> {
    Ok(target
        .jobs()
        .await?
        .submit_job(pb::SubmitJobRequest {
            spec_json: spec(name, dp),
        })
        .await?
        .into_inner())
}

fn expect_code<T: std::fmt::Debug>(
    result: Result<T, tonic::Status>,
    code: Code,
    what: &str,
) -> anyhow::Result<()> {
    match result {
        Err(s) if s.code() == code => Ok(()),
        other => bail!("{what}: expected {code:?}, got {other:?}"),
    }
}

/// Registration works, and a protocol version mismatch is refused with FAILED_PRECONDITION.
pub async fn registration_and_version_mismatch(t: &Target) -> anyhow::Result<()> {
    let worker = FakeWorker::join(t, 1).await?;
    let listed = t
        .jobs()
        .await?
        .list_workers(pb::ListWorkersRequest {})
        .await?
        .into_inner();
    ensure!(
        listed.workers.iter().any(|w| w.id == worker.id),
        "registered worker not listed"
    );
    let mut client = t.workers().await?;
    let bad = client
        .register(pb::RegisterRequest {
            protocol_version: PROTOCOL_VERSION + 99,
            worker_id: String::new(),
            hostname: "old".into(),
            slots: 1,
            devices: vec![],
            memory_bytes: 0,
            gpus: vec![],
        })
        .await;
    expect_code(
        bad,
        Code::FailedPrecondition,
        "register with a wrong version",
    )?;
    let (tx, rx) = mpsc::channel(1);
    tx.send(pb::WorkerMessage {
        protocol_version: PROTOCOL_VERSION + 99,
        worker_id: worker.id.clone(),
        body: Some(Body::Heartbeat(pb::Heartbeat {})),
    })
    .await?;
    let session = client.session(ReceiverStream::new(rx)).await;
    expect_code(
        session.map(|_| ()),
        Code::FailedPrecondition,
        "session with a wrong version",
    )
}

/// Every RPC refuses malformed input with INVALID_ARGUMENT (or NOT_FOUND) and stores nothing.
pub async fn invalid_input_changes_nothing(t: &Target) -> anyhow::Result<()> {
    let mut jobs = t.jobs().await?;
    let before = jobs
        .list_jobs(pb::ListJobsRequest {})
        .await?
        .into_inner()
        .jobs
        .len();
    for spec_json in [
        "not json".to_string(),
        "{}".to_string(),
        spec("x", 0),
        spec("x", 1).replace("\"lr\":0.01", "\"lr\":-1"),
        spec("x", 1).replace("\"kind\":\"mlp\"", "\"kind\":\"mlp\",\"colour\":1"),
    ] {
        let r = jobs
            .submit_job(pb::SubmitJobRequest {
                spec_json: spec_json.clone(),
            })
            .await;
        expect_code(r, Code::InvalidArgument, &format!("submit {spec_json}"))?;
    }
    // A store endpoint at the cloud metadata address is refused, naming the field.
    let metadata = spec("x", 1).replace(
        "\"parallel\"",
        r#""checkpoint":{"url":"s3://b/x","options":{"aws_endpoint":"http://169.254.169.254"}},"parallel""#,
    );
    match jobs
        .submit_job(pb::SubmitJobRequest {
            spec_json: metadata,
        })
        .await
    {
        Err(s)
            if s.code() == Code::InvalidArgument
                && s.message().contains("checkpoint.options.aws_endpoint") => {}
        other => {
            bail!("a metadata endpoint: expected INVALID_ARGUMENT naming the field, got {other:?}")
        }
    }
    expect_code(
        jobs.get_job(pb::GetJobRequest {
            job_id: String::new(),
        })
        .await,
        Code::InvalidArgument,
        "get ''",
    )?;
    expect_code(
        jobs.get_job(pb::GetJobRequest {
            job_id: "nope".into(),
        })
        .await,
        Code::NotFound,
        "get unknown",
    )?;
    expect_code(
        jobs.cancel_job(pb::CancelJobRequest {
            job_id: String::new(),
        })
        .await,
        Code::InvalidArgument,
        "cancel ''",
    )?;
    expect_code(
        jobs.resume_job(pb::ResumeJobRequest {
            job_id: "nope".into(),
            from_step: None,
            set: vec![],
            from_step_in_store: false,
        })
        .await,
        Code::NotFound,
        "resume unknown",
    )?;
    expect_code(
        jobs.list_checkpoints(pb::ListCheckpointsRequest {
            job_id: String::new(),
        })
        .await,
        Code::InvalidArgument,
        "checkpoints ''",
    )?;
    let watch = jobs
        .watch_job(pb::WatchJobRequest {
            job_id: String::new(),
            after_seq: 0,
            follow: false,
        })
        .await;
    expect_code(watch.map(|_| ()), Code::InvalidArgument, "watch ''")?;
    let watch = jobs
        .watch_job(pb::WatchJobRequest {
            job_id: "nope".into(),
            after_seq: 0,
            follow: false,
        })
        .await;
    expect_code(watch.map(|_| ()), Code::NotFound, "watch unknown")?;
    let mut workers = t.workers().await?;
    // A session whose message has no body, and one for a worker that never registered.
    let worker = FakeWorker::join(t, 1).await?;
    for (worker_id, body, code) in [
        (worker.id.clone(), None, Code::InvalidArgument),
        (
            "never-registered".to_string(),
            Some(Body::Heartbeat(pb::Heartbeat {})),
            Code::NotFound,
        ),
    ] {
        let (tx, rx) = mpsc::channel(1);
        tx.send(pb::WorkerMessage {
            protocol_version: PROTOCOL_VERSION,
            worker_id,
            body,
        })
        .await?;
        let session = workers.session(ReceiverStream::new(rx)).await;
        expect_code(session.map(|_| ()), code, "malformed session")?;
    }
    let gpu = |index| pb::Gpu {
        index,
        name: "g".into(),
        memory_bytes: 0,
    };
    // No slots, no hostname, and one GPU listed twice (ranks would share it).
    for (slots, hostname, gpus) in [
        (0, "h", vec![]),
        (1, "", vec![]),
        (1, "h", vec![gpu(0), gpu(1), gpu(0)]),
    ] {
        let indices: Vec<u32> = gpus.iter().map(|g| g.index).collect();
        let r = workers
            .register(pb::RegisterRequest {
                protocol_version: PROTOCOL_VERSION,
                worker_id: String::new(),
                hostname: hostname.into(),
                slots,
                devices: vec![],
                memory_bytes: 0,
                gpus,
            })
            .await;
        expect_code(
            r,
            Code::InvalidArgument,
            &format!("register slots={slots} hostname={hostname:?} gpus={indices:?}"),
        )?;
    }
    let r = workers
        .rendezvous(pb::RendezvousRequest {
            protocol_version: PROTOCOL_VERSION,
            key: None,
            address: "127.0.0.1:1".into(),
            nccl_groups: vec![],
            attempt_secret: String::new(),
        })
        .await;
    expect_code(r, Code::InvalidArgument, "rendezvous without a key")?;
    let r = workers
        .rendezvous(pb::RendezvousRequest {
            protocol_version: PROTOCOL_VERSION,
            key: Some(pb::RankKey {
                job_id: "nope".into(),
                attempt: 1,
                rank: 0,
            }),
            address: "127.0.0.1:1".into(),
            nccl_groups: vec![],
            attempt_secret: "0".repeat(64),
        })
        .await;
    expect_code(
        r,
        Code::Unauthenticated,
        "rendezvous without the attempt's secret",
    )?;
    let after = jobs
        .list_jobs(pb::ListJobsRequest {})
        .await?
        .into_inner()
        .jobs
        .len();
    ensure!(
        before == after,
        "invalid submissions stored jobs ({before} → {after})"
    );
    Ok(())
}

/// submit → scheduled → (rendezvous) running → (all ranks exit 0) succeeded.
pub async fn job_lifecycle(t: &Target) -> anyhow::Result<()> {
    let mut w = FakeWorker::join(t, 1).await?;
    let submitted = submit(t, "lifecycle", 1).await?;
    let a = w.next_assignment().await?;
    let key = a.key.context("assignment without key")?;
    ensure!(
        key.job_id == submitted.id && key.attempt == 1 && key.rank == 0,
        "unexpected assignment {key:?}"
    );
    ensure!(
        job(t, &key.job_id).await?.state == pb::JobState::Scheduled as i32,
        "not Scheduled"
    );
    // Rendezvous answers only the attempt's secret, and checks the input after it.
    let request = |address: &str, attempt_secret: &str| pb::RendezvousRequest {
        protocol_version: PROTOCOL_VERSION,
        key: Some(key.clone()),
        address: address.into(),
        nccl_groups: vec![],
        attempt_secret: attempt_secret.into(),
    };
    let mut workers = t.workers().await?;
    ensure!(a.attempt_secret.len() == 64, "no attempt secret in {key:?}");
    let mut forged = a.attempt_secret.clone().into_bytes();
    forged[0] = if forged[0] == b'0' { b'1' } else { b'0' };
    let forged = String::from_utf8(forged)?;
    for (secret, name) in [("", "no secret"), (forged.as_str(), "a forged secret")] {
        let r = workers.rendezvous(request("127.0.0.1:9", secret)).await;
        expect_code(r, Code::Unauthenticated, &format!("rendezvous with {name}"))?;
    }
    let r = workers.rendezvous(request("", &a.attempt_secret)).await;
    expect_code(r, Code::InvalidArgument, "rendezvous without an address")?;
    let table = workers
        .rendezvous(request("127.0.0.1:9", &a.attempt_secret))
        .await?
        .into_inner();
    ensure!(
        table.peers == ["127.0.0.1:9"] && table.nccl_groups.is_empty(),
        "peer table {table:?}"
    );
    ensure!(
        job(t, &key.job_id).await?.state == pb::JobState::Running as i32,
        "not Running"
    );
    // A diverged loss is reported like any other: the session must survive it.
    w.send(Body::Progress(pb::RankProgress {
        key: Some(key.clone()),
        step: 9,
        loss: f64::INFINITY,
        eval_loss: None,
        samples_per_sec: 1.0,
        eval_metrics: None,
    }))
    .await?;
    w.send(Body::Progress(pb::RankProgress {
        key: Some(key.clone()),
        step: 10,
        loss: 0.5,
        eval_loss: Some(0.4),
        samples_per_sec: 1.0,
        eval_metrics: Some(metrics(0.9)),
    }))
    .await?;
    // A classifier's final evaluation on the test split.
    w.send(Body::Test(pb::TestResult {
        key: Some(key.clone()),
        loss: 0.3,
        accuracy: None,
        metrics: Some(metrics(0.8)),
    }))
    .await?;
    w.exit(&key, 0).await?;
    wait_state(t, &key.job_id, pb::JobState::Succeeded).await?;
    let done = job(t, &key.job_id).await?;
    ensure!(
        done.step == 10 && done.loss == Some(0.5),
        "progress not recorded: {done:?}"
    );
    ensure!(
        done.eval_metrics == Some(metrics(0.9)) && done.test_metrics == Some(metrics(0.8)),
        "a classifier's metrics did not reach the job: {:?} {:?}",
        done.eval_metrics,
        done.test_metrics
    );
    Ok(())
}

/// Classifier metrics as a rank would report them.
fn metrics(accuracy: f64) -> pb::ClassMetrics {
    pb::ClassMetrics {
        accuracy,
        precision: accuracy - 0.1,
        recall: accuracy - 0.05,
        f1: accuracy - 0.08,
        samples: 512,
    }
}

/// Cancelling a running job sends a stop order and ends it Cancelled.
pub async fn cancel_stops_ranks(t: &Target) -> anyhow::Result<()> {
    let mut w = FakeWorker::join(t, 1).await?;
    let submitted = submit(t, "cancel", 1).await?;
    let a = w.next_assignment().await?;
    ensure!(
        a.key.as_ref().is_some_and(|k| k.job_id == submitted.id),
        "wrong job assigned"
    );
    t.jobs()
        .await?
        .cancel_job(pb::CancelJobRequest {
            job_id: submitted.id.clone(),
        })
        .await?;
    loop {
        if let pb::coordinator_message::Body::Stop(stop) = w.next().await? {
            ensure!(
                stop.job_id == submitted.id && stop.below_attempt == 2,
                "stop {stop:?}"
            );
            break;
        }
    }
    ensure!(
        job(t, &submitted.id).await?.state == pb::JobState::Cancelled as i32,
        "not Cancelled"
    );
    let again = t
        .jobs()
        .await?
        .cancel_job(pb::CancelJobRequest {
            job_id: submitted.id,
        })
        .await;
    expect_code(again, Code::FailedPrecondition, "cancel an ended job")
}

/// A rank that exits non-zero ends the attempt; the job restarts as attempt 2.
pub async fn rank_exit_restarts(t: &Target) -> anyhow::Result<()> {
    let mut w = FakeWorker::join(t, 1).await?;
    let submitted = submit(t, "restart", 1).await?;
    let first_assignment = w.next_assignment().await?;
    let first = first_assignment.key.clone().context("key")?;
    ensure!(first.job_id == submitted.id, "wrong job");
    w.exit(&first, 1).await?;
    let second_assignment = w.next_assignment().await?;
    let second = second_assignment.key.clone().context("key")?;
    // A rank of the ended attempt is refused with its own secret (ABORTED, it is not live),
    // and its secret opens nothing of the new attempt (UNAUTHENTICATED).
    let rendezvous = |key: &pb::RankKey, secret: &str| pb::RendezvousRequest {
        protocol_version: PROTOCOL_VERSION,
        key: Some(key.clone()),
        address: "127.0.0.1:9".into(),
        nccl_groups: vec![],
        attempt_secret: secret.into(),
    };
    let mut workers = t.workers().await?;
    ensure!(
        first_assignment.attempt_secret != second_assignment.attempt_secret,
        "two attempts share a secret"
    );
    let r = workers
        .rendezvous(rendezvous(&first, &first_assignment.attempt_secret))
        .await;
    expect_code(r, Code::Aborted, "a rank of the ended attempt")?;
    let r = workers
        .rendezvous(rendezvous(&second, &first_assignment.attempt_secret))
        .await;
    expect_code(
        r,
        Code::Unauthenticated,
        "the ended attempt's secret on the new one",
    )?;
    ensure!(
        second.job_id == submitted.id && second.attempt == 2,
        "expected attempt 2, got {second:?}"
    );
    let j = job(t, &submitted.id).await?;
    ensure!(
        j.restarts == 1 && j.attempt == 2,
        "restarts {} attempt {}",
        j.restarts,
        j.attempt
    );
    // A late report from attempt 1 changes nothing (fencing).
    w.exit(&first, 0).await?;
    w.exit(&second, 0).await?;
    wait_state(t, &submitted.id, pb::JobState::Succeeded).await
}

/// A worker that stops talking is declared lost once its lease runs out.
pub async fn lease_expiry_loses_the_worker(t: &Target) -> anyhow::Result<()> {
    let w = FakeWorker::join(t, 1).await?;
    ensure!(
        w.lease_ttl_ms <= 30_000,
        "lease of {} ms is too long to test",
        w.lease_ttl_ms
    );
    let id = w.id.clone();
    let ttl = w.lease_ttl_ms;
    drop(w); // no more heartbeats
    let deadline = tokio::time::Instant::now() + Duration::from_millis(ttl * 3 + 2000);
    loop {
        let workers = t
            .jobs()
            .await?
            .list_workers(pb::ListWorkersRequest {})
            .await?
            .into_inner()
            .workers;
        let me = workers
            .iter()
            .find(|x| x.id == id)
            .context("worker vanished")?;
        if me.state == pb::WorkerState::Lost as i32 {
            return Ok(());
        }
        ensure!(
            tokio::time::Instant::now() < deadline,
            "worker still alive after its lease"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn wait_state(t: &Target, id: &str, state: pb::JobState) -> anyhow::Result<()> {
    for _ in 0..200 {
        if job(t, id).await?.state == state as i32 {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    bail!("job {id} never reached {state:?}: {:?}", job(t, id).await?)
}

/// One conformance case.
pub type Case =
    fn(&Target) -> std::pin::Pin<Box<dyn std::future::Future<Output = anyhow::Result<()>> + '_>>;

/// Every case, by name, in the order the binary runs them.
pub fn cases() -> Vec<(&'static str, Case)> {
    vec![
        ("registration_and_version_mismatch", |t| {
            Box::pin(registration_and_version_mismatch(t))
        }),
        ("invalid_input_changes_nothing", |t| {
            Box::pin(invalid_input_changes_nothing(t))
        }),
        ("job_lifecycle", |t| Box::pin(job_lifecycle(t))),
        ("cancel_stops_ranks", |t| Box::pin(cancel_stops_ranks(t))),
        ("rank_exit_restarts", |t| Box::pin(rank_exit_restarts(t))),
        ("lease_expiry_loses_the_worker", |t| {
            Box::pin(lease_expiry_loses_the_worker(t))
        }),
        ("cuda_ranks_get_gpus_of_their_own", |t| {
            Box::pin(cuda_ranks_get_gpus_of_their_own(t))
        }),
        ("nccl_ids_reach_every_rank", |t| {
            Box::pin(nccl_ids_reach_every_rank(t))
        }),
        ("every_method_checks_its_callers_token_and_role", |t| {
            Box::pin(every_method_checks_its_callers_token_and_role(t))
        }),
        ("submitters_change_only_their_own_jobs", |t| {
            Box::pin(submitters_change_only_their_own_jobs(t))
        }),
        ("workers_hold_credentials_of_their_own", |t| {
            Box::pin(workers_hold_credentials_of_their_own(t))
        }),
    ]
}
