//! The standard gRPC health service: SERVING while the coordinator runs, NOT_SERVING from the
//! moment shutdown starts until the server stops `drain_ms` later.

use gantry_coordinator::{Coordinator, Options};
use std::time::Duration;
use tokio_util::sync::CancellationToken;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

#[tokio::test]
async fn health_turns_not_serving_when_shutdown_starts() {
    let dir = tempfile::tempdir().unwrap();
    let shutdown = CancellationToken::new();
    let coordinator = Coordinator::start(
        Options {
            drain_ms: 1_000,
            ..Options::new("127.0.0.1:0".parse().unwrap(), dir.path().to_path_buf())
        },
        shutdown.clone(),
    )
    .await
    .unwrap();
    // Over TLS, verified with the CA the coordinator made; no token: health is open.
    let ca = std::fs::read(dir.path().join("tls/ca.pem")).unwrap();
    let channel = gantry_proto::endpoint(&format!("https://{}", coordinator.addr), Some(&ca))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut health = HealthClient::new(channel);
    let status = |service: &str| HealthCheckRequest {
        service: service.into(),
    };
    for service in ["", "gantry.v1.JobService", "gantry.v1.WorkerService"] {
        let r = health.check(status(service)).await.unwrap().into_inner();
        assert_eq!(r.status(), ServingStatus::Serving, "{service:?}");
    }
    shutdown.cancel();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let r = health.check(status("")).await.unwrap().into_inner();
    assert_eq!(r.status(), ServingStatus::NotServing);
    // After the drain the server is gone.
    coordinator.task.await.unwrap().unwrap();
    assert!(health.check(status("")).await.is_err());
}
