//! How the CLI shows things: tables for people, JSON for scripts.

use comfy_table::Table;
use gantry_proto::v1 as pb;
use serde_json::{Value, json};
use std::time::{Duration, UNIX_EPOCH};

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Output {
    Table,
    Json,
}

pub fn state_name(state: i32) -> &'static str {
    match pb::JobState::try_from(state).unwrap_or(pb::JobState::Unspecified) {
        pb::JobState::Pending => "Pending",
        pb::JobState::Scheduled => "Scheduled",
        pb::JobState::Running => "Running",
        pb::JobState::Restarting => "Restarting",
        pb::JobState::Succeeded => "Succeeded",
        pb::JobState::Failed => "Failed",
        pb::JobState::Cancelled => "Cancelled",
        pb::JobState::Unspecified => "Unknown",
    }
}

fn timestamp(ms: i64) -> String {
    let t = UNIX_EPOCH + Duration::from_millis(ms.max(0) as u64);
    humantime::format_rfc3339_millis(t).to_string()
}

/// A classifier's metrics as JSON (fractions, not percentages).
fn metrics_json(m: pb::ClassMetrics) -> Value {
    json!({
        "accuracy": m.accuracy,
        "precision": m.precision,
        "recall": m.recall,
        "f1": m.f1,
        "samples": m.samples,
    })
}

/// A classifier's metrics as a line of text.
fn metrics_text(m: pb::ClassMetrics) -> String {
    gantry_core::ClassMetrics::from(m).to_string()
}

/// A job as JSON, with the fields DESIGN.md promises.
pub fn job_json(job: &pb::Job) -> Value {
    let parallel = job.parallel.unwrap_or_default();
    json!({
        "id": job.id,
        "name": job.name,
        "submitted_by": job.submitted_by,
        "state": state_name(job.state),
        "step": job.step,
        "total_steps": job.total_steps,
        "attempt": job.attempt,
        "restarts": job.restarts,
        "loss": job.loss,
        "eval_loss": job.eval_loss,
        "test_loss": job.test_loss,
        // A classifier's cross-entropy has no perplexity.
        "test_perplexity": job.test_loss.filter(|_| job.test_metrics.is_none()).map(f64::exp),
        "test_accuracy": job.test_accuracy,
        "eval_metrics": job.eval_metrics.map(metrics_json),
        "test_metrics": job.test_metrics.map(metrics_json),
        "parallel": {"dp": parallel.dp, "tp": parallel.tp, "pp": parallel.pp},
        "last_checkpoint": job.last_checkpoint.as_ref().map(|c| json!({"step": c.step, "url": c.url})),
        "error": job.error,
        "pending_reason": job.pending_reason,
        "created_at": timestamp(job.created_at_ms),
        "updated_at": timestamp(job.updated_at_ms),
        "attempts": job.attempts.iter().map(|a| json!({
            "attempt": a.attempt,
            "started_at": timestamp(a.started_at_ms),
            "ended_at": a.ended_at_ms.map(timestamp),
            "outcome": a.outcome,
        })).collect::<Vec<_>>(),
    })
}

pub fn print_json(value: &Value) {
    println!("{}", serde_json::to_string_pretty(value).expect("json"));
}

fn opt(v: Option<f64>) -> String {
    v.map_or("-".into(), |v| format!("{v:.4}"))
}

pub fn jobs(jobs: &[pb::Job], out: Output) {
    if out == Output::Json {
        return print_json(&Value::Array(jobs.iter().map(job_json).collect()));
    }
    let mut table = Table::new();
    table.set_header([
        "ID",
        "STATE",
        "STEP",
        "LOSS",
        "EVAL",
        "ATTEMPT",
        "RESTARTS",
        "DP×TP×PP",
    ]);
    for j in jobs {
        let p = j.parallel.unwrap_or_default();
        table.add_row([
            j.id.clone(),
            state_name(j.state).to_string(),
            format!("{}/{}", j.step, j.total_steps),
            opt(j.loss),
            opt(j.eval_loss),
            j.attempt.to_string(),
            j.restarts.to_string(),
            format!("{}×{}×{}", p.dp, p.tp, p.pp),
        ]);
    }
    println!("{table}");
}

pub fn status(job: &pb::Job, out: Output) {
    if out == Output::Json {
        return print_json(&job_json(job));
    }
    let p = job.parallel.unwrap_or_default();
    println!("job:         {} ({})", job.id, job.name);
    println!("state:       {}", state_name(job.state));
    if !job.submitted_by.is_empty() {
        println!("submitter:   {}", job.submitted_by);
    }
    if let Some(reason) = &job.pending_reason {
        println!("waiting:     {reason}");
    }
    println!("step:        {}/{}", job.step, job.total_steps);
    println!(
        "loss:        {} (eval {})",
        opt(job.loss),
        opt(job.eval_loss)
    );
    match (job.test_loss, job.test_metrics) {
        (Some(test), None) => {
            let accuracy = job.test_accuracy.map_or(String::new(), |a| {
                format!(", exact-match accuracy {:.1}%", a * 100.0)
            });
            println!(
                "test:        loss {test:.4}, perplexity {:.3}{accuracy}",
                test.exp()
            );
        }
        (Some(test), Some(_)) => println!("test:        loss {test:.4}"),
        _ => {}
    }
    if let Some(m) = job.eval_metrics {
        println!("validation:  {}", metrics_text(m));
    }
    if let Some(m) = job.test_metrics {
        println!("test split:  {}", metrics_text(m));
    }
    println!("layout:      dp={} tp={} pp={}", p.dp, p.tp, p.pp);
    println!("attempt:     {} ({} restarts)", job.attempt, job.restarts);
    match &job.last_checkpoint {
        Some(c) => println!("checkpoint:  step {} at {}", c.step, c.url),
        None => println!("checkpoint:  none"),
    }
    if let Some(error) = &job.error {
        println!("error:       {error}");
    }
    for a in &job.attempts {
        let outcome = a.outcome.as_deref().unwrap_or("live");
        println!(
            "  attempt {}: started {}, {outcome}",
            a.attempt,
            timestamp(a.started_at_ms)
        );
    }
    println!("created:     {}", timestamp(job.created_at_ms));
    println!("updated:     {}", timestamp(job.updated_at_ms));
}

pub fn summary(job: &pb::Job) -> String {
    let mut s = format!(
        "{} {} at step {}/{}, loss {}, eval loss {}, {} restart(s)",
        job.id,
        state_name(job.state),
        job.step,
        job.total_steps,
        opt(job.loss),
        opt(job.eval_loss),
        job.restarts
    );
    match (job.test_loss, job.test_metrics) {
        (Some(test), None) => s.push_str(&format!(
            "; test loss {test:.4} (perplexity {:.3})",
            test.exp()
        )),
        (Some(test), Some(_)) => s.push_str(&format!("; test loss {test:.4}")),
        _ => {}
    }
    if let Some(accuracy) = job.test_accuracy {
        s.push_str(&format!(", exact-match accuracy {:.1}%", accuracy * 100.0));
    }
    if let Some(m) = job.test_metrics {
        s.push_str(&format!("; test {}", metrics_text(m)));
    }
    if let Some(c) = &job.last_checkpoint {
        s.push_str(&format!("; checkpoint at step {}: {}", c.step, c.url));
    }
    if let Some(e) = &job.error {
        s.push_str(&format!("; error: {e}"));
    }
    s
}

pub fn workers(workers: &[pb::Worker], out: Output) {
    if out == Output::Json {
        let rows: Vec<Value> = workers
            .iter()
            .map(|w| {
                json!({
                    "id": w.id, "hostname": w.hostname, "slots": w.slots, "used_slots": w.used_slots,
                    "state": if w.state == pb::WorkerState::Alive as i32 { "Alive" } else { "Lost" },
                    "devices": w.devices, "registered_at": timestamp(w.registered_at_ms),
                    "gpus": w.gpus.iter().map(|g| json!({
                        "index": g.index, "name": g.name, "memory_bytes": g.memory_bytes,
                    })).collect::<Vec<_>>(),
                    "last_seen": timestamp(w.last_seen_ms),
                })
            })
            .collect();
        return print_json(&Value::Array(rows));
    }
    let mut table = Table::new();
    table.set_header(["ID", "STATE", "SLOTS", "USED", "DEVICES", "LAST SEEN"]);
    for w in workers {
        table.add_row([
            w.id.clone(),
            if w.state == pb::WorkerState::Alive as i32 {
                "Alive"
            } else {
                "Lost"
            }
            .to_string(),
            w.slots.to_string(),
            w.used_slots.to_string(),
            match w.gpus.len() {
                0 => w.devices.join(","),
                n => format!("{} ({n} GPUs)", w.devices.join(",")),
            },
            timestamp(w.last_seen_ms),
        ]);
    }
    println!("{table}");
}

pub fn checkpoints(checkpoints: &[pb::Checkpoint], out: Output) {
    let state = |c: &pb::Checkpoint| match pb::CheckpointState::try_from(c.state) {
        Ok(pb::CheckpointState::Committed) => "committed",
        Ok(pb::CheckpointState::Partial) => "partial",
        Ok(pb::CheckpointState::Corrupt) => "corrupt",
        _ => "unknown",
    };
    if out == Output::Json {
        let rows: Vec<Value> = checkpoints
            .iter()
            .map(|c| {
                json!({"step": c.step, "url": c.url, "attempt": c.attempt, "size_bytes": c.size_bytes,
                       "state": state(c), "committed_at": timestamp(c.committed_at_ms)})
            })
            .collect();
        return print_json(&Value::Array(rows));
    }
    let mut table = Table::new();
    table.set_header(["STEP", "STATE", "SIZE", "ATTEMPT", "URL"]);
    for c in checkpoints {
        table.add_row([
            c.step.to_string(),
            state(c).to_string(),
            format!("{:.1} KiB", c.size_bytes as f64 / 1024.0),
            c.attempt.to_string(),
            c.url.clone(),
        ]);
    }
    println!("{table}");
}

pub fn log_line(line: &pb::LogLine) -> String {
    if line.rank < 0 {
        format!("[coordinator] {}", line.line)
    } else if line.stream == "stderr" {
        format!(
            "[attempt {} rank {} stderr] {}",
            line.attempt, line.rank, line.line
        )
    } else {
        format!(
            "[attempt {} rank {}] {}",
            line.attempt, line.rank, line.line
        )
    }
}

/// Parses a rank's `step N/M loss=X …` line.
pub fn step_loss(line: &str) -> Option<(u64, f64)> {
    let rest = line.strip_prefix("step ")?;
    let (step, rest) = rest.split_once('/')?;
    let loss = rest
        .split_whitespace()
        .find_map(|w| w.strip_prefix("loss="))?;
    Some((step.parse().ok()?, loss.parse().ok()?))
}

/// A token just created: the token itself (shown this once) and its record.
pub fn created_token(created: &pb::CreateTokenResponse, out: Output) {
    let info = created.info.clone().unwrap_or_default();
    if out == Output::Json {
        return print_json(&json!({
            "token": created.token, "id": info.id, "name": info.name, "role": info.role,
        }));
    }
    println!("{}", created.token);
    eprintln!(
        "token {} for {} ({}): shown once; the coordinator keeps only its hash",
        info.id, info.name, info.role
    );
}

pub fn tokens(tokens: &[pb::TokenInfo], out: Output) {
    if out == Output::Json {
        let rows: Vec<Value> = tokens
            .iter()
            .map(|t| {
                json!({
                    "id": t.id, "name": t.name, "role": t.role,
                    "created_at": timestamp(t.created_at_ms),
                    "revoked_at": t.revoked_at_ms.map(timestamp),
                })
            })
            .collect();
        return print_json(&Value::Array(rows));
    }
    let mut table = Table::new();
    table.set_header(["ID", "NAME", "ROLE", "CREATED", "REVOKED"]);
    for t in tokens {
        table.add_row([
            t.id.clone(),
            t.name.clone(),
            t.role.clone(),
            timestamp(t.created_at_ms),
            t.revoked_at_ms.map(timestamp).unwrap_or_default(),
        ]);
    }
    println!("{table}");
}
