//! The GPU part of the suite: what a worker says of its GPUs, and what cuda ranks are given.

use crate::{FakeWorker, Target, job, spec};
use anyhow::{Context, ensure};
use gantry_proto::v1 as pb;

/// A worker's GPUs are listed, each rank of a cuda job is assigned one of them, none twice, and
/// a cuda job with no GPU free waits with a reason that says so.
pub async fn cuda_ranks_get_gpus_of_their_own(t: &Target) -> anyhow::Result<()> {
    let mut w = FakeWorker::join_with_gpus(t, 4, 2).await?;
    let cuda = |name: &str, dp: u32| {
        spec(name, dp).replace(
            r#""parallel""#,
            r#""resources":{"device":"cuda"},"parallel""#,
        )
    };
    let mut jobs = t.jobs().await?;
    let listed = jobs
        .list_workers(pb::ListWorkersRequest {})
        .await?
        .into_inner();
    let me = listed
        .workers
        .iter()
        .find(|x| x.id == w.id)
        .context("not listed")?;
    ensure!(
        me.gpus.len() == 2 && me.devices.contains(&"cuda".to_string()),
        "listed as {me:?}"
    );
    let first = jobs
        .submit_job(pb::SubmitJobRequest {
            spec_json: cuda("gpus", 2),
        })
        .await?
        .into_inner();
    let mut gpus = Vec::new();
    for _ in 0..2 {
        let a = w.next_assignment().await?;
        ensure!(
            a.key.as_ref().is_some_and(|k| k.job_id == first.id),
            "{a:?}"
        );
        gpus.push(a.gpu.context("a cuda rank assigned without a GPU")?);
    }
    gpus.sort();
    ensure!(gpus == [0, 1], "GPUs assigned: {gpus:?}");
    let second = jobs
        .submit_job(pb::SubmitJobRequest {
            spec_json: cuda("no-gpu-left", 1),
        })
        .await?
        .into_inner();
    let waiting = job(t, &second.id).await?;
    ensure!(
        waiting.state == pb::JobState::Pending as i32
            && waiting
                .pending_reason
                .as_deref()
                .is_some_and(|r| r.starts_with("needs 1 GPUs (cuda), 0 free on")),
        "{waiting:?}"
    );
    for id in [first.id, second.id] {
        jobs.cancel_job(pb::CancelJobRequest { job_id: id }).await?;
    }
    Ok(())
}
