//! What one client may ask: a spec or a message over the limit, more watch streams than its
//! share, or more requests than the rate limit are RESOURCE_EXHAUSTED, change nothing, and are
//! counted in the metrics; the coordinator goes on serving.

use gantry_coordinator::service::Limits;
use gantry_coordinator::{Coordinator, Options};
use gantry_proto::v1 as pb;
use tokio_util::sync::CancellationToken;
use tonic::Code;

struct Running {
    dir: tempfile::TempDir,
    url: String,
    shutdown: CancellationToken,
    metrics: std::net::SocketAddr,
}

impl Running {
    async fn start(tune: impl FnOnce(&mut Options)) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let metrics = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        let mut options = Options::new("127.0.0.1:0".parse().unwrap(), dir.path().to_path_buf());
        options.metrics_listen = Some(metrics);
        tune(&mut options);
        let shutdown = CancellationToken::new();
        let c = Coordinator::start(options, shutdown.clone()).await.unwrap();
        Self {
            url: format!("https://{}", c.addr),
            dir,
            shutdown,
            metrics,
        }
    }

    async fn jobs(&self) -> pb::job_service_client::JobServiceClient<gantry_proto::Authed> {
        let ca = std::fs::read(self.dir.path().join("tls/ca.pem")).unwrap();
        let token = std::fs::read_to_string(self.dir.path().join("admin.token")).unwrap();
        let channel = gantry_proto::endpoint(&self.url, Some(&ca))
            .unwrap()
            .connect()
            .await
            .unwrap();
        let bearer = gantry_proto::Bearer::new(Some(token.trim())).unwrap();
        gantry_proto::job_client(channel, bearer)
    }

    /// The `gantry_rpc_refused` count for `method` and `code`.
    fn refused(&self, method: &str, code: &str) -> f64 {
        use std::io::{Read, Write};
        let mut stream = std::net::TcpStream::connect(self.metrics).unwrap();
        write!(stream, "GET /metrics HTTP/1.0\r\nHost: x\r\n\r\n").unwrap();
        let mut text = String::new();
        stream.read_to_string(&mut text).unwrap();
        let series = format!("gantry_rpc_refused_total{{method=\"{method}\",code=\"{code}\"}} ");
        text.lines()
            .find_map(|l| l.strip_prefix(&series))
            .map_or(0.0, |v| v.trim().parse().unwrap())
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

fn spec_of(bytes: usize) -> String {
    let name = "x".repeat(bytes);
    format!(
        r#"{{"name":"{name}","model":{{"kind":"mlp"}},"train":{{"steps":1,"global_batch":8,"lr":0.1}}}}"#
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_spec_or_a_message_over_the_limit_is_resource_exhausted_and_changes_nothing() {
    let c = Running::start(|o| {
        o.limits.max_spec_bytes = 4_096;
        o.max_message_bytes = 64 << 10;
    })
    .await;
    let mut jobs = c.jobs().await;
    for (bytes, method_refused) in [(8_000, "spec_json"), (100_000, "")] {
        let r = jobs
            .submit_job(pb::SubmitJobRequest {
                spec_json: spec_of(bytes),
            })
            .await;
        let status = r.unwrap_err();
        assert_eq!(
            status.code(),
            Code::ResourceExhausted,
            "{bytes}: {status:?}"
        );
        assert!(status.message().contains(method_refused), "{status:?}");
    }
    let listed = jobs.list_jobs(pb::ListJobsRequest {}).await.unwrap();
    assert!(
        listed.into_inner().jobs.is_empty(),
        "a refused spec was stored"
    );
    assert_eq!(
        c.refused("/gantry.v1.JobService/SubmitJob", "ResourceExhausted"),
        2.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_holds_at_most_its_share_of_watch_streams() {
    let c = Running::start(|o| {
        o.limits = Limits {
            max_watch_streams: 2,
            ..Limits::default()
        };
    })
    .await;
    let mut jobs = c.jobs().await;
    let job = jobs
        .submit_job(pb::SubmitJobRequest {
            spec_json: spec_of(4),
        })
        .await
        .unwrap()
        .into_inner();
    let watch = || pb::WatchJobRequest {
        job_id: job.id.clone(),
        after_seq: 0,
        follow: true,
    };
    let first = jobs.watch_job(watch()).await.unwrap();
    let second = jobs.watch_job(watch()).await.unwrap();
    let third = jobs.watch_job(watch()).await.unwrap_err();
    assert_eq!(third.code(), Code::ResourceExhausted, "{third:?}");
    // Closing one frees its slot, as soon as the server sees the stream reset.
    drop(first);
    let mut reopened = None;
    for _ in 0..50 {
        match jobs.watch_job(watch()).await {
            Ok(s) => {
                reopened = Some(s);
                break;
            }
            Err(s) => assert_eq!(s.code(), Code::ResourceExhausted),
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert!(
        reopened.is_some(),
        "the closed stream's slot was never freed"
    );
    drop(second);
    assert!(c.refused("/gantry.v1.JobService/WatchJob", "ResourceExhausted") >= 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_over_the_rate_limit_is_refused_and_the_server_goes_on() {
    let c = Running::start(|o| {
        o.rate_limit_per_sec = 5;
        o.rate_limit_burst = 5;
    })
    .await;
    let mut jobs = c.jobs().await;
    let mut codes = Vec::new();
    for _ in 0..20 {
        codes.push(
            jobs.list_jobs(pb::ListJobsRequest {})
                .await
                .map_or_else(|s| s.code(), |_| Code::Ok),
        );
    }
    let refused = codes
        .iter()
        .filter(|&&c| c == Code::ResourceExhausted)
        .count();
    assert!(refused >= 10, "{codes:?}");
    assert!(codes[..5].iter().all(|&c| c == Code::Ok), "{codes:?}");
    assert_eq!(
        c.refused("/gantry.v1.JobService/ListJobs", "ResourceExhausted"),
        refused as f64
    );
    // The quota refills.
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    jobs.list_jobs(pb::ListJobsRequest {}).await.unwrap();
}
