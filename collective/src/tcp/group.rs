//! Groups: any subset of the world runs collectives among its own members over the mesh's
//! connections, in the order given.

use super::comm::{SMALL_ALL_REDUCE, TcpComm};
use super::frame::{OP_ALL_GATHER, OP_ALL_REDUCE, OP_BROADCAST, OP_P2P, OP_REDUCE_SCATTER, fnv1a};
use super::ring::{Buf, combine};
use crate::plan::{self, Action, RingPlan};
use crate::{CommError, Communicator, ReduceOp, World, check_split};

impl TcpComm {
    /// A view on the ranks in `members` (global ranks, this one included), e.g. a DP group.
    pub fn group(&mut self, members: &[u32]) -> Result<Group<'_>, CommError> {
        let index = members
            .iter()
            .position(|&m| m == self.rank)
            .ok_or_else(|| {
                CommError::Invalid(format!("rank {} is not in group {members:?}", self.rank))
            })?;
        if members.iter().any(|&m| m >= self.world) {
            return Err(CommError::Invalid(format!(
                "group {members:?} outside a world of {}",
                self.world
            )));
        }
        let id = fnv1a(members.iter().flat_map(|m| m.to_le_bytes()));
        Ok(Group {
            comm: self,
            members: members.to_vec(),
            index,
            id,
        })
    }

    /// The whole world as a group.
    pub fn world(&mut self) -> Group<'_> {
        let members: Vec<u32> = (0..self.world).collect();
        self.group(&members).expect("every rank is in the world")
    }
}

impl World for TcpComm {
    fn world_rank(&self) -> u32 {
        self.rank
    }

    fn world_size(&self) -> u32 {
        self.world
    }

    fn group(&mut self, members: &[u32]) -> Result<Box<dyn Communicator + '_>, CommError> {
        Ok(Box::new(TcpComm::group(self, members)?))
    }
}

/// A group of ranks on a [`TcpComm`]; ring order is the order of `members`.
pub struct Group<'a> {
    comm: &'a mut TcpComm,
    members: Vec<u32>,
    index: usize,
    id: u64,
}

impl Group<'_> {
    fn next(&self) -> Option<u32> {
        (self.members.len() > 1).then(|| self.members[(self.index + 1) % self.members.len()])
    }

    fn prev(&self) -> Option<u32> {
        let n = self.members.len();
        (n > 1).then(|| self.members[(self.index + n - 1) % n])
    }

    fn member(&self, index: u32) -> Result<u32, CommError> {
        self.members.get(index as usize).copied().ok_or_else(|| {
            CommError::Invalid(format!(
                "rank {index} outside a group of {}",
                self.members.len()
            ))
        })
    }

    fn ring(
        &mut self,
        op: &'static str,
        code: u32,
        buf: &mut [f32],
        plan: &RingPlan,
        reduce: ReduceOp,
    ) -> Result<(), CommError> {
        if self.members.len() == 1 {
            return Ok(());
        }
        let header = self.comm.header(code, self.id, buf.len(), true);
        let (next, prev) = (self.next(), self.prev());
        self.comm
            .run(op, header, next, prev, Buf::Write(buf), plan, reduce)
    }
}

impl Communicator for Group<'_> {
    fn rank(&self) -> u32 {
        self.index as u32
    }

    fn size(&self) -> u32 {
        self.members.len() as u32
    }

    fn all_reduce(&mut self, buf: &mut [f32], op: ReduceOp) -> Result<(), CommError> {
        let n = self.members.len();
        if n > 1 && buf.len() * 4 <= SMALL_ALL_REDUCE {
            let header = self.comm.header(OP_ALL_REDUCE, self.id, buf.len(), true);
            let mut theirs = std::mem::take(&mut self.comm.work);
            let result = if n.is_power_of_two() {
                // Recursive doubling: log2(n) exchanges with one partner each. Partners combine
                // the same two values (IEEE addition and max are commutative), so every rank
                // holds identical bits after every round.
                theirs.resize(buf.len(), 0.0);
                let mut result = Ok(());
                let mut mask = 1;
                while mask < n && result.is_ok() {
                    let partner = self.members[self.index ^ mask];
                    result = self.comm.exchange_with(header, partner, buf, &mut theirs);
                    if result.is_ok() {
                        combine(buf, &theirs, op);
                    }
                    mask <<= 1;
                }
                result
            } else {
                // One hop: everyone's buffer to everyone, summed in rank order everywhere.
                theirs.resize(buf.len() * n, 0.0);
                let result = self
                    .comm
                    .exchange_all(header, &self.members, buf, &mut theirs);
                if result.is_ok() {
                    buf.copy_from_slice(&theirs[..buf.len()]);
                    for part in theirs.chunks_exact(buf.len().max(1)).skip(1).take(n - 1) {
                        combine(buf, part, op);
                    }
                }
                result
            };
            self.comm.work = theirs;
            result.map_err(|e| self.comm.aborted_or(e))?;
        } else {
            let plan = plan::all_reduce(buf.len(), n, self.index);
            self.ring("all_reduce", OP_ALL_REDUCE, buf, &plan, op)?;
        }
        if op == ReduceOp::Avg && n > 1 {
            let scale = 1.0 / n as f32;
            buf.iter_mut().for_each(|v| *v *= scale);
        }
        Ok(())
    }

    fn reduce_scatter(
        &mut self,
        input: &[f32],
        output: &mut [f32],
        op: ReduceOp,
    ) -> Result<(), CommError> {
        let n = self.members.len();
        check_split("reduce_scatter", input.len(), output.len(), n as u32)?;
        let mut work = std::mem::take(&mut self.comm.work);
        work.clear();
        work.extend_from_slice(input);
        let plan = plan::reduce_scatter(output.len(), n, self.index);
        let result = self.ring("reduce_scatter", OP_REDUCE_SCATTER, &mut work, &plan, op);
        let mine = self.index * output.len()..(self.index + 1) * output.len();
        output.copy_from_slice(&work[mine]);
        self.comm.work = work;
        result?;
        if op == ReduceOp::Avg && n > 1 {
            let scale = 1.0 / n as f32;
            output.iter_mut().for_each(|v| *v *= scale);
        }
        Ok(())
    }

    fn all_gather(&mut self, input: &[f32], output: &mut [f32]) -> Result<(), CommError> {
        let n = self.members.len();
        check_split("all_gather", output.len(), input.len(), n as u32)?;
        output[self.index * input.len()..(self.index + 1) * input.len()].copy_from_slice(input);
        let plan = plan::all_gather(input.len(), n, self.index);
        self.ring("all_gather", OP_ALL_GATHER, output, &plan, ReduceOp::Sum)
    }

    fn broadcast(&mut self, buf: &mut [f32], root: u32) -> Result<(), CommError> {
        self.member(root)?;
        let plan = plan::broadcast(buf.len(), self.members.len(), self.index, root as usize);
        self.ring("broadcast", OP_BROADCAST, buf, &plan, ReduceOp::Sum)
    }

    fn send(&mut self, buf: &[f32], peer: u32) -> Result<(), CommError> {
        let to = self.member(peer)?;
        let header = self.comm.header(
            OP_P2P,
            self.id ^ u64::from(self.comm.rank),
            buf.len(),
            false,
        );
        let plan = RingPlan {
            initial: plan::whole(buf.len()),
            receives: vec![],
        };
        self.comm.run(
            "send",
            header,
            Some(to),
            None,
            Buf::Read(buf),
            &plan,
            ReduceOp::Sum,
        )
    }

    fn recv(&mut self, buf: &mut [f32], peer: u32) -> Result<(), CommError> {
        let from = self.member(peer)?;
        let header = self
            .comm
            .header(OP_P2P, self.id ^ u64::from(from), buf.len(), false);
        let plan = RingPlan {
            initial: vec![],
            receives: vec![plan::Receive {
                range: 0..buf.len(),
                action: Action::Copy,
                forward: false,
            }],
        };
        self.comm.run(
            "recv",
            header,
            None,
            Some(from),
            Buf::Write(buf),
            &plan,
            ReduceOp::Sum,
        )
    }
}
