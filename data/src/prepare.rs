//! `gantry data prepare`: read, clean, split, tokenize, write. Everything that can be refused
//! (an input, the tokenizer, the dtype, the output already a dataset) is refused before the
//! first byte is written; the manifest goes last, and a write that fails removes what it wrote.

use crate::clean::{CleanOptions, clean};
use crate::input::{InputOptions, read_inputs};
use crate::manifest::{
    BLOCK_BYTES, Dtype, FORMAT, Manifest, Report, ShardEntry, SplitEntry, SplitName, TokenizerEntry,
};
use crate::split::{check_fractions, split_of};
use crate::store::Location;
use crate::tokenizer;
use gantry_checkpoint::Options;
use object_store::{ObjectStoreExt, PutPayload};
use serde::{Deserialize, Serialize};
use std::time::Instant;

/// Where the tokenizer comes from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TokenizerChoice {
    /// A `tokenizer.json`.
    File(String),
    /// A byte-level BPE of this many tokens, trained on the train split.
    Train { vocab_size: usize },
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PrepareConfig {
    /// Files and folders, local paths or object-store URLs.
    pub inputs: Vec<String>,
    /// The dataset's root, a local path or an object-store URL.
    pub out: String,
    pub input: InputOptions,
    pub clean: CleanOptions,
    pub tokenizer: TokenizerChoice,
    /// The end-of-text token placed after every document.
    pub end_of_text: String,
    /// Train / validation / test fractions of the documents.
    pub split: [f64; 3],
    /// The token dtype; by default the narrowest that fits the vocabulary.
    pub dtype: Option<Dtype>,
    /// Tokens per shard file, at most.
    pub shard_tokens: u64,
    /// Bytes per checksummed block of a shard (what one ranged read of a remote dataset fetches).
    pub block_bytes: u64,
    /// Options of the stores' clients (object_store keys), for inputs and output alike.
    #[serde(skip)]
    pub store_options: Options,
}

impl PrepareConfig {
    pub fn new(inputs: Vec<String>, out: String, tokenizer: TokenizerChoice) -> Self {
        Self {
            inputs,
            out,
            input: InputOptions::default(),
            clean: CleanOptions::default(),
            tokenizer,
            end_of_text: tokenizer::END_OF_TEXT.into(),
            split: [0.8, 0.1, 0.1],
            dtype: None,
            shard_tokens: 64 << 20,
            block_bytes: BLOCK_BYTES,
            store_options: Options::new(),
        }
    }
}

/// What a prepare did, for its summary.
#[derive(Debug, Clone, PartialEq)]
pub struct Summary {
    pub manifest: Manifest,
    pub manifest_sha256: String,
    pub seconds: f64,
}

/// What a long prepare tells the person waiting for it.
pub trait Progress {
    /// A phase starts; `total` units of work (0 when unknown).
    fn phase(&self, name: &str, total: u64);
    fn advance(&self, done: u64);
}

/// No progress reports.
pub struct Quiet;

impl Progress for Quiet {
    fn phase(&self, _: &str, _: u64) {}
    fn advance(&self, _: u64) {}
}

pub async fn prepare(config: &PrepareConfig, progress: &dyn Progress) -> anyhow::Result<Summary> {
    let started = Instant::now();
    check_fractions(config.split)?;
    anyhow::ensure!(config.shard_tokens > 0, "shard_tokens: must be at least 1");
    anyhow::ensure!(config.block_bytes > 0, "block_bytes: must be at least 1");
    anyhow::ensure!(
        !config.end_of_text.is_empty(),
        "end_of_text: must not be empty"
    );
    let out = Location::open(&config.out, &config.store_options)
        .map_err(|e| anyhow::anyhow!("out: {e:#}"))?;
    if out.store.head(&out.path("manifest.json")).await.is_ok() {
        anyhow::bail!(
            "out: {} already holds a dataset (manifest.json); choose another path or delete it",
            config.out
        );
    }
    // A tokenizer file that does not parse is refused before reading anything.
    let given = match &config.tokenizer {
        TokenizerChoice::File(path) => Some(tokenizer::load(path, &config.end_of_text)?),
        TokenizerChoice::Train { .. } => None,
    };

    progress.phase("read", 0);
    let (documents, input_report) =
        read_inputs(&config.inputs, &config.input, &config.store_options).await?;
    progress.advance(input_report.bytes);
    progress.phase("clean", 0);
    let (documents, cleaning) = clean(documents, &config.clean);
    anyhow::ensure!(
        !documents.is_empty(),
        "inputs: cleaning left no document ({cleaning:?})"
    );
    let mut by_split: [Vec<crate::input::Document>; 3] = Default::default();
    for doc in documents {
        let index = match split_of(&doc.text, config.split) {
            SplitName::Train => 0,
            SplitName::Validation => 1,
            SplitName::Test => 2,
        };
        by_split[index].push(doc);
    }
    anyhow::ensure!(
        !by_split[0].is_empty(),
        "split: no document landed in the train split"
    );

    let tokenizer = match (given, &config.tokenizer) {
        (Some(t), _) => t,
        (None, TokenizerChoice::Train { vocab_size }) => {
            progress.phase("train tokenizer", 0);
            tokenizer::train(
                by_split[0].iter().map(|d| d.text.as_str()),
                *vocab_size,
                &config.end_of_text,
            )?
        }
        (None, TokenizerChoice::File(_)) => unreachable!("loaded above"),
    };
    let vocab_size = tokenizer.get_vocab_size(true);
    let dtype = config.dtype.unwrap_or(Dtype::for_vocab(vocab_size));
    anyhow::ensure!(
        dtype.fits(vocab_size),
        "dtype: {dtype:?} cannot hold the ids of a vocabulary of {vocab_size} tokens; use u32"
    );
    let eot_id = tokenizer.token_to_id(&config.end_of_text).ok_or_else(|| {
        anyhow::anyhow!(
            "end_of_text: {:?} is not in the vocabulary",
            config.end_of_text
        )
    })?;
    let tokenizer_json = tokenizer::to_json(&tokenizer)?;

    // Tokenize every split in memory first: nothing is written until all of it worked.
    let total_docs: u64 = by_split.iter().map(|s| s.len() as u64).sum();
    progress.phase("tokenize", total_docs);
    let mut files: Vec<(String, Vec<u8>)> = Vec::new();
    let mut entries: Vec<SplitEntry> = Vec::new();
    for (split, docs) in SplitName::ALL.into_iter().zip(&by_split) {
        let mut entry = SplitEntry {
            labels: config.input.label_field.as_ref().map(|_| {
                docs.iter()
                    .map(|d| d.label.clone().unwrap_or_default())
                    .collect()
            }),
            ..SplitEntry::default()
        };
        let mut shard = ShardBuffer::new(dtype, config.block_bytes);
        for chunk in docs.chunks(256) {
            let texts: Vec<&str> = chunk.iter().map(|d| d.text.as_str()).collect();
            let encodings = tokenizer
                .encode_batch(texts, false)
                .map_err(|e| anyhow::anyhow!("tokenizing: {e}"))?;
            for encoding in encodings {
                let ids = encoding.get_ids();
                if shard.tokens > 0 && shard.tokens + ids.len() as u64 + 1 > config.shard_tokens {
                    shard.finish(split, entry.shards.len(), &mut files, &mut entry);
                    shard = ShardBuffer::new(dtype, config.block_bytes);
                }
                shard.push(ids, eot_id);
                entry.documents += 1;
            }
            progress.advance(chunk.len() as u64);
        }
        if shard.tokens > 0 {
            shard.finish(split, entry.shards.len(), &mut files, &mut entry);
        }
        entries.push(entry);
    }
    let [train, validation, test]: [SplitEntry; 3] = entries.try_into().expect("three splits");
    let manifest = Manifest {
        format: FORMAT,
        tokenizer: TokenizerEntry {
            file: "tokenizer.json".into(),
            sha256: tokenizer::sha256(&tokenizer_json),
            vocab_size: vocab_size as u32,
            end_of_text: config.end_of_text.clone(),
            end_of_text_id: eot_id,
        },
        dtype,
        block_bytes: config.block_bytes,
        train,
        validation,
        test,
        report: Report {
            input: input_report,
            cleaning,
        },
        settings: serde_json::to_value(config)?,
    };
    let manifest_json = serde_json::to_vec_pretty(&manifest)?;
    let manifest_sha256 = crate::read::manifest_sha256(&manifest_json);
    files.insert(0, ("tokenizer.json".into(), tokenizer_json.into_bytes()));

    let bytes: u64 = files.iter().map(|(_, b)| b.len() as u64).sum();
    progress.phase("write", bytes);
    let mut written = Vec::new();
    let result = async {
        for (name, contents) in files {
            let len = contents.len() as u64;
            let path = out.path(&name);
            out.store
                .put(&path, PutPayload::from(contents))
                .await
                .map_err(|e| anyhow::anyhow!("writing {}/{name}: {e}", config.out))?;
            written.push(path);
            progress.advance(len);
        }
        out.store
            .put(&out.path("manifest.json"), PutPayload::from(manifest_json))
            .await
            .map_err(|e| anyhow::anyhow!("writing {}/manifest.json: {e}", config.out))?;
        anyhow::Ok(())
    }
    .await;
    if let Err(e) = result {
        for path in written {
            let _ = out.store.delete(&path).await;
        }
        return Err(e);
    }
    Ok(Summary {
        manifest,
        manifest_sha256,
        seconds: started.elapsed().as_secs_f64(),
    })
}

/// One shard being filled: its tokens and where each document starts.
struct ShardBuffer {
    dtype: Dtype,
    block_bytes: u64,
    bytes: Vec<u8>,
    starts: Vec<u64>,
    tokens: u64,
}

impl ShardBuffer {
    fn new(dtype: Dtype, block_bytes: u64) -> Self {
        Self {
            dtype,
            block_bytes,
            bytes: Vec::new(),
            starts: Vec::new(),
            tokens: 0,
        }
    }

    fn push(&mut self, ids: &[u32], eot: u32) {
        self.starts.push(self.tokens);
        for &id in ids.iter().chain(std::iter::once(&eot)) {
            match self.dtype {
                Dtype::U16 => self.bytes.extend_from_slice(&(id as u16).to_le_bytes()),
                Dtype::U32 => self.bytes.extend_from_slice(&id.to_le_bytes()),
            }
        }
        self.tokens += ids.len() as u64 + 1;
    }

    fn finish(
        self,
        split: SplitName,
        index: usize,
        files: &mut Vec<(String, Vec<u8>)>,
        entry: &mut SplitEntry,
    ) {
        let tokens_file = format!("{}/{index:05}.tokens", split.name());
        let docs_file = format!("{}/{index:05}.docs", split.name());
        let docs: Vec<u8> = self
            .starts
            .iter()
            .chain(std::iter::once(&self.tokens))
            .flat_map(|o| o.to_le_bytes())
            .collect();
        entry.shards.push(ShardEntry {
            tokens_crc32c: crc32c::crc32c(&self.bytes),
            docs_crc32c: crc32c::crc32c(&docs),
            tokens_file: tokens_file.clone(),
            docs_file: docs_file.clone(),
            tokens: self.tokens,
            documents: self.starts.len() as u64,
            block_crc32c: self
                .bytes
                .chunks(self.block_bytes as usize)
                .map(crc32c::crc32c)
                .collect(),
        });
        entry.tokens += self.tokens;
        files.push((tokens_file, self.bytes));
        files.push((docs_file, docs));
    }
}
