//! What goes on the wire before the data: every operation starts with a 32-byte header naming
//! the operation, the group and a sequence number, so ranks that disagree about what they are
//! doing fail loudly instead of mixing data.

use super::comm::TcpComm;
use std::ops::Range;

pub(super) const MAGIC: u32 = 0x4741_4e54; // "GANT"

pub(super) const OP_ALL_REDUCE: u32 = 1;
pub(super) const OP_REDUCE_SCATTER: u32 = 2;
pub(super) const OP_ALL_GATHER: u32 = 3;
pub(super) const OP_BROADCAST: u32 = 4;
pub(super) const OP_P2P: u32 = 5;

/// FNV-1a: the short, stable hash that names a job and a group on the wire.
pub(super) fn fnv1a(bytes: impl IntoIterator<Item = u8>) -> u64 {
    bytes.into_iter().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

impl TcpComm {
    pub(super) fn header(&mut self, op: u32, group: u64, len: usize, sequenced: bool) -> [u8; 32] {
        let seq = if sequenced {
            let s = self.sequence.entry(group).or_default();
            *s += 1;
            *s
        } else {
            0
        };
        let mut h = [0u8; 32];
        h[..4].copy_from_slice(&MAGIC.to_le_bytes());
        h[4..8].copy_from_slice(&op.to_le_bytes());
        h[8..16].copy_from_slice(&group.to_le_bytes());
        h[16..24].copy_from_slice(&seq.to_le_bytes());
        h[24..].copy_from_slice(&(len as u64).to_le_bytes());
        h
    }
}

/// Whether a header read off the wire is the one this rank expects: `Err` says how they differ.
/// What a rank reads from its peers before any data, so it is fuzzed (`gantry-fuzz frame`).
pub fn check_header(got: &[u8], want: &[u8; 32]) -> Result<(), String> {
    let got: &[u8; 32] = got
        .try_into()
        .map_err(|_| format!("a header of {} bytes, not 32", got.len()))?;
    if got == want {
        Ok(())
    } else {
        Err(describe(got, want))
    }
}

pub(super) fn describe(got: &[u8; 32], want: &[u8; 32]) -> String {
    let field = |h: &[u8; 32], r: Range<usize>| {
        u64::from_le_bytes({
            let mut b = [0u8; 8];
            b[..r.len()].copy_from_slice(&h[r]);
            b
        })
    };
    format!(
        "peer sent op {} group {:x} seq {} len {}, expected op {} group {:x} seq {} len {}",
        field(got, 4..8),
        field(got, 8..16),
        field(got, 16..24),
        field(got, 24..32),
        field(want, 4..8),
        field(want, 8..16),
        field(want, 16..24),
        field(want, 24..32),
    )
}
