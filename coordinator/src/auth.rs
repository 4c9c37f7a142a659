//! Who may call what: bearer tokens with roles, kept hashed in the coordinator's database, and
//! the tower layer that checks them before any handler runs.
//!
//! Tokens are 256 random bits, so the coordinator keeps only their SHA-256 (as GitHub and
//! Kubernetes' bootstrap tokens do): a stolen database reveals no credential. Each method needs
//! a role ([`need`]); `admin` may do everything, `submitter` submits and cancels or resumes its
//! own jobs (checked by the handler, which knows the job), `viewer` only reads, and `worker` is
//! what worker daemons present to register and hold a session. Rendezvous takes no token: a
//! rank presents its attempt's secret, checked against the live attempt by the core.

use crate::metrics::RpcMetrics;
use rusqlite::{Connection, params};
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::future::Future;
use std::path::Path;
use std::pin::Pin;
use std::sync::{Arc, Mutex, RwLock};
use std::task::{Context, Poll};
use tonic::codegen::http;

/// What a token lets its holder do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Admin,
    Submitter,
    Viewer,
    Worker,
}

impl Role {
    pub const ALL: [Role; 4] = [Role::Admin, Role::Submitter, Role::Viewer, Role::Worker];

    pub fn as_str(self) -> &'static str {
        match self {
            Role::Admin => "admin",
            Role::Submitter => "submitter",
            Role::Viewer => "viewer",
            Role::Worker => "worker",
        }
    }

    pub fn parse(s: &str) -> Result<Self, String> {
        Self::ALL
            .into_iter()
            .find(|r| r.as_str() == s)
            .ok_or_else(|| format!("role: {s:?} is not one of admin, submitter, viewer, worker"))
    }

    /// Whether this role may call a method that needs `need`.
    pub fn may(self, need: Need) -> bool {
        matches!(
            (self, need),
            (_, Need::Nothing | Need::AttemptSecret)
                | (Role::Admin, _)
                | (Role::Submitter, Need::Submitter | Need::Viewer)
                | (Role::Viewer, Need::Viewer)
                | (Role::Worker, Need::Worker)
        )
    }
}

/// What a method asks of its caller.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Need {
    /// Nothing: the health service.
    Nothing,
    /// The attempt's secret, in the request (rendezvous).
    AttemptSecret,
    Viewer,
    Submitter,
    Admin,
    Worker,
}

/// The need of a gRPC method, by its path. A method not listed needs a viewer's token at
/// least, so a method added later is never open by omission.
pub fn need(path: &str) -> Need {
    let method = path.rsplit('/').next().unwrap_or_default();
    if path.starts_with("/grpc.health.v1.Health/") {
        return Need::Nothing;
    }
    match (path.starts_with("/gantry.v1.WorkerService/"), method) {
        (true, "Rendezvous") => Need::AttemptSecret,
        (true, _) => Need::Worker,
        (false, "SubmitJob" | "CancelJob" | "ResumeJob") => Need::Submitter,
        (false, "CreateToken" | "ListTokens" | "RevokeToken") => Need::Admin,
        _ => Need::Viewer,
    }
}

/// The holder of a token, as the handlers see it (a request extension).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    pub name: String,
    pub role: Role,
}

impl Principal {
    /// Whoever calls a coordinator that runs with `--insecure`.
    pub fn anonymous() -> Self {
        Self {
            name: "anonymous".into(),
            role: Role::Admin,
        }
    }
}

/// A token as listed: never the token itself.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenInfo {
    pub id: String,
    pub name: String,
    pub role: Role,
    pub created_at_ms: i64,
    pub revoked_at_ms: Option<i64>,
}

/// The coordinator's tokens: rows in its database, and the live ones in memory by hash.
pub struct Tokens {
    conn: Mutex<Connection>,
    live: RwLock<HashMap<String, Principal>>,
}

fn digest(token: &str) -> String {
    gantry_core::hex(&Sha256::digest(token.trim().as_bytes()))
}

/// A fresh token: 256 bits from the OS's generator.
pub fn fresh_token() -> String {
    format!("gantry_{}", gantry_core::hex(&rand::random::<[u8; 32]>()))
}

impl Tokens {
    /// Opens (creating if needed) the tokens table of the database at `path`.
    pub fn open(path: &Path) -> Result<Self, rusqlite::Error> {
        let conn = Connection::open(path)?;
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        conn.execute_batch(
            "CREATE TABLE IF NOT EXISTS tokens (
                 hash TEXT PRIMARY KEY, id TEXT NOT NULL, name TEXT NOT NULL, role TEXT NOT NULL,
                 created_at_ms INTEGER NOT NULL, revoked_at_ms INTEGER);",
        )?;
        let tokens = Self {
            conn: Mutex::new(conn),
            live: RwLock::new(HashMap::new()),
        };
        let mut live = HashMap::new();
        for (hash, info) in tokens.rows()? {
            if info.revoked_at_ms.is_none() {
                live.insert(
                    hash,
                    Principal {
                        name: info.name,
                        role: info.role,
                    },
                );
            }
        }
        *tokens.live.write().expect("not poisoned") = live;
        Ok(tokens)
    }

    fn rows(&self) -> Result<Vec<(String, TokenInfo)>, rusqlite::Error> {
        let conn = self.conn.lock().expect("not poisoned");
        let mut query = conn.prepare(
            "SELECT hash, id, name, role, created_at_ms, revoked_at_ms FROM tokens
             ORDER BY created_at_ms, id",
        )?;
        let rows = query.query_map([], |row| {
            let role: String = row.get(3)?;
            Ok((
                row.get(0)?,
                TokenInfo {
                    id: row.get(1)?,
                    name: row.get(2)?,
                    // A role this coordinator does not know (a newer one's) grants nothing.
                    role: Role::parse(&role).unwrap_or(Role::Viewer),
                    created_at_ms: row.get(4)?,
                    revoked_at_ms: row.get(5)?,
                },
            ))
        })?;
        rows.collect()
    }

    /// Every token, oldest first, revoked ones included.
    pub fn list(&self) -> Result<Vec<TokenInfo>, rusqlite::Error> {
        Ok(self.rows()?.into_iter().map(|(_, info)| info).collect())
    }

    /// Creates a token for `name` with `role`: the token (shown once) and its record.
    pub fn create(
        &self,
        name: &str,
        role: Role,
        now_ms: i64,
    ) -> Result<(String, TokenInfo), rusqlite::Error> {
        let token = fresh_token();
        let info = self.add(&token, name, role, now_ms)?;
        Ok((token, info))
    }

    /// Records `token` (one given to the coordinator, e.g. from a Kubernetes Secret) unless it
    /// is already known; a known token keeps its record.
    pub fn add(
        &self,
        token: &str,
        name: &str,
        role: Role,
        now_ms: i64,
    ) -> Result<TokenInfo, rusqlite::Error> {
        let hash = digest(token);
        let info = TokenInfo {
            id: hash[..12].to_string(),
            name: name.to_string(),
            role,
            created_at_ms: now_ms,
            revoked_at_ms: None,
        };
        let conn = self.conn.lock().expect("not poisoned");
        let inserted = conn.execute(
            "INSERT OR IGNORE INTO tokens (hash, id, name, role, created_at_ms)
             VALUES (?1, ?2, ?3, ?4, ?5)",
            params![hash, info.id, info.name, role.as_str(), now_ms],
        )?;
        if inserted == 1 {
            self.live.write().expect("not poisoned").insert(
                hash,
                Principal {
                    name: info.name.clone(),
                    role,
                },
            );
        }
        Ok(info)
    }

    /// Revokes the token with this id: it stops working at once. `None` when there is none.
    pub fn revoke(&self, id: &str, now_ms: i64) -> Result<Option<TokenInfo>, rusqlite::Error> {
        self.revoke_where("id", id, now_ms)?;
        Ok(self.list()?.into_iter().find(|t| t.id == id))
    }

    /// Revokes every live token named `name` (a worker's credentials, before a new one).
    pub fn revoke_named(&self, name: &str, now_ms: i64) -> Result<(), rusqlite::Error> {
        self.revoke_where("name", name, now_ms)
    }

    /// Revokes the live tokens whose `column` (`id` or `name`) is `value`, in the database
    /// and in memory, in one statement.
    fn revoke_where(&self, column: &str, value: &str, now_ms: i64) -> Result<(), rusqlite::Error> {
        let conn = self.conn.lock().expect("not poisoned");
        let mut update = conn.prepare(&format!(
            "UPDATE tokens SET revoked_at_ms = ?2 WHERE {column} = ?1 AND revoked_at_ms IS NULL
             RETURNING hash"
        ))?;
        let hashes: Vec<String> = update
            .query_map(params![value, now_ms], |r| r.get(0))?
            .collect::<Result<_, _>>()?;
        let mut live = self.live.write().expect("not poisoned");
        for hash in hashes {
            live.remove(&hash);
        }
        Ok(())
    }

    /// Whose token this is, if it is live.
    pub fn who(&self, token: &str) -> Option<Principal> {
        self.live
            .read()
            .expect("not poisoned")
            .get(&digest(token))
            .cloned()
    }

    /// Whether any live token has `role`.
    pub fn has_live(&self, role: Role) -> bool {
        self.live
            .read()
            .expect("not poisoned")
            .values()
            .any(|p| p.role == role)
    }

    /// Makes sure a live token of `role` exists: `given` (recorded if new), else the one in
    /// `file` if it still works, else, when no live token of the role exists at all, a fresh one
    /// written to `file`, readable by its owner only.
    pub fn bootstrap(
        &self,
        role: Role,
        name: &str,
        given: Option<&str>,
        file: &Path,
        now_ms: i64,
    ) -> anyhow::Result<()> {
        if let Some(token) = given {
            anyhow::ensure!(!token.trim().is_empty(), "the {name} token given is empty");
            self.add(token, name, role, now_ms)?;
            return Ok(());
        }
        let in_file = std::fs::read_to_string(file).ok();
        if in_file.as_deref().and_then(|t| self.who(t)).is_some() || self.has_live(role) {
            return Ok(());
        }
        let (token, _) = self.create(name, role, now_ms)?;
        gantry_ops::write_private(file, format!("{token}\n").as_bytes())?;
        tracing::info!(file = %file.display(), role = role.as_str(), "wrote a new token");
        Ok(())
    }
}

/// The token of an `authorization: Bearer …` header.
fn bearer<B>(request: &http::Request<B>) -> Option<&str> {
    let value = request
        .headers()
        .get(gantry_proto::AUTHORIZATION)?
        .to_str()
        .ok()?;
    let (scheme, token) = value.split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then_some(token.trim())
}

/// Checks every call's token against its method's need; `tokens` of `None` lets every call
/// through as [`Principal::anonymous`] (`--insecure`). First, each client address gets at most
/// its share of requests (`limiter`): more is RESOURCE_EXHAUSTED, before any token is looked at.
#[derive(Clone)]
pub struct Authenticate {
    pub tokens: Option<Arc<Tokens>>,
    pub metrics: RpcMetrics,
    pub limiter: Option<Arc<RateLimiter>>,
}

/// Requests per client address, by governor's GCRA.
pub type RateLimiter = governor::DefaultKeyedRateLimiter<std::net::IpAddr>;

/// A limiter of `per_second` requests per client address, bursts of `burst`.
pub fn rate_limiter(per_second: u32, burst: u32) -> Option<Arc<RateLimiter>> {
    let per_second = std::num::NonZeroU32::new(per_second)?;
    let burst = std::num::NonZeroU32::new(burst.max(per_second.get()))?;
    Some(Arc::new(governor::RateLimiter::keyed(
        governor::Quota::per_second(per_second).allow_burst(burst),
    )))
}

/// The address a request came from, as tonic's server records it.
fn peer<B>(request: &http::Request<B>) -> Option<std::net::IpAddr> {
    use tonic::transport::server::{TcpConnectInfo, TlsConnectInfo};
    let ext = request.extensions();
    ext.get::<TlsConnectInfo<TcpConnectInfo>>()
        .and_then(|i| i.get_ref().remote_addr())
        .or_else(|| {
            ext.get::<TcpConnectInfo>()
                .and_then(TcpConnectInfo::remote_addr)
        })
        .map(|a| a.ip())
}

impl Authenticate {
    pub fn layer<S>(&self, inner: S) -> Authenticated<S> {
        Authenticated {
            inner,
            auth: self.clone(),
        }
    }

    /// Who the caller is, or the status that refuses it.
    fn check<B>(&self, request: &http::Request<B>) -> Result<Option<Principal>, tonic::Status> {
        if let (Some(limiter), Some(ip)) = (&self.limiter, peer(request)) {
            if limiter.len() > 100_000 {
                limiter.retain_recent();
            }
            if limiter.check_key(&ip).is_err() {
                return Err(tonic::Status::resource_exhausted(format!(
                    "{ip} sends more requests than this coordinator's rate limit; slow down"
                )));
            }
        }
        let Some(tokens) = &self.tokens else {
            return Ok(Some(Principal::anonymous()));
        };
        let need = need(request.uri().path());
        if matches!(need, Need::Nothing | Need::AttemptSecret) {
            return Ok(None);
        }
        let Some(token) = bearer(request) else {
            return Err(tonic::Status::unauthenticated(
                "no bearer token: pass --token, set GANTRY_TOKEN, or name a --token-file",
            ));
        };
        let Some(principal) = tokens.who(token) else {
            return Err(tonic::Status::unauthenticated(
                "the token is unknown or revoked",
            ));
        };
        if !principal.role.may(need) {
            return Err(tonic::Status::permission_denied(format!(
                "{} holds the role {}, which may not call {}",
                principal.name,
                principal.role.as_str(),
                request.uri().path()
            )));
        }
        Ok(Some(principal))
    }
}

/// A service behind [`Authenticate`].
#[derive(Clone)]
pub struct Authenticated<S> {
    inner: S,
    auth: Authenticate,
}

impl<S, B, R> tower::Service<http::Request<B>> for Authenticated<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<R>>,
    S::Future: Send + 'static,
    R: Default + Send + 'static,
    S::Error: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<S::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: http::Request<B>) -> Self::Future {
        match self.auth.check(&request) {
            Ok(principal) => {
                if let Some(p) = principal {
                    request.extensions_mut().insert(p);
                }
                let method = request.uri().path().to_string();
                let metrics = self.auth.metrics.clone();
                let response = self.inner.call(request);
                Box::pin(async move {
                    let mut response = response.await?;
                    message_too_large(&mut response, &method, &metrics);
                    Ok(response)
                })
            }
            Err(status) => {
                self.auth
                    .metrics
                    .refused(request.uri().path(), status.code());
                Box::pin(std::future::ready(Ok(status.into_http())))
            }
        }
    }
}

/// A request message over the size limit is RESOURCE_EXHAUSTED (tonic's decoder answers
/// OUT_OF_RANGE), and counted.
fn message_too_large<R>(response: &mut http::Response<R>, method: &str, metrics: &RpcMetrics) {
    let headers = response.headers_mut();
    let too_large = headers.get("grpc-status").is_some_and(|s| s == "11")
        && headers
            .get("grpc-message")
            .and_then(|m| m.to_str().ok())
            .is_some_and(|m| m.contains("too%20large") || m.contains("too large"));
    if too_large {
        headers.insert(
            "grpc-status",
            http::HeaderValue::from_static("8"), // RESOURCE_EXHAUSTED
        );
        metrics.refused(method, tonic::Code::ResourceExhausted);
    }
}

/// The name of a worker's own credential.
pub fn worker_principal(worker_id: &str) -> String {
    format!("worker:{worker_id}")
}

/// A submitter may cancel or resume only the jobs its token's name submitted (`owner`); other
/// roles that reach the handler may change any.
pub fn may_change_job(who: &Principal, job: &str, owner: &str) -> Result<(), tonic::Status> {
    if who.role == Role::Submitter && owner != who.name {
        return Err(tonic::Status::permission_denied(format!(
            "job {job} was submitted by {owner:?}; {} may change only its own jobs",
            who.name
        )));
    }
    Ok(())
}

/// Whether `who` may act as worker `worker_id`: an admin, or that worker's own credential.
pub fn may_act_as_worker(who: &Principal, worker_id: &str) -> Result<(), tonic::Status> {
    if who.role == Role::Admin || who.name == worker_principal(worker_id) {
        return Ok(());
    }
    Err(tonic::Status::permission_denied(format!(
        "{} may not act as worker {worker_id:?}: present the credential its registration gave",
        who.name
    )))
}

/// The caller of a handler, as [`Authenticated`] found it.
pub fn caller<T>(request: &tonic::Request<T>) -> Result<Principal, tonic::Status> {
    request
        .extensions()
        .get::<Principal>()
        .cloned()
        .ok_or_else(|| tonic::Status::unauthenticated("no credential was checked for this call"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_method_needs_what_its_role_table_says() {
        let job = |m: &str| need(&format!("/gantry.v1.JobService/{m}"));
        let worker = |m: &str| need(&format!("/gantry.v1.WorkerService/{m}"));
        assert_eq!(job("SubmitJob"), Need::Submitter);
        assert_eq!(job("GetJob"), Need::Viewer);
        assert_eq!(job("RevokeToken"), Need::Admin);
        assert_eq!(job("SomethingNew"), Need::Viewer);
        assert_eq!(worker("Register"), Need::Worker);
        assert_eq!(worker("Rendezvous"), Need::AttemptSecret);
        assert_eq!(need("/grpc.health.v1.Health/Check"), Need::Nothing);
        assert!(Role::Admin.may(Need::Worker) && Role::Admin.may(Need::Admin));
        assert!(Role::Submitter.may(Need::Viewer) && !Role::Submitter.may(Need::Admin));
        assert!(!Role::Viewer.may(Need::Submitter) && !Role::Worker.may(Need::Viewer));
        assert!(!Role::Viewer.may(Need::Worker) && !Role::Submitter.may(Need::Worker));
    }

    #[test]
    fn tokens_are_kept_hashed_survive_a_restart_and_stop_working_when_revoked() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("coordinator.db");
        let tokens = Tokens::open(&db).unwrap();
        let (alice, info) = tokens.create("alice", Role::Submitter, 1).unwrap();
        assert_eq!(tokens.who(&alice).unwrap().name, "alice");
        assert!(tokens.who("gantry_not-a-token").is_none());
        let stored = std::fs::read(&db).unwrap();
        let needle = alice.as_bytes();
        assert!(
            !stored.windows(needle.len()).any(|w| w == needle),
            "the database holds the token itself"
        );
        drop(tokens);
        let tokens = Tokens::open(&db).unwrap();
        assert_eq!(tokens.who(&alice).unwrap().role, Role::Submitter);
        let revoked = tokens.revoke(&info.id, 5).unwrap().unwrap();
        assert_eq!(revoked.revoked_at_ms, Some(5));
        assert!(tokens.who(&alice).is_none());
        assert!(tokens.revoke("nope", 6).unwrap().is_none());
        drop(tokens);
        assert!(Tokens::open(&db).unwrap().who(&alice).is_none());
    }

    #[test]
    fn bootstrap_writes_an_owner_only_token_once_and_keeps_a_given_one() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let tokens = Tokens::open(&dir.path().join("db")).unwrap();
        let file = dir.path().join("admin.token");
        tokens
            .bootstrap(Role::Admin, "admin", None, &file, 1)
            .unwrap();
        let first = std::fs::read_to_string(&file).unwrap();
        assert_eq!(tokens.who(&first).unwrap().role, Role::Admin);
        let mode = std::fs::metadata(&file).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        tokens
            .bootstrap(Role::Admin, "admin", None, &file, 2)
            .unwrap();
        assert_eq!(std::fs::read_to_string(&file).unwrap(), first);
        let given = dir.path().join("join.token");
        tokens
            .bootstrap(Role::Worker, "workers", Some("from-a-secret"), &given, 3)
            .unwrap();
        assert!(!given.exists());
        assert_eq!(tokens.who("from-a-secret").unwrap().role, Role::Worker);
    }
}
