//! Ring schedules as plain data: for the member at `index` of a ring of `n`, which ranges of the
//! working buffer go out first, and what arrives from the predecessor (in order), what to do
//! with it, and whether to pass it on. The engine streams these in chunks, so a chunk is
//! forwarded as soon as it is reduced (pipelining across ring steps).
//!
//! Segment k of a ring all-reduce is summed in the fixed order k+1, k+2, …, k (ring order), so
//! results are bit-identical from run to run and on every rank.

use std::ops::Range;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Combine the incoming values into the buffer with the reduction.
    Reduce,
    /// Overwrite the buffer with the incoming values.
    Copy,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Receive {
    pub range: Range<usize>,
    pub action: Action,
    /// Send the range on to the successor once it has arrived.
    pub forward: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct RingPlan {
    pub initial: Vec<Range<usize>>,
    pub receives: Vec<Receive>,
}

/// The whole buffer as the only range to send.
#[allow(
    clippy::single_range_in_vec_init,
    reason = "a list of one range, not the range's elements"
)]
pub fn whole(len: usize) -> Vec<Range<usize>> {
    vec![0..len]
}

/// Segment `k` of `n` near-equal segments of a buffer of `len` (any `len`, including 0 and < n).
pub fn segment(len: usize, n: usize, k: usize) -> Range<usize> {
    (k * len / n)..((k + 1) * len / n)
}

fn at(n: usize, i: usize, back: usize) -> usize {
    (i + n * 2 - back % n) % n
}

/// Reduce-scatter that leaves member `i` with the full reduction of segment `i`.
fn reduce_scatter_steps(
    n: usize,
    i: usize,
    seg: &dyn Fn(usize) -> Range<usize>,
    forward_last: bool,
) -> RingPlan {
    if n == 1 {
        return RingPlan::default();
    }
    RingPlan {
        initial: vec![seg(at(n, i, 1))],
        receives: (0..n - 1)
            .map(|s| Receive {
                range: seg(at(n, i, s + 2)),
                action: Action::Reduce,
                forward: s < n - 2 || forward_last,
            })
            .collect(),
    }
}

/// All-gather where member `i` starts with segment `i` (already in place).
fn all_gather_steps(n: usize, i: usize, seg: &dyn Fn(usize) -> Range<usize>) -> Vec<Receive> {
    (0..n.saturating_sub(1))
        .map(|s| Receive {
            range: seg(at(n, i, s + 1)),
            action: Action::Copy,
            forward: s + 2 < n,
        })
        .collect()
}

pub fn all_reduce(len: usize, n: usize, i: usize) -> RingPlan {
    let seg = |k| segment(len, n, k);
    let mut plan = reduce_scatter_steps(n, i, &seg, true);
    plan.receives.extend(all_gather_steps(n, i, &seg));
    plan
}

/// Over a working buffer of `n` segments of `part` elements each.
pub fn reduce_scatter(part: usize, n: usize, i: usize) -> RingPlan {
    reduce_scatter_steps(n, i, &|k| k * part..(k + 1) * part, false)
}

/// Over an output buffer of `n` segments of `part` elements, segment `i` filled beforehand.
pub fn all_gather(part: usize, n: usize, i: usize) -> RingPlan {
    let seg = |k: usize| k * part..(k + 1) * part;
    RingPlan {
        initial: if n > 1 { vec![seg(i)] } else { vec![] },
        receives: all_gather_steps(n, i, &seg),
    }
}

/// A pipelined chain from `root` around the ring.
pub fn broadcast(len: usize, n: usize, i: usize, root: usize) -> RingPlan {
    if n == 1 {
        return RingPlan::default();
    }
    let position = (i + n - root) % n;
    if position == 0 {
        RingPlan {
            initial: whole(len),
            receives: vec![],
        }
    } else {
        RingPlan {
            initial: vec![],
            receives: vec![Receive {
                range: 0..len,
                action: Action::Copy,
                forward: position + 1 < n,
            }],
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Simulates the plans of a whole ring on plain vectors, step by step as the engine would:
    /// member i's sends arrive, in order, as member (i+1)'s receives.
    fn simulate(n: usize, plans: &[RingPlan], bufs: &mut [Vec<f32>]) {
        let mut outbox: Vec<std::collections::VecDeque<Vec<f32>>> = (0..n)
            .map(|i| {
                plans[i]
                    .initial
                    .iter()
                    .map(|r| bufs[i][r.clone()].to_vec())
                    .collect()
            })
            .collect();
        let mut next_receive = vec![0usize; n];
        loop {
            let mut progressed = false;
            for i in 0..n {
                let prev = (i + n - 1) % n;
                let Some(step) = plans[i].receives.get(next_receive[i]) else {
                    continue;
                };
                let Some(data) = outbox[prev].pop_front() else {
                    continue;
                };
                assert_eq!(
                    data.len(),
                    step.range.len(),
                    "member {i} expected {:?}",
                    step.range
                );
                for (dst, src) in bufs[i][step.range.clone()].iter_mut().zip(&data) {
                    match step.action {
                        Action::Reduce => *dst += src,
                        Action::Copy => *dst = *src,
                    }
                }
                if step.forward {
                    outbox[i].push_back(bufs[i][step.range.clone()].to_vec());
                }
                next_receive[i] += 1;
                progressed = true;
            }
            if !progressed {
                break;
            }
        }
        for i in 0..n {
            assert_eq!(
                next_receive[i],
                plans[i].receives.len(),
                "member {i} is missing data"
            );
            assert!(
                outbox[i].is_empty(),
                "member {i} sent more than was received"
            );
        }
    }

    #[test]
    fn all_reduce_plans_sum_everything_everywhere() {
        for n in 1..=6 {
            for len in [0, 1, 2, 5, 6, 13] {
                let mut bufs: Vec<Vec<f32>> = (0..n)
                    .map(|i| (0..len).map(|k| (i * 100 + k) as f32).collect())
                    .collect();
                let expected: Vec<f32> = (0..len)
                    .map(|k| (0..n).map(|i| (i * 100 + k) as f32).sum())
                    .collect();
                let plans: Vec<RingPlan> = (0..n).map(|i| all_reduce(len, n, i)).collect();
                simulate(n, &plans, &mut bufs);
                for b in &bufs {
                    assert_eq!(b, &expected, "n={n} len={len}");
                }
            }
        }
    }

    #[test]
    fn reduce_scatter_and_all_gather_plans_are_correct() {
        for n in 1..=5 {
            let part = 3;
            let mut bufs: Vec<Vec<f32>> = (0..n)
                .map(|i| (0..n * part).map(|k| (i * 10 + k) as f32).collect())
                .collect();
            let plans: Vec<RingPlan> = (0..n).map(|i| reduce_scatter(part, n, i)).collect();
            simulate(n, &plans, &mut bufs);
            for (i, b) in bufs.iter().enumerate() {
                let want: Vec<f32> = (i * part..(i + 1) * part)
                    .map(|k| (0..n).map(|r| (r * 10 + k) as f32).sum())
                    .collect();
                assert_eq!(&b[i * part..(i + 1) * part], &want[..]);
            }
            let mut bufs: Vec<Vec<f32>> = (0..n)
                .map(|i| {
                    (0..n * part)
                        .map(|k| if k / part == i { k as f32 } else { -1.0 })
                        .collect()
                })
                .collect();
            let plans: Vec<RingPlan> = (0..n).map(|i| all_gather(part, n, i)).collect();
            simulate(n, &plans, &mut bufs);
            for b in &bufs {
                assert_eq!(b, &(0..n * part).map(|k| k as f32).collect::<Vec<_>>());
            }
        }
    }

    #[test]
    fn broadcast_plans_copy_the_root() {
        for n in 1..=5 {
            for root in 0..n {
                let mut bufs: Vec<Vec<f32>> = (0..n).map(|i| vec![i as f32; 4]).collect();
                let plans: Vec<RingPlan> = (0..n).map(|i| broadcast(4, n, i, root)).collect();
                simulate(n, &plans, &mut bufs);
                assert!(bufs.iter().all(|b| b == &vec![root as f32; 4]));
            }
        }
    }

    /// Elements member `i` of a plan sends over the whole operation: its initial ranges and
    /// every range it forwards.
    fn sent(plan: &RingPlan) -> usize {
        plan.initial.iter().map(|r| r.len()).sum::<usize>()
            + plan
                .receives
                .iter()
                .filter(|r| r.forward)
                .map(|r| r.range.len())
                .sum::<usize>()
    }

    /// Whole numbers, so that sums are exact in any order and only the plan can be wrong.
    fn inputs(n: usize, len: usize, seed: u64) -> Vec<Vec<f32>> {
        (0..n)
            .map(|i| {
                (0..len)
                    .map(|k| ((seed as usize + i * 31 + k * 7) % 1000) as f32 - 500.0)
                    .collect()
            })
            .collect()
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(256))]

        /// The segments of a buffer are contiguous, disjoint, cover it, and differ in size by at
        /// most one element: the ring's work is balanced for any length.
        #[test]
        fn segments_partition_any_buffer(len in 0usize..10_000, n in 1usize..=16) {
            let segs: Vec<_> = (0..n).map(|k| segment(len, n, k)).collect();
            proptest::prop_assert_eq!(segs[0].start, 0);
            proptest::prop_assert_eq!(segs[n - 1].end, len);
            for w in segs.windows(2) {
                proptest::prop_assert_eq!(w[0].end, w[1].start);
            }
            let (min, max) = (
                segs.iter().map(|s| s.len()).min().unwrap(),
                segs.iter().map(|s| s.len()).max().unwrap(),
            );
            proptest::prop_assert!(max - min <= 1, "{segs:?}");
        }

        /// Every member of any ring ends with the sum of every member's buffer, and sends no
        /// more than a bandwidth-optimal ring does: 2(n-1) segments of the buffer.
        #[test]
        fn all_reduce_sums_everywhere_and_is_bandwidth_optimal(
            n in 1usize..=9, len in 0usize..300, seed in 0u64..1000,
        ) {
            let mut bufs = inputs(n, len, seed);
            let expected: Vec<f32> = (0..len).map(|k| bufs.iter().map(|b| b[k]).sum()).collect();
            let plans: Vec<RingPlan> = (0..n).map(|i| all_reduce(len, n, i)).collect();
            simulate(n, &plans, &mut bufs);
            for (i, b) in bufs.iter().enumerate() {
                proptest::prop_assert_eq!(b, &expected, "member {}", i);
            }
            let largest = len.div_ceil(n);
            for (i, plan) in plans.iter().enumerate() {
                proptest::prop_assert!(
                    sent(plan) <= 2 * (n - 1) * largest,
                    "member {} sends {} elements of {}", i, sent(plan), len
                );
            }
        }

        /// Reduce-scatter leaves member i with the sum of segment i; all-gather then gives every
        /// member every segment.
        #[test]
        fn reduce_scatter_then_all_gather_is_an_all_reduce(
            n in 1usize..=9, part in 0usize..40, seed in 0u64..1000,
        ) {
            let len = n * part;
            let mut bufs = inputs(n, len, seed);
            let expected: Vec<f32> = (0..len).map(|k| bufs.iter().map(|b| b[k]).sum()).collect();
            let plans: Vec<RingPlan> = (0..n).map(|i| reduce_scatter(part, n, i)).collect();
            simulate(n, &plans, &mut bufs);
            for (i, b) in bufs.iter().enumerate() {
                let mine = i * part..(i + 1) * part;
                proptest::prop_assert_eq!(&b[mine.clone()], &expected[mine], "member {}", i);
            }
            // Each member keeps only its own reduced segment, then gathers the others.
            let mut gathered: Vec<Vec<f32>> = (0..n)
                .map(|i| {
                    let mut out = vec![0.0; len];
                    out[i * part..(i + 1) * part].copy_from_slice(&bufs[i][i * part..(i + 1) * part]);
                    out
                })
                .collect();
            let plans: Vec<RingPlan> = (0..n).map(|i| all_gather(part, n, i)).collect();
            simulate(n, &plans, &mut gathered);
            for (i, b) in gathered.iter().enumerate() {
                proptest::prop_assert_eq!(b, &expected, "member {}", i);
            }
        }

        /// A broadcast from any root reaches every member exactly once, each receiving the
        /// root's buffer, and the chain ends at the member before the root.
        #[test]
        fn broadcast_reaches_everyone_from_any_root(
            n in 1usize..=9, root_pick in 0usize..9, len in 0usize..100, seed in 0u64..1000,
        ) {
            let root = root_pick % n;
            let mut bufs = inputs(n, len, seed);
            let want = bufs[root].clone();
            let plans: Vec<RingPlan> = (0..n).map(|i| broadcast(len, n, i, root)).collect();
            simulate(n, &plans, &mut bufs);
            for (i, b) in bufs.iter().enumerate() {
                proptest::prop_assert_eq!(b, &want, "member {}", i);
            }
            let forwards = plans.iter().flat_map(|p| &p.receives).filter(|r| r.forward).count();
            proptest::prop_assert_eq!(forwards, n.saturating_sub(2));
        }
    }
}
