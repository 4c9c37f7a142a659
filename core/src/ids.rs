//! Typed ids, so a job id is never passed where a worker id belongs.

use serde::{Deserialize, Serialize};
use std::fmt;

macro_rules! string_id {
    ($name:ident) => {
        #[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
        #[serde(transparent)]
        pub struct $name(pub String);

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl $name {
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl From<&str> for $name {
            fn from(s: &str) -> Self {
                Self(s.to_string())
            }
        }
    };
}

string_id!(JobId);
string_id!(WorkerId);

macro_rules! number_id {
    ($(#[$doc:meta])* $name:ident($inner:ty)) => {
        $(#[$doc])*
        #[derive(
            Debug, Clone, Copy, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize,
        )]
        #[serde(transparent)]
        pub struct $name(pub $inner);

        impl $name {
            pub const fn get(self) -> $inner {
                self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                self.0.fmt(f)
            }
        }

        impl From<$inner> for $name {
            fn from(n: $inner) -> Self {
                Self(n)
            }
        }

        impl From<$name> for $inner {
            fn from(id: $name) -> Self {
                id.0
            }
        }
    };
}

number_id!(
    /// The number of a job's (re)start, from 1. Every message and checkpoint commit carries it,
    /// and a store's fence holds the newest: an older attempt's commit is refused (fencing).
    Attempt(u64)
);
number_id!(
    /// A rank's place in its job's world, `0..world_size`.
    Rank(u32)
);

impl Attempt {
    /// The attempt a job starts with.
    pub const FIRST: Self = Self(1);

    /// The attempt that follows this one (a restart).
    pub const fn next(self) -> Self {
        Self(self.0 + 1)
    }
}

impl Rank {
    /// The rank that commits checkpoints and reports the job's progress.
    pub const LEADER: Self = Self(0);

    /// The rank as an index into per-rank tables.
    pub const fn index(self) -> usize {
        self.0 as usize
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numeric_ids_serialise_as_bare_numbers() {
        // Manifests and assignments written before the newtypes hold plain numbers.
        assert_eq!(serde_json::to_string(&Attempt(7)).unwrap(), "7");
        assert_eq!(serde_json::from_str::<Rank>("3").unwrap(), Rank(3));
        assert_eq!(Attempt(7).next(), Attempt(8));
        assert_eq!(
            format!("attempt {} rank {}", Attempt(2), Rank(5)),
            "attempt 2 rank 5"
        );
    }
}
