//! A job's data: built-in corpora generated from the job's seed, or a dataset that
//! `gantry data prepare` wrote (`data.source = "dataset:<path or URL>"`), read window by window
//! from local files (a remote dataset's shards copied into the machine's cache first), every
//! shard's checksum verified. Either way every rank (and every restart) sees the same samples,
//! and the global batch of a step is a pure function of (seed, step): global step s takes
//! samples [s·B, (s+1)·B) of a sequence of per-epoch permutations, and each dp rank its
//! contiguous slice of them, so the samples of a step are the same at any dp size and the data
//! cursor of a checkpoint is its step.

use gantry_core::JobSpec;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// Input and output widths of the synthetic regression task.
pub const REGRESSION_IN: usize = 16;
pub const REGRESSION_OUT: usize = 4;

/// Characters of the arithmetic corpus; the token id is the index.
pub const VOCAB: &[u8] = b"\n+=0123456789";

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
}

impl Batch {
    pub fn len(&self) -> usize {
        match self {
            Batch::Regression { n, .. } | Batch::Tokens { n, .. } => *n,
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
    /// A token stream cut into windows of `seq_len + 1`.
    Tokens {
        stream: Vec<i64>,
        seq_len: usize,
    },
    /// A dataset's split on local files, cut the same way and read window by window.
    Stream {
        tokens: gantry_data::cache::SplitTokens,
        seq_len: usize,
    },
}

impl Samples {
    fn len(&self) -> usize {
        match self {
            Samples::Regression { y, .. } => y.len() / REGRESSION_OUT,
            Samples::Tokens { stream, seq_len } => stream.len().saturating_sub(1) / seq_len,
            Samples::Stream { tokens, seq_len } => {
                (tokens.len().saturating_sub(1) / *seq_len as u64) as usize
            }
        }
    }

    fn batch(&self, indices: &[usize]) -> Batch {
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
            Samples::Tokens { stream, seq_len } => {
                let window = |i: usize| &stream[i * seq_len..i * seq_len + seq_len + 1];
                Batch::Tokens {
                    inputs: indices
                        .iter()
                        .flat_map(|&i| &window(i)[..*seq_len])
                        .copied()
                        .collect(),
                    targets: indices
                        .iter()
                        .flat_map(|&i| &window(i)[1..])
                        .copied()
                        .collect(),
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
    /// What a `dataset:` source adds: its manifest's hash (checkpoints keep it), its tokenizer
    /// (to show what the model writes) and the vocabulary size.
    prepared: Option<Prepared>,
}

struct Prepared {
    manifest_sha256: String,
    tokenizer: gantry_data::Tokenizer,
    vocab_size: u32,
}

impl Dataset {
    /// The spec's data: generated for a `builtin:` source; for a `dataset:` one, its shards on
    /// local files (verified, a remote dataset's copied into the machine's cache), opened
    /// through the worker's store options with the spec's `data.options` over them.
    pub fn open(
        spec: &JobSpec,
        worker: &gantry_data::Options,
        io: &tokio::runtime::Runtime,
    ) -> anyhow::Result<Self> {
        let Some(url) = spec.dataset() else {
            return Ok(Self::for_spec(spec));
        };
        use gantry_data::SplitName;
        let options = gantry_core::store_options::for_url(url, worker, &spec.data.options);
        let reader = io.block_on(gantry_data::DatasetReader::open(url, &options))?;
        let seq_len = spec.data.seq_len as usize;
        let cache = gantry_data::cache::default_dir();
        let mut splits = Vec::new();
        for split in SplitName::ALL {
            splits.push(Samples::Stream {
                tokens: io.block_on(reader.local_split(split, &cache))?,
                seq_len,
            });
        }
        let [train, validation, test]: [Samples; 3] = splits.try_into().ok().expect("three splits");
        anyhow::ensure!(
            train.len() > 0,
            "data.source: the train split of dataset {url} holds fewer than data.seq_len + 1 = {} \
             tokens",
            seq_len + 1
        );
        Ok(Self {
            train,
            validation,
            test,
            test_lines: Vec::new(),
            seed: spec.train.seed,
            prepared: Some(Prepared {
                tokenizer: io.block_on(reader.tokenizer())?,
                vocab_size: reader.manifest.tokenizer.vocab_size,
                manifest_sha256: reader.manifest_sha256,
            }),
        })
    }

    /// Fills in `model.vocab_size` from a dataset's tokenizer, or refuses one that differs.
    pub fn fit_vocab(&self, spec: &mut JobSpec) -> anyhow::Result<()> {
        let Some(theirs) = self.prepared.as_ref().map(|p| p.vocab_size) else {
            return Ok(());
        };
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

    /// SHA-256 of the dataset's manifest (a `dataset:` source's).
    pub fn manifest_sha256(&self) -> Option<&str> {
        Some(&self.prepared.as_ref()?.manifest_sha256)
    }

    pub fn for_spec(spec: &JobSpec) -> Self {
        let seed = spec.train.seed;
        let examples = spec.data.examples as usize;
        let [train_frac, val_frac, _] = spec.data.split;
        let n_train = ((examples as f64) * train_frac).round() as usize;
        let n_val = ((examples as f64) * val_frac).round() as usize;
        let cut = |n_train: usize, n_val: usize| (0..n_train, n_train..n_train + n_val);
        let mut test_lines = Vec::new();
        let (train, validation, test) = match spec.data_source() {
            "builtin:arithmetic" => {
                let lines = arithmetic_lines(examples, seed);
                let seq_len = spec.data.seq_len as usize;
                let (tr, va) = cut(n_train, n_val);
                let stream = |lines: &[String]| Samples::Tokens {
                    stream: lines.iter().flat_map(|l| encode(l)).collect(),
                    seq_len,
                };
                test_lines = lines[va.end..]
                    .iter()
                    .map(|l| encode(l).collect())
                    .collect();
                (
                    stream(&lines[tr]),
                    stream(&lines[va.clone()]),
                    stream(&lines[va.end..]),
                )
            }
            _ => {
                let (x, y) = regression(examples, seed);
                let part = |range: std::ops::Range<usize>| Samples::Regression {
                    x: x[range.start * REGRESSION_IN..range.end * REGRESSION_IN].to_vec(),
                    y: y[range.start * REGRESSION_OUT..range.end * REGRESSION_OUT].to_vec(),
                };
                let (tr, va) = cut(n_train, n_val);
                let rest = va.end..examples;
                (part(tr), part(va), part(rest))
            }
        };
        Self {
            train,
            validation,
            test,
            test_lines,
            seed,
            prepared: None,
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
        let mut epoch_cache: Option<(usize, Vec<usize>)> = None;
        (start..start + global_batch)
            .map(|pos| {
                let epoch = pos / n;
                if epoch_cache.as_ref().is_none_or(|(e, _)| *e != epoch) {
                    let mut perm: Vec<usize> = (0..n).collect();
                    let mut rng = ChaCha8Rng::seed_from_u64(
                        self.seed ^ (epoch as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15),
                    );
                    perm.shuffle(&mut rng);
                    epoch_cache = Some((epoch, perm));
                }
                epoch_cache.as_ref().expect("filled above").1[pos % n]
            })
            .collect()
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
        self.samples(split).batch(indices)
    }
}

/// This data-parallel rank's contiguous share of a global batch.
pub fn shard(indices: &[usize], dp_rank: usize, dp: usize) -> &[usize] {
    let per = indices.len() / dp;
    &indices[dp_rank * per..(dp_rank + 1) * per]
}

fn encode(line: &str) -> impl Iterator<Item = i64> + '_ {
    line.bytes().map(|b| {
        VOCAB
            .iter()
            .position(|&v| v == b)
            .expect("the corpus only uses vocabulary characters") as i64
    })
}

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

/// Inputs uniform in [-1, 1]; targets from a fixed random two-layer teacher network.
fn regression(count: usize, seed: u64) -> (Vec<f32>, Vec<f32>) {
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
                        Batch::Regression { .. } => unreachable!(),
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
