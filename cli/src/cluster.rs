//! `gantry up` and `gantry demo`: a local cluster in this process.

use crate::failure::{Failure, Remote, connect};
use crate::follow::follow_job;
use crate::{local, render};
use gantry_core::JobSpec;
use gantry_proto::v1 as pb;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Instant;
use tokio_util::sync::CancellationToken;

const EXAMPLE_GPT_DP2: &str = include_str!("../../deploy/examples/gpt-dp2.toml");

/// `gantry up`: a coordinator and `workers` daemons, until Ctrl-C.
pub async fn up(
    workers: u32,
    slots_per_worker: u32,
    state_dir: &Path,
    listen: SocketAddr,
    insecure: bool,
) -> Result<i32, Failure> {
    let shutdown = CancellationToken::new();
    let cluster = local::LocalCluster::start(
        listen,
        state_dir,
        workers,
        slots_per_worker,
        shutdown.clone(),
        insecure,
    )
    .await
    .map_err(|e| Failure::usage(format!("{e:#}")))?;
    println!(
        "gantry is up: coordinator {} with {workers} worker(s) × {slots_per_worker} slot(s); state in {}",
        cluster.url,
        state_dir.display()
    );
    let token = state_dir.join("admin.token");
    let token_flag = if insecure {
        eprintln!(
            "WARNING: --insecure: plain TCP and no tokens. Anyone who can reach {listen} can \
             submit jobs, and so run code on this machine, cancel them and register workers."
        );
        String::new()
    } else if state_dir == Path::new(".gantry") {
        String::new() // the CLI reads .gantry/admin.token and .gantry/tls/ca.pem by default
    } else {
        format!(
            " --token-file {} --ca-cert {}",
            token.display(),
            state_dir.join("tls/ca.pem").display()
        )
    };
    if !insecure {
        println!(
            "admin token in {} (readable by you alone); other users get theirs from `gantry token create NAME`",
            token.display()
        );
    }
    println!(
        "submit with: gantry --coordinator {}{token_flag} submit deploy/examples/mlp-dp2.toml --wait",
        cluster.url
    );
    tokio::signal::ctrl_c().await.ok();
    println!("stopping");
    shutdown.cancel();
    cluster.stopped().await?;
    Ok(0)
}

/// `gantry demo`: `up` with two workers, the example job followed to its end, a summary.
pub async fn demo(state_dir: &Path, set: &[String]) -> Result<i32, Failure> {
    let shutdown = CancellationToken::new();
    let cluster = local::LocalCluster::start(
        "127.0.0.1:0".parse().expect("valid"),
        state_dir,
        2,
        1,
        shutdown.clone(),
        false,
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
    let remote = Remote {
        url: cluster.url.clone(),
        bearer: gantry_proto::Bearer::new(cluster.admin_token.as_deref())
            .map_err(|e| Failure::usage(format!("admin.token: {e}")))?,
        ca: cluster.ca.clone(),
    };
    let mut client = connect(&remote).await?;
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
