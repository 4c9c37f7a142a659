//! What reads a job's checkpoint store directly from this machine: `gantry checkpoints` and
//! `gantry export`.

use crate::failure::{Failure, Remote, connect};
use crate::render::{self, Output};
use gantry_checkpoint::{CheckpointError, CheckpointStore};
use gantry_core::JobSpec;
use gantry_proto::v1 as pb;
use gantry_trainer::export;

pub async fn checkpoints(
    coordinator: &Remote,
    out: Output,
    job: String,
    verify: bool,
) -> Result<i32, Failure> {
    let mut client = connect(coordinator).await?;
    let recorded = client
        .list_checkpoints(pb::ListCheckpointsRequest {
            job_id: job.clone(),
        })
        .await?
        .into_inner()
        .checkpoints;
    let job = client
        .get_job(pb::GetJobRequest { job_id: job })
        .await?
        .into_inner();
    // What the store holds: committed, partial or corrupt. Without access to the store
    // (no credentials here), the coordinator's record of commits.
    let checkpoints = match stored_checkpoints(&job, &recorded, verify).await {
        Ok(listed) => listed,
        Err(e) => {
            eprintln!("showing the coordinator's records; cannot read the store: {e:#}");
            recorded
        }
    };
    render::checkpoints(&checkpoints, out);
    Ok(0)
}

/// Every step directory in `job`'s checkpoint store, oldest first, checked (every byte when
/// `verify`).
async fn stored_checkpoints(
    job: &pb::Job,
    recorded: &[pb::Checkpoint],
    verify: bool,
) -> anyhow::Result<Vec<pb::Checkpoint>> {
    let spec = JobSpec::from_json(&job.spec_json)?;
    let store = CheckpointStore::for_job(&spec.checkpoint, &job.id, &Default::default())?;
    let mut listed: Vec<pb::Checkpoint> = store
        .list(verify)
        .await?
        .into_iter()
        .map(|l| {
            let record = recorded.iter().find(|r| r.step == l.step);
            let state = match l.state {
                "committed" => pb::CheckpointState::Committed,
                "partial" => pb::CheckpointState::Partial,
                _ => pb::CheckpointState::Corrupt,
            };
            pb::Checkpoint {
                step: l.step,
                url: store.step_url(l.step),
                attempt: l
                    .attempt
                    .map_or_else(|| record.map_or(0, |r| r.attempt), |a| a.get()),
                size_bytes: l.bytes,
                committed_at_ms: record.map_or(0, |r| r.committed_at_ms),
                state: state as i32,
            }
        })
        .collect();
    if listed.is_empty() && !recorded.is_empty() {
        // A file:// store on another machine's disk looks empty from here.
        anyhow::bail!(
            "it holds none of the {} checkpoints the coordinator recorded",
            recorded.len()
        );
    }
    listed.sort_by_key(|c| c.step);
    Ok(listed)
}

/// `gantry export`: reads a checkpoint of `job` straight from its object store and writes the
/// whole model as one safetensors file.
/// What `gantry export` writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ExportFormat {
    Safetensors,
    Hf,
}

pub async fn export(
    job: &pb::Job,
    step: Option<u64>,
    out: &std::path::Path,
    format: ExportFormat,
) -> anyhow::Result<()> {
    let spec = JobSpec::from_json(&job.spec_json)?;
    if format == ExportFormat::Hf
        && !matches!(
            spec.model.kind,
            gantry_core::ModelKind::Llama | gantry_core::ModelKind::Bert
        )
    {
        anyhow::bail!(
            "--format hf: writes the llama and bert families; {} trains the {:?} (export it \
             with --format safetensors, Gantry's names)",
            job.id,
            spec.model.kind
        );
    }
    let (manifest, params) = whole_model(job, &spec, step).await?;
    let metadata = [
        ("format", "pt".to_string()),
        ("gantry.job", job.id.clone()),
        ("gantry.step", manifest.step.to_string()),
        ("gantry.model", serde_json::to_string(&spec.model)?),
        (
            "gantry.layout",
            format!("dp={} tp={} pp={}", manifest.dp, manifest.tp, manifest.pp),
        ),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    let (params, file) = match format {
        ExportFormat::Safetensors => (params, out.to_path_buf()),
        ExportFormat::Hf => {
            // The dataset the model trained on: its tokenizer, and a classifier's label names.
            let dataset = job_dataset(&spec).await?;
            let labels = dataset
                .as_ref()
                .map(|d| d.manifest.label_names())
                .unwrap_or_default();
            let (params, config) = gantry_trainer::hf::export(&spec, &params, &labels)?;
            std::fs::create_dir_all(out)?;
            std::fs::write(
                out.join("config.json"),
                serde_json::to_string_pretty(&config)?,
            )?;
            if let Some(reader) = dataset {
                std::fs::write(out.join("tokenizer.json"), reader.tokenizer_json().await?)?;
            }
            (params, out.join("model.safetensors"))
        }
    };
    export::write_safetensors(&params, metadata, &file)?;
    let bytes: usize = params.values().map(|t| t.values.len() * 4).sum();
    println!(
        "wrote {} tensors ({:.1} MiB) of {} at step {} to {}",
        params.len(),
        bytes as f64 / (1 << 20) as f64,
        job.id,
        manifest.step,
        file.display()
    );
    Ok(())
}

/// The whole model of `job`'s checkpoint at `step`, or of its newest one whose shards verify.
pub async fn whole_model(
    job: &pb::Job,
    spec: &JobSpec,
    step: Option<u64>,
) -> anyhow::Result<(
    gantry_checkpoint::Manifest,
    std::collections::BTreeMap<String, export::Tensor32>,
)> {
    let store = CheckpointStore::for_job(&spec.checkpoint, &job.id, &Default::default())?;
    // The shards are checked as they are read; without --step, a step whose shards are torn
    // or damaged is skipped for the one before (a store that cannot be read is an error).
    let candidates = match step {
        Some(step) => vec![step],
        None => store.steps().await?,
    };
    let mut exported = None;
    for candidate in candidates {
        let read = async {
            let manifest = store.committed(candidate).await?;
            let params = export::whole_model(spec, &store, &manifest).await?;
            Ok::<_, anyhow::Error>((manifest, params))
        };
        match read.await {
            Ok(found) => {
                exported = Some(found);
                break;
            }
            Err(e)
                if step.is_none()
                    && e.downcast_ref::<CheckpointError>()
                        .is_some_and(|e| store.is_damage(e)) =>
            {
                eprintln!("skipping step {candidate}: {e:#}")
            }
            Err(e) => return Err(e),
        }
    }
    exported.ok_or_else(|| anyhow::anyhow!("{} has no usable checkpoint", job.id))
}

/// The dataset a job trained on (a `dataset:` source's), opened from this machine with the
/// spec's `data.options`.
pub async fn job_dataset(spec: &JobSpec) -> anyhow::Result<Option<gantry_data::DatasetReader>> {
    let Some(url) = spec.dataset() else {
        return Ok(None);
    };
    let options = gantry_core::store_options::for_url(url, &Default::default(), &spec.data.options);
    Ok(Some(gantry_data::DatasetReader::open(url, &options).await?))
}
