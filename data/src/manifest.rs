//! The dataset format. Under a dataset's root:
//!
//! - `manifest.json`, written last (a folder without one is not a dataset, or its prepare did
//!   not finish): the format version, the tokenizer's hash, the token dtype, per split the
//!   token, document and shard counts and each shard's files with their CRC-32C, the cleaning
//!   report and the settings it was prepared with;
//! - `tokenizer.json`: the tokenizer, byte for byte what the manifest's hash covers;
//! - `{split}/{n:05}.tokens`: the split's documents, tokenized, each followed by the end-of-text
//!   token, as little-endian u16 (when the vocabulary fits) or u32, with a CRC-32C of the whole
//!   file and one of each block of `block_bytes` (so a reader can fetch and check a block with one
//!   ranged read);
//! - `{split}/{n:05}.docs`: where each document of the shard starts, as little-endian u64 token
//!   offsets into the shard, and the shard's length last.
//!
//! A job's checkpoint keeps the SHA-256 of `manifest.json`: a dataset that changed under a job
//! is refused at resume.

use crate::clean::CleanReport;
use crate::input::InputReport;
use serde::{Deserialize, Serialize};

/// The format this build writes and reads.
pub const FORMAT: u32 = 1;

/// The block size this build writes: a ranged read of a remote shard fetches whole blocks.
pub const BLOCK_BYTES: u64 = 1 << 20;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SplitName {
    Train,
    Validation,
    Test,
}

impl SplitName {
    pub const ALL: [SplitName; 3] = [SplitName::Train, SplitName::Validation, SplitName::Test];

    pub fn name(self) -> &'static str {
        match self {
            SplitName::Train => "train",
            SplitName::Validation => "validation",
            SplitName::Test => "test",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Dtype {
    U16,
    U32,
}

impl Dtype {
    pub fn bytes(self) -> usize {
        match self {
            Dtype::U16 => 2,
            Dtype::U32 => 4,
        }
    }

    /// The narrowest dtype for ids below `vocab_size`.
    pub fn for_vocab(vocab_size: usize) -> Self {
        if vocab_size <= 1 << 16 {
            Dtype::U16
        } else {
            Dtype::U32
        }
    }

    pub fn fits(self, vocab_size: usize) -> bool {
        match self {
            Dtype::U16 => vocab_size <= 1 << 16,
            Dtype::U32 => vocab_size as u64 <= 1 << 32,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TokenizerEntry {
    pub file: String,
    pub sha256: String,
    pub vocab_size: u32,
    pub end_of_text: String,
    pub end_of_text_id: u32,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ShardEntry {
    pub tokens_file: String,
    pub tokens_crc32c: u32,
    pub docs_file: String,
    pub docs_crc32c: u32,
    pub tokens: u64,
    pub documents: u64,
    /// CRC-32C of each `block_bytes` of the tokens file (the last block may be shorter). A
    /// manifest without them is read a whole shard at a time.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub block_crc32c: Vec<u32>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct SplitEntry {
    pub documents: u64,
    pub tokens: u64,
    /// Labels of the split's documents, in order (classification data only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub labels: Option<Vec<String>>,
    pub shards: Vec<ShardEntry>,
}

/// What reading and cleaning found.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Report {
    pub input: InputReport,
    pub cleaning: CleanReport,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    pub format: u32,
    pub tokenizer: TokenizerEntry,
    pub dtype: Dtype,
    /// The block size of the shards' `block_crc32c` (0 in a manifest without them).
    #[serde(default)]
    pub block_bytes: u64,
    pub train: SplitEntry,
    pub validation: SplitEntry,
    pub test: SplitEntry,
    /// What reading and cleaning found.
    pub report: Report,
    /// The settings it was prepared with.
    pub settings: serde_json::Value,
}

impl Manifest {
    pub fn split(&self, split: SplitName) -> &SplitEntry {
        match split {
            SplitName::Train => &self.train,
            SplitName::Validation => &self.validation,
            SplitName::Test => &self.test,
        }
    }

    /// A labelled dataset's label names, sorted: a classifier's label i is the i-th (empty for
    /// a dataset without labels).
    pub fn label_names(&self) -> Vec<String> {
        let mut names: Vec<String> = [&self.train, &self.validation, &self.test]
            .iter()
            .flat_map(|split| split.labels.iter().flatten().cloned())
            .collect();
        names.sort();
        names.dedup();
        names
    }

    /// Samples of `seq_len + 1` tokens the split's packed token stream holds (consecutive
    /// samples share one token: a sample's last target is the next one's first input).
    pub fn samples(&self, split: SplitName, seq_len: u32) -> u64 {
        self.split(split).tokens.saturating_sub(1) / u64::from(seq_len.max(1))
    }
}
