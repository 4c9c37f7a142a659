//! `cuda` jobs through the core, with virtual workers that report GPUs (or none): where their
//! ranks go, which GPU each gets, why they wait, and when a GPU is free again.

use crate::convert;
use crate::core::{Core, CoreOptions, RankExit, RankKey, Registration, WorkerReport};
use crate::state::{Gpu, JobState};
use crate::store::Store;
use gantry_core::{Attempt, JobId, Rank, WorkerId};
use gantry_proto::v1 as pb;
use std::collections::HashSet;
use tokio::sync::mpsc;

type Inbox = mpsc::UnboundedReceiver<crate::core::WorkerCommand>;

const GIB: u64 = 1 << 30;

fn core() -> Core {
    let options = CoreOptions {
        default_checkpoint_url: "file:///tmp/gantry-core-gpu-tests".into(),
        heartbeat_interval_ms: 100,
        lease_ttl_ms: 1_000,
        allowed_stores: Vec::new(),
    };
    Core::load(Store::in_memory().unwrap(), options, 0).unwrap()
}

fn cuda_spec(dp: u32, tp: u32) -> String {
    format!(
        r#"{{"name":"g","model":{{"kind":"gpt","layers":2,"d_model":64,"heads":4}},"data":{{"seq_len":16}},"train":{{"steps":10,"global_batch":8,"lr":0.1}},"parallel":{{"dp":{dp},"tp":{tp}}},"resources":{{"device":"cuda"}},"fault_tolerance":{{"max_restarts":0}}}}"#
    )
}

fn cpu_spec(dp: u32) -> String {
    format!(
        r#"{{"name":"c","model":{{"kind":"mlp"}},"train":{{"steps":10,"global_batch":8,"lr":0.1}},"parallel":{{"dp":{dp}}}}}"#
    )
}

/// A connected worker with `slots` slots and a GPU of `gpu_gib` GiB for each entry (0: size
/// not said).
fn join(core: &mut Core, name: &str, slots: u32, gpu_gib: &[u64]) -> (WorkerId, Inbox) {
    let gpus = gpu_gib
        .iter()
        .enumerate()
        .map(|(i, gib)| Gpu {
            index: i as u32,
            name: "test gpu".into(),
            memory_bytes: gib * GIB,
        })
        .collect();
    let registration = Registration {
        worker_id: Some(WorkerId(name.into())),
        hostname: name.into(),
        slots,
        gpus,
        ..Registration::default()
    };
    let id = core.register(registration, 0).unwrap();
    let (tx, rx) = mpsc::unbounded_channel();
    core.open_session(&id, tx, 0).unwrap();
    (id, rx)
}

/// The assignments in `inbox` as the worker receives them: (job, rank, gpu).
fn assigned(inbox: &mut Inbox) -> Vec<(String, u32, Option<u32>)> {
    let mut out = Vec::new();
    while let Ok(command) = inbox.try_recv() {
        if let Some(pb::coordinator_message::Body::Assign(a)) = convert::command(command).body {
            let key = a.key.unwrap();
            out.push((key.job_id, key.rank, a.gpu));
        }
    }
    out
}

fn pending_reason(core: &Core, job: &JobId) -> Option<String> {
    match &core.job(job).unwrap().state {
        JobState::Pending { reason } => reason.clone(),
        other => panic!("{job} should be pending, is {other:?}"),
    }
}

fn succeeded(job: &JobId, attempt: u64, rank: u32) -> WorkerReport {
    WorkerReport::Exited(RankExit {
        key: RankKey {
            job: job.clone(),
            attempt: Attempt(attempt),
            rank: Rank(rank),
        },
        exit_code: Some(0),
        signal: None,
        message: String::new(),
        stopped: false,
    })
}

#[test]
fn a_cuda_job_on_a_cpu_only_cluster_stays_pending_and_says_why() {
    let mut core = core();
    let mut inboxes: Vec<Inbox> = ["a", "b", "c"]
        .iter()
        .map(|n| join(&mut core, n, 4, &[]).1)
        .collect();
    let cuda = core.submit(&cuda_spec(2, 1), 1).unwrap().id;
    let cpu = core.submit(&cpu_spec(2), 2).unwrap().id;
    core.tick(3).unwrap();
    assert_eq!(
        pending_reason(&core, &cuda).as_deref(),
        Some("needs 2 GPUs (cuda), 0 free on 3 workers")
    );
    // The cpu job behind it is not held up.
    assert!(matches!(
        core.job(&cpu).unwrap().state,
        JobState::Scheduled { .. }
    ));
    let sent: Vec<_> = inboxes.iter_mut().flat_map(assigned).collect();
    assert!(
        sent.iter()
            .all(|(job, _, gpu)| job == &cpu.0 && gpu.is_none())
    );
}

#[test]
fn cuda_ranks_land_on_gpu_workers_each_on_its_own_gpu_and_free_it_when_they_end() {
    let mut core = core();
    let (_, mut cpu_box) = join(&mut core, "cpu", 8, &[]);
    let (g, mut gpu_box) = join(&mut core, "gpu", 8, &[80, 80]);
    let first = core.submit(&cuda_spec(2, 1), 1).unwrap().id;
    let second = core.submit(&cuda_spec(1, 1), 2).unwrap().id;
    core.tick(3).unwrap();
    assert_eq!(assigned(&mut cpu_box), []);
    let mut got = assigned(&mut gpu_box);
    got.sort();
    assert_eq!(
        got,
        [(first.0.clone(), 0, Some(0)), (first.0.clone(), 1, Some(1))]
    );
    assert_eq!(core.job(&first).unwrap().state.gpus(), [0, 1]);
    // Both GPUs are held, though the cpu worker has slots and the gpu worker has more.
    assert_eq!(
        pending_reason(&core, &second).as_deref(),
        Some("needs 1 GPUs (cuda), 0 free on 2 workers")
    );
    // Once the first job's ranks end, its GPUs go to the second.
    for rank in 0..2 {
        core.on_worker_message(&g, succeeded(&first, 1, rank), 10)
            .unwrap();
    }
    core.tick(11).unwrap();
    assert_eq!(core.job(&first).unwrap().state, JobState::Succeeded);
    assert_eq!(assigned(&mut gpu_box), [(second.0.clone(), 0, Some(0))]);
}

#[test]
fn each_tensor_parallel_group_shares_one_worker_and_no_gpu_is_given_twice() {
    let mut core = core();
    let (_, mut a) = join(&mut core, "a", 4, &[40, 40, 40]);
    let (_, mut b) = join(&mut core, "b", 4, &[40, 40, 40]);
    // Two groups of 2: one on each worker (3 GPUs each hold one group, not two).
    let tp = core.submit(&cuda_spec(2, 2), 1).unwrap().id;
    // Then a job of 2 single ranks takes the GPU left on each.
    let dp = core.submit(&cuda_spec(2, 1), 2).unwrap().id;
    core.tick(3).unwrap();
    let on_a = assigned(&mut a);
    let on_b = assigned(&mut b);
    for (inbox, name) in [(&on_a, "a"), (&on_b, "b")] {
        let gpus: HashSet<u32> = inbox.iter().map(|(_, _, g)| g.unwrap()).collect();
        assert_eq!(gpus.len(), inbox.len(), "a GPU of {name} given twice");
        assert_eq!(gpus, HashSet::from([0, 1, 2]));
    }
    let tp_ranks = |inbox: &[(String, u32, Option<u32>)]| -> Vec<u32> {
        let mut r: Vec<u32> = inbox
            .iter()
            .filter(|(j, _, _)| j == &tp.0)
            .map(|(_, r, _)| *r)
            .collect();
        r.sort();
        r
    };
    let groups = [tp_ranks(&on_a), tp_ranks(&on_b)];
    assert!(
        groups == [vec![0, 1], vec![2, 3]] || groups == [vec![2, 3], vec![0, 1]],
        "{groups:?}"
    );
    assert!(matches!(
        core.job(&dp).unwrap().state,
        JobState::Scheduled { .. }
    ));
}

#[test]
fn a_cuda_job_too_big_for_every_gpu_is_refused_and_one_that_fits_a_big_gpu_waits_for_it() {
    let mut core = core();
    let huge = r#"{"name":"big","model":{"kind":"gpt","layers":48,"d_model":2048,"heads":16},"data":{"seq_len":512},"train":{"steps":10,"global_batch":64,"lr":0.1},"resources":{"device":"cuda"}}"#;
    // GPUs of unknown size refuse nothing (and this job takes the only one).
    join(&mut core, "declared", 1, &[0]);
    assert!(core.submit(huge, 1).is_ok());
    join(&mut core, "small", 1, &[8]);
    let err = core.submit(huge, 2).unwrap_err().to_string();
    assert!(err.contains("the largest GPU has 8.0 GiB"), "{err}");
    // A big GPU anywhere admits it; placement then skips the small one.
    let (_, mut big) = join(&mut core, "big", 1, &[8, 400]);
    let job = core.submit(huge, 3).unwrap().id;
    core.tick(4).unwrap();
    let on_big = assigned(&mut big);
    assert!(on_big.contains(&(job.0.clone(), 0, Some(1))), "{on_big:?}");
}

#[test]
fn stored_placements_read_with_or_without_gpus() {
    let running = JobState::Running {
        placement: vec![WorkerId("w".into())],
        gpus: vec![3],
    };
    let json = serde_json::to_string(&running).unwrap();
    assert_eq!(serde_json::from_str::<JobState>(&json).unwrap(), running);
    let old: JobState = serde_json::from_str(r#"{"state":"Running","placement":["w"]}"#).unwrap();
    assert_eq!(old.gpus(), [] as [u32; 0]);
}
