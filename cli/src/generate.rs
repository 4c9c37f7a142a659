//! `gantry generate JOB --prompt TEXT`: a trained llama continues a prompt on this machine's
//! CPU, from the job's newest verified checkpoint (or `--step`), with a key/value cache.

use crate::store;
use gantry_core::{JobSpec, ModelKind};
use gantry_proto::v1 as pb;
use gantry_trainer::llama::Sampling;

pub struct Request {
    pub prompt: String,
    pub max_tokens: usize,
    pub sampling: Sampling,
    pub step: Option<u64>,
}

pub async fn generate(job: &pb::Job, request: Request) -> anyhow::Result<()> {
    let mut spec = JobSpec::from_json(&job.spec_json)?;
    anyhow::ensure!(
        spec.model.kind == ModelKind::Llama,
        "generate: runs the llama family; {} trains the {:?}",
        job.id,
        spec.model.kind
    );
    let tokenizer = match store::job_dataset(&spec).await? {
        Some(reader) => reader.tokenizer().await?,
        None => gantry_trainer::corpus::arithmetic_tokenizer(),
    };
    let (manifest, whole) = store::whole_model(job, &spec, request.step).await?;
    // The vocabulary as trained (a dataset's spec may leave it to the dataset).
    let vocab = whole
        .get("embed_tokens.weight")
        .map(|t| t.shape[0] as u32)
        .ok_or_else(|| anyhow::anyhow!("{}: the checkpoint has no embed_tokens.weight", job.id))?;
    spec.model.vocab_size = Some(vocab);
    let ids: Vec<i64> = tokenizer
        .encode(request.prompt.as_str(), false)
        .map_err(|e| anyhow::anyhow!("--prompt: {e}"))?
        .get_ids()
        .iter()
        .map(|&id| i64::from(id))
        .collect();
    anyhow::ensure!(!ids.is_empty(), "--prompt: the prompt has no tokens");
    let new = gantry_trainer::llama::continue_on_cpu(
        &spec,
        whole,
        &ids,
        request.max_tokens,
        request.sampling,
    )?;
    let prompt_tokens = ids.len();
    let ids: Vec<u32> = new.iter().map(|&t| t as u32).collect();
    let text = tokenizer
        .decode(&ids, false)
        .map_err(|e| anyhow::anyhow!("decoding: {e}"))?;
    eprintln!(
        "{} at step {}: {prompt_tokens} prompt tokens, {} new",
        job.id,
        manifest.step,
        new.len()
    );
    println!("{}{text}", request.prompt);
    Ok(())
}
