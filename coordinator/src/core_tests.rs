//! The core driven directly, with virtual workers and an injected clock: no sockets, no sleeps.

use crate::core::{Core, CoreOptions, RankExit, RankKey, WorkerReport};
use crate::state::JobState;
use crate::store::Store;
use gantry_core::{JobId, WorkerId};
use gantry_proto::v1 as pb;
use tokio::sync::mpsc;

type Inbox = mpsc::UnboundedReceiver<Result<pb::CoordinatorMessage, tonic::Status>>;

fn options() -> CoreOptions {
    CoreOptions {
        default_checkpoint_url: "file:///tmp/gantry-core-tests".into(),
        heartbeat_interval_ms: 100,
        lease_ttl_ms: 1_000,
    }
}

fn spec(dp: u32) -> String {
    format!(
        r#"{{"name":"j","model":{{"kind":"mlp"}},"train":{{"steps":10,"global_batch":8,"lr":0.1}},"parallel":{{"dp":{dp}}},"fault_tolerance":{{"max_restarts":1}}}}"#
    )
}

fn join(core: &mut Core, name: &str, now: i64) -> (WorkerId, Inbox) {
    let id = core
        .register(
            Some(WorkerId(name.into())),
            "host".into(),
            1,
            vec![],
            0,
            now,
        )
        .unwrap();
    let (tx, rx) = mpsc::unbounded_channel();
    core.open_session(&id, tx, now).unwrap();
    (id, rx)
}

fn assignments(inbox: &mut Inbox) -> Vec<pb::RankKey> {
    let mut out = Vec::new();
    while let Ok(Ok(msg)) = inbox.try_recv() {
        if let Some(pb::coordinator_message::Body::Assign(a)) = msg.body {
            out.push(a.key.unwrap());
        }
    }
    out
}

fn key(job: &JobId, attempt: u64, rank: u32) -> RankKey {
    RankKey {
        job: job.clone(),
        attempt,
        rank,
    }
}

#[test]
fn a_job_waits_with_a_reason_until_workers_join() {
    let mut core = Core::load(Store::in_memory().unwrap(), options(), 0).unwrap();
    let job = core.submit(&spec(2), 0).unwrap().id;
    match &core.job(&job).unwrap().state {
        JobState::Pending { reason, .. } => {
            assert_eq!(reason.as_deref(), Some("needs 2 slots, 0 free"))
        }
        other => panic!("{other:?}"),
    }
    let (_, mut a) = join(&mut core, "a", 1);
    core.tick(2).unwrap();
    assert!(
        core.job(&job).unwrap().state.wants_slots(),
        "one slot is not enough"
    );
    let (_, mut b) = join(&mut core, "b", 3);
    core.tick(4).unwrap();
    assert!(matches!(
        core.job(&job).unwrap().state,
        JobState::Scheduled { .. }
    ));
    let ranks: Vec<u32> = assignments(&mut a)
        .into_iter()
        .chain(assignments(&mut b))
        .map(|k| k.rank)
        .collect();
    assert_eq!(ranks.len(), 2);
    assert!(ranks.contains(&0) && ranks.contains(&1));
}

#[test]
fn an_expired_lease_ends_the_attempt_and_the_job_restarts_elsewhere() {
    let mut core = Core::load(Store::in_memory().unwrap(), options(), 0).unwrap();
    let (a, mut inbox_a) = join(&mut core, "a", 0);
    let job = core.submit(&spec(1), 0).unwrap().id;
    assert_eq!(
        assignments(&mut inbox_a),
        vec![pb::RankKey {
            job_id: job.0.clone(),
            attempt: 1,
            rank: 0
        }]
    );
    let (b, mut inbox_b) = join(&mut core, "b", 500);

    // b keeps heartbeating; a goes silent. Nothing happens before a's lease runs out…
    core.on_worker_message(&b, WorkerReport::Heartbeat, 900)
        .unwrap();
    core.tick(999).unwrap();
    assert_eq!(core.job(&job).unwrap().attempt, 1);
    // …and at 1000 ms a is lost, attempt 1 ends and attempt 2 goes to b.
    core.on_worker_message(&b, WorkerReport::Heartbeat, 1000)
        .unwrap();
    core.tick(1000).unwrap();
    let j = core.job(&job).unwrap();
    assert_eq!((j.attempt, j.restarts), (2, 1));
    assert!(
        !core
            .workers()
            .iter()
            .find(|(w, _)| w.id == a)
            .unwrap()
            .0
            .is_alive()
    );
    assert_eq!(assignments(&mut inbox_b)[0].attempt, 2);

    // A late exit from attempt 1 is ignored (fencing); attempt 2's failure exhausts the budget.
    let exit = |attempt, code| {
        WorkerReport::Exited(RankExit {
            key: key(&job, attempt, 0),
            exit_code: Some(code),
            signal: None,
            message: String::new(),
            stopped: false,
        })
    };
    core.on_worker_message(&b, exit(1, 1), 1100).unwrap();
    assert_eq!(core.job(&job).unwrap().attempt, 2);
    // …but kept in the history, since it may be the real cause of attempt 1's end.
    let history = core.events_after(&job, 0, 100).unwrap();
    assert!(history.iter().any(|e| {
        e.line
            .contains("attempt 1: rank 0 exited with code 1 (reported after")
    }));
    core.on_worker_message(&b, exit(2, 1), 1200).unwrap();
    match &core.job(&job).unwrap().state {
        JobState::Failed { error } => {
            assert!(error.contains("rank 0 exited with code 1"), "{error}")
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn a_reloaded_core_keeps_jobs_attempts_and_checkpoints() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("state.db");
    let job = {
        let mut core = Core::load(Store::open(&db).unwrap(), options(), 0).unwrap();
        let (w, _inbox) = join(&mut core, "w", 0);
        let job = core.submit(&spec(1), 0).unwrap().id;
        let report = WorkerReport::Checkpoint {
            key: key(&job, 1, 0),
            step: 5,
            url: "file:///x".into(),
            size_bytes: 9,
            deleted_steps: vec![],
        };
        core.on_worker_message(&w, report, 10).unwrap();
        // A stale attempt's checkpoint neither moves the job's checkpoint nor deletes any.
        let stale = WorkerReport::Checkpoint {
            key: key(&job, 7, 0),
            step: 9,
            url: "file:///y".into(),
            size_bytes: 9,
            deleted_steps: vec![5],
        };
        core.on_worker_message(&w, stale, 11).unwrap();
        job
    };
    let core = Core::load(Store::open(&db).unwrap(), options(), 20).unwrap();
    let j = core.job(&job).unwrap();
    assert!(matches!(j.state, JobState::Scheduled { .. }));
    assert_eq!(j.last_checkpoint.as_ref().map(|c| c.step), Some(5));
    let attempts = core.attempts(&job).unwrap();
    assert_eq!(
        (
            attempts.len(),
            attempts[0].attempt,
            attempts[0].outcome.as_deref()
        ),
        (1, 1, None)
    );
    assert_eq!(core.checkpoints(&job).unwrap().len(), 1);
    assert!(core.events_after(&job, 0, 100).unwrap().len() >= 2);
    // Workers come back with a fresh lease, to give them time to reconnect.
    assert!(
        core.workers()
            .iter()
            .all(|(w, _)| !w.lease_expired(20 + 999))
    );
}

#[test]
fn a_job_too_big_for_the_workers_memory_is_refused_with_the_knobs_to_turn() {
    let mut core = Core::load(Store::in_memory().unwrap(), options(), 0).unwrap();
    // No worker has said how much memory it has: nothing to check against.
    let huge = r#"{"name":"big","model":{"kind":"gpt","layers":48,"d_model":2048,"heads":16},"data":{"seq_len":512},"train":{"steps":10,"global_batch":64,"lr":0.1}}"#;
    assert!(core.submit(huge, 0).is_ok());
    core.register(None, "small".into(), 2, vec![], 8 << 30, 1)
        .unwrap();
    let err = core.submit(huge, 2).unwrap_err().to_string();
    assert!(
        err.contains("resources") && err.contains("activation_checkpointing"),
        "{err}"
    );
    assert_eq!(core.jobs().len(), 1, "nothing stored");
    // The small default job fits.
    assert!(core.submit(&spec(1), 3).is_ok());
}
