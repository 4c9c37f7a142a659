//! Following a job to its end, with a progress bar.

use crate::failure::{Client, Failure};
use crate::render;
use gantry_proto::v1 as pb;

/// Follows a job to its end with a progress bar; with `show_events`, prints its history lines
/// (state changes, restarts, checkpoints) above the bar. Returns the job as it ended.
pub async fn follow_job(
    client: &mut Client,
    job_id: &str,
    show_events: bool,
) -> Result<pb::Job, Failure> {
    let bar = indicatif::ProgressBar::new(0);
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{spinner} [{elapsed_precise}] {bar:40} {pos}/{len} {msg}",
        )
        .expect("valid template"),
    );
    let mut stream = client
        .watch_job(pb::WatchJobRequest {
            job_id: job_id.to_string(),
            after_seq: 0,
            follow: true,
        })
        .await?
        .into_inner();
    let mut last = None;
    while let Some(event) = stream.message().await? {
        match event.kind {
            Some(pb::job_event::Kind::Job(job)) => {
                bar.set_length(job.total_steps);
                bar.set_position(job.step);
                let mut msg = render::state_name(job.state).to_string();
                if let Some(loss) = job.loss {
                    msg.push_str(&format!(" loss {loss:.4}"));
                }
                if let Some(eval) = job.eval_loss {
                    msg.push_str(&format!(" eval {eval:.4}"));
                }
                if let Some(reason) = &job.pending_reason {
                    msg.push_str(&format!(" ({reason})"));
                }
                bar.set_message(msg);
                let done = [
                    pb::JobState::Succeeded,
                    pb::JobState::Failed,
                    pb::JobState::Cancelled,
                ]
                .iter()
                .any(|s| *s as i32 == job.state);
                last = Some(job);
                if done {
                    break;
                }
            }
            Some(pb::job_event::Kind::Log(line)) => {
                let is_step_line = line.rank >= 0 && line.line.starts_with("step ");
                if show_events && !is_step_line {
                    // `println` on a hidden bar (not a terminal) would drop the line.
                    bar.suspend(|| println!("{}", render::log_line(&line)));
                }
            }
            None => {}
        }
    }
    bar.finish_and_clear();
    match last {
        Some(job) => Ok(job),
        None => Err(Failure {
            code: 3,
            message: "the coordinator closed the stream before the job ended".into(),
        }),
    }
}
