//! Whether a placed attempt hangs: it has shown no life (its placement, a reported step, or
//! the coordinator's own start) for longer than its hang timeout. Such an attempt is stuck
//! somewhere the collectives' timeouts do not see (a rank spinning, a deadlock outside a
//! collective), so only the coordinator can notice it.

/// The hang check's verdict on one attempt at one moment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Hang {
    /// The check does not apply; the reason says why.
    Unwatched { reason: &'static str },
    /// Life was seen recently enough; the attempt hangs if nothing more comes by `deadline_ms`.
    Alive { deadline_ms: i64 },
    /// The attempt hangs: fail it with this cause.
    Hung { cause: String },
}

/// Judges an attempt at `now_ms` that last showed life at `last_life_ms` (none: never
/// watched), under a timeout of `hang_timeout_secs` (0 turns the check off).
pub fn check(now_ms: i64, last_life_ms: Option<i64>, hang_timeout_secs: u64) -> Hang {
    if hang_timeout_secs == 0 {
        return Hang::Unwatched {
            reason: "the job's hang timeout is 0 (off)",
        };
    }
    let Some(since) = last_life_ms else {
        return Hang::Unwatched {
            reason: "no sign of life recorded for this attempt",
        };
    };
    let timeout_ms = i64::try_from(hang_timeout_secs.saturating_mul(1000)).unwrap_or(i64::MAX);
    let deadline_ms = since.saturating_add(timeout_ms);
    if now_ms > deadline_ms {
        Hang::Hung {
            cause: format!("no step reported for {hang_timeout_secs} s (hung)"),
        }
    } else {
        Hang::Alive { deadline_ms }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_attempt_hangs_only_after_its_whole_timeout() {
        assert_eq!(
            check(4_000, Some(1_000), 3),
            Hang::Alive { deadline_ms: 4_000 }
        );
        assert_eq!(
            check(4_001, Some(1_000), 3),
            Hang::Hung {
                cause: "no step reported for 3 s (hung)".into()
            }
        );
    }

    #[test]
    fn a_zero_timeout_or_no_record_turns_the_check_off() {
        assert_eq!(
            check(1 << 40, Some(0), 0),
            Hang::Unwatched {
                reason: "the job's hang timeout is 0 (off)"
            }
        );
        assert_eq!(
            check(1 << 40, None, 3),
            Hang::Unwatched {
                reason: "no sign of life recorded for this attempt"
            }
        );
    }

    #[test]
    fn a_huge_timeout_does_not_overflow() {
        assert!(matches!(
            check(i64::MAX, Some(i64::MAX - 1), u64::MAX),
            Hang::Alive { .. }
        ));
    }
}
