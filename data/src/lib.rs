//! Datasets: text in, token shards out, and back into training.
//!
//! `gantry data prepare` ([`prepare::prepare`]) reads `.txt` files and folders and `.jsonl` files
//! from a local path or any object-store URL Gantry supports ([`input`]), cleans the documents
//! deterministically ([`clean`]: Unicode normalisation and whitespace, exact and near-duplicate
//! removal, length and quality filters), splits them by a stable hash of each document
//! ([`split`]), tokenizes them with a given `tokenizer.json` or a byte-level BPE trained on the
//! train split ([`tokenizer`]), and writes per split token shards, document offsets, the
//! tokenizer and a `manifest.json` ([`manifest`]) written last. Training opens a dataset with
//! [`read::DatasetReader`], which verifies every shard's checksum.

pub mod cache;
pub mod clean;
pub mod input;
pub mod manifest;
pub mod prepare;
pub mod read;
pub mod split;
mod store;
pub mod tokenizer;

pub use manifest::{Dtype, Manifest, SplitName};
pub use prepare::{PrepareConfig, Progress, Summary, prepare};
pub use read::DatasetReader;
pub use store::url_of;
pub use tokenizers::Tokenizer;

/// Options for an object store's client, by object_store's configuration key.
pub type Options = gantry_checkpoint::Options;
