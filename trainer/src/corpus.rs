//! The built-in corpora, generated from a job's seed: `builtin:arithmetic` (`17+25=42` lines for
//! the `gpt`), made a dataset by the same prepare code as any corpus a user brings and read back
//! the same way, and `builtin:regression` (features and targets from a fixed random teacher, for
//! the `mlp`), which is numbers rather than text and so is generated in memory.

use gantry_core::JobSpec;
use gantry_data::clean::CleanOptions;
use gantry_data::input::TxtDocuments;
use gantry_data::prepare::{PrepareConfig, Quiet, TokenizerChoice};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::path::PathBuf;

pub const ARITHMETIC: &str = "builtin:arithmetic";

/// Input and output widths of the synthetic regression task.
pub const REGRESSION_IN: usize = 16;
pub const REGRESSION_OUT: usize = 4;

/// Characters of the arithmetic corpus; the token id is the index.
pub const VOCAB: &[u8] = b"\n+=0123456789";

/// The token that ends every arithmetic line (and so every document of its dataset).
pub const END_OF_LINE: u32 = 0;

/// Lines like `17+25=42\n`, operands below 100.
pub fn arithmetic_lines(count: usize, seed: u64) -> Vec<String> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 0xa11c_e5ed);
    (0..count)
        .map(|_| {
            let a: u32 = rng.random_range(0..100);
            let b: u32 = rng.random_range(0..100);
            format!("{a}+{b}={}\n", a + b)
        })
        .collect()
}

/// The arithmetic corpus's tokenizer (what its dataset stores).
pub fn arithmetic_tokenizer() -> gantry_data::Tokenizer {
    arithmetic_tokenizer_json()
        .to_string()
        .parse()
        .expect("the arithmetic tokenizer parses")
}

/// A character per token, the ids of [`VOCAB`], joined back without spaces.
fn arithmetic_tokenizer_json() -> serde_json::Value {
    let vocab: serde_json::Map<String, serde_json::Value> = VOCAB
        .iter()
        .enumerate()
        .map(|(id, &c)| ((c as char).to_string(), id.into()))
        .collect();
    serde_json::json!({
        "version": "1.0", "truncation": null, "padding": null, "added_tokens": [],
        "normalizer": null,
        "pre_tokenizer": {
            "type": "Split", "pattern": {"Regex": "."}, "behavior": "Isolated", "invert": false
        },
        "post_processor": null,
        "decoder": {"type": "Fuse"},
        "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "\n"}
    })
}

/// `builtin:arithmetic` as a dataset in the machine's dataset cache, prepared on first use (by
/// whichever rank gets there first; the others use its copy): a line per document, split by the
/// lines' hashes in `data.split`, every line kept (the generated lines are clean, and a repeated
/// sum is data, not a duplicate document), the end of line as the end-of-text token, so the
/// packed stream is the lines as generated.
pub async fn arithmetic_dataset(spec: &JobSpec) -> anyhow::Result<PathBuf> {
    let (examples, seed, split) = (spec.data.examples, spec.train.seed, spec.data.split);
    let key = format!(
        "arithmetic examples={examples} seed={seed} split={split:?} format={}",
        gantry_data::manifest::FORMAT
    );
    let name = &gantry_data::tokenizer::sha256(&key)[..16];
    let root = gantry_data::cache::default_dir()
        .join("builtin")
        .join(format!("arithmetic-{name}"));
    if root.join("manifest.json").exists() {
        return Ok(root);
    }
    // Unique to this preparation: ranks of a machine (and threads of a test) may race here.
    static PREPARED: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = PREPARED.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let work = root.with_extension(format!("partial-{}-{n}", std::process::id()));
    let _ = std::fs::remove_dir_all(&work);
    let sources = work.join("sources");
    let made = async {
        std::fs::create_dir_all(&sources)?;
        let lines = sources.join("arithmetic.txt");
        std::fs::write(&lines, arithmetic_lines(examples as usize, seed).concat())?;
        let tokenizer = sources.join("tokenizer.json");
        std::fs::write(&tokenizer, arithmetic_tokenizer_json().to_string())?;
        let path = |p: &std::path::Path| p.display().to_string();
        let mut config = PrepareConfig::new(
            vec![path(&lines)],
            path(&work.join("dataset")),
            TokenizerChoice::File(path(&tokenizer)),
        );
        config.input.txt_documents = TxtDocuments::Line;
        config.clean = CleanOptions {
            min_chars: 1,
            max_non_text: 1.0,
            near_duplicate_threshold: None,
            exact_duplicates: false,
        };
        config.end_of_text = "\n".into();
        config.split = split;
        gantry_data::prepare(&config, &Quiet).await?;
        anyhow::Ok(())
    }
    .await;
    let placed = made.and_then(|()| {
        std::fs::rename(work.join("dataset"), &root).or_else(|e| {
            // Another rank placed its (identical) copy first.
            match root.join("manifest.json").exists() {
                true => Ok(()),
                false => Err(anyhow::anyhow!("{}: {e}", root.display())),
            }
        })
    });
    let _ = std::fs::remove_dir_all(&work);
    placed.map_err(|e| anyhow::anyhow!("data.source: preparing {ARITHMETIC}: {e}"))?;
    Ok(root)
}

/// Inputs uniform in [-1, 1]; targets from a fixed random two-layer teacher network.
pub fn regression(count: usize, seed: u64) -> (Vec<f32>, Vec<f32>) {
    const HIDDEN: usize = 32;
    let mut teacher = ChaCha8Rng::seed_from_u64(seed ^ 0x7eac_4e55);
    let w1: Vec<f32> = (0..REGRESSION_IN * HIDDEN)
        .map(|_| teacher.random_range(-1.0..1.0f32) / (REGRESSION_IN as f32).sqrt())
        .collect();
    let w2: Vec<f32> = (0..HIDDEN * REGRESSION_OUT)
        .map(|_| teacher.random_range(-1.0..1.0f32) / (HIDDEN as f32).sqrt() * 2.0)
        .collect();
    let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 0xda7a);
    let x: Vec<f32> = (0..count * REGRESSION_IN)
        .map(|_| rng.random_range(-1.0..1.0f32))
        .collect();
    let mut y = vec![0.0f32; count * REGRESSION_OUT];
    for i in 0..count {
        let xi = &x[i * REGRESSION_IN..(i + 1) * REGRESSION_IN];
        let hidden: Vec<f32> = (0..HIDDEN)
            .map(|h| {
                (0..REGRESSION_IN)
                    .map(|k| xi[k] * w1[k * HIDDEN + h])
                    .sum::<f32>()
                    .tanh()
            })
            .collect();
        for o in 0..REGRESSION_OUT {
            y[i * REGRESSION_OUT + o] = (0..HIDDEN)
                .map(|h| hidden[h] * w2[h * REGRESSION_OUT + o])
                .sum();
        }
    }
    (x, y)
}
