//! The GPU part of the suite: what a worker says of its GPUs, and what cuda ranks are given.

use crate::{FakeWorker, Target, expect_code, job, spec};
use anyhow::{Context, ensure};
use gantry_proto::PROTOCOL_VERSION;
use gantry_proto::v1 as pb;
use tonic::Code;

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

/// Ranks of a cuda job meet through the rendezvous with one NCCL unique id per group of their
/// mesh, each sent by the group's first member: every rank gets all of them once the table is
/// complete. An id for a group the sender does not lead, of the wrong size or sent twice is
/// INVALID_ARGUMENT and changes nothing.
pub async fn nccl_ids_reach_every_rank(t: &Target) -> anyhow::Result<()> {
    let mut w = FakeWorker::join_with_gpus(t, 4, 4).await?;
    let spec = spec("nccl", 2).replace(
        r#""parallel":{"dp":2}"#,
        r#""resources":{"device":"cuda"},"parallel":{"dp":2,"pp":2}"#,
    );
    let job = t
        .jobs()
        .await?
        .submit_job(pb::SubmitJobRequest { spec_json: spec })
        .await?
        .into_inner();
    let mut assigned = Vec::new();
    for _ in 0..4 {
        let a = w.next_assignment().await?;
        assigned.push((a.key.context("assignment without key")?, a.attempt_secret));
    }
    assigned.sort_by_key(|(k, _)| k.rank);
    let (keys, secrets): (Vec<_>, Vec<_>) = assigned.into_iter().unzip();
    // Mesh dp=2 pp=2 (rank = 2·pp + dp): the world, dp groups {0,1} {2,3}, pp groups {0,2}
    // {1,3}, and every rank alone as its tp group; each led by its first member.
    let led: [&[&[u32]]; 4] = [
        &[&[0, 1, 2, 3], &[0, 1], &[0], &[0, 2]],
        &[&[1], &[1, 3]],
        &[&[2, 3], &[2]],
        &[&[3]],
    ];
    let id = |members: &[u32]| -> Vec<u8> {
        let tag = members
            .iter()
            .fold(1u8, |a, &m| a.wrapping_mul(7).wrapping_add(m as u8));
        vec![tag; 128]
    };
    let group = |members: &[u32], unique_id: Vec<u8>| pb::NcclGroupId {
        members: members.to_vec(),
        unique_id,
    };
    let request = |rank: usize, nccl_groups: Vec<pb::NcclGroupId>| pb::RendezvousRequest {
        protocol_version: PROTOCOL_VERSION,
        key: Some(keys[rank].clone()),
        address: format!("10.0.0.{rank}"),
        nccl_groups,
        attempt_secret: secrets[rank].clone(),
    };
    let mine = |rank: usize| -> Vec<pb::NcclGroupId> {
        led[rank].iter().map(|m| group(m, id(m))).collect()
    };
    let mut workers = t.workers().await?;
    for rank in 0..3 {
        let table = workers
            .rendezvous(request(rank, mine(rank)))
            .await?
            .into_inner();
        ensure!(
            table.peers.is_empty(),
            "table before rank 3 reported: {table:?}"
        );
    }
    let bad = [
        (
            1,
            vec![group(&[0, 1], id(&[0, 1]))],
            "a group rank 1 does not lead",
        ),
        (2, vec![group(&[2, 3], vec![1, 2, 3])], "an id of 3 bytes"),
        (
            0,
            vec![group(&[0], id(&[0])), group(&[0], id(&[0]))],
            "a group twice",
        ),
        (
            3,
            vec![group(&[3, 4], id(&[3, 4]))],
            "a group outside the world",
        ),
    ];
    for (rank, groups, what) in bad {
        let r = workers.rendezvous(request(rank, groups)).await;
        expect_code(r, Code::InvalidArgument, what)?;
    }
    let table = workers.rendezvous(request(3, mine(3))).await?.into_inner();
    ensure!(table.peers.len() == 4, "peer table {table:?}");
    let mut got: Vec<(Vec<u32>, Vec<u8>)> = table
        .nccl_groups
        .into_iter()
        .map(|g| (g.members, g.unique_id))
        .collect();
    got.sort();
    let mut want: Vec<(Vec<u32>, Vec<u8>)> = led
        .iter()
        .flat_map(|groups| groups.iter().map(|m| (m.to_vec(), id(m))))
        .collect();
    want.sort();
    ensure!(
        got == want,
        "NCCL groups handed out: {got:?}, sent: {want:?}"
    );
    let again = workers.rendezvous(request(0, mine(0))).await?.into_inner();
    ensure!(
        again.nccl_groups.len() == 9,
        "rank 0 asking again: {again:?}"
    );
    t.jobs()
        .await?
        .cancel_job(pb::CancelJobRequest { job_id: job.id })
        .await?;
    Ok(())
}
