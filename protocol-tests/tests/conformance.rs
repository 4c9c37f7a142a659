//! The conformance suite against a fresh in-process coordinator per case (bound on port 0).

use gantry_coordinator::{Coordinator, Options};
use gantry_protocol_tests::{self as suite, Target};
use tokio_util::sync::CancellationToken;

async fn coordinator() -> (Target, CancellationToken, tempfile::TempDir) {
    let (target, shutdown, dir) = started(false).await;
    // Secure by default: the coordinator wrote its admin token and CA beside its database.
    let token = std::fs::read_to_string(dir.path().join("admin.token")).unwrap();
    let target = Target {
        url: target.url.replace("http://", "https://"),
        token: Some(token.trim().to_string()),
        ca: Some(std::fs::read(dir.path().join("tls/ca.pem")).unwrap()),
    };
    (target, shutdown, dir)
}

/// A fresh in-process coordinator with short leases; `insecure` as `--insecure`.
async fn started(insecure: bool) -> (Target, CancellationToken, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let shutdown = CancellationToken::new();
    let c = Coordinator::start(
        Options {
            heartbeat_interval_ms: 100,
            lease_ttl_ms: 1_000,
            insecure,
            ..Options::new("127.0.0.1:0".parse().unwrap(), dir.path().to_path_buf())
        },
        shutdown.clone(),
    )
    .await
    .unwrap();
    let target = Target {
        url: format!("http://{}", c.addr),
        token: None,
        ca: None,
    };
    (target, shutdown, dir)
}

macro_rules! case {
    ($name:ident) => {
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn $name() {
            let (target, shutdown, _dir) = coordinator().await;
            suite::$name(&target).await.unwrap();
            shutdown.cancel();
        }
    };
}

case!(registration_and_version_mismatch);
case!(invalid_input_changes_nothing);
case!(job_lifecycle);
case!(cancel_stops_ranks);
case!(rank_exit_restarts);
case!(lease_expiry_loses_the_worker);
case!(cuda_ranks_get_gpus_of_their_own);
case!(nccl_ids_reach_every_rank);
case!(every_method_checks_its_callers_token_and_role);
case!(submitters_change_only_their_own_jobs);
case!(workers_hold_credentials_of_their_own);

/// `--insecure`: plain TCP and no tokens; the suite's lifecycle runs as an anonymous admin.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_insecure_coordinator_serves_plain_tcp_without_tokens() {
    let (target, shutdown, dir) = started(true).await;
    assert!(!dir.path().join("admin.token").exists() && !dir.path().join("tls").exists());
    suite::job_lifecycle(&target).await.unwrap();
    suite::registration_and_version_mismatch(&target)
        .await
        .unwrap();
    shutdown.cancel();
}
