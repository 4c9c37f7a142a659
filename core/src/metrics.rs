//! A classifier's evaluation: accuracy, and precision, recall and F1 macro-averaged over the
//! labels, as scikit-learn's `precision_recall_fscore_support(average="macro")` computes them
//! (over the labels that occur in the truth or the predictions; a label never predicted has
//! precision 0, as with `zero_division=0`).

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct ClassMetrics {
    pub accuracy: f64,
    pub precision: f64,
    pub recall: f64,
    pub f1: f64,
    /// How many samples they were measured on.
    pub samples: u64,
}

impl ClassMetrics {
    /// From a confusion matrix of `labels` × `labels` counts, `counts[truth · labels +
    /// predicted]`; None when it counts nothing.
    pub fn from_confusion(counts: &[f64], labels: usize) -> Option<Self> {
        assert_eq!(counts.len(), labels * labels, "a square confusion matrix");
        let total: f64 = counts.iter().sum();
        if total <= 0.0 {
            return None;
        }
        let at = |t: usize, p: usize| counts[t * labels + p];
        let correct: f64 = (0..labels).map(|l| at(l, l)).sum();
        let (mut precision, mut recall, mut f1, mut seen) = (0.0, 0.0, 0.0, 0usize);
        for l in 0..labels {
            let truth: f64 = (0..labels).map(|p| at(l, p)).sum();
            let predicted: f64 = (0..labels).map(|t| at(t, l)).sum();
            if truth == 0.0 && predicted == 0.0 {
                continue;
            }
            seen += 1;
            let p = if predicted > 0.0 {
                at(l, l) / predicted
            } else {
                0.0
            };
            let r = if truth > 0.0 { at(l, l) / truth } else { 0.0 };
            precision += p;
            recall += r;
            f1 += if p + r > 0.0 {
                2.0 * p * r / (p + r)
            } else {
                0.0
            };
        }
        let seen = seen as f64;
        Some(Self {
            accuracy: correct / total,
            precision: precision / seen,
            recall: recall / seen,
            f1: f1 / seen,
            samples: total as u64,
        })
    }
}

impl std::fmt::Display for ClassMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "accuracy {:.2}%, precision {:.2}%, recall {:.2}%, F1 {:.2}% (macro, {} samples)",
            self.accuracy * 100.0,
            self.precision * 100.0,
            self.recall * 100.0,
            self.f1 * 100.0,
            self.samples
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn confusion(truth: &[usize], predicted: &[usize], labels: usize) -> Vec<f64> {
        let mut counts = vec![0.0; labels * labels];
        for (t, p) in truth.iter().zip(predicted) {
            counts[t * labels + p] += 1.0;
        }
        counts
    }

    /// scikit-learn's documented example of `precision_recall_fscore_support`: y_true
    /// [0, 1, 2, 0, 1, 2], y_pred [0, 2, 1, 0, 0, 1] gives macro precision 0.2222, recall
    /// 0.3333, F1 0.2667 (accuracy_score 0.3333).
    #[test]
    fn macro_averages_match_scikit_learn() {
        let m = ClassMetrics::from_confusion(
            &confusion(&[0, 1, 2, 0, 1, 2], &[0, 2, 1, 0, 0, 1], 3),
            3,
        )
        .unwrap();
        let close = |a: f64, b: f64| (a - b).abs() < 5e-5;
        assert!(close(m.accuracy, 1.0 / 3.0), "{m:?}");
        assert!(close(m.precision, 0.2222), "{m:?}");
        assert!(close(m.recall, 0.3333), "{m:?}");
        assert!(close(m.f1, 0.2667), "{m:?}");
        assert_eq!(m.samples, 6);
    }

    /// A classifier that always says the majority label: scikit-learn gives accuracy 0.75,
    /// macro precision 0.375 (0.75 and 0 for the never-predicted label), recall 0.5, F1
    /// 0.4286; a label that neither occurs nor is predicted does not count.
    #[test]
    fn the_majority_baseline_scores_as_scikit_learn_says() {
        let m =
            ClassMetrics::from_confusion(&confusion(&[0, 0, 0, 1], &[0, 0, 0, 0], 3), 3).unwrap();
        let close = |a: f64, b: f64| (a - b).abs() < 5e-5;
        assert!(close(m.accuracy, 0.75), "{m:?}");
        assert!(close(m.precision, 0.375), "{m:?}");
        assert!(close(m.recall, 0.5), "{m:?}");
        assert!(close(m.f1, 0.4286), "{m:?}");
        assert_eq!(ClassMetrics::from_confusion(&[0.0; 4], 2), None);
    }
}
