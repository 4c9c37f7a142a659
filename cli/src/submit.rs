//! `gantry submit`: a spec in, a job id (or the job followed to its end) out.

use crate::failure::{Failure, Remote, connect};
use crate::follow::follow_job;
use crate::render::{self, Output};
use gantry_core::JobSpec;
use gantry_proto::v1 as pb;
use std::path::Path;

pub async fn submit(
    coordinator: &Remote,
    out: Output,
    spec: &Path,
    set: &[String],
    wait: bool,
    follow: bool,
) -> Result<i32, Failure> {
    let spec = JobSpec::load(spec, set).map_err(|e| Failure::usage(e.to_string()))?;
    let mut client = connect(coordinator).await?;
    let job = client
        .submit_job(pb::SubmitJobRequest {
            spec_json: spec.to_json(),
        })
        .await?
        .into_inner();
    if !(wait || follow) {
        match out {
            Output::Json => render::print_json(&render::job_json(&job)),
            Output::Table => println!("{}", job.id),
        }
        return Ok(0);
    }
    if out == Output::Table {
        eprintln!("submitted {}", job.id);
    }
    let end = follow_job(&mut client, &job.id, follow).await?;
    match out {
        Output::Json => render::print_json(&render::job_json(&end)),
        Output::Table => println!("{}", render::summary(&end)),
    }
    Ok(if end.state == pb::JobState::Succeeded as i32 {
        0
    } else {
        1
    })
}
