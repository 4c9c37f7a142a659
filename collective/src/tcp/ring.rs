//! The ring engine: streams a [`RingPlan`] over a buffer, writing to the successor and reading
//! from the predecessor whenever either is ready, so sending, receiving and reducing overlap, no
//! call can deadlock on full socket buffers, and a chunk is forwarded as soon as it has been
//! reduced. Data goes straight between the caller's buffer and the socket (reductions use one
//! reusable scratch chunk).

use super::comm::{CHUNK, TcpComm};
use super::frame::check_header;
use super::poll::wait_ready;
use crate::plan::{Action, RingPlan};
use crate::{CommError, ReduceOp};
use std::collections::VecDeque;
use std::io::{ErrorKind, Read, Write};
use std::ops::Range;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

impl TcpComm {
    /// Streams `plan` over `buf`: sends to `next`, receives from `prev` (global ranks).
    #[allow(clippy::too_many_arguments)]
    pub(super) fn run(
        &mut self,
        op: &'static str,
        header: [u8; 32],
        next: Option<u32>,
        prev: Option<u32>,
        buf: Buf<'_>,
        plan: &RingPlan,
        reduce: ReduceOp,
    ) -> Result<(), CommError> {
        self.stream_plan(op, header, next, prev, buf, plan, reduce)
            .map_err(|e| self.aborted_or(e))
    }

    #[allow(clippy::too_many_arguments)]
    fn stream_plan(
        &mut self,
        op: &'static str,
        header: [u8; 32],
        next: Option<u32>,
        prev: Option<u32>,
        mut buf: Buf<'_>,
        plan: &RingPlan,
        reduce: ReduceOp,
    ) -> Result<(), CommError> {
        let TcpComm {
            links,
            timeout,
            aborted,
            scratch,
            ..
        } = self;
        let link = |r: Option<u32>| r.and_then(|r| links[r as usize].as_ref());
        let (out, inp) = (link(next), link(prev));
        let mut sends: VecDeque<Range<usize>> = VecDeque::new();
        let mut header_out = if out.is_some() { 0 } else { 32 };
        let mut sent = 0usize; // bytes of the front send chunk already written
        for r in &plan.initial {
            push_chunks(&mut sends, r.clone());
        }
        let mut header_in = [0u8; 32];
        let mut header_filled = if inp.is_some() { 0 } else { 32 };
        let receives: Vec<(Range<usize>, Action, bool)> = plan
            .receives
            .iter()
            .flat_map(|r| chunks(r.range.clone()).map(move |c| (c, r.action, r.forward)))
            .collect();
        let mut current = 0usize;
        let mut filled = 0usize; // bytes of the current receive chunk already read
        let mut last_progress = Instant::now();
        // Try the sockets before waiting on them; `idle` counts fruitless tries since progress.
        let mut fresh = true;
        let mut idle = 0u32;
        loop {
            if aborted.load(Ordering::SeqCst) {
                return Err(CommError::Aborted);
            }
            let want_write = header_out < 32 || !sends.is_empty();
            let want_read = header_filled < 32 || current < receives.len();
            if !want_write && !want_read {
                return Ok(());
            }
            let wait = timeout.saturating_sub(last_progress.elapsed());
            if wait.is_zero() {
                let peer = if want_read { prev } else { next };
                return Err(CommError::Timeout {
                    op,
                    peer: peer.unwrap_or_default(),
                    timeout: *timeout,
                });
            }
            let (readable, writable) = if fresh {
                fresh = false;
                (want_read, want_write)
            } else {
                let wait = wait.min(Duration::from_millis(200));
                wait_ready(
                    out.filter(|_| want_write),
                    inp.filter(|_| want_read),
                    wait,
                    &mut idle,
                )
            };
            let progress_before = last_progress;
            let io_err = |peer: Option<u32>, e: std::io::Error| CommError::Io {
                op,
                peer: peer.unwrap_or_default(),
                source: e,
            };
            if writable && let Some(mut stream) = out {
                loop {
                    let bytes: &[u8] = if header_out < 32 {
                        &header[header_out..]
                    } else if let Some(r) = sends.front() {
                        &bytemuck::cast_slice(&buf.read()[r.clone()])[sent..]
                    } else {
                        break;
                    };
                    match stream.write(bytes) {
                        Ok(0) => {
                            return Err(CommError::Closed {
                                op,
                                peer: next.unwrap_or_default(),
                            });
                        }
                        Ok(n) => {
                            last_progress = Instant::now();
                            if header_out < 32 {
                                header_out += n;
                            } else {
                                sent += n;
                                if sent == sends.front().map_or(0, |r| r.len() * 4) {
                                    sends.pop_front();
                                    sent = 0;
                                }
                            }
                        }
                        Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                        Err(e) if e.kind() == ErrorKind::Interrupted => {}
                        Err(e) => return Err(io_err(next, e)),
                    }
                }
            }
            if readable && let Some(mut stream) = inp {
                loop {
                    let target: &mut [u8] = if header_filled < 32 {
                        &mut header_in[header_filled..]
                    } else if let Some((range, action, _)) = receives.get(current) {
                        match action {
                            Action::Reduce => {
                                &mut bytemuck::cast_slice_mut(&mut scratch[..range.len()])[filled..]
                            }
                            Action::Copy => {
                                &mut bytemuck::cast_slice_mut(&mut buf.write()[range.clone()])
                                    [filled..]
                            }
                        }
                    } else {
                        break;
                    };
                    match stream.read(target) {
                        Ok(0) => {
                            return Err(CommError::Closed {
                                op,
                                peer: prev.unwrap_or_default(),
                            });
                        }
                        Ok(n) => {
                            last_progress = Instant::now();
                            if header_filled < 32 {
                                header_filled += n;
                                if header_filled == 32
                                    && let Err(detail) = check_header(&header_in, &header)
                                {
                                    return Err(CommError::Mismatch {
                                        op,
                                        peer: prev.unwrap_or_default(),
                                        detail,
                                    });
                                }
                                continue;
                            }
                            filled += n;
                            let (range, action, forward) = &receives[current];
                            if filled == range.len() * 4 {
                                if *action == Action::Reduce {
                                    combine(
                                        &mut buf.write()[range.clone()],
                                        &scratch[..range.len()],
                                        reduce,
                                    );
                                }
                                if *forward {
                                    sends.push_back(range.clone());
                                }
                                current += 1;
                                filled = 0;
                            }
                        }
                        Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                        Err(e) if e.kind() == ErrorKind::Interrupted => {}
                        Err(e) => return Err(io_err(prev, e)),
                    }
                }
            }
            if last_progress != progress_before {
                idle = 0;
            }
        }
    }
}

fn chunks(r: Range<usize>) -> impl Iterator<Item = Range<usize>> {
    (r.start..r.end)
        .step_by(CHUNK)
        .map(move |s| s..(s + CHUNK).min(r.end))
}

fn push_chunks(queue: &mut VecDeque<Range<usize>>, r: Range<usize>) {
    queue.extend(chunks(r));
}

pub(super) fn combine(dst: &mut [f32], src: &[f32], op: ReduceOp) {
    match op {
        ReduceOp::Sum | ReduceOp::Avg => dst.iter_mut().zip(src).for_each(|(d, s)| *d += s),
        ReduceOp::Max => dst.iter_mut().zip(src).for_each(|(d, s)| *d = d.max(*s)),
    }
}

/// The buffer an operation streams: a send-only operation gets it read-only.
pub(super) enum Buf<'a> {
    Read(&'a [f32]),
    Write(&'a mut [f32]),
}

impl Buf<'_> {
    fn read(&self) -> &[f32] {
        match self {
            Buf::Read(s) => s,
            Buf::Write(s) => s,
        }
    }

    fn write(&mut self) -> &mut [f32] {
        match self {
            Buf::Write(s) => s,
            Buf::Read(_) => unreachable!("a plan with receives always gets a writable buffer"),
        }
    }
}
