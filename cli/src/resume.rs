//! `gantry resume`: a job restarted from its newest (or a chosen) checkpoint.

use crate::failure::{Failure, Remote, connect};
use crate::render::{self, Output};
use gantry_checkpoint::CheckpointStore;
use gantry_core::JobSpec;
use gantry_proto::v1 as pb;

pub async fn resume(
    coordinator: &Remote,
    out: Output,
    job: String,
    from_step: Option<u64>,
    set: Vec<String>,
) -> Result<i32, Failure> {
    let mut client = connect(coordinator).await?;
    // The store is the truth about what is committed: check the step there when this
    // machine can read it, and fall back to the coordinator's records otherwise.
    let from_step_in_store = match from_step {
        Some(step) => {
            let found = client
                .get_job(pb::GetJobRequest {
                    job_id: job.clone(),
                })
                .await?
                .into_inner();
            committed_in_store(&found, step).await?
        }
        None => false,
    };
    let job = client
        .resume_job(pb::ResumeJobRequest {
            job_id: job,
            from_step,
            set,
            from_step_in_store,
        })
        .await?
        .into_inner();
    render::status(&job, out);
    Ok(0)
}

/// Whether `step` is committed in `job`'s checkpoint store: an error when the store says it is
/// not, `false` when this machine cannot read the store (no credentials, no shared volume).
async fn committed_in_store(job: &pb::Job, step: u64) -> Result<bool, Failure> {
    let spec = JobSpec::from_json(&job.spec_json).map_err(anyhow::Error::from)?;
    let Ok(store) = CheckpointStore::for_job(&spec.checkpoint, &job.id, &Default::default()) else {
        return Ok(false);
    };
    match store.committed(step).await {
        Ok(_) => Ok(true),
        // A store that holds no step at all is one this machine does not see (a file:// store
        // on another machine's disk): the coordinator's records decide.
        Err(e) if store.is_damage(&e) && !store.steps().await.unwrap_or_default().is_empty() => {
            Err(Failure::usage(format!(
                "from_step: job {} has no usable checkpoint at step {step}: {e}",
                job.id
            )))
        }
        Err(_) => Ok(false),
    }
}
