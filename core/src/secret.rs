//! An attempt's secret: what proves that a process is one of that attempt's ranks, at
//! rendezvous (to the coordinator) and on every data-plane connection (to its peers).
//!
//! The coordinator derives it from a key only it holds, `HMAC-SHA256(key, job ‖ attempt)`, so
//! it stores nothing per attempt and a restarted coordinator derives the same secrets. A new
//! attempt has a new secret; an old attempt's no longer opens anything, because rendezvous
//! also checks that the attempt is live.

use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

/// An attempt's secret, in hex. `Debug` never prints it.
#[derive(Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct AttemptSecret(pub String);

impl std::fmt::Debug for AttemptSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AttemptSecret(…)")
    }
}

impl AttemptSecret {
    /// The secret of `attempt` of `job`, under the coordinator's `key`.
    pub fn derive(key: &[u8; 32], job: &str, attempt: u64) -> Self {
        let mut mac = Hmac::<Sha256>::new_from_slice(key).expect("HMAC takes any key length");
        mac.update(job.as_bytes());
        mac.update(&[0]);
        mac.update(&attempt.to_le_bytes());
        Self(crate::hex(&mac.finalize().into_bytes()))
    }

    /// Whether `presented` is this secret, in time that does not depend on where they differ.
    pub fn matches(&self, presented: &str) -> bool {
        self.0.len() == presented.len() && bool::from(self.0.as_bytes().ct_eq(presented.as_bytes()))
    }

    /// The 256-bit key the data plane's handshake authenticates with.
    pub fn key(&self) -> [u8; 32] {
        Sha256::digest(self.0.as_bytes()).into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_differ_by_job_attempt_and_key_and_never_print() {
        let key = [7u8; 32];
        let a = AttemptSecret::derive(&key, "job-1", 1);
        assert_eq!(a, AttemptSecret::derive(&key, "job-1", 1));
        assert_ne!(a, AttemptSecret::derive(&key, "job-1", 2));
        assert_ne!(a, AttemptSecret::derive(&key, "job-2", 1));
        assert_ne!(a, AttemptSecret::derive(&[8u8; 32], "job-1", 1));
        assert_eq!(a.0.len(), 64);
        assert!(a.matches(&a.0) && !a.matches(&a.0[1..]) && !a.matches(""));
        assert!(!format!("{a:?}").contains(&a.0[..8]));
    }
}
