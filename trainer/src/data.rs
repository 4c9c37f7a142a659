//! A job's data: built-in corpora generated from the job's seed, or a dataset that
//! `gantry data prepare` wrote (`data.source = "dataset:<path or URL>"`), read window by window
//! from local files (a remote dataset's shards copied into the machine's cache first), every
//! shard's checksum verified. Either way every rank (and every restart) sees the same samples,
//! and the global batch of a step is a pure function of (seed, step): global step s takes
//! samples [s·B, (s+1)·B) of a sequence of per-epoch permutations, and each dp rank its
//! contiguous slice of them, so the samples of a step are the same at any dp size and the data
//! cursor of a checkpoint is its step.

use crate::corpus;
pub use crate::corpus::{REGRESSION_IN, REGRESSION_OUT, VOCAB, arithmetic_lines};
use gantry_core::{JobSpec, ModelKind, Task};
use rand::SeedableRng;
use rand::seq::SliceRandom;
use rand_chacha::ChaCha8Rng;
use std::sync::{Arc, Mutex};

/// Samples of the validation and test splits an evaluation reads, at most (their first).
pub const EVAL_SAMPLES: usize = 512;

/// Steps whose samples a remote dataset fetches ahead of the step being trained.
pub const PREFETCH_STEPS: u64 = 8;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Split {
    Train,
    Validation,
    Test,
}

/// One batch, in the shape the model consumes.
#[derive(Debug, Clone, PartialEq)]
pub enum Batch {
    /// `x` is `[n, REGRESSION_IN]`, `y` is `[n, REGRESSION_OUT]`, row-major.
    Regression { x: Vec<f32>, y: Vec<f32>, n: usize },
    /// Token windows: `inputs[i]` predicts `targets[i]`, each `[n, seq_len]`.
    Tokens {
        inputs: Vec<i64>,
        targets: Vec<i64>,
        n: usize,
        seq_len: usize,
    },
    /// Masked-LM: token windows `[n, seq_len]` with the same number of positions masked in
    /// each sample; `positions` are those positions as flat indices into `[n · seq_len]` (sample
    /// by sample) and `targets` the tokens they held.
    Masked {
        inputs: Vec<i64>,
        positions: Vec<i64>,
        targets: Vec<i64>,
        n: usize,
        seq_len: usize,
    },
    /// Classification: documents as `[CLS] tokens… [SEP]`, padded to `[n, seq_len]`; sample i
    /// is `lengths[i]` tokens long and labelled `labels[i]`.
    Labelled {
        inputs: Vec<i64>,
        lengths: Vec<usize>,
        labels: Vec<i64>,
        n: usize,
        seq_len: usize,
    },
}

impl Batch {
    pub fn len(&self) -> usize {
        match self {
            Batch::Regression { n, .. }
            | Batch::Tokens { n, .. }
            | Batch::Masked { n, .. }
            | Batch::Labelled { n, .. } => *n,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

enum Samples {
    Regression {
        x: Vec<f32>,
        y: Vec<f32>,
    },
    /// A dataset's split cut into windows of `seq_len + 1` tokens, read window by window.
    Stream {
        tokens: gantry_data::cache::SplitTokens,
        seq_len: usize,
    },
    /// A labelled dataset's split, document by document (each ends before its end-of-text).
    Documents {
        docs: Vec<Vec<u32>>,
        labels: Vec<i64>,
        seq_len: usize,
        special: Special,
    },
}

/// The tokens a bert's inputs are framed with.
#[derive(Debug, Clone, Copy)]
struct Special {
    cls: u32,
    sep: u32,
    pad: u32,
}

/// Masked-LM's share of masked positions in a sample (BERT's 15%), at least one.
pub fn masked_per_sample(seq_len: usize) -> usize {
    ((seq_len as f64 * 0.15).round() as usize).max(1)
}

/// BERT's masking of a window for masked-LM: a fixed number of positions per sample, chosen,
/// and each replaced by `[MASK]` (80%), a random token (10%) or kept (10%), as a pure function of
/// (seed, split, sample), so every layout and every restart masks a sample alike.
#[derive(Debug, Clone, Copy)]
struct Masking {
    mask: u32,
    vocab: u32,
    per_sample: usize,
    seed: u64,
}

impl Masking {
    /// Masks `window` (sample `index` of `split`) in place; returns the masked positions (in
    /// order) and the tokens they held.
    fn apply(&self, split: Split, index: usize, window: &mut [u32]) -> Vec<(usize, u32)> {
        let stream = (index as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ split as u64;
        let mut rng = ChaCha8Rng::seed_from_u64(self.seed ^ 0x6d61_736b ^ stream);
        let mut order: Vec<usize> = (0..window.len()).collect();
        let (chosen, _) = order.partial_shuffle(&mut rng, self.per_sample);
        let mut chosen = chosen.to_vec();
        chosen.sort_unstable();
        chosen
            .into_iter()
            .map(|p| {
                let held = window[p];
                let roll: f64 = rand::Rng::random(&mut rng);
                if roll < 0.8 {
                    window[p] = self.mask;
                } else if roll < 0.9 {
                    window[p] = rand::Rng::random_range(&mut rng, 0..self.vocab);
                }
                (p, held)
            })
            .collect()
    }
}

impl Samples {
    fn len(&self) -> usize {
        match self {
            Samples::Regression { y, .. } => y.len() / REGRESSION_OUT,
            Samples::Stream { tokens, seq_len } => {
                (tokens.len().saturating_sub(1) / *seq_len as u64) as usize
            }
            Samples::Documents { docs, .. } => docs.len(),
        }
    }

    /// Starts fetching the samples `indices` of a remote dataset (nothing to do otherwise).
    fn prefetch(&self, indices: &[usize]) {
        if let Samples::Stream { tokens, seq_len } = self {
            for &i in indices {
                tokens.prefetch((i * seq_len) as u64, seq_len + 1);
            }
        }
    }

    fn batch(&self, split: Split, indices: &[usize], masking: Option<&Masking>) -> Batch {
        match self {
            Samples::Regression { x, y } => Batch::Regression {
                x: indices
                    .iter()
                    .flat_map(|&i| &x[i * REGRESSION_IN..(i + 1) * REGRESSION_IN])
                    .copied()
                    .collect(),
                y: indices
                    .iter()
                    .flat_map(|&i| &y[i * REGRESSION_OUT..(i + 1) * REGRESSION_OUT])
                    .copied()
                    .collect(),
                n: indices.len(),
            },
            Samples::Stream { tokens, seq_len } if masking.is_some() => {
                let masking = masking.expect("matched");
                let (mut inputs, mut positions, mut targets) = (Vec::new(), Vec::new(), Vec::new());
                for (row, &i) in indices.iter().enumerate() {
                    let mut window = tokens
                        .read((i * seq_len) as u64, *seq_len)
                        .unwrap_or_else(|e| panic!("reading the dataset's sample {i}: {e}"));
                    for (p, held) in masking.apply(split, i, &mut window) {
                        positions.push((row * seq_len + p) as i64);
                        targets.push(i64::from(held));
                    }
                    inputs.extend(window.iter().map(|&t| i64::from(t)));
                }
                Batch::Masked {
                    inputs,
                    positions,
                    targets,
                    n: indices.len(),
                    seq_len: *seq_len,
                }
            }
            Samples::Documents {
                docs,
                labels,
                seq_len,
                special,
            } => {
                let mut inputs = Vec::with_capacity(indices.len() * seq_len);
                let mut lengths = Vec::with_capacity(indices.len());
                for &i in indices {
                    // [CLS] and [SEP] around as much of the document as fits.
                    let body = &docs[i][..docs[i].len().min(seq_len - 2)];
                    let framed = std::iter::once(special.cls)
                        .chain(body.iter().copied())
                        .chain(std::iter::once(special.sep));
                    let start = inputs.len();
                    inputs.extend(framed.map(i64::from));
                    lengths.push(inputs.len() - start);
                    inputs.resize(start + seq_len, i64::from(special.pad));
                }
                Batch::Labelled {
                    inputs,
                    lengths,
                    labels: indices.iter().map(|&i| labels[i]).collect(),
                    n: indices.len(),
                    seq_len: *seq_len,
                }
            }
            Samples::Stream { tokens, seq_len } => {
                let mut inputs = Vec::with_capacity(indices.len() * seq_len);
                let mut targets = Vec::with_capacity(indices.len() * seq_len);
                for &i in indices {
                    let window = tokens
                        .read((i * seq_len) as u64, seq_len + 1)
                        .unwrap_or_else(|e| panic!("reading the dataset's sample {i}: {e}"));
                    inputs.extend(window[..*seq_len].iter().map(|&t| i64::from(t)));
                    targets.extend(window[1..].iter().map(|&t| i64::from(t)));
                }
                Batch::Tokens {
                    inputs,
                    targets,
                    n: indices.len(),
                    seq_len: *seq_len,
                }
            }
        }
    }
}

pub struct Dataset {
    train: Samples,
    validation: Samples,
    test: Samples,
    /// The test split's arithmetic lines, token by token, for exact-match accuracy.
    test_lines: Vec<Vec<i64>>,
    seed: u64,
    /// Recent epochs' sample orders.
    permutations: Mutex<Vec<(usize, Arc<Vec<usize>>)>>,
    /// What a `dataset:` source adds: its manifest's hash (checkpoints keep it), its tokenizer
    /// (to show what the model writes) and the vocabulary size.
    prepared: Option<Prepared>,
    /// A bert's masked-LM masking of the token windows.
    masking: Option<Masking>,
    /// A labelled dataset's label names, sorted: label i is `label_names[i]`.
    label_names: Vec<String>,
}

struct Prepared {
    /// None for a built-in corpus (a pure function of the spec).
    manifest_sha256: Option<String>,
    /// What reading it from a store cost so far (a remote dataset's).
    io: Option<gantry_data::cache::IoStats>,
    tokenizer: gantry_data::Tokenizer,
    vocab_size: u32,
}

impl Dataset {
    /// The spec's data. A `dataset:` source's shards are read where they are (verified) or, for
    /// a remote dataset, fetched block by block into the machine's cache, through the worker's
    /// store options with the spec's `data.options` over them. `builtin:arithmetic` is made a
    /// dataset by the same prepare code (in the machine's cache) and read the same way;
    /// `builtin:regression`, numbers rather than text, is generated.
    pub fn open(
        spec: &JobSpec,
        worker: &gantry_data::Options,
        io: &tokio::runtime::Runtime,
    ) -> anyhow::Result<Self> {
        if let Some(url) = spec.dataset() {
            let options = gantry_core::store_options::for_url(url, worker, &spec.data.options);
            let reader = io.block_on(gantry_data::DatasetReader::open(url, &options))?;
            return Self::read(spec, url, reader, io);
        }
        if spec.data_source() != corpus::ARITHMETIC {
            return Ok(Self::regression(spec));
        }
        let root = io.block_on(corpus::arithmetic_dataset(spec))?;
        let url = root.display().to_string();
        let reader = io.block_on(gantry_data::DatasetReader::open(&url, &Default::default()))?;
        let mut data = Self::read(spec, corpus::ARITHMETIC, reader, io)?;
        // Generated from the spec, it cannot change under a job: checkpoints need no hash of it.
        if let Some(p) = data.prepared.as_mut() {
            p.manifest_sha256 = None;
        }
        // The test split's lines, each with its end-of-line, for exact-match accuracy.
        if let Samples::Stream { tokens, .. } = &data.test {
            let stream = tokens.read(0, tokens.len() as usize)?;
            data.test_lines = stream
                .split_inclusive(|&t| t == corpus::END_OF_LINE)
                .map(|line| line.iter().map(|&t| i64::from(t)).collect())
                .collect();
        }
        Ok(data)
    }

    /// The data of a spec without a remote dataset, for tests and benchmarks (a built-in corpus,
    /// or a dataset on the local disk).
    pub fn for_spec(spec: &JobSpec) -> Self {
        let io = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a runtime");
        Self::open(spec, &Default::default(), &io).expect("the spec's data")
    }

    fn read(
        spec: &JobSpec,
        name: &str,
        reader: gantry_data::DatasetReader,
        io: &tokio::runtime::Runtime,
    ) -> anyhow::Result<Self> {
        let seq_len = spec.data.seq_len as usize;
        let splits = reader.splits(&gantry_data::cache::default_dir())?;
        let tokenizer = io.block_on(reader.tokenizer())?;
        if spec.model.kind == ModelKind::Bert {
            return Self::for_bert(spec, name, reader, splits, tokenizer);
        }
        let stream = |tokens| Samples::Stream { tokens, seq_len };
        let (train, validation, test) = (
            stream(splits.train),
            stream(splits.validation),
            stream(splits.test),
        );
        anyhow::ensure!(
            train.len() > 0,
            "data.source: the train split of {name} holds fewer than data.seq_len + 1 = {} tokens",
            seq_len + 1
        );
        // What every evaluation reads (the first samples of each split) is fetched meanwhile.
        for split in [&validation, &test] {
            split.prefetch(&(0..split.len().min(EVAL_SAMPLES)).collect::<Vec<_>>());
        }
        Ok(Self {
            train,
            validation,
            test,
            test_lines: Vec::new(),
            seed: spec.train.seed,
            permutations: Mutex::default(),
            masking: None,
            label_names: Vec::new(),
            prepared: Some(Prepared {
                io: splits.io,
                tokenizer,
                vocab_size: reader.manifest.tokenizer.vocab_size,
                manifest_sha256: Some(reader.manifest_sha256),
            }),
        })
    }

    /// Fills in `model.vocab_size` from a dataset's tokenizer and a classifier's
    /// `model.num_labels` from its labels, or refuses values that differ.
    pub fn fit_spec(&self, spec: &mut JobSpec) -> anyhow::Result<()> {
        if spec.task() == Task::Classification {
            let theirs = self.label_names.len() as u32;
            match spec.model.num_labels {
                None => spec.model.num_labels = Some(theirs),
                Some(ours) if ours != theirs => anyhow::bail!(
                    "model.num_labels: {ours}, but dataset {} has {theirs} labels ({})",
                    spec.dataset().unwrap_or_default(),
                    self.label_names.join(", ")
                ),
                Some(_) => {}
            }
        }
        let Some(theirs) = self.prepared.as_ref().map(|p| p.vocab_size) else {
            return Ok(());
        };
        // A built-in corpus's vocabulary is the spec's own.
        if spec.dataset().is_none() {
            return Ok(());
        }
        match spec.model.vocab_size {
            None => spec.model.vocab_size = Some(theirs),
            Some(ours) if ours != theirs => anyhow::bail!(
                "model.vocab_size: {ours}, but the tokenizer of dataset {} has {theirs} tokens",
                spec.dataset().unwrap_or_default()
            ),
            Some(_) => {}
        }
        Ok(())
    }

    /// A fixed prompt for a dataset's generated samples: the first tokens of the validation
    /// split, or of the train split.
    pub fn sample_prompt(&self, len: usize) -> Option<Vec<i64>> {
        self.prepared.as_ref()?;
        let from = |s: &Samples| match s {
            Samples::Stream { tokens, .. } if tokens.len() >= len as u64 => tokens
                .read(0, len)
                .ok()
                .map(|t| t.into_iter().map(i64::from).collect()),
            _ => None,
        };
        from(&self.validation).or_else(|| from(&self.train))
    }

    /// The text of `tokens`, with a dataset's tokenizer.
    pub fn decode(&self, tokens: &[i64]) -> Option<String> {
        let ids: Vec<u32> = tokens.iter().map(|&t| t as u32).collect();
        self.prepared.as_ref()?.tokenizer.decode(&ids, false).ok()
    }

    /// Starts fetching this dp rank's samples of `step` (for a remote dataset; nothing to do for
    /// the others), so the step finds them on disk.
    pub fn prefetch_step(&self, step: u64, global_batch: usize, dp_rank: usize, dp: usize) {
        if self.prepared.as_ref().is_some_and(|p| p.io.is_some()) {
            let global = self.global_batch_indices(step, global_batch);
            self.train.prefetch(shard(&global, dp_rank, dp));
        }
    }

    /// What reading a remote dataset cost so far, for the logs.
    pub fn io_report(&self) -> Option<String> {
        Some(self.prepared.as_ref()?.io.as_ref()?.to_string())
    }

    /// The vocabulary the model trains with: the dataset's tokenizer's, else the spec's.
    pub fn vocab_size(&self, spec: &JobSpec) -> usize {
        match &self.prepared {
            Some(p) if spec.dataset().is_some() => p.vocab_size as usize,
            _ => spec.vocab_size(),
        }
    }

    /// SHA-256 of the dataset's manifest (a `dataset:` source's).
    pub fn manifest_sha256(&self) -> Option<&str> {
        self.prepared.as_ref()?.manifest_sha256.as_deref()
    }

    /// `builtin:regression`: features and targets generated from the seed, split by position.
    fn regression(spec: &JobSpec) -> Self {
        let seed = spec.train.seed;
        let examples = spec.data.examples as usize;
        let [train_frac, val_frac, _] = spec.data.split;
        let n_train = ((examples as f64) * train_frac).round() as usize;
        let n_val = ((examples as f64) * val_frac).round() as usize;
        let (x, y) = corpus::regression(examples, seed);
        let part = |range: std::ops::Range<usize>| Samples::Regression {
            x: x[range.start * REGRESSION_IN..range.end * REGRESSION_IN].to_vec(),
            y: y[range.start * REGRESSION_OUT..range.end * REGRESSION_OUT].to_vec(),
        };
        Self {
            train: part(0..n_train),
            validation: part(n_train..n_train + n_val),
            test: part(n_train + n_val..examples),
            test_lines: Vec::new(),
            seed,
            permutations: Mutex::default(),
            prepared: None,
            masking: None,
            label_names: Vec::new(),
        }
    }

    pub fn len(&self, split: Split) -> usize {
        self.samples(split).len()
    }

    fn samples(&self, split: Split) -> &Samples {
        match split {
            Split::Train => &self.train,
            Split::Validation => &self.validation,
            Split::Test => &self.test,
        }
    }

    /// Training sample indices of `step`'s global batch: consecutive positions in a sequence of
    /// per-epoch permutations of the training set.
    pub fn global_batch_indices(&self, step: u64, global_batch: usize) -> Vec<usize> {
        let n = self.train.len();
        assert!(n > 0, "the training split is empty");
        let start = step as usize * global_batch;
        let mut current: Option<(usize, Arc<Vec<usize>>)> = None;
        (start..start + global_batch)
            .map(|pos| {
                let epoch = pos / n;
                if current.as_ref().is_none_or(|(e, _)| *e != epoch) {
                    current = Some((epoch, self.permutation(epoch)));
                }
                current.as_ref().expect("filled above").1[pos % n]
            })
            .collect()
    }

    /// The order of the training samples in `epoch`, seeded by (seed, epoch). The last two
    /// epochs' are kept: a step and the one prefetched ahead of it may straddle an epoch's end.
    fn permutation(&self, epoch: usize) -> Arc<Vec<usize>> {
        let mut kept = self.permutations.lock().expect("permutations");
        if let Some((_, perm)) = kept.iter().find(|(e, _)| *e == epoch) {
            return perm.clone();
        }
        let mut perm: Vec<usize> = (0..self.train.len()).collect();
        let mut rng = ChaCha8Rng::seed_from_u64(
            self.seed ^ (epoch as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15),
        );
        perm.shuffle(&mut rng);
        let perm = Arc::new(perm);
        if kept.len() == 2 {
            kept.remove(0);
        }
        kept.push((epoch, perm.clone()));
        perm
    }

    /// Test-split lines (`a+b=c\n`, as tokens) and where each answer starts (after `=`).
    pub fn test_answers(&self) -> impl Iterator<Item = (&[i64], usize)> {
        let equals = VOCAB
            .iter()
            .position(|&c| c == b'=')
            .expect("'=' is in the vocabulary") as i64;
        self.test_lines
            .iter()
            .filter_map(move |l| Some((l.as_slice(), l.iter().position(|&t| t == equals)? + 1)))
    }

    pub fn batch(&self, split: Split, indices: &[usize]) -> Batch {
        self.samples(split)
            .batch(split, indices, self.masking.as_ref())
    }

    /// A labelled dataset's label names, sorted (label i is the i-th); empty otherwise.
    pub fn label_names(&self) -> &[String] {
        &self.label_names
    }

    /// A bert's data: documents with their labels for classification, else the token stream
    /// masked for masked-LM. A split's documents are read whole, once, and cut at end-of-text.
    fn for_bert(
        spec: &JobSpec,
        name: &str,
        reader: gantry_data::DatasetReader,
        splits: gantry_data::cache::Splits,
        tokenizer: gantry_data::Tokenizer,
    ) -> anyhow::Result<Self> {
        let seq_len = spec.data.seq_len as usize;
        let manifest = &reader.manifest;
        let eot = manifest.tokenizer.end_of_text_id;
        let id = |names: &[&str]| names.iter().find_map(|t| tokenizer.token_to_id(t));
        let parts = [
            (splits.train, &manifest.train),
            (splits.validation, &manifest.validation),
            (splits.test, &manifest.test),
        ];
        let ([train, validation, test], masking, label_names) =
            if spec.task() == Task::Classification {
                let names = manifest.label_names();
                anyhow::ensure!(
                    names.len() >= 2,
                    "data.source: {name} has {} label(s); classification needs a dataset prepared \
                 with --label-field and at least two labels",
                    names.len()
                );
                let special = Special {
                    cls: id(&["[CLS]", "<s>"]).unwrap_or(eot),
                    sep: eot,
                    pad: id(&["[PAD]", "<pad>"]).unwrap_or(eot),
                };
                let mut samples = Vec::new();
                for (tokens, entry) in parts {
                    let stream = tokens.read(0, tokens.len() as usize)?;
                    let docs: Vec<Vec<u32>> = stream
                        .split(|&t| t == eot)
                        .take(entry.documents as usize)
                        .map(<[u32]>::to_vec)
                        .collect();
                    let labels: Vec<i64> = entry
                        .labels
                        .iter()
                        .flatten()
                        .map(|l| names.binary_search(l).expect("a listed label") as i64)
                        .collect();
                    anyhow::ensure!(
                        docs.len() == labels.len(),
                        "data.source: {name} holds {} documents but {} labels in a split",
                        docs.len(),
                        labels.len()
                    );
                    samples.push(Samples::Documents {
                        docs,
                        labels,
                        seq_len,
                        special,
                    });
                }
                let [train, validation, test] = <[Samples; 3]>::try_from(samples)
                    .unwrap_or_else(|_| unreachable!("three splits"));
                ([train, validation, test], None, names)
            } else {
                let mask = id(&["[MASK]", "<mask>"]).ok_or_else(|| {
                anyhow::anyhow!(
                    "data.source: the tokenizer of {name} has no [MASK] (or <mask>) token, which \
                     masked-LM needs; prepare the dataset with a BERT tokenizer.json"
                )
            })?;
                let masking = Masking {
                    mask,
                    vocab: manifest.tokenizer.vocab_size,
                    per_sample: masked_per_sample(seq_len),
                    seed: spec.train.seed,
                };
                let samples = parts.map(|(tokens, _)| Samples::Stream { tokens, seq_len });
                (samples, Some(masking), Vec::new())
            };
        anyhow::ensure!(
            train.len() > 0,
            "data.source: the train split of {name} has no samples"
        );
        Ok(Self {
            train,
            validation,
            test,
            test_lines: Vec::new(),
            seed: spec.train.seed,
            permutations: Mutex::default(),
            masking,
            label_names,
            prepared: Some(Prepared {
                io: splits.io,
                tokenizer,
                vocab_size: manifest.tokenizer.vocab_size,
                manifest_sha256: Some(reader.manifest_sha256.clone()),
            }),
        })
    }
}

/// This data-parallel rank's contiguous share of a global batch.
pub fn shard(indices: &[usize], dp_rank: usize, dp: usize) -> &[usize] {
    let per = indices.len() / dp;
    &indices[dp_rank * per..(dp_rank + 1) * per]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(kind: &str) -> JobSpec {
        JobSpec::from_json(&format!(
            r#"{{"name":"t","model":{{"kind":"{kind}"}},"train":{{"steps":5,"global_batch":8,"lr":0.1}}}}"#
        ))
        .unwrap()
    }

    #[test]
    fn batches_are_a_pure_function_of_seed_and_step() {
        for kind in ["mlp", "gpt"] {
            let a = Dataset::for_spec(&spec(kind));
            let b = Dataset::for_spec(&spec(kind));
            for step in [0, 1, 1000] {
                let ia = a.global_batch_indices(step, 8);
                assert_eq!(ia, b.global_batch_indices(step, 8));
                assert_eq!(a.batch(Split::Train, &ia), b.batch(Split::Train, &ia));
            }
            assert_ne!(a.global_batch_indices(0, 8), a.global_batch_indices(1, 8));
            assert!(a.len(Split::Validation) > 0 && a.len(Split::Test) > 0);
        }
    }

    #[test]
    fn shards_partition_the_global_batch() {
        let global: Vec<usize> = (10..18).collect();
        let joined: Vec<usize> = (0..4).flat_map(|r| shard(&global, r, 4).to_vec()).collect();
        assert_eq!(joined, global);
    }

    /// The samples of a step do not depend on the dp size: the dp ranks' batches, joined in
    /// rank order, are the global batch, token for token.
    #[test]
    fn every_dp_size_takes_the_same_samples_of_a_step() {
        let data = Dataset::for_spec(&spec("gpt"));
        for step in [0, 7, 123, 10_000] {
            let global = data.global_batch_indices(step, 8);
            let Batch::Tokens { inputs: whole, .. } = data.batch(Split::Train, &global) else {
                panic!("token batches");
            };
            for dp in [1, 2, 4] {
                let joined: Vec<i64> = (0..dp)
                    .flat_map(|r| match data.batch(Split::Train, shard(&global, r, dp)) {
                        Batch::Tokens { inputs, .. } => inputs,
                        _ => unreachable!("token batches"),
                    })
                    .collect();
                assert_eq!(joined, whole, "step {step} at dp {dp}");
            }
        }
    }

    #[test]
    fn the_corpus_is_correct_arithmetic() {
        for line in arithmetic_lines(50, 1) {
            let (lhs, rhs) = line.trim_end().split_once('=').unwrap();
            let (a, b) = lhs.split_once('+').unwrap();
            assert_eq!(
                a.parse::<u32>().unwrap() + b.parse::<u32>().unwrap(),
                rhs.parse::<u32>().unwrap()
            );
        }
    }
}
