//! gRPC adapters: decode, call one core method under the lock ([`Handle`]), encode. The
//! decisions are the core's and, on who may call what, `auth`'s; what is here is plumbing and
//! the per-client limits on what one request may ask (`Limits`).

use crate::auth::{Principal, Role, Tokens, caller};
use crate::convert;
use crate::core::{Core, Resume, Update};
use crate::error::CoordinatorError;
use crate::handle::Handle;
use gantry_core::WorkerId;
use gantry_proto::PROTOCOL_VERSION;
use gantry_proto::v1 as pb;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use tokio::sync::mpsc;
use tokio_stream::wrappers::{ReceiverStream, UnboundedReceiverStream};
use tokio_stream::{Stream, StreamExt};
use tonic::{Request, Response, Status, Streaming};

fn check_version(version: u32) -> Result<(), Status> {
    if version == PROTOCOL_VERSION {
        Ok(())
    } else {
        Err(Status::failed_precondition(format!(
            "protocol version {version} is not supported; this coordinator speaks version {PROTOCOL_VERSION}"
        )))
    }
}

type EventStream = Pin<Box<dyn Stream<Item = Result<pb::JobEvent, Status>> + Send>>;
type SessionStream = Pin<Box<dyn Stream<Item = Result<pb::CoordinatorMessage, Status>> + Send>>;

/// The job service: the core, the tokens (none when the coordinator runs `--insecure`), and
/// the limits on what one client may ask.
pub struct JobApi {
    pub handle: Handle,
    pub tokens: Option<Arc<Tokens>>,
    pub limits: Limits,
    pub metrics: crate::metrics::RpcMetrics,
    /// Open watch streams by client (its token's name).
    watches: Arc<Mutex<std::collections::HashMap<String, usize>>>,
}

/// What one client may ask of the job service.
#[derive(Debug, Clone, Copy, serde::Serialize)]
pub struct Limits {
    /// The largest job spec (`spec_json`) accepted.
    pub max_spec_bytes: usize,
    /// Watch streams (`gantry logs -f`, `--follow`) one client may hold open at once.
    pub max_watch_streams: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_spec_bytes: 1 << 20,
            max_watch_streams: 64,
        }
    }
}

/// One open watch stream, counted against its client until dropped.
struct WatchSlot {
    watches: Arc<Mutex<std::collections::HashMap<String, usize>>>,
    client: String,
}

impl Drop for WatchSlot {
    fn drop(&mut self) {
        let mut watches = self.watches.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = watches.get_mut(&self.client) {
            *n -= 1;
            if *n == 0 {
                watches.remove(&self.client);
            }
        }
    }
}

impl JobApi {
    pub fn new(
        handle: Handle,
        tokens: Option<Arc<Tokens>>,
        limits: Limits,
        metrics: crate::metrics::RpcMetrics,
    ) -> Self {
        Self {
            handle,
            tokens,
            limits,
            metrics,
            watches: Arc::default(),
        }
    }

    /// A watch slot for `client`, or RESOURCE_EXHAUSTED when it holds its limit already.
    fn watch_slot(&self, client: &str) -> Result<WatchSlot, Status> {
        let mut watches = self.watches.lock().unwrap_or_else(|p| p.into_inner());
        let open = watches.entry(client.to_string()).or_default();
        if *open >= self.limits.max_watch_streams {
            self.metrics.refused(
                "/gantry.v1.JobService/WatchJob",
                tonic::Code::ResourceExhausted,
            );
            return Err(Status::resource_exhausted(format!(
                "{client} has {open} watch streams open, the most one client may hold"
            )));
        }
        *open += 1;
        Ok(WatchSlot {
            watches: self.watches.clone(),
            client: client.to_string(),
        })
    }

    fn tokens(&self) -> Result<&Tokens, Status> {
        self.tokens.as_deref().ok_or_else(|| {
            Status::failed_precondition("this coordinator runs --insecure: it has no tokens")
        })
    }
}

/// The auth checks that need the job: a submitter changes only its own.
fn check_owner(who: &Principal, core: &Core, id: &gantry_core::JobId) -> Result<(), Status> {
    crate::auth::may_change_job(who, &id.0, &core.job(id)?.submitted_by)
}

fn token_info(t: crate::auth::TokenInfo) -> pb::TokenInfo {
    pb::TokenInfo {
        id: t.id,
        name: t.name,
        role: t.role.as_str().into(),
        created_at_ms: t.created_at_ms,
        revoked_at_ms: t.revoked_at_ms,
    }
}

fn database(e: rusqlite::Error) -> Status {
    Status::internal(format!("tokens: {e}"))
}

#[tonic::async_trait]
impl pb::job_service_server::JobService for JobApi {
    async fn submit_job(
        &self,
        req: Request<pb::SubmitJobRequest>,
    ) -> Result<Response<pb::Job>, Status> {
        let who = caller(&req)?;
        let spec = req.into_inner().spec_json;
        if spec.len() > self.limits.max_spec_bytes {
            self.metrics.refused(
                "/gantry.v1.JobService/SubmitJob",
                tonic::Code::ResourceExhausted,
            );
            return Err(Status::resource_exhausted(format!(
                "spec_json: {} bytes, more than the {} this coordinator accepts",
                spec.len(),
                self.limits.max_spec_bytes
            )));
        }
        let job = self
            .handle
            .with(|core, now| core.submit_as(&spec, &who.name, now))?;
        Ok(Response::new(convert::job(&job)))
    }

    async fn get_job(&self, req: Request<pb::GetJobRequest>) -> Result<Response<pb::Job>, Status> {
        let id = convert::job_id(&req.into_inner().job_id)?;
        let job = self.handle.with(|core, _| {
            let mut job = convert::job(core.job(&id)?);
            job.attempts = core.attempts(&id)?.iter().map(convert::attempt).collect();
            Ok::<_, CoordinatorError>(job)
        })?;
        Ok(Response::new(job))
    }

    async fn list_jobs(
        &self,
        _: Request<pb::ListJobsRequest>,
    ) -> Result<Response<pb::ListJobsResponse>, Status> {
        let jobs = self
            .handle
            .with(|core, _| core.jobs().into_iter().map(convert::job).collect());
        Ok(Response::new(pb::ListJobsResponse { jobs }))
    }

    async fn cancel_job(
        &self,
        req: Request<pb::CancelJobRequest>,
    ) -> Result<Response<pb::Job>, Status> {
        let who = caller(&req)?;
        let id = convert::job_id(&req.into_inner().job_id)?;
        let job = self.handle.with(|core, now| {
            check_owner(&who, core, &id)?;
            core.cancel_as(&id, &who.name, now).map_err(Status::from)
        })?;
        Ok(Response::new(convert::job(&job)))
    }

    async fn resume_job(
        &self,
        req: Request<pb::ResumeJobRequest>,
    ) -> Result<Response<pb::Job>, Status> {
        let who = caller(&req)?;
        let req = req.into_inner();
        let id = convert::job_id(&req.job_id)?;
        let from = Resume {
            step: req.from_step,
            in_store: req.from_step_in_store,
        };
        let job = self.handle.with(|core, now| {
            check_owner(&who, core, &id)?;
            core.resume_as(&id, from, &req.set, &who.name, now)
                .map_err(Status::from)
        })?;
        Ok(Response::new(convert::job(&job)))
    }

    async fn list_workers(
        &self,
        _: Request<pb::ListWorkersRequest>,
    ) -> Result<Response<pb::ListWorkersResponse>, Status> {
        let workers = self.handle.with(|core, _| {
            core.workers()
                .into_iter()
                .map(|(w, used)| convert::worker(w, used))
                .collect()
        });
        Ok(Response::new(pb::ListWorkersResponse { workers }))
    }

    async fn list_checkpoints(
        &self,
        req: Request<pb::ListCheckpointsRequest>,
    ) -> Result<Response<pb::ListCheckpointsResponse>, Status> {
        let id = convert::job_id(&req.into_inner().job_id)?;
        let checkpoints = self
            .handle
            .with(|core, _| core.checkpoints(&id))?
            .iter()
            .map(convert::checkpoint)
            .collect();
        Ok(Response::new(pb::ListCheckpointsResponse { checkpoints }))
    }

    type WatchJobStream = EventStream;

    async fn watch_job(
        &self,
        req: Request<pb::WatchJobRequest>,
    ) -> Result<Response<EventStream>, Status> {
        let slot = self.watch_slot(&caller(&req)?.name)?;
        let req = req.into_inner();
        let id = convert::job_id(&req.job_id)?;
        // Subscribe before reading history so nothing falls between the two.
        let (mut updates, snapshot) = self
            .handle
            .with(|core, _| core.job(&id).map(|j| (core.subscribe(), j.clone())))?;
        let (tx, rx) = mpsc::channel(256);
        let handle = self.handle.clone();
        tokio::spawn(async move {
            // The stream counts against its client until this task ends.
            let _slot = slot;
            let mut last_seq = req.after_seq;
            loop {
                let page = handle.with(|core, _| core.events_after(&id, last_seq, 500));
                let Ok(page) = page else { return };
                if page.is_empty() {
                    break;
                }
                for row in &page {
                    last_seq = row.seq;
                    if tx.send(Ok(convert::line_event(row))).await.is_err() {
                        return;
                    }
                }
            }
            let snapshot = handle
                .with(|core, _| core.job(&id).cloned())
                .unwrap_or(snapshot);
            if tx.send(Ok(convert::job_event(&snapshot))).await.is_err()
                || !req.follow
                || snapshot.state.is_terminal()
            {
                return;
            }
            loop {
                // A client that goes away frees its stream at once, not at the next event.
                let update = tokio::select! {
                    () = tx.closed() => return,
                    update = updates.recv() => update,
                };
                let event = match update {
                    Ok(Update::Job(job)) if job.id == id => {
                        let done = job.state.is_terminal();
                        (convert::job_event(&job), done)
                    }
                    Ok(Update::Line(row)) if row.job_id == id && row.seq > last_seq => {
                        last_seq = row.seq;
                        (convert::line_event(&row), false)
                    }
                    Ok(_) => continue,
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => continue,
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
                };
                if tx.send(Ok(event.0)).await.is_err() || event.1 {
                    return;
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn create_token(
        &self,
        req: Request<pb::CreateTokenRequest>,
    ) -> Result<Response<pb::CreateTokenResponse>, Status> {
        let req = req.into_inner();
        let name = req.name.trim();
        if name.is_empty() || name.len() > 128 || name.chars().any(char::is_control) {
            return Err(Status::invalid_argument(
                "name: required, at most 128 characters, no control characters",
            ));
        }
        let role = Role::parse(&req.role).map_err(Status::invalid_argument)?;
        let (token, info) = self
            .tokens()?
            .create(name, role, self.handle.now_ms())
            .map_err(database)?;
        tracing::info!(id = %info.id, name, role = role.as_str(), "token created");
        Ok(Response::new(pb::CreateTokenResponse {
            token,
            info: Some(token_info(info)),
        }))
    }

    async fn list_tokens(
        &self,
        _: Request<pb::ListTokensRequest>,
    ) -> Result<Response<pb::ListTokensResponse>, Status> {
        let tokens = self.tokens()?.list().map_err(database)?;
        Ok(Response::new(pb::ListTokensResponse {
            tokens: tokens.into_iter().map(token_info).collect(),
        }))
    }

    async fn revoke_token(
        &self,
        req: Request<pb::RevokeTokenRequest>,
    ) -> Result<Response<pb::TokenInfo>, Status> {
        let id = req.into_inner().id;
        let info = self
            .tokens()?
            .revoke(&id, self.handle.now_ms())
            .map_err(database)?
            .ok_or_else(|| Status::not_found(format!("id: no token {id:?}")))?;
        tracing::info!(id = %info.id, name = %info.name, "token revoked");
        Ok(Response::new(token_info(info)))
    }
}

/// The worker service: the core, and the tokens that workers' credentials are kept among (none
/// when the coordinator runs `--insecure`).
pub struct WorkerApi(pub Handle, pub Option<Arc<Tokens>>);

#[tonic::async_trait]
impl pb::worker_service_server::WorkerService for WorkerApi {
    async fn register(
        &self,
        req: Request<pb::RegisterRequest>,
    ) -> Result<Response<pb::RegisterResponse>, Status> {
        let who = caller(&req)?;
        let req = req.into_inner();
        check_version(req.protocol_version)?;
        // Coming back as a known worker takes that worker's credential; the join token only
        // registers new ones.
        if !req.worker_id.is_empty() {
            crate::auth::may_act_as_worker(&who, &req.worker_id)?;
        }
        let registration = convert::registration(req)?;
        let (id, options) = self.0.with(|core, now| {
            core.register(registration, now)
                .map(|id| (id, core.options().clone()))
        })?;
        // The join token is exchanged for a credential of this worker alone (its earlier ones
        // revoked), which it presents from now on and an admin can revoke on its own.
        let own = crate::auth::worker_principal(&id.0);
        let credential = match &self.1 {
            Some(tokens) if who.name != own => {
                let now = self.0.now_ms();
                tokens.revoke_named(&own, now).map_err(database)?;
                tokens.create(&own, Role::Worker, now).map_err(database)?.0
            }
            _ => String::new(),
        };
        Ok(Response::new(pb::RegisterResponse {
            worker_id: id.0,
            heartbeat_interval_ms: options.heartbeat_interval_ms,
            lease_ttl_ms: options.lease_ttl_ms,
            credential,
        }))
    }

    type SessionStream = SessionStream;

    async fn session(
        &self,
        req: Request<Streaming<pb::WorkerMessage>>,
    ) -> Result<Response<SessionStream>, Status> {
        let who = caller(&req)?;
        let mut inbound = req.into_inner();
        let first = inbound.message().await?.ok_or_else(|| {
            Status::invalid_argument("session: the stream ended before its first message")
        })?;
        check_version(first.protocol_version)?;
        if first.worker_id.is_empty() {
            return Err(CoordinatorError::InvalidArgument("worker_id: required".into()).into());
        }
        crate::auth::may_act_as_worker(&who, &first.worker_id)?;
        let worker = WorkerId(first.worker_id);
        let report = convert::worker_report(first.body)?;
        // The core holds the only sender of commands, so the stream ends when it lets the
        // session go; an error closing the session follows the commands sent before it.
        let (commands, command_rx) = mpsc::unbounded_channel();
        let (closing, closing_rx) = mpsc::unbounded_channel::<Status>();
        let session = self.0.with(|core, now| {
            let session = core.open_session(&worker, commands, now)?;
            core.on_worker_message(&worker, report, now)?;
            Ok::<_, CoordinatorError>(session)
        })?;
        tracing::info!(worker = %worker, "worker session opened");
        let handle = self.0.clone();
        tokio::spawn(async move {
            loop {
                let msg = match inbound.message().await {
                    Ok(Some(msg)) => msg,
                    Ok(None) | Err(_) => break,
                };
                let outcome = check_version(msg.protocol_version).and_then(|()| {
                    if msg.worker_id != worker.0 {
                        return Err(Status::invalid_argument(format!(
                            "worker_id: {:?} does not match this session's worker {worker}",
                            msg.worker_id
                        )));
                    }
                    let report = convert::worker_report(msg.body)?;
                    handle
                        .with(|core, now| core.on_worker_message(&worker, report, now))
                        .map_err(Status::from)
                });
                if let Err(status) = outcome {
                    tracing::warn!(worker = %worker, error = %status, "closing session on a bad message");
                    let _ = closing.send(status);
                    break;
                }
            }
            handle.with(|core, _| core.close_session(&worker, session));
        });
        let outbound = UnboundedReceiverStream::new(command_rx)
            .map(|command| Ok(convert::command(command)))
            .chain(UnboundedReceiverStream::new(closing_rx).map(Err));
        Ok(Response::new(Box::pin(outbound)))
    }

    async fn rendezvous(
        &self,
        req: Request<pb::RendezvousRequest>,
    ) -> Result<Response<pb::RendezvousResponse>, Status> {
        let req = req.into_inner();
        check_version(req.protocol_version)?;
        let key = convert::rank_key(req.key, "key")?;
        let secret = req.attempt_secret;
        let groups = req
            .nccl_groups
            .into_iter()
            .map(convert::nccl_group)
            .collect();
        let table = self.0.with(|core, now| {
            if !core.attempt_secret(&key.job, key.attempt).matches(&secret) {
                return Err(Status::unauthenticated(format!(
                    "attempt_secret: not the secret of attempt {} of job {}",
                    key.attempt, key.job
                )));
            }
            core.rendezvous(&key, req.address, groups, now)
                .map_err(Status::from)
        })?;
        Ok(Response::new(match table {
            Some(t) => pb::RendezvousResponse {
                peers: t.addresses,
                nccl_groups: t
                    .nccl_groups
                    .into_iter()
                    .map(convert::nccl_group_out)
                    .collect(),
            },
            None => pb::RendezvousResponse::default(),
        }))
    }
}
