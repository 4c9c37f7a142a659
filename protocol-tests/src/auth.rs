//! Who may call what: every method against every kind of credential, as a table.

use crate::{Target, expect_code, spec};
use anyhow::{Context, bail, ensure};
use gantry_proto::PROTOCOL_VERSION;
use gantry_proto::v1 as pb;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Code;

/// A credential a caller may present.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Holder {
    Nobody,
    Wrong,
    Revoked,
    Viewer,
    Submitter,
    Worker,
    Admin,
}

/// What the coordinator must answer a holder, by DESIGN's role table (written here again, not
/// taken from the coordinator): `None` when the call is refused before its handler, with the
/// code it is refused with.
fn refusal(holder: Holder, method: &str) -> Option<Code> {
    let viewer = [
        "GetJob",
        "ListJobs",
        "ListWorkers",
        "ListCheckpoints",
        "WatchJob",
    ];
    let submitter = ["SubmitJob", "CancelJob", "ResumeJob"];
    // A worker token (the join token) registers new workers; sessions take the credential
    // a registration gives (below, `workers_hold_credentials_of_their_own`).
    let worker = ["Register"];
    let allowed = match holder {
        Holder::Nobody | Holder::Wrong | Holder::Revoked => return Some(Code::Unauthenticated),
        Holder::Admin => true,
        Holder::Viewer => viewer.contains(&method),
        Holder::Submitter => viewer.contains(&method) || submitter.contains(&method),
        Holder::Worker => worker.contains(&method),
    };
    (!allowed).then_some(Code::PermissionDenied)
}

/// A worker registers with the join token and gets a credential of its own: its session and
/// its coming back take that credential; another worker's credential, or the join token, may
/// not act as it; once revoked, the credential opens nothing.
pub async fn workers_hold_credentials_of_their_own(t: &Target) -> anyhow::Result<()> {
    ensure!(
        t.token.is_some(),
        "this case needs an admin token (--token)"
    );
    let join = t
        .jobs()
        .await?
        .create_token(pb::CreateTokenRequest {
            name: "conformance-join".into(),
            role: "worker".into(),
        })
        .await?
        .into_inner()
        .token;
    let register = |worker_id: &str| pb::RegisterRequest {
        protocol_version: PROTOCOL_VERSION,
        worker_id: worker_id.into(),
        hostname: "conformance".into(),
        slots: 1,
        devices: vec!["cpu".into()],
        ..Default::default()
    };
    let mut joining = t.workers_as(Some(&join)).await?;
    let a = joining.register(register("")).await?.into_inner();
    let b = joining.register(register("")).await?.into_inner();
    ensure!(
        !a.credential.is_empty() && a.credential != b.credential && a.credential != join,
        "no credentials of their own: {a:?} {b:?}"
    );
    let session = async |token: &str, worker_id: &str| {
        let (tx, rx) = tokio::sync::mpsc::channel(1);
        tx.send(pb::WorkerMessage {
            protocol_version: PROTOCOL_VERSION,
            worker_id: worker_id.into(),
            body: Some(pb::worker_message::Body::Running(
                pb::RunningRanks::default(),
            )),
        })
        .await
        .map_err(|e| tonic::Status::internal(e.to_string()))?;
        let mut client = t
            .workers_as(Some(token))
            .await
            .map_err(|e| tonic::Status::unavailable(e.to_string()))?;
        client.session(ReceiverStream::new(rx)).await.map(drop)
    };
    session(&a.credential, &a.worker_id).await?;
    for (token, worker, what) in [
        (
            &b.credential,
            &a.worker_id,
            "b's credential opening a's session",
        ),
        (&join, &a.worker_id, "the join token opening a's session"),
    ] {
        expect_code(session(token, worker).await, Code::PermissionDenied, what)?;
    }
    let again = t
        .workers_as(Some(&a.credential))
        .await?
        .register(register(&a.worker_id))
        .await?
        .into_inner();
    ensure!(
        again.worker_id == a.worker_id && again.credential.is_empty(),
        "coming back with its credential: {again:?}"
    );
    let r = joining.register(register(&a.worker_id)).await;
    expect_code(r, Code::PermissionDenied, "the join token re-registering a")?;
    let mut admin = t.jobs().await?;
    let tokens = admin
        .list_tokens(pb::ListTokensRequest {})
        .await?
        .into_inner()
        .tokens;
    let own = tokens
        .iter()
        .find(|t| t.name == format!("worker:{}", a.worker_id) && t.revoked_at_ms.is_none())
        .context("a's credential is not listed")?;
    admin
        .revoke_token(pb::RevokeTokenRequest { id: own.id.clone() })
        .await?;
    expect_code(
        session(&a.credential, &a.worker_id).await,
        Code::Unauthenticated,
        "a revoked credential",
    )?;
    Ok(())
}

/// Over plain TCP a TLS coordinator answers nothing. Every method of both services is called
/// with no token, a wrong one, a revoked one and one of
/// each role. A refused call gets UNAUTHENTICATED (no valid token) or PERMISSION_DENIED (a role
/// that may not call it) and changes nothing; an allowed call reaches its handler (here, each
/// request is one the handler itself answers without changing anything). Rendezvous takes no
/// token: without the attempt's secret it is UNAUTHENTICATED whatever token comes with it.
pub async fn every_method_checks_its_callers_token_and_role(t: &Target) -> anyhow::Result<()> {
    ensure!(
        t.token.is_some(),
        "this case needs the coordinator's admin token (--token)"
    );
    // Plain TCP to a TLS coordinator gets nowhere, even with the admin token.
    if let Some(address) = t.url.strip_prefix("https://") {
        let plain = Target {
            url: format!("http://{address}"),
            ..t.clone()
        };
        if let Ok(mut jobs) = plain.jobs().await {
            let r = jobs.list_jobs(pb::ListJobsRequest {}).await;
            ensure!(r.is_err(), "plain TCP to {address} was answered: {r:?}");
        }
    }
    let mut admin = t.jobs().await?;
    let mut create = async |name: &str, role: &str| -> anyhow::Result<pb::CreateTokenResponse> {
        Ok(admin
            .create_token(pb::CreateTokenRequest {
                name: name.into(),
                role: role.into(),
            })
            .await?
            .into_inner())
    };
    let viewer = create("conformance-viewer", "viewer").await?.token;
    let submitter = create("conformance-submitter", "submitter").await?.token;
    let worker = create("conformance-worker", "worker").await?.token;
    let revoked = create("conformance-revoked", "viewer").await?;
    let id = revoked.info.context("no token info")?.id;
    let mut admin = t.jobs().await?;
    admin
        .revoke_token(pb::RevokeTokenRequest { id: id.clone() })
        .await?;
    let listed = admin
        .list_tokens(pb::ListTokensRequest {})
        .await?
        .into_inner()
        .tokens;
    ensure!(
        listed
            .iter()
            .any(|t| t.id == id && t.revoked_at_ms.is_some()),
        "the revoked token is not listed as revoked: {listed:?}"
    );
    ensure!(
        !listed.iter().any(|t| t.id.len() > 12),
        "a listing shows more than an id: {listed:?}"
    );
    let jobs_before = admin
        .list_jobs(pb::ListJobsRequest {})
        .await?
        .into_inner()
        .jobs;
    let tokens_before = listed.len();

    let holders = [
        (Holder::Nobody, None),
        (Holder::Wrong, Some("gantry_0000")),
        (Holder::Revoked, Some(revoked.token.as_str())),
        (Holder::Viewer, Some(viewer.as_str())),
        (Holder::Submitter, Some(submitter.as_str())),
        (Holder::Worker, Some(worker.as_str())),
        (Holder::Admin, t.token.as_deref()),
    ];
    let mut checked = 0;
    for (holder, token) in holders {
        let mut jobs = t.jobs_as(token).await?;
        let mut workers = t.workers_as(token).await?;
        let nope = || "no-such-job".to_string();
        let calls: Vec<(&str, Result<(), tonic::Status>)> = vec![
            (
                "SubmitJob",
                jobs.submit_job(pb::SubmitJobRequest {
                    spec_json: "{}".into(),
                })
                .await
                .map(drop),
            ),
            (
                "GetJob",
                jobs.get_job(pb::GetJobRequest { job_id: nope() })
                    .await
                    .map(drop),
            ),
            (
                "ListJobs",
                jobs.list_jobs(pb::ListJobsRequest {}).await.map(drop),
            ),
            (
                "CancelJob",
                jobs.cancel_job(pb::CancelJobRequest { job_id: nope() })
                    .await
                    .map(drop),
            ),
            (
                "ResumeJob",
                jobs.resume_job(pb::ResumeJobRequest {
                    job_id: nope(),
                    ..Default::default()
                })
                .await
                .map(drop),
            ),
            (
                "ListWorkers",
                jobs.list_workers(pb::ListWorkersRequest {}).await.map(drop),
            ),
            (
                "ListCheckpoints",
                jobs.list_checkpoints(pb::ListCheckpointsRequest { job_id: nope() })
                    .await
                    .map(drop),
            ),
            (
                "WatchJob",
                jobs.watch_job(pb::WatchJobRequest {
                    job_id: nope(),
                    after_seq: 0,
                    follow: false,
                })
                .await
                .map(drop),
            ),
            (
                "CreateToken",
                jobs.create_token(pb::CreateTokenRequest {
                    name: String::new(),
                    role: "viewer".into(),
                })
                .await
                .map(drop),
            ),
            (
                "ListTokens",
                jobs.list_tokens(pb::ListTokensRequest {}).await.map(drop),
            ),
            (
                "RevokeToken",
                jobs.revoke_token(pb::RevokeTokenRequest { id: nope() })
                    .await
                    .map(drop),
            ),
            (
                "Register",
                workers
                    .register(pb::RegisterRequest {
                        protocol_version: PROTOCOL_VERSION,
                        hostname: "conformance".into(),
                        slots: 0,
                        ..Default::default()
                    })
                    .await
                    .map(drop),
            ),
            ("Session", {
                let (tx, rx) = tokio::sync::mpsc::channel(1);
                tx.send(pb::WorkerMessage {
                    protocol_version: PROTOCOL_VERSION,
                    worker_id: "never-registered".into(),
                    body: Some(pb::worker_message::Body::Heartbeat(pb::Heartbeat {})),
                })
                .await?;
                workers.session(ReceiverStream::new(rx)).await.map(drop)
            }),
        ];
        for (method, result) in calls {
            let what = format!("{holder:?} calling {method}");
            match refusal(holder, method) {
                Some(code) => expect_code(result, code, &what)?,
                None => {
                    if let Err(s) = &result
                        && matches!(s.code(), Code::Unauthenticated | Code::PermissionDenied)
                    {
                        bail!("{what}: refused ({:?}: {})", s.code(), s.message());
                    }
                }
            }
            checked += 1;
        }
        let rendezvous = workers
            .rendezvous(pb::RendezvousRequest {
                protocol_version: PROTOCOL_VERSION,
                key: Some(pb::RankKey {
                    job_id: nope(),
                    attempt: 1,
                    rank: 0,
                }),
                address: "127.0.0.1:1".into(),
                nccl_groups: vec![],
                attempt_secret: token.unwrap_or_default().into(),
            })
            .await;
        expect_code(
            rendezvous,
            Code::Unauthenticated,
            &format!("{holder:?} calling Rendezvous with a token for a secret"),
        )?;
    }
    ensure!(checked == 7 * 13, "checked {checked} calls");
    let jobs_after = admin
        .list_jobs(pb::ListJobsRequest {})
        .await?
        .into_inner()
        .jobs;
    ensure!(
        jobs_after.len() == jobs_before.len(),
        "refused or invalid calls changed the jobs"
    );
    let tokens_after = admin
        .list_tokens(pb::ListTokensRequest {})
        .await?
        .into_inner();
    ensure!(
        tokens_after.tokens.len() == tokens_before,
        "refused or invalid calls changed the tokens"
    );
    Ok(())
}

/// A submitter may cancel and resume only the jobs its token's name submitted; the job records
/// who submitted and who cancelled it, in its status and its history.
pub async fn submitters_change_only_their_own_jobs(t: &Target) -> anyhow::Result<()> {
    let mut admin = t.jobs().await?;
    let mut token = async |name: &str, role: &str| -> anyhow::Result<String> {
        Ok(admin
            .create_token(pb::CreateTokenRequest {
                name: name.into(),
                role: role.into(),
            })
            .await?
            .into_inner()
            .token)
    };
    let alice = token("conformance-alice", "submitter").await?;
    let bob = token("conformance-bob", "submitter").await?;
    let viewer = token("conformance-reader", "viewer").await?;
    let job = t
        .jobs_as(Some(&alice))
        .await?
        .submit_job(pb::SubmitJobRequest {
            spec_json: spec("owned", 1),
        })
        .await?
        .into_inner();
    ensure!(
        job.submitted_by == "conformance-alice",
        "submitted_by {:?}",
        job.submitted_by
    );
    let cancel = |id: &str| pb::CancelJobRequest { job_id: id.into() };
    for (who, token) in [("bob", &bob), ("a viewer", &viewer)] {
        let r = t
            .jobs_as(Some(token))
            .await?
            .cancel_job(cancel(&job.id))
            .await;
        expect_code(
            r,
            Code::PermissionDenied,
            &format!("{who} cancelling alice's job"),
        )?;
        let r = t
            .jobs_as(Some(token))
            .await?
            .resume_job(pb::ResumeJobRequest {
                job_id: job.id.clone(),
                ..Default::default()
            })
            .await;
        expect_code(
            r,
            Code::PermissionDenied,
            &format!("{who} resuming alice's job"),
        )?;
    }
    let mut admin = t.jobs().await?;
    let state = admin
        .get_job(pb::GetJobRequest {
            job_id: job.id.clone(),
        })
        .await?
        .into_inner()
        .state;
    ensure!(
        state != pb::JobState::Cancelled as i32,
        "a refused cancel cancelled the job"
    );
    t.jobs_as(Some(&alice))
        .await?
        .cancel_job(cancel(&job.id))
        .await?;
    let mut history = admin
        .watch_job(pb::WatchJobRequest {
            job_id: job.id.clone(),
            after_seq: 0,
            follow: false,
        })
        .await?
        .into_inner();
    let mut lines = Vec::new();
    while let Some(event) = history.message().await? {
        if let Some(pb::job_event::Kind::Log(line)) = event.kind {
            lines.push(line.line);
        }
    }
    for expected in [
        "job submitted by conformance-alice",
        "job cancelled by conformance-alice",
    ] {
        ensure!(
            lines.iter().any(|l| l == expected),
            "no {expected:?} in the history: {lines:?}"
        );
    }
    Ok(())
}
