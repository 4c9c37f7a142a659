//! Cleaning, each step counted and all of it deterministic (the same input gives the same
//! documents in the same order):
//!
//! 1. Unicode NFC normalisation and whitespace clean-up (line ends, trailing spaces, runs of
//!    spaces and of blank lines, leading and trailing blank space);
//! 2. length and quality filters: fewer than `min_chars` characters, or more than
//!    `max_non_text` of them neither letters, digits, whitespace nor prose punctuation;
//! 3. exact duplicates, by a hash of the cleaned text (the first one stays);
//! 4. near duplicates: MinHash signatures of each document's character 5-grams, grouped by
//!    locality-sensitive hashing into candidate pairs, a candidate dropped when its estimated
//!    Jaccard similarity to an earlier kept document reaches `near_duplicate_threshold`.

use crate::input::Document;
use serde::{Deserialize, Serialize};
use std::collections::{HashMap, HashSet};
use tokenizers::normalizers::unicode::NFC;
use tokenizers::{NormalizedString, Normalizer};
use xxhash_rust::xxh3::{xxh3_64, xxh3_64_with_seed};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CleanOptions {
    pub min_chars: usize,
    /// The largest share of characters that are not text (letters, digits, whitespace,
    /// punctuation) a document may have.
    pub max_non_text: f64,
    /// Near-duplicate removal at this estimated Jaccard similarity; `None` turns it off.
    pub near_duplicate_threshold: Option<f64>,
    /// Exact-duplicate removal (by content hash).
    #[serde(default = "yes")]
    pub exact_duplicates: bool,
}

fn yes() -> bool {
    true
}

impl Default for CleanOptions {
    fn default() -> Self {
        Self {
            min_chars: 16,
            max_non_text: 0.3,
            near_duplicate_threshold: Some(0.8),
            exact_duplicates: true,
        }
    }
}

/// What cleaning did, step by step.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct CleanReport {
    pub read: u64,
    /// Documents whose text normalisation or whitespace clean-up changed.
    pub normalised: u64,
    pub too_short: u64,
    pub non_text: u64,
    pub exact_duplicates: u64,
    pub near_duplicates: u64,
    pub kept: u64,
}

/// Cleans `documents` (in order) and returns those kept, with the report.
pub fn clean(documents: Vec<Document>, options: &CleanOptions) -> (Vec<Document>, CleanReport) {
    let mut report = CleanReport {
        read: documents.len() as u64,
        ..CleanReport::default()
    };
    let mut seen = HashSet::new();
    let mut kept = Vec::new();
    for mut doc in documents {
        let cleaned = normalise(&doc.text);
        if cleaned != doc.text {
            report.normalised += 1;
        }
        doc.text = cleaned;
        let chars = doc.text.chars().count();
        if chars < options.min_chars {
            report.too_short += 1;
            continue;
        }
        let non_text = doc.text.chars().filter(|&c| !is_text(c)).count();
        if non_text as f64 > options.max_non_text * chars as f64 {
            report.non_text += 1;
            continue;
        }
        if options.exact_duplicates && !seen.insert(xxh3_64(doc.text.as_bytes())) {
            report.exact_duplicates += 1;
            continue;
        }
        kept.push(doc);
    }
    if let Some(threshold) = options.near_duplicate_threshold {
        let before = kept.len();
        kept = remove_near_duplicates(kept, threshold);
        report.near_duplicates = (before - kept.len()) as u64;
    }
    report.kept = kept.len() as u64;
    (kept, report)
}

/// Letters, digits, whitespace and the punctuation of prose (not symbols such as `@#$%^&*|<>`).
fn is_text(c: char) -> bool {
    c.is_alphanumeric()
        || c.is_whitespace()
        || matches!(
            c,
            '.' | ','
                | ';'
                | ':'
                | '!'
                | '?'
                | '\''
                | '"'
                | '('
                | ')'
                | '['
                | ']'
                | '-'
                | '/'
                | '‘'
                | '’'
                | '“'
                | '”'
                | '–'
                | '—'
                | '…'
                | '«'
                | '»'
                | '¿'
                | '¡'
                | '·'
        )
}

/// NFC, `\r\n` → `\n`, tabs and runs of spaces → one space, no trailing spaces, at most one
/// blank line in a row, no leading or trailing blank space.
pub fn normalise(text: &str) -> String {
    let mut n = NormalizedString::from(text);
    NFC.normalize(&mut n).expect("NFC cannot fail");
    let text = n.get().replace("\r\n", "\n").replace('\r', "\n");
    let mut out = String::with_capacity(text.len());
    let mut blank_run = 0;
    for line in text.lines() {
        let mut cleaned = String::with_capacity(line.len());
        let mut space = false;
        for c in line.trim().chars() {
            if c == ' ' || c == '\t' || c == '\u{a0}' {
                space = true;
            } else {
                if space {
                    cleaned.push(' ');
                }
                space = false;
                cleaned.push(c);
            }
        }
        if cleaned.is_empty() {
            blank_run += 1;
            continue;
        }
        if !out.is_empty() {
            out.push('\n');
            if blank_run > 0 {
                out.push('\n');
            }
        }
        blank_run = 0;
        out.push_str(&cleaned);
    }
    out
}

/// Hash functions per signature.
const PERMUTATIONS: usize = 128;
/// Characters per shingle.
const SHINGLE: usize = 5;

/// LSH bands × rows for a threshold: the (b, r) with b·r = [`PERMUTATIONS`] whose S-curve
/// midpoint (1/b)^(1/r) is nearest the threshold.
pub fn bands_for(threshold: f64) -> (usize, usize) {
    (1..=PERMUTATIONS)
        .filter(|b| PERMUTATIONS.is_multiple_of(*b))
        .map(|b| (b, PERMUTATIONS / b))
        .min_by(|&(b1, r1), &(b2, r2)| {
            let d = |b: usize, r: usize| ((1.0 / b as f64).powf(1.0 / r as f64) - threshold).abs();
            d(b1, r1).total_cmp(&d(b2, r2))
        })
        .expect("128 has divisors")
}

/// A document's MinHash signature over its character shingles.
pub fn signature(text: &str) -> Vec<u64> {
    let chars: Vec<char> = text.chars().collect();
    let mut shingles: Vec<u64> = if chars.len() <= SHINGLE {
        vec![xxh3_64(text.as_bytes())]
    } else {
        chars
            .windows(SHINGLE)
            .map(|w| xxh3_64(w.iter().collect::<String>().as_bytes()))
            .collect()
    };
    shingles.sort_unstable();
    shingles.dedup();
    // One hash per shingle, then PERMUTATIONS cheap hash functions of it: h(x) = a·x + b
    // (mod 2^64) with odd a, each (a, b) fixed from its index.
    let mut signature = vec![u64::MAX; PERMUTATIONS];
    for (i, min) in signature.iter_mut().enumerate() {
        let a = xxh3_64_with_seed(b"a", i as u64) | 1;
        let b = xxh3_64_with_seed(b"b", i as u64);
        for &s in &shingles {
            *min = (*min).min(a.wrapping_mul(s).wrapping_add(b));
        }
    }
    signature
}

/// The share of signature positions where two signatures agree: an estimate of the Jaccard
/// similarity of their shingle sets.
pub fn similarity(a: &[u64], b: &[u64]) -> f64 {
    a.iter().zip(b).filter(|(x, y)| x == y).count() as f64 / a.len() as f64
}

fn remove_near_duplicates(documents: Vec<Document>, threshold: f64) -> Vec<Document> {
    let (bands, rows) = bands_for(threshold);
    let signatures: Vec<Vec<u64>> = documents.iter().map(|d| signature(&d.text)).collect();
    // Bucket of each band of each kept document → the kept documents in it.
    let mut buckets: HashMap<(usize, u64), Vec<usize>> = HashMap::new();
    let mut keep = vec![false; documents.len()];
    for (i, sig) in signatures.iter().enumerate() {
        let keys: Vec<(usize, u64)> = (0..bands)
            .map(|b| {
                let band = &sig[b * rows..(b + 1) * rows];
                let bytes: Vec<u8> = band.iter().flat_map(|h| h.to_le_bytes()).collect();
                (b, xxh3_64(&bytes))
            })
            .collect();
        let duplicate = keys.iter().any(|key| {
            buckets.get(key).is_some_and(|members| {
                members
                    .iter()
                    .any(|&j| similarity(sig, &signatures[j]) >= threshold)
            })
        });
        if !duplicate {
            keep[i] = true;
            for key in keys {
                buckets.entry(key).or_default().push(i);
            }
        }
    }
    documents
        .into_iter()
        .zip(keep)
        .filter_map(|(d, k)| k.then_some(d))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn doc(text: &str) -> Document {
        Document {
            text: text.into(),
            label: None,
        }
    }

    #[test]
    fn whitespace_and_unicode_are_normalised() {
        // "é" as e + combining acute becomes the one precomposed character.
        assert_eq!(
            normalise("  caf\u{65}\u{301}\t\t au  lait \r\n\r\n\r\n\nnext  "),
            "caf\u{e9} au lait\n\nnext"
        );
        assert_eq!(normalise("a\n \nb"), "a\n\nb");
    }

    #[test]
    fn each_step_is_counted() {
        let base = "The quick brown fox jumps over the lazy dog near the river bank today.";
        let near = "The quick brown fox jumps over the lazy dog near the river bank today!";
        let other = "An entirely different sentence about reading books in the quiet library.";
        let docs = vec![
            doc(base),
            doc(&format!("  {base}  ")), // exact duplicate once cleaned
            doc("short"),
            doc("@@@@ #### $$$$ %%%% ^^^^ &&&& ****"),
            doc(near),
            doc(other),
        ];
        let (kept, report) = clean(docs, &CleanOptions::default());
        assert_eq!(
            kept.iter().map(|d| d.text.as_str()).collect::<Vec<_>>(),
            [base, other]
        );
        assert_eq!(
            report,
            CleanReport {
                read: 6,
                normalised: 1,
                too_short: 1,
                non_text: 1,
                exact_duplicates: 1,
                near_duplicates: 1,
                kept: 2,
            }
        );
    }

    #[test]
    fn minhash_estimates_jaccard_similarity() {
        let a = "the cat sat on the mat and looked out of the window at the birds";
        let b = "the cat sat on the mat and looked out of the window at the bird";
        let c = "completely unrelated words about ships sailing across a stormy sea";
        let (sa, sb, sc) = (signature(a), signature(b), signature(c));
        assert!(similarity(&sa, &sb) > 0.8, "{}", similarity(&sa, &sb));
        assert!(similarity(&sa, &sc) < 0.2, "{}", similarity(&sa, &sc));
        assert_eq!(sa, signature(a), "deterministic");
        let (b, r) = bands_for(0.8);
        assert_eq!(b * r, PERMUTATIONS);
        assert!(((1.0 / b as f64).powf(1.0 / r as f64) - 0.8).abs() < 0.1);
    }
}
