//! The core driven directly, with virtual workers and an injected clock: no sockets, no sleeps.

use crate::convert;
use crate::core::{
    Core, CoreOptions, RankExit, RankKey, Registration, WorkerCommand, WorkerReport,
};
use crate::state::JobState;
use crate::store::Store;
use gantry_core::{Attempt, JobId, Rank, WorkerId};
use gantry_proto::v1 as pb;
use tokio::sync::mpsc;

type Inbox = mpsc::UnboundedReceiver<WorkerCommand>;

fn options() -> CoreOptions {
    CoreOptions {
        default_checkpoint_url: "file:///tmp/gantry-core-tests".into(),
        heartbeat_interval_ms: 100,
        lease_ttl_ms: 1_000,
        allowed_stores: Vec::new(),
    }
}

fn spec(dp: u32) -> String {
    format!(
        r#"{{"name":"j","model":{{"kind":"mlp"}},"train":{{"steps":10,"global_batch":8,"lr":0.1}},"parallel":{{"dp":{dp}}},"fault_tolerance":{{"max_restarts":1,"restart_backoff_secs":0}}}}"#
    )
}

fn join(core: &mut Core, name: &str, now: i64) -> (WorkerId, Inbox) {
    let id = core
        .register(
            Registration {
                worker_id: Some(WorkerId(name.into())),
                hostname: "host".into(),
                slots: 1,
                ..Registration::default()
            },
            now,
        )
        .unwrap();
    let (tx, rx) = mpsc::unbounded_channel();
    core.open_session(&id, tx, now).unwrap();
    (id, rx)
}

fn assignments(inbox: &mut Inbox) -> Vec<pb::RankKey> {
    let mut out = Vec::new();
    while let Ok(command) = inbox.try_recv() {
        // As its worker receives it, so the encoding is checked too.
        if let Some(pb::coordinator_message::Body::Assign(a)) = convert::command(command).body {
            out.push(a.key.unwrap());
        }
    }
    out
}

fn key(job: &JobId, attempt: u64, rank: u32) -> RankKey {
    RankKey {
        job: job.clone(),
        attempt: Attempt(attempt),
        rank: Rank(rank),
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
    assert_eq!(core.job(&job).unwrap().attempt, Attempt(1));
    // …and at 1000 ms a is lost, attempt 1 ends and attempt 2 goes to b.
    core.on_worker_message(&b, WorkerReport::Heartbeat, 1000)
        .unwrap();
    core.tick(1000).unwrap();
    let j = core.job(&job).unwrap();
    assert_eq!((j.attempt, j.restarts), (Attempt(2), 1));
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
    core.on_worker_message(&b, exited(&job, 1, 0, 1), 1100)
        .unwrap();
    assert_eq!(core.job(&job).unwrap().attempt, Attempt(2));
    // …but kept in the history, since it may be the real cause of attempt 1's end.
    let history = core.events_after(&job, 0, 100).unwrap();
    assert!(history.iter().any(|e| {
        e.line
            .contains("attempt 1: rank 0 exited with code 1 (reported after")
    }));
    core.on_worker_message(&b, exited(&job, 2, 0, 1), 1200)
        .unwrap();
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
        (1, Attempt(1), None)
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
    let small = Registration {
        hostname: "small".into(),
        slots: 2,
        memory_bytes: 8 << 30,
        ..Registration::default()
    };
    core.register(small, 1).unwrap();
    let err = core.submit(huge, 2).unwrap_err().to_string();
    assert!(
        err.contains("resources") && err.contains("activation_checkpointing"),
        "{err}"
    );
    assert_eq!(core.jobs().len(), 1, "nothing stored");
    // The small default job fits.
    assert!(core.submit(&spec(1), 3).is_ok());
}

fn spec_with(dp: u32, fault_tolerance: &str) -> String {
    format!(
        r#"{{"name":"j","model":{{"kind":"mlp"}},"train":{{"steps":10,"global_batch":8,"lr":0.1}},"parallel":{{"dp":{dp}}},"fault_tolerance":{fault_tolerance}}}"#
    )
}

fn killed(job: &JobId, attempt: u64, rank: u32) -> WorkerReport {
    ended(job, attempt, rank, None, Some(9))
}

fn exited(job: &JobId, attempt: u64, rank: u32, code: i32) -> WorkerReport {
    ended(job, attempt, rank, Some(code), None)
}

/// A rank's end as its worker reports it (by itself, not stopped).
fn ended(
    job: &JobId,
    attempt: u64,
    rank: u32,
    exit_code: Option<i32>,
    signal: Option<i32>,
) -> WorkerReport {
    WorkerReport::Exited(RankExit {
        key: key(job, attempt, rank),
        exit_code,
        signal,
        message: String::new(),
        stopped: false,
    })
}

#[test]
fn restarts_back_off_and_a_hung_attempt_is_restarted() {
    let mut core = Core::load(Store::in_memory().unwrap(), options(), 0).unwrap();
    let (a, _inbox) = join(&mut core, "a", 0);
    let job = core
        .submit(
            &spec_with(
                1,
                r#"{"max_restarts":5,"restart_backoff_secs":1.0,"hang_timeout_secs":3}"#,
            ),
            0,
        )
        .unwrap()
        .id;
    core.tick(10).unwrap();
    assert_eq!(core.job(&job).unwrap().attempt, Attempt(1));

    // The first restart waits 1 s, the second 2 s.
    core.on_worker_message(&a, killed(&job, 1, 0), 100).unwrap();
    // A report of the ended attempt that arrives while the job backs off is kept too: the
    // first report is often a peer's broken collective, and this one the real cause.
    core.on_worker_message(&a, exited(&job, 1, 0, 3), 200)
        .unwrap();
    let history = core.events_after(&job, 0, 100).unwrap();
    assert!(
        history.iter().any(|e| e
            .line
            .contains("attempt 1: rank 0 exited with code 3 (reported after")),
        "{history:?}"
    );
    core.tick(1099).unwrap();
    assert!(core.job(&job).unwrap().state.wants_slots(), "backing off");
    core.on_worker_message(&a, WorkerReport::Heartbeat, 1100)
        .unwrap();
    core.tick(1100).unwrap();
    assert_eq!(core.job(&job).unwrap().attempt, Attempt(2));
    core.on_worker_message(&a, killed(&job, 2, 0), 1200)
        .unwrap();
    core.on_worker_message(&a, WorkerReport::Heartbeat, 3100)
        .unwrap();
    core.tick(3100).unwrap();
    assert!(core.job(&job).unwrap().state.wants_slots(), "2 s now");
    core.on_worker_message(&a, WorkerReport::Heartbeat, 3200)
        .unwrap();
    core.tick(3200).unwrap();
    assert_eq!(core.job(&job).unwrap().attempt, Attempt(3));

    // Attempt 3 reports a step, then nothing for longer than the 3 s hang timeout.
    let progress = WorkerReport::Progress {
        key: key(&job, 3, 0),
        step: 1,
        loss: 1.0,
        eval_loss: None,
        eval_metrics: None,
    };
    core.on_worker_message(&a, progress, 3300).unwrap();
    for t in [4000, 5000, 6000, 6300] {
        core.on_worker_message(&a, WorkerReport::Heartbeat, t)
            .unwrap();
        core.tick(t).unwrap();
    }
    assert_eq!(core.job(&job).unwrap().attempt, Attempt(3), "not hung yet");
    core.on_worker_message(&a, WorkerReport::Heartbeat, 6301)
        .unwrap();
    core.tick(6301).unwrap();
    let history = core.events_after(&job, 0, 100).unwrap();
    assert!(
        history.iter().any(|e| e
            .line
            .contains("attempt 3 failed: no step reported for 3 s (hung)")),
        "{history:?}"
    );
}

#[test]
fn a_worker_that_keeps_failing_is_avoided_while_others_have_room() {
    let mut core = Core::load(Store::in_memory().unwrap(), options(), 0).unwrap();
    let (a, _ia) = join(&mut core, "a", 0);
    let (b, _ib) = join(&mut core, "b", 0);
    let ft = r#"{"max_restarts":5,"restart_backoff_secs":0.0}"#;
    // Two jobs of one rank each; "a" sorts first, so it gets the first one.
    let job = core.submit(&spec_with(1, ft), 0).unwrap().id;
    core.tick(1).unwrap();
    let on = |core: &Core| core.job(&job).unwrap().state.placement().unwrap()[0].clone();
    assert_eq!(on(&core), a);
    // Its rank is killed twice on "a"; after the first, "a" is still preferred.
    core.on_worker_message(&a, killed(&job, 1, 0), 10).unwrap();
    core.tick(11).unwrap();
    assert_eq!(on(&core), a);
    core.on_worker_message(&a, killed(&job, 2, 0), 20).unwrap();
    core.tick(21).unwrap();
    assert_eq!(on(&core), b, "a failed twice: avoided while b has room");
    // With b busy, a is still used rather than leaving a job waiting.
    let other = core.submit(&spec_with(1, ft), 30).unwrap().id;
    core.on_worker_message(&b, WorkerReport::Heartbeat, 31)
        .unwrap();
    core.tick(31).unwrap();
    assert_eq!(core.job(&other).unwrap().state.placement().unwrap()[0], a);
}

#[test]
fn a_draining_worker_gets_no_ranks_and_a_drained_attempt_costs_no_restart() {
    let mut core = Core::load(Store::in_memory().unwrap(), options(), 0).unwrap();
    let (a, _ia) = join(&mut core, "a", 0);
    let (b, _ib) = join(&mut core, "b", 0);
    let job = core
        .submit(&spec_with(1, r#"{"max_restarts":0}"#), 0)
        .unwrap()
        .id;
    core.tick(1).unwrap();
    assert_eq!(core.job(&job).unwrap().state.placement().unwrap()[0], a);
    core.on_worker_message(&a, WorkerReport::Draining, 10)
        .unwrap();
    core.on_worker_message(&a, exited(&job, 1, 0, 76), 20)
        .unwrap();
    core.on_worker_message(&b, WorkerReport::Heartbeat, 21)
        .unwrap();
    core.tick(21).unwrap();
    let j = core.job(&job).unwrap();
    assert_eq!(
        j.attempt,
        Attempt(2),
        "restarted although max_restarts is 0"
    );
    assert_eq!(j.restarts, 0);
    assert_eq!(
        j.state.placement().unwrap()[0],
        b,
        "not on the draining worker"
    );
}

#[test]
fn a_commit_reported_after_a_cancel_is_kept_and_a_superseded_attempt_s_is_not() {
    let mut core = Core::load(Store::in_memory().unwrap(), options(), 0).unwrap();
    let (w, _inbox) = join(&mut core, "w", 0);
    let job = core.submit(&spec(1), 0).unwrap().id;
    let report = |attempt, step| WorkerReport::Checkpoint {
        key: key(&job, attempt, 0),
        step,
        url: format!("file:///c/step-{step}"),
        size_bytes: 9,
        deleted_steps: vec![],
    };
    core.tick(10).unwrap();
    core.cancel(&job, 20).unwrap();
    // Rank 0 committed step 200 just before it was stopped; its report comes in after.
    core.on_worker_message(&w, report(1, 200), 30).unwrap();
    let steps: Vec<u64> = core
        .checkpoints(&job)
        .unwrap()
        .iter()
        .map(|c| c.step)
        .collect();
    assert_eq!(steps, [200]);
    let last_checkpoint = |core: &Core| core.job(&job).unwrap().last_checkpoint.clone().unwrap();
    assert_eq!(last_checkpoint(&core).step, 200);
    // A step the coordinator has no record of is refused, unless the client found it in the
    // store (a rank stopped between committing and reporting it).
    assert!(core.resume(&job, Some(250), false, &[], 35).is_err());
    core.resume(&job, Some(250), true, &[], 40).unwrap();
    // Once attempt 2 has started, attempt 1's reports are stale.
    core.tick(50).unwrap();
    assert_eq!(core.job(&job).unwrap().attempt, Attempt(2));
    core.on_worker_message(&w, report(1, 300), 60).unwrap();
    assert_eq!(last_checkpoint(&core).step, 200);
}

#[test]
fn a_running_attempt_gets_a_hang_deadline_when_the_coordinator_restarts() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("state.db");
    let ft = r#"{"max_restarts":1,"restart_backoff_secs":0.0,"hang_timeout_secs":3}"#;
    let job = {
        let mut core = Core::load(Store::open(&db).unwrap(), options(), 0).unwrap();
        let (w, _inbox) = join(&mut core, "w", 0);
        let job = core.submit(&spec_with(1, ft), 0).unwrap().id;
        let progress = WorkerReport::Progress {
            key: key(&job, 1, 0),
            step: 1,
            loss: 1.0,
            eval_loss: None,
            eval_metrics: None,
        };
        core.on_worker_message(&w, progress, 100).unwrap();
        assert!(matches!(
            core.job(&job).unwrap().state,
            JobState::Running { .. }
        ));
        job
    };
    // The coordinator comes back at 10 s, long after the last step: the attempt is not
    // declared hung for the time it was away, but its deadline runs from the restart.
    let mut core = Core::load(Store::open(&db).unwrap(), options(), 10_000).unwrap();
    let (w, _inbox) = join(&mut core, "w", 10_000);
    let running = WorkerReport::Running {
        ranks: vec![key(&job, 1, 0)],
        exited: vec![],
    };
    core.on_worker_message(&w, running, 10_000).unwrap();
    for t in [10_000, 10_900, 11_800, 12_700, 13_000] {
        core.on_worker_message(&w, WorkerReport::Heartbeat, t)
            .unwrap();
        core.tick(t).unwrap();
    }
    assert_eq!(
        core.job(&job).unwrap().state.name(),
        "Running",
        "not hung yet"
    );
    core.on_worker_message(&w, WorkerReport::Heartbeat, 13_001)
        .unwrap();
    core.tick(13_001).unwrap();
    let history = core.events_after(&job, 0, 100).unwrap();
    assert!(
        history.iter().any(|e| e
            .line
            .contains("attempt 1 failed: no step reported for 3 s (hung)")),
        "{history:?}"
    );
}
