//! Splitting by document: a stable hash of each document's cleaned text places it in train,
//! validation or test, so adding files never moves a document between splits and a document
//! (or its exact duplicate) can never be in two.

use crate::manifest::SplitName;
use xxhash_rust::xxh3::xxh3_64_with_seed;

/// The split of a document of `text` for fractions `[train, validation, test]` (summing to 1).
pub fn split_of(text: &str, fractions: [f64; 3]) -> SplitName {
    // A point in [0, 1) from the text alone.
    let at = (xxh3_64_with_seed(text.as_bytes(), 0x5e1f) >> 11) as f64 / (1u64 << 53) as f64;
    if at < fractions[0] {
        SplitName::Train
    } else if at < fractions[0] + fractions[1] {
        SplitName::Validation
    } else {
        SplitName::Test
    }
}

/// Checks split fractions: three, each in [0, 1], summing to 1, with a non-empty train split.
pub fn check_fractions(fractions: [f64; 3]) -> anyhow::Result<()> {
    let sum: f64 = fractions.iter().sum();
    anyhow::ensure!(
        fractions.iter().all(|f| (0.0..=1.0).contains(f)) && (sum - 1.0).abs() < 1e-9,
        "split: {fractions:?} must be three fractions in [0, 1] that sum to 1"
    );
    anyhow::ensure!(
        fractions[0] > 0.0,
        "split: the train fraction must be above 0"
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn documents_keep_their_split_and_the_shares_follow_the_fractions() {
        let docs: Vec<String> = (0..10_000)
            .map(|i| format!("document number {i}"))
            .collect();
        let fractions = [0.8, 0.1, 0.1];
        let splits: Vec<SplitName> = docs.iter().map(|d| split_of(d, fractions)).collect();
        // The same text, the same split, whatever else is in the corpus.
        assert_eq!(splits[1234], split_of("document number 1234", fractions));
        let share = |s: SplitName| splits.iter().filter(|&&x| x == s).count() as f64 / 1e4;
        assert!((share(SplitName::Train) - 0.8).abs() < 0.02);
        assert!((share(SplitName::Validation) - 0.1).abs() < 0.02);
        assert!((share(SplitName::Test) - 0.1).abs() < 0.02);
        assert!(check_fractions([0.5, 0.5, 0.5]).is_err());
        assert!(check_fractions([0.0, 0.5, 0.5]).is_err());
    }
}
