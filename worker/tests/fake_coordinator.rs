//! End-to-end tests of the worker daemon (`gantry_worker::agent::run`) against an in-process fake
//! coordinator.
//!
//! The fake implements `WorkerService` and is scripted by each test: it records every
//! `RegisterRequest` and every `WorkerMessage` it receives (numbered by session), lets the test
//! push `CoordinatorMessage`s (Assign, Stop) into the current session, drop that session, or stop
//! and restart the whole server on the same port. The daemon runs real OS processes as ranks:
//! its rank command runs `sh` on a script the test wrote next to where the daemon writes the
//! assignment (`…/attempt-N/rank-R.json` → `…/attempt-N/rank-R.sh`), so every rank of a test can
//! behave differently. Tests synchronise only by polling what the fake received, with deadlines.

use gantry_core::{Attempt, ExitCode, JobId, Rank, RankAssignment};
use gantry_proto::PROTOCOL_VERSION;
use gantry_proto::v1 as pb;
use gantry_worker::agent::{AgentOptions, run};
use gantry_worker::gpus::Gpu;
use pb::worker_message::Body;
use pb::worker_service_server::{WorkerService, WorkerServiceServer};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio_stream::wrappers::{TcpListenerStream, UnboundedReceiverStream};
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status, Streaming};

/// How long any one expected thing may take to happen.
const WAIT: Duration = Duration::from_secs(10);
const POLL: Duration = Duration::from_millis(10);
const HEARTBEAT_MS: u64 = 100;

// ---------------------------------------------------------------------------------------------
// The fake coordinator
// ---------------------------------------------------------------------------------------------

/// A message the fake received on session number `session` (1 for the first session).
#[derive(Debug, Clone)]
struct Received {
    session: usize,
    at: Instant,
    msg: pb::WorkerMessage,
}

#[derive(Debug, Default)]
struct State {
    registrations: Vec<pb::RegisterRequest>,
    /// The `authorization` header of each registration and each session, in order.
    credentials: Vec<(&'static str, String)>,
    received: Vec<Received>,
    /// How many sessions were opened so far; the current one has this number.
    sessions: usize,
    /// The way down into the current session; dropping it ends the session.
    session: Option<mpsc::UnboundedSender<Result<pb::CoordinatorMessage, Status>>>,
}

#[derive(Clone, Default)]
struct Fake {
    state: Arc<Mutex<State>>,
}

#[tonic::async_trait]
impl WorkerService for Fake {
    async fn register(
        &self,
        request: Request<pb::RegisterRequest>,
    ) -> Result<Response<pb::RegisterResponse>, Status> {
        let presented = authorization(&request);
        let request = request.into_inner();
        let mut state = self.state.lock().unwrap();
        state.credentials.push(("register", presented));
        // A reconnecting worker keeps its id; a new one gets the next.
        let worker_id = if request.worker_id.is_empty() {
            format!("worker-{}", state.registrations.len() + 1)
        } else {
            request.worker_id.clone()
        };
        state.registrations.push(request);
        Ok(Response::new(pb::RegisterResponse {
            credential: format!("credential-of-{worker_id}"),
            worker_id,
            heartbeat_interval_ms: HEARTBEAT_MS,
            lease_ttl_ms: 10 * HEARTBEAT_MS,
        }))
    }

    type SessionStream = UnboundedReceiverStream<Result<pb::CoordinatorMessage, Status>>;

    async fn session(
        &self,
        request: Request<Streaming<pb::WorkerMessage>>,
    ) -> Result<Response<Self::SessionStream>, Status> {
        let presented = authorization(&request);
        let mut inbound = request.into_inner();
        let (down, down_rx) = mpsc::unbounded_channel();
        let session = {
            let mut state = self.state.lock().unwrap();
            state.credentials.push(("session", presented));
            state.sessions += 1;
            state.session = Some(down);
            state.sessions
        };
        let state = self.state.clone();
        tokio::spawn(async move {
            while let Ok(Some(msg)) = inbound.message().await {
                let at = Instant::now();
                state
                    .lock()
                    .unwrap()
                    .received
                    .push(Received { session, at, msg });
            }
            // The worker ended its side: end ours, as the coordinator does.
            let mut state = state.lock().unwrap();
            if state.sessions == session {
                state.session = None;
            }
        });
        Ok(Response::new(UnboundedReceiverStream::new(down_rx)))
    }

    async fn rendezvous(
        &self,
        _: Request<pb::RendezvousRequest>,
    ) -> Result<Response<pb::RendezvousResponse>, Status> {
        Err(Status::unimplemented(
            "the fake coordinator has no rendezvous",
        ))
    }
}

/// The bearer a request came with ("" for none).
fn authorization<T>(request: &Request<T>) -> String {
    request
        .metadata()
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string()
}

/// The fake served on 127.0.0.1, which the test can stop and restart on the same port.
struct Coordinator {
    fake: Fake,
    addr: SocketAddr,
    server: Option<(oneshot::Sender<()>, JoinHandle<()>)>,
}

impl Coordinator {
    async fn start() -> Self {
        let mut coordinator = Coordinator {
            fake: Fake::default(),
            addr: "127.0.0.1:0".parse().unwrap(),
            server: None,
        };
        coordinator.serve().await;
        coordinator
    }

    async fn serve(&mut self) {
        let listener = tokio::net::TcpListener::bind(self.addr).await.unwrap();
        self.addr = listener.local_addr().unwrap();
        let (stop, stopped) = oneshot::channel::<()>();
        let service = WorkerServiceServer::new(self.fake.clone());
        let task = tokio::spawn(async move {
            tonic::transport::Server::builder()
                .add_service(service)
                .serve_with_incoming_shutdown(TcpListenerStream::new(listener), async {
                    let _ = stopped.await;
                })
                .await
                .unwrap();
        });
        self.server = Some((stop, task));
    }

    /// Makes the coordinator unreachable: ends the session and stops the server.
    async fn stop(&mut self) {
        self.drop_session();
        let (stop, task) = self.server.take().expect("the server runs");
        let _ = stop.send(());
        tokio::time::timeout(WAIT, task)
            .await
            .expect("the server stops")
            .unwrap();
    }

    /// Serves again on the same port, remembering everything received before.
    async fn restart(&mut self) {
        assert!(self.server.is_none());
        self.serve().await;
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.fake.state.lock().unwrap()
    }

    /// Pushes `body` down the current session.
    fn send(&self, body: pb::coordinator_message::Body) {
        let state = self.state();
        let session = state.session.as_ref().expect("a session is open");
        session
            .send(Ok(pb::CoordinatorMessage { body: Some(body) }))
            .expect("the session is open");
    }

    fn assign(&self, key: &pb::RankKey, spec_json: &str) {
        self.assign_gpu(key, spec_json, None);
    }

    /// Assigns `key`, on the worker's GPU `gpu` when given (a cuda job).
    fn assign_gpu(&self, key: &pb::RankKey, spec_json: &str, gpu: Option<u32>) {
        self.send(pb::coordinator_message::Body::Assign(pb::Assignment {
            key: Some(key.clone()),
            world_size: 2,
            parallel: Some(pb::Parallel {
                dp: 2,
                tp: 1,
                pp: 1,
            }),
            spec_json: spec_json.into(),
            resume_step: None,
            gpu,
            attempt_secret: format!("secret-of-{}-{}", key.job_id, key.attempt),
        }));
    }

    fn stop_ranks(&self, job_id: &str, below_attempt: u64) {
        self.send(pb::coordinator_message::Body::Stop(pb::StopRanks {
            job_id: job_id.into(),
            below_attempt,
            reason: "test".into(),
        }));
    }

    /// Ends the current session from the coordinator's side.
    fn drop_session(&self) {
        self.state().session = None;
    }

    /// Polls what the fake received until `found` finds something, or fails the test.
    async fn wait_for<T>(&self, what: &str, mut found: impl FnMut(&State) -> Option<T>) -> T {
        let deadline = Instant::now() + WAIT;
        loop {
            if let Some(t) = found(&self.state()) {
                return t;
            }
            if Instant::now() > deadline {
                let state = self.state();
                panic!(
                    "timed out after {WAIT:?} waiting for {what}; the coordinator got {:#?}\nand {:#?}",
                    state.registrations, state.received
                );
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// The first message of session `session`, once it came.
    async fn first_of_session(&self, session: usize) -> pb::WorkerMessage {
        self.wait_for(&format!("the first message of session {session}"), |s| {
            s.received
                .iter()
                .find(|r| r.session == session)
                .map(|r| r.msg.clone())
        })
        .await
    }

    /// The exit of `key`, once reported as a `RankExited` message.
    async fn exit_of(&self, key: &pb::RankKey) -> pb::RankExited {
        self.wait_for(&format!("the exit of {key:?}"), |s| {
            exits(s, key).first().cloned()
        })
        .await
    }

    /// The first line of `key` on `stream` that starts with `prefix`.
    async fn line_of(&self, key: &pb::RankKey, stream: &str, prefix: &str) -> String {
        self.wait_for(&format!("a {stream} line {prefix:?} of {key:?}"), |s| {
            lines(s, key, stream)
                .into_iter()
                .find(|l| l.starts_with(prefix))
        })
        .await
    }

    /// The rank's pid, from the `pid N` line every rank script here prints first.
    async fn pid_of(&self, key: &pb::RankKey) -> i32 {
        let line = self.line_of(key, "stdout", "pid ").await;
        line["pid ".len()..].parse().unwrap()
    }
}

/// The `RankExited` messages of `key` (across sessions).
fn exits(state: &State, key: &pb::RankKey) -> Vec<pb::RankExited> {
    state
        .received
        .iter()
        .filter_map(|r| match &r.msg.body {
            Some(Body::Exited(e)) if e.key.as_ref() == Some(key) => Some(e.clone()),
            _ => None,
        })
        .collect()
}

/// The lines `key` wrote on `stream`, as relayed to the coordinator.
fn lines(state: &State, key: &pb::RankKey, stream: &str) -> Vec<String> {
    state
        .received
        .iter()
        .filter_map(|r| match &r.msg.body {
            Some(Body::Logs(l)) if l.key.as_ref() == Some(key) && l.stream == stream => {
                Some(l.lines.clone())
            }
            _ => None,
        })
        .flatten()
        .collect()
}

/// Where in `received` the first message matching `is` is.
fn position(state: &State, is: impl Fn(&Body) -> bool) -> Option<usize> {
    state
        .received
        .iter()
        .position(|r| r.msg.body.as_ref().is_some_and(&is))
}

/// The highest `tick N` that `key` printed so far (0 for none).
fn last_tick(state: &State, key: &pb::RankKey) -> u64 {
    lines(state, key, "stdout")
        .iter()
        .filter_map(|l| l.strip_prefix("tick ")?.parse().ok())
        .max()
        .unwrap_or(0)
}

// ---------------------------------------------------------------------------------------------
// The daemon under test and its ranks
// ---------------------------------------------------------------------------------------------

/// Runs a rank as the script next to its assignment file, with the daemon's arguments.
const RANK_COMMAND: &str = r#"exec sh "${2%.json}.sh" "$@""#;

struct Daemon {
    work: tempfile::TempDir,
    shutdown: CancellationToken,
    drain: CancellationToken,
    task: Option<JoinHandle<anyhow::Result<()>>>,
}

impl Daemon {
    fn start(coordinator: &Coordinator, slots: u32, drain_timeout_secs: u64) -> Self {
        Self::start_with_gpus(coordinator, slots, drain_timeout_secs, Vec::new())
    }

    /// A daemon that offers `gpus`, as one whose config declares them.
    fn start_with_gpus(
        coordinator: &Coordinator,
        slots: u32,
        drain_timeout_secs: u64,
        gpus: Vec<Gpu>,
    ) -> Self {
        let work = tempfile::tempdir().unwrap();
        let options = AgentOptions {
            coordinator: coordinator.url(),
            slots,
            gpus,
            work_dir: work.path().to_path_buf(),
            hostname: "test-host".into(),
            advertise_host: "127.0.0.9".into(),
            rank_command: vec!["sh".into(), "-c".into(), RANK_COMMAND.into(), "sh".into()],
            metrics_listen: None,
            drain_timeout_secs,
            store_options: Default::default(),
            log_format: Default::default(),
            join_token: Some("the-join-token".into()),
            ca_cert: None,
        };
        let shutdown = CancellationToken::new();
        let drain = CancellationToken::new();
        let task = tokio::spawn(run(options, shutdown.clone(), drain.clone()));
        Daemon {
            work,
            shutdown,
            drain,
            task: Some(task),
        }
    }

    /// The directory the daemon runs the ranks of `key`'s attempt in.
    fn attempt_dir(&self, key: &pb::RankKey) -> PathBuf {
        std::fs::canonicalize(self.work.path())
            .unwrap()
            .join(&key.job_id)
            .join(format!("attempt-{}", key.attempt))
    }

    /// Writes what the rank `key` will run (a `sh` script), before it is assigned.
    fn rank_script(&self, key: &pb::RankKey, script: &str) {
        let dir = self.attempt_dir(key);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join(format!("rank-{}.sh", key.rank)), script).unwrap();
    }

    /// Creates the file `name` in `key`'s attempt directory (what the scripts here wait for).
    fn touch(&self, key: &pb::RankKey, name: &str) {
        std::fs::write(self.attempt_dir(key).join(name), "").unwrap();
    }

    /// Waits for `run` to return, and returns what it returned.
    async fn finished(&mut self) -> anyhow::Result<()> {
        let task = self.task.take().expect("the daemon runs");
        tokio::time::timeout(WAIT, task)
            .await
            .expect("the daemon returns")
            .unwrap()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

fn key(job_id: &str, attempt: u64, rank: u32) -> pb::RankKey {
    pb::RankKey {
        job_id: job_id.into(),
        attempt,
        rank,
    }
}

/// Whether the process `pid` is gone (exited and reaped).
fn gone(pid: i32) -> bool {
    !Path::new(&format!("/proc/{pid}")).exists()
}

async fn wait_gone(pid: i32) {
    let deadline = Instant::now() + WAIT;
    while !gone(pid) {
        assert!(Instant::now() < deadline, "process {pid} still runs");
        tokio::time::sleep(POLL).await;
    }
}

/// A rank that prints its pid, then `tick N` every 50 ms until it is killed.
const TICKING: &str = r#"echo "pid $$"
i=0
while :; do i=$((i+1)); echo "tick $i"; sleep 0.05; done
"#;

/// A rank that prints its pid, then exits with `code` once the file `file` exists in its
/// directory.
fn exits_when(file: &str, code: i32) -> String {
    format!(
        r#"echo "pid $$"
while [ ! -e {file} ]; do sleep 0.02; done
exit {code}
"#
    )
}

// ---------------------------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn registers_then_opens_a_session_that_reports_no_ranks_then_heartbeats() {
    let coordinator = Coordinator::start().await;
    let _daemon = Daemon::start(&coordinator, 3, 30);

    let first = coordinator.first_of_session(1).await;
    {
        let state = coordinator.state();
        let [reg] = state.registrations.as_slice() else {
            panic!("one registration expected: {:?}", state.registrations);
        };
        assert_eq!(reg.protocol_version, PROTOCOL_VERSION);
        assert_eq!(reg.worker_id, "", "a new worker has no id yet");
        assert_eq!(reg.slots, 3);
        assert_eq!(reg.hostname, "test-host");
        assert!(!reg.devices.is_empty());
    }
    assert_eq!(first.protocol_version, PROTOCOL_VERSION);
    assert_eq!(first.worker_id, "worker-1");
    assert_eq!(
        first.body,
        Some(Body::Running(pb::RunningRanks::default())),
        "the session opens with what runs (nothing)"
    );

    let heartbeats = coordinator
        .wait_for("three heartbeats", |s| {
            let beats: Vec<&Received> = s
                .received
                .iter()
                .filter(|r| matches!(r.msg.body, Some(Body::Heartbeat(_))))
                .collect();
            (beats.len() >= 3).then(|| beats.iter().map(|r| (*r).clone()).collect::<Vec<_>>())
        })
        .await;
    for beat in &heartbeats {
        assert_eq!(beat.session, 1);
        assert_eq!(beat.msg.worker_id, "worker-1");
        assert_eq!(beat.msg.protocol_version, PROTOCOL_VERSION);
    }
    // At the interval the coordinator asked for, not as fast as it can.
    let spread = heartbeats[2].at - heartbeats[0].at;
    assert!(
        spread >= Duration::from_millis(HEARTBEAT_MS * 3 / 2),
        "heartbeats came {spread:?} apart"
    );
    let state = coordinator.state();
    assert!(
        state.received[1..]
            .iter()
            .all(|r| matches!(r.msg.body, Some(Body::Heartbeat(_)))),
        "only heartbeats after RunningRanks: {:#?}",
        state.received
    );
    assert_eq!(state.registrations.len(), 1);
    assert_eq!(state.sessions, 1);
}

#[tokio::test]
async fn an_assigned_rank_runs_with_its_assignment_and_its_events_logs_and_exit_reach_the_coordinator()
 {
    let coordinator = Coordinator::start().await;
    let daemon = Daemon::start(&coordinator, 1, 30);
    let rank = key("job-a", 4, 1);
    daemon.rank_script(
        &rank,
        r#"echo "args $1 $(basename "$2")"
echo "cwd $(pwd)"
printf 'assignment %s\n' "$(tr -d '\n' < "$2")"
echo '@gantry {"progress":{"step":3,"loss":0.5,"eval_loss":0.25,"samples_per_sec":12.5}}'
echo "plain stdout line"
echo "plain stderr line" >&2
exit 0
"#,
    );
    coordinator.first_of_session(1).await;
    let spec = "{\n  \"name\": \"job-a\",\n  \"train\": {\"steps\": 3}\n}";
    coordinator.assign(&rank, spec);

    let exit = coordinator.exit_of(&rank).await;
    assert_eq!(exit.exit_code, Some(ExitCode::Finished.code()), "{exit:?}");
    assert_eq!(exit.signal, None);
    assert!(!exit.stopped);

    let state = coordinator.state();
    let stdout = lines(&state, &rank, "stdout");
    assert!(
        stdout.contains(&"args --assignment rank-1.json".to_string()),
        "{stdout:?}"
    );
    let cwd = format!("cwd {}", daemon.attempt_dir(&rank).display());
    assert!(stdout.contains(&cwd), "{stdout:?} lacks {cwd:?}");
    let json = stdout
        .iter()
        .find_map(|l| l.strip_prefix("assignment "))
        .expect("the rank printed its assignment");
    let assignment: RankAssignment = serde_json::from_str(json).unwrap();
    assert_eq!(assignment.job_id, JobId::from("job-a"));
    assert_eq!(assignment.attempt, Attempt(4));
    assert_eq!(assignment.rank, Rank(1));
    assert_eq!(assignment.world_size, 2);
    assert_eq!(
        assignment.spec_json, spec,
        "the spec reaches the rank as sent"
    );
    assert_eq!(assignment.resume_step, None);
    assert_eq!(assignment.coordinator, coordinator.url());
    assert_eq!(assignment.advertise_host, "127.0.0.9");
    assert_eq!(
        assignment.attempt_secret.0, "secret-of-job-a-4",
        "the attempt's secret reaches the rank"
    );

    // The event line is a progress message, not a log line; plain lines are logs.
    assert!(
        stdout.contains(&"plain stdout line".to_string()),
        "{stdout:?}"
    );
    assert!(!stdout.iter().any(|l| l.contains("@gantry")), "{stdout:?}");
    assert_eq!(lines(&state, &rank, "stderr"), ["plain stderr line"]);
    let progress: Vec<&pb::RankProgress> = state
        .received
        .iter()
        .filter_map(|r| match &r.msg.body {
            Some(Body::Progress(p)) => Some(p),
            _ => None,
        })
        .collect();
    assert_eq!(
        progress,
        [&pb::RankProgress {
            key: Some(rank.clone()),
            step: 3,
            loss: 0.5,
            eval_loss: Some(0.25),
            samples_per_sec: 12.5,
            eval_metrics: None,
        }]
    );
    // Everything the rank wrote is relayed before its exit.
    let exited_at = position(&state, |b| matches!(b, Body::Exited(_))).unwrap();
    let last_output = state
        .received
        .iter()
        .rposition(|r| matches!(r.msg.body, Some(Body::Logs(_) | Body::Progress(_))))
        .unwrap();
    assert!(last_output < exited_at, "{:#?}", state.received);
    assert!(state.received.iter().all(|r| r.msg.worker_id == "worker-1"));
}

#[tokio::test]
async fn a_rank_that_fails_or_is_killed_is_reported_with_its_code_or_signal_and_stderr() {
    let coordinator = Coordinator::start().await;
    let daemon = Daemon::start(&coordinator, 2, 30);
    let failing = key("job-f", 1, 0);
    let killed = key("job-f", 1, 1);
    daemon.rank_script(&failing, "echo 'fatal: out of cheese' >&2\nexit 3\n");
    daemon.rank_script(&killed, TICKING);
    coordinator.first_of_session(1).await;
    coordinator.assign(&failing, "{}");
    coordinator.assign(&killed, "{}");

    let exit = coordinator.exit_of(&failing).await;
    assert_eq!(exit.exit_code, Some(3), "{exit:?}");
    assert_eq!(exit.signal, None);
    assert!(!exit.stopped, "nobody stopped it: {exit:?}");
    {
        let state = coordinator.state();
        assert_eq!(lines(&state, &failing, "stderr"), ["fatal: out of cheese"]);
        let stderr_at = position(
            &state,
            |b| matches!(b, Body::Logs(l) if l.key.as_ref() == Some(&failing)),
        );
        let exit_at = position(
            &state,
            |b| matches!(b, Body::Exited(e) if e.key.as_ref() == Some(&failing)),
        );
        assert!(stderr_at < exit_at, "the cause comes before the exit");
        assert!(exits(&state, &killed).is_empty(), "the other rank runs on");
    }

    let pid = coordinator.pid_of(&killed).await;
    // SAFETY: a plain kill(2) of the rank process this test's daemon started.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGKILL) }, 0);
    let exit = coordinator.exit_of(&killed).await;
    assert_eq!(exit.exit_code, None, "{exit:?}");
    assert_eq!(exit.signal, Some(libc::SIGKILL));
    assert!(!exit.stopped, "someone else's kill is not a stop: {exit:?}");
    let state = coordinator.state();
    assert_eq!(exits(&state, &failing).len(), 1);
    assert_eq!(exits(&state, &killed).len(), 1);
}

#[tokio::test]
async fn a_stop_order_kills_the_ranks_of_older_attempts_only_and_marks_them_stopped() {
    let coordinator = Coordinator::start().await;
    let daemon = Daemon::start(&coordinator, 3, 30);
    let old = key("job-s", 1, 0);
    let new = key("job-s", 2, 0);
    let other = key("job-o", 1, 0);
    for k in [&old, &new, &other] {
        daemon.rank_script(k, TICKING);
    }
    coordinator.first_of_session(1).await;
    for k in [&old, &new, &other] {
        coordinator.assign(k, "{}");
    }
    coordinator
        .wait_for("every rank ticking", |s| {
            [&old, &new, &other]
                .iter()
                .all(|k| last_tick(s, k) > 0)
                .then_some(())
        })
        .await;

    coordinator.stop_ranks("job-s", 2);
    let exit = coordinator.exit_of(&old).await;
    assert!(exit.stopped, "{exit:?}");
    assert_eq!(exit.exit_code, None);
    assert_eq!(exit.signal, Some(libc::SIGKILL));

    // The newer attempt and the other job still run: they go on ticking after that exit.
    let (new_then, other_then) = {
        let state = coordinator.state();
        (last_tick(&state, &new), last_tick(&state, &other))
    };
    coordinator
        .wait_for("the newer attempt and the other job ticking on", |s| {
            (last_tick(s, &new) >= new_then + 4 && last_tick(s, &other) >= other_then + 4)
                .then_some(())
        })
        .await;
    {
        let state = coordinator.state();
        assert!(exits(&state, &new).is_empty(), "{:?}", exits(&state, &new));
        assert!(exits(&state, &other).is_empty());
    }

    // The job ends: a stop above every attempt ends the newer one too.
    coordinator.stop_ranks("job-s", u64::MAX);
    let exit = coordinator.exit_of(&new).await;
    assert!(exit.stopped, "{exit:?}");
    let state = coordinator.state();
    assert_eq!(exits(&state, &old).len(), 1);
    assert!(exits(&state, &other).is_empty());
}

#[tokio::test]
async fn after_a_lost_session_or_coordinator_the_daemon_reregisters_and_reports_what_runs_and_exited()
 {
    let mut coordinator = Coordinator::start().await;
    let daemon = Daemon::start(&coordinator, 2, 30);
    let stays = key("job-r", 1, 0);
    let dies = key("job-r", 1, 1);
    daemon.rank_script(&stays, &exits_when("go-0", 0));
    daemon.rank_script(&dies, &exits_when("go-1", 5));
    coordinator.first_of_session(1).await;
    coordinator.assign(&stays, "{}");
    coordinator.assign(&dies, "{}");
    coordinator.pid_of(&stays).await;
    let dies_pid = coordinator.pid_of(&dies).await;

    // The coordinator ends the session: the daemon registers again, under its id, and opens
    // the new session with both ranks.
    coordinator.drop_session();
    let first = coordinator.first_of_session(2).await;
    {
        let state = coordinator.state();
        assert_eq!(state.registrations.len(), 2);
        assert_eq!(state.registrations[1].worker_id, "worker-1");
    }
    let Some(Body::Running(mut running)) = first.body else {
        panic!("session 2 opened with {first:?}");
    };
    running.ranks.sort_by_key(|k| k.rank);
    assert_eq!(running.ranks, [stays.clone(), dies.clone()]);
    assert!(running.exited.is_empty(), "{running:?}");
    assert_eq!(first.worker_id, "worker-1");

    // The coordinator goes away; a rank exits meanwhile.
    coordinator.stop().await;
    daemon.touch(&dies, "go-1");
    wait_gone(dies_pid).await;
    coordinator.restart().await;
    let first = coordinator.first_of_session(3).await;
    {
        let state = coordinator.state();
        assert_eq!(state.registrations.len(), 3);
        assert_eq!(state.registrations[2].worker_id, "worker-1");
        // The join token registers once; from then on the worker presents the credential
        // its registration gave, to open sessions and to come back.
        let own = "Bearer credential-of-worker-1".to_string();
        assert_eq!(
            state.credentials,
            [
                ("register", "Bearer the-join-token".to_string()),
                ("session", own.clone()),
                ("register", own.clone()),
                ("session", own.clone()),
                ("register", own.clone()),
                ("session", own),
            ]
        );
    }
    assert_eq!(first.worker_id, "worker-1");
    let Some(Body::Running(running)) = first.body else {
        panic!("session 3 opened with {first:?}");
    };
    assert_eq!(running.ranks, std::slice::from_ref(&stays), "{running:?}");
    let [exit] = running.exited.as_slice() else {
        panic!("one exit expected: {running:?}");
    };
    assert_eq!(exit.key.as_ref(), Some(&dies));
    assert_eq!(exit.exit_code, Some(5));
    assert!(!exit.stopped);

    // The rank that ran through it all still reports on the new session.
    daemon.touch(&stays, "go-0");
    let exit = coordinator.exit_of(&stays).await;
    assert_eq!(exit.exit_code, Some(0));
    let state = coordinator.state();
    assert!(
        state.received.iter().any(|r| r.session == 3
            && matches!(&r.msg.body, Some(Body::Exited(e)) if e.key.as_ref() == Some(&stays))),
        "the exit came on session 3"
    );
    assert!(
        exits(&state, &dies).is_empty(),
        "reported once, in RunningRanks"
    );
}

#[tokio::test]
async fn a_drain_terms_the_ranks_reports_their_exits_hands_back_new_work_and_returns() {
    let coordinator = Coordinator::start().await;
    let mut daemon = Daemon::start(&coordinator, 2, 30);
    let running = key("job-d", 1, 0);
    let late = key("job-d", 1, 1);
    daemon.rank_script(
        &running,
        r#"trap 'echo "got TERM"; while [ ! -e release ]; do sleep 0.02; done; exit 76' TERM
echo ready
while :; do sleep 0.02; done
"#,
    );
    daemon.rank_script(&late, "touch started-1\necho started\n");
    coordinator.first_of_session(1).await;
    coordinator.assign(&running, "{}");
    coordinator.line_of(&running, "stdout", "ready").await;

    daemon.drain.cancel();
    coordinator
        .wait_for("Draining", |s| {
            position(s, |b| matches!(b, Body::Draining(_)))
        })
        .await;
    coordinator.line_of(&running, "stdout", "got TERM").await;

    // Work placed before the coordinator heard of the drain goes back untouched.
    coordinator.assign(&late, "{}");
    let exit = coordinator.exit_of(&late).await;
    assert_eq!(exit.exit_code, Some(ExitCode::Drained.code()), "{exit:?}");
    assert!(!exit.stopped);
    assert!(
        !daemon.attempt_dir(&late).join("rank-1.json").exists(),
        "no assignment written"
    );
    assert!(
        !daemon.attempt_dir(&late).join("started-1").exists(),
        "never started"
    );

    // The rank checkpoints (here: waits for the test) and exits as drained.
    daemon.touch(&running, "release");
    let exit = coordinator.exit_of(&running).await;
    assert_eq!(exit.exit_code, Some(ExitCode::Drained.code()), "{exit:?}");
    assert!(!exit.stopped);
    daemon.finished().await.unwrap();

    let state = coordinator.state();
    assert!(lines(&state, &late, "stdout").is_empty());
    let draining: Vec<usize> = state
        .received
        .iter()
        .enumerate()
        .filter(|(_, r)| matches!(r.msg.body, Some(Body::Draining(_))))
        .map(|(i, _)| i)
        .collect();
    assert_eq!(draining.len(), 1, "{:#?}", state.received);
    let exit_at = position(
        &state,
        |b| matches!(b, Body::Exited(e) if e.key.as_ref() == Some(&running)),
    );
    assert!(Some(draining[0]) < exit_at);
    assert_eq!(exits(&state, &running).len(), 1);
    assert_eq!(exits(&state, &late).len(), 1);
}

#[tokio::test]
async fn a_drain_that_times_out_kills_the_ranks_left_and_returns() {
    let coordinator = Coordinator::start().await;
    let mut daemon = Daemon::start(&coordinator, 1, 1);
    let stubborn = key("job-t", 1, 0);
    daemon.rank_script(
        &stubborn,
        r#"trap 'echo "ignoring TERM"' TERM
echo "pid $$"
while :; do sleep 0.02; done
"#,
    );
    coordinator.first_of_session(1).await;
    coordinator.assign(&stubborn, "{}");
    let pid = coordinator.pid_of(&stubborn).await;

    let drained_at = Instant::now();
    daemon.drain.cancel();
    coordinator
        .line_of(&stubborn, "stdout", "ignoring TERM")
        .await;
    daemon.finished().await.unwrap();
    let took = drained_at.elapsed();
    assert!(
        took >= Duration::from_millis(900),
        "returned after {took:?}, before the drain timeout"
    );
    wait_gone(pid).await;
}

#[tokio::test]
async fn what_a_rank_reports_while_the_coordinator_is_away_is_delivered_after_reconnecting() {
    let mut coordinator = Coordinator::start().await;
    let daemon = Daemon::start(&coordinator, 1, 30);
    let rank = key("job-b", 1, 0);
    daemon.rank_script(
        &rank,
        r#"echo "pid $$"
while [ ! -e go ]; do sleep 0.02; done
echo 'kept stderr' >&2
echo '@gantry {"progress":{"step":1,"loss":2.0,"eval_loss":null,"samples_per_sec":1.0}}'
echo '@gantry {"progress":{"step":2,"loss":1.0,"eval_loss":null,"samples_per_sec":1.0}}'
touch wrote
while [ ! -e go-2 ]; do sleep 0.02; done
"#,
    );
    coordinator.first_of_session(1).await;
    coordinator.assign(&rank, "{}");
    coordinator.pid_of(&rank).await;

    coordinator.stop().await;
    daemon.touch(&rank, "go");
    let wrote = daemon.attempt_dir(&rank).join("wrote");
    let deadline = Instant::now() + WAIT;
    while !wrote.exists() {
        assert!(Instant::now() < deadline, "the rank never wrote");
        tokio::time::sleep(POLL).await;
    }
    coordinator.restart().await;
    // Delivered on the new session (before its RunningRanks, in fact; see the proto's "first").
    coordinator
        .wait_for("the stderr line and the progress on session 2", |s| {
            let session_2: Vec<&Body> = s
                .received
                .iter()
                .filter(|r| r.session == 2)
                .filter_map(|r| r.msg.body.as_ref())
                .collect();
            let stderr = session_2.iter().any(|b| {
                matches!(b, Body::Logs(l) if l.stream == "stderr" && l.lines == ["kept stderr"])
            });
            let running = session_2.iter().any(|b| matches!(b, Body::Running(_)));
            (stderr && running).then_some(())
        })
        .await;
    {
        let state = coordinator.state();
        let progress: Vec<u64> = state
            .received
            .iter()
            .filter_map(|r| match &r.msg.body {
                Some(Body::Progress(p)) => Some(p.step),
                _ => None,
            })
            .collect();
        assert_eq!(progress, [2], "the newest progress replaces the older one");
    }
    daemon.touch(&rank, "go-2");
    assert_eq!(coordinator.exit_of(&rank).await.exit_code, Some(0));
}

#[tokio::test]
async fn a_drain_while_the_coordinator_is_away_still_terms_the_ranks_and_returns() {
    let mut coordinator = Coordinator::start().await;
    let mut daemon = Daemon::start(&coordinator, 1, 1);
    let rank = key("job-u", 1, 0);
    daemon.rank_script(
        &rank,
        "trap 'touch got-term; exit 76' TERM\necho \"pid $$\"\nwhile :; do sleep 0.02; done\n",
    );
    coordinator.first_of_session(1).await;
    coordinator.assign(&rank, "{}");
    let pid = coordinator.pid_of(&rank).await;

    coordinator.stop().await;
    daemon.drain.cancel();
    // Drain timeout 1 s: by then the rank has had its SIGTERM and `run` has returned.
    daemon.finished().await.unwrap();
    assert!(
        daemon.attempt_dir(&rank).join("got-term").exists(),
        "no SIGTERM"
    );
    wait_gone(pid).await;
}

/// A rank that prints the GPU it was given (or `none`), then exits.
const PRINTS_ITS_GPU: &str = r#"echo "gpu ${CUDA_VISIBLE_DEVICES-none}"
"#;

#[tokio::test]
async fn a_gpu_worker_offers_its_gpus_and_runs_a_rank_on_the_gpu_it_was_given() {
    let coordinator = Coordinator::start().await;
    // As a daemon started with CUDA_VISIBLE_DEVICES=4,6 sees its GPUs: 0 and 1, handed out as
    // the host's 4 and 6.
    let gpus = ["4", "6"]
        .iter()
        .enumerate()
        .map(|(i, visible)| Gpu {
            index: i as u32,
            name: "declared".into(),
            memory_bytes: 0,
            visible_as: visible.to_string(),
        })
        .collect();
    let daemon = Daemon::start_with_gpus(&coordinator, 3, 30, gpus);
    coordinator.first_of_session(1).await;
    {
        let state = coordinator.state();
        let reg = &state.registrations[0];
        assert_eq!(reg.devices, ["cpu", "cuda"]);
        let offered: Vec<u32> = reg.gpus.iter().map(|g| g.index).collect();
        assert_eq!(offered, [0, 1]);
    }
    let on_gpu = key("job-g", 1, 0);
    let on_cpu = key("job-g", 1, 1);
    let on_missing = key("job-g", 1, 2);
    for k in [&on_gpu, &on_cpu, &on_missing] {
        daemon.rank_script(k, PRINTS_ITS_GPU);
    }
    coordinator.assign_gpu(&on_gpu, "{}", Some(1));
    coordinator.assign_gpu(&on_cpu, "{}", None);
    coordinator.assign_gpu(&on_missing, "{}", Some(2));

    assert_eq!(
        coordinator.line_of(&on_gpu, "stdout", "gpu ").await,
        "gpu 6"
    );
    // A rank without a GPU keeps the daemon's environment as it is.
    let inherited = std::env::var("CUDA_VISIBLE_DEVICES").unwrap_or_else(|_| "none".into());
    assert_eq!(
        coordinator.line_of(&on_cpu, "stdout", "gpu ").await,
        format!("gpu {inherited}")
    );
    let refused = coordinator.exit_of(&on_missing).await;
    assert_eq!(refused.exit_code, Some(127), "{refused:?}");
    assert!(
        refused
            .message
            .contains("assigned GPU 2, which this worker lacks"),
        "{refused:?}"
    );
}

#[tokio::test]
async fn a_cpu_worker_offers_no_gpus() {
    let coordinator = Coordinator::start().await;
    let _daemon = Daemon::start(&coordinator, 1, 30);
    coordinator.first_of_session(1).await;
    let state = coordinator.state();
    assert_eq!(state.registrations[0].devices, ["cpu"]);
    assert!(state.registrations[0].gpus.is_empty());
}
