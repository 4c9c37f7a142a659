//! Tokenizers, from Hugging Face's `tokenizers` (loading from files only; no HTTP): a given
//! `tokenizer.json`, or a byte-level BPE trained on the train split. Every dataset has an
//! end-of-text token, placed after each document so packed sequences see the boundaries.

use sha2::{Digest, Sha256};
use std::collections::HashSet;
use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::TrainerWrapper;
use tokenizers::models::bpe::{BPE, BpeTrainerBuilder};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::{AddedToken, Tokenizer};

/// GPT-2's end-of-text token, the default.
pub const END_OF_TEXT: &str = "<|endoftext|>";

/// Loads a `tokenizer.json`; `eot` is added as a special token if the vocabulary lacks it.
/// Padding and truncation a model's tokenizer.json may carry (a sentence-transformers BERT pads
/// and cuts every text to 128 tokens) are turned off: a document is tokenized whole, and the
/// trainer frames and cuts it for the model.
pub fn load(path: &str, eot: &str) -> anyhow::Result<Tokenizer> {
    let mut tokenizer = Tokenizer::from_file(path).map_err(|e| {
        anyhow::anyhow!("tokenizer {path}: does not parse as a tokenizer.json: {e}")
    })?;
    tokenizer.with_padding(None);
    tokenizer
        .with_truncation(None)
        .map_err(|e| anyhow::anyhow!("tokenizer {path}: turning truncation off: {e}"))?;
    tokenizer
        .add_special_tokens([AddedToken::from(eot, true)])
        .map_err(|e| anyhow::anyhow!("tokenizer {path}: adding {eot:?}: {e}"))?;
    Ok(tokenizer)
}

/// GPT-2's byte-level BPE from its `encoder.json` (vocabulary) and `vocab.bpe` (merges).
pub fn gpt2(vocab: &str, merges: &str) -> anyhow::Result<Tokenizer> {
    let bpe = BPE::from_file(vocab, merges)
        .build()
        .map_err(|e| anyhow::anyhow!("BPE {vocab}, {merges}: {e}"))?;
    let mut tokenizer = Tokenizer::new(bpe);
    tokenizer.with_pre_tokenizer(Some(ByteLevel::default().add_prefix_space(false)));
    tokenizer.with_decoder(Some(ByteLevelDecoder::default()));
    tokenizer
        .add_special_tokens([AddedToken::from(END_OF_TEXT, true)])
        .map_err(|e| anyhow::anyhow!("adding {END_OF_TEXT:?}: {e}"))?;
    Ok(tokenizer)
}

/// Trains a byte-level BPE of `vocab_size` tokens (`eot` among them) on `texts`: every byte is
/// in its alphabet, so any text round-trips byte for byte.
pub fn train<'a>(
    texts: impl Iterator<Item = &'a str> + Send,
    vocab_size: usize,
    eot: &str,
) -> anyhow::Result<Tokenizer> {
    let alphabet: HashSet<char> = ByteLevel::alphabet().into_iter().collect();
    anyhow::ensure!(
        vocab_size > alphabet.len(),
        "vocab_size: {vocab_size} is not above the {} byte-level symbols",
        alphabet.len()
    );
    let mut trainer: TrainerWrapper = BpeTrainerBuilder::new()
        .vocab_size(vocab_size)
        .min_frequency(0)
        .show_progress(false)
        .initial_alphabet(alphabet)
        .special_tokens(vec![AddedToken::from(eot, true)])
        .build()
        .into();
    let mut tokenizer = Tokenizer::new(BPE::default());
    tokenizer.with_pre_tokenizer(Some(ByteLevel::default().add_prefix_space(false)));
    tokenizer.with_decoder(Some(ByteLevelDecoder::default()));
    tokenizer
        .train(&mut trainer, texts)
        .map_err(|e| anyhow::anyhow!("training the tokenizer: {e}"))?;
    Ok(tokenizer)
}

/// The tokenizer's JSON, as stored with a dataset (deterministic: vocabulary in id order).
pub fn to_json(tokenizer: &Tokenizer) -> anyhow::Result<String> {
    tokenizer
        .to_string(false)
        .map_err(|e| anyhow::anyhow!("tokenizer to JSON: {e}"))
}

/// SHA-256 of a tokenizer's JSON, in hex.
pub fn sha256(json: &str) -> String {
    hex(&Sha256::digest(json.as_bytes()))
}

pub(crate) fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
