//! The coordinator's core behind one lock, and where time comes from: what the gRPC services,
//! the ticker and the metrics scrape all hold.

use crate::core::Core;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{SystemTime, UNIX_EPOCH};

/// Where time comes from; tests may supply their own.
pub trait Clock: Send + Sync + 'static {
    fn now_ms(&self) -> i64;
}

pub struct SystemClock;

impl Clock for SystemClock {
    fn now_ms(&self) -> i64 {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as i64)
    }
}

/// A cheap, cloneable handle on the core.
#[derive(Clone)]
pub struct Handle {
    core: Arc<Mutex<Core>>,
    clock: Arc<dyn Clock>,
}

impl Handle {
    pub fn new(core: Core, clock: Arc<dyn Clock>) -> Self {
        Self {
            core: Arc::new(Mutex::new(core)),
            clock,
        }
    }

    pub fn now_ms(&self) -> i64 {
        self.clock.now_ms()
    }

    /// Runs one command against the core. The lock is never held across an await.
    pub fn with<T>(&self, f: impl FnOnce(&mut Core, i64) -> T) -> T {
        let now = self.clock.now_ms();
        let mut core: MutexGuard<'_, Core> = self.core.lock().unwrap_or_else(|p| p.into_inner());
        f(&mut core, now)
    }
}
