//! `gantry data prepare`: a dataset from text, with a progress bar and a summary.

use crate::failure::Failure;
use gantry_data::clean::CleanOptions;
use gantry_data::input::{InputOptions, InvalidUtf8, TxtDocuments};
use gantry_data::prepare::{PrepareConfig, Progress, TokenizerChoice};
use gantry_data::{Dtype, SplitName};
use indicatif::{ProgressBar, ProgressStyle};
use std::sync::Mutex;

#[derive(Debug, clap::Args)]
pub struct PrepareArgs {
    /// Files and folders of `.txt` and `.jsonl` (local paths or object-store URLs).
    #[arg(required = true)]
    inputs: Vec<String>,
    /// Where to write the dataset (a local path or an object-store URL; must not hold one).
    #[arg(long)]
    out: String,
    /// A `tokenizer.json` to use (e.g. GPT-2's, a BERT WordPiece).
    #[arg(long, conflicts_with = "vocab_size")]
    tokenizer: Option<String>,
    /// Train a byte-level BPE of this many tokens on the train split instead.
    #[arg(long)]
    vocab_size: Option<usize>,
    /// How a `.txt` file becomes documents.
    #[arg(long, value_enum, default_value = "paragraph")]
    documents: DocumentsArg,
    /// The JSONL field holding a document's text.
    #[arg(long, default_value = "text")]
    text_field: String,
    /// The JSONL field holding a document's label (classification data).
    #[arg(long)]
    label_field: Option<String>,
    /// Train, validation and test fractions of the documents.
    #[arg(long, value_delimiter = ',', num_args = 3, default_values_t = [0.8, 0.1, 0.1])]
    split: Vec<f64>,
    /// Documents with fewer characters are dropped.
    #[arg(long, default_value_t = CleanOptions::default().min_chars)]
    min_chars: usize,
    /// Documents with a larger share of characters that are not text are dropped.
    #[arg(long, default_value_t = CleanOptions::default().max_non_text)]
    max_non_text: f64,
    /// The estimated Jaccard similarity at which a document is a near duplicate (MinHash).
    #[arg(long, default_value_t = 0.8)]
    near_duplicates: f64,
    /// Keep near duplicates (exact duplicates are still removed, unless --keep-duplicates).
    #[arg(long)]
    keep_near_duplicates: bool,
    /// Keep exact duplicates too (data where a repeated document is a sample, not noise).
    #[arg(long)]
    keep_duplicates: bool,
    /// What to do with input that is not UTF-8.
    #[arg(long, value_enum, default_value = "refuse")]
    invalid_utf8: InvalidUtf8Arg,
    /// The end-of-text token written after every document.
    #[arg(long, default_value = gantry_data::tokenizer::END_OF_TEXT)]
    end_of_text: String,
    /// Token dtype (by default the narrowest that fits the vocabulary).
    #[arg(long, value_enum)]
    dtype: Option<DtypeArg>,
    /// Object-store client options (object_store keys), e.g. `aws_endpoint=http://…`.
    #[arg(long = "store-option", value_name = "KEY=VALUE")]
    store_options: Vec<String>,
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum DocumentsArg {
    File,
    Paragraph,
    Line,
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum InvalidUtf8Arg {
    Skip,
    Refuse,
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum DtypeArg {
    U16,
    U32,
}

/// A progress bar per phase.
struct Bar(Mutex<Option<ProgressBar>>);

impl Progress for Bar {
    fn phase(&self, name: &str, total: u64) {
        let bar = if total > 0 {
            ProgressBar::new(total).with_style(
                ProgressStyle::with_template("{msg:>16} [{bar:30}] {pos}/{len} ({eta})")
                    .expect("a valid template")
                    .progress_chars("=> "),
            )
        } else {
            ProgressBar::new_spinner()
        };
        bar.set_message(name.to_string());
        if let Some(previous) = self.0.lock().unwrap().replace(bar) {
            previous.finish_and_clear();
        }
    }

    fn advance(&self, done: u64) {
        if let Some(bar) = self.0.lock().unwrap().as_ref() {
            bar.inc(done);
        }
    }
}

pub async fn prepare(args: PrepareArgs) -> Result<i32, Failure> {
    let tokenizer = match (args.tokenizer, args.vocab_size) {
        (Some(path), None) => TokenizerChoice::File(path),
        (None, Some(vocab_size)) => TokenizerChoice::Train { vocab_size },
        _ => {
            return Err(Failure::usage(
                "give --tokenizer FILE (a tokenizer.json) or --vocab-size N (train a byte-level BPE)",
            ));
        }
    };
    let mut config = PrepareConfig::new(args.inputs, args.out, tokenizer);
    config.input = InputOptions {
        txt_documents: match args.documents {
            DocumentsArg::File => TxtDocuments::File,
            DocumentsArg::Paragraph => TxtDocuments::Paragraph,
            DocumentsArg::Line => TxtDocuments::Line,
        },
        text_field: args.text_field,
        label_field: args.label_field,
        invalid_utf8: match args.invalid_utf8 {
            InvalidUtf8Arg::Skip => InvalidUtf8::Skip,
            InvalidUtf8Arg::Refuse => InvalidUtf8::Refuse,
        },
    };
    config.clean = CleanOptions {
        min_chars: args.min_chars,
        max_non_text: args.max_non_text,
        near_duplicate_threshold: (!args.keep_near_duplicates && !args.keep_duplicates)
            .then_some(args.near_duplicates),
        exact_duplicates: !args.keep_duplicates,
    };
    config.split = args
        .split
        .try_into()
        .map_err(|_| Failure::usage("--split takes three fractions"))?;
    config.end_of_text = args.end_of_text;
    config.dtype = args.dtype.map(|d| match d {
        DtypeArg::U16 => Dtype::U16,
        DtypeArg::U32 => Dtype::U32,
    });
    for option in args.store_options {
        let (k, v) = option
            .split_once('=')
            .ok_or_else(|| Failure::usage(format!("--store-option {option}: not KEY=VALUE")))?;
        config.store_options.insert(k.to_string(), v.to_string());
    }
    let bar = Bar(Mutex::new(None));
    let result = gantry_data::prepare(&config, &bar).await;
    if let Some(b) = bar.0.lock().unwrap().take() {
        b.finish_and_clear();
    }
    let summary = result.map_err(|e| Failure::usage(format!("{e:#}")))?;
    let m = &summary.manifest;
    let r = &m.report;
    let mb = r.input.bytes as f64 / 1e6;
    println!(
        "read {} files, {mb:.1} MB, {} documents{}",
        r.input.files,
        r.input.documents,
        if r.input.invalid_utf8 > 0 {
            format!(" ({} not UTF-8, skipped)", r.input.invalid_utf8)
        } else {
            String::new()
        }
    );
    let c = &r.cleaning;
    println!(
        "cleaning: {} normalised; removed {} too short, {} mostly not text, {} exact duplicates, \
         {} near duplicates; kept {} of {}",
        c.normalised,
        c.too_short,
        c.non_text,
        c.exact_duplicates,
        c.near_duplicates,
        c.kept,
        c.read
    );
    println!(
        "tokenizer: {} tokens, end of text {:?} = {}, sha256 {}",
        m.tokenizer.vocab_size,
        m.tokenizer.end_of_text,
        m.tokenizer.end_of_text_id,
        m.tokenizer.sha256
    );
    for split in SplitName::ALL {
        let s = m.split(split);
        println!(
            "{:>10}: {} documents, {} tokens ({:?}), {} shards",
            split.name(),
            s.documents,
            s.tokens,
            m.dtype,
            s.shards.len()
        );
    }
    println!(
        "wrote {} (manifest sha256 {}) in {:.1} s, {:.1} MB/s",
        config.out,
        summary.manifest_sha256,
        summary.seconds,
        mb / summary.seconds.max(1e-9)
    );
    Ok(0)
}
