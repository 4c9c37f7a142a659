//! The GPUs this worker offers: declared in its config (`gpus = N`), or found through the CUDA
//! driver when built with the `cuda` feature, and in either case only those its own
//! `CUDA_VISIBLE_DEVICES` lets it see.
//!
//! The coordinator names a GPU by its index as this daemon sees it (0, 1, … after
//! `CUDA_VISIBLE_DEVICES`), and a rank placed on it runs with `CUDA_VISIBLE_DEVICES` set to
//! that one device only. The value the rank gets is the daemon's own entry for it, not the
//! index: a daemon started with `CUDA_VISIBLE_DEVICES=2,3` hands its GPU 0 out as `2`, since a
//! rank given `0` would open the host's first GPU, which is not this daemon's to give.

use serde::Serialize;

/// One GPU this worker offers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Gpu {
    /// The CUDA device index as this daemon sees it; what assignments name.
    pub index: u32,
    pub name: String,
    /// 0: unknown (a declared GPU), which the coordinator never refuses a rank for.
    pub memory_bytes: u64,
    /// What a rank placed on this GPU gets as `CUDA_VISIBLE_DEVICES`.
    pub visible_as: String,
}

impl Gpu {
    pub fn to_proto(&self) -> gantry_proto::v1::Gpu {
        gantry_proto::v1::Gpu {
            index: self.index,
            name: self.name.clone(),
            memory_bytes: self.memory_bytes,
        }
    }
}

/// The device kinds a worker with `gpus` offers, as the coordinator lists them.
pub fn devices(gpus: &[Gpu]) -> Vec<String> {
    let mut devices = vec!["cpu".to_string()];
    if !gpus.is_empty() {
        devices.push("cuda".into());
    }
    devices
}

/// The GPU an assignment names; an error (the rank does not start) for one this worker lacks,
/// rather than a rank that would open whichever GPU CUDA picks.
pub fn assigned(gpus: &[Gpu], index: u32) -> anyhow::Result<&Gpu> {
    gpus.iter()
        .find(|g| g.index == index)
        .ok_or_else(|| anyhow::anyhow!("assigned GPU {index}, which this worker lacks"))
}

/// The devices a `CUDA_VISIBLE_DEVICES` value lets a process see, in order, as CUDA reads it:
/// comma-separated indices or `GPU-…`/`MIG-…` UUIDs, where an invalid entry hides itself and
/// every entry after it. `None` when the variable is unset (every device is visible).
pub fn visible_devices(var: Option<&str>) -> Option<Vec<String>> {
    let var = var?;
    Some(
        var.split(',')
            .map(str::trim)
            .take_while(|e| {
                e.parse::<u32>().is_ok() || e.starts_with("GPU-") || e.starts_with("MIG-")
            })
            .map(String::from)
            .collect(),
    )
}

/// The GPUs to offer: `declared` ones (unnamed, of unknown size) when the config says how many,
/// so a test or a machine without the driver can stand in for a GPU worker; otherwise what
/// [`discover`] finds. `visible` is this daemon's `CUDA_VISIBLE_DEVICES`.
pub fn gpus(declared: Option<u32>, visible: Option<&str>) -> anyhow::Result<Vec<Gpu>> {
    let visible = visible_devices(visible);
    let found = match declared {
        Some(n) => {
            if let Some(v) = &visible {
                anyhow::ensure!(
                    n as usize <= v.len(),
                    "gpus: {n} declared but CUDA_VISIBLE_DEVICES shows {}",
                    v.len()
                );
            }
            (0..n).map(|_| ("declared".to_string(), 0)).collect()
        }
        None => discover(),
    };
    Ok(found
        .into_iter()
        .enumerate()
        .map(|(i, (name, memory_bytes))| Gpu {
            index: i as u32,
            name,
            memory_bytes,
            visible_as: visible
                .as_ref()
                .and_then(|v| v.get(i).cloned())
                .unwrap_or_else(|| i.to_string()),
        })
        .collect())
}

/// Each CUDA device the driver shows this process: its name and total memory. None when the
/// driver library is missing or finds no device: a worker without GPUs is a cpu worker, not
/// a failed one.
#[cfg(feature = "cuda")]
fn discover() -> Vec<(String, u64)> {
    use cudarc::driver::{CudaContext, result, sys};
    // SAFETY: only tries to load the library. With cudarc's dynamic loading, any driver call
    // without it would panic, so this check comes first.
    if !unsafe { sys::is_culib_present() } {
        return Vec::new();
    }
    let count = match CudaContext::device_count() {
        Ok(n) => n,
        Err(e) => {
            tracing::warn!(error = %e, "the CUDA driver found no GPUs");
            return Vec::new();
        }
    };
    // Devices are read without a context: a context would take memory on every GPU for as
    // long as this daemon runs, memory its ranks need.
    let read = |ordinal: i32| -> Result<(String, u64), result::DriverError> {
        let device = result::device::get(ordinal)?;
        let name = result::device::get_name(device)?;
        // SAFETY: `device` was just returned by the driver for this ordinal.
        let memory = unsafe { result::device::total_mem(device) }?;
        Ok((name, memory as u64))
    };
    let mut found = Vec::new();
    for ordinal in 0..count {
        match read(ordinal) {
            Ok(gpu) => found.push(gpu),
            Err(e) => {
                // Indices must stay those of the driver, so stop rather than skip.
                tracing::warn!(ordinal, error = %e, "cannot read a GPU; offering those before it");
                break;
            }
        }
    }
    found
}

#[cfg(not(feature = "cuda"))]
fn discover() -> Vec<(String, u64)> {
    Vec::new()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn visible_as(gpus: &[Gpu]) -> Vec<&str> {
        gpus.iter().map(|g| g.visible_as.as_str()).collect()
    }

    #[test]
    fn cuda_visible_devices_reads_as_cuda_reads_it() {
        assert_eq!(visible_devices(None), None);
        assert_eq!(visible_devices(Some("")), Some(vec![]));
        assert_eq!(
            visible_devices(Some("2, 3")),
            Some(vec!["2".into(), "3".into()])
        );
        assert_eq!(
            visible_devices(Some("1,-1,0")),
            Some(vec!["1".into()]),
            "an invalid entry hides the rest"
        );
        assert_eq!(
            visible_devices(Some("GPU-8f2e,MIG-1a")),
            Some(vec!["GPU-8f2e".into(), "MIG-1a".into()])
        );
    }

    #[test]
    fn declared_gpus_are_indexed_from_0_and_handed_out_as_the_daemon_sees_them() {
        let all = gpus(Some(2), None).unwrap();
        assert_eq!(
            all.iter().map(|g| g.index).collect::<Vec<_>>(),
            [0, 1],
            "indices"
        );
        assert_eq!(visible_as(&all), ["0", "1"]);
        assert!(all.iter().all(|g| g.memory_bytes == 0));
        assert_eq!(visible_as(&gpus(Some(2), Some("5,7")).unwrap()), ["5", "7"]);
        assert_eq!(gpus(Some(0), Some("5,7")).unwrap(), []);
    }

    #[test]
    fn more_gpus_declared_than_visible_is_an_error() {
        let err = gpus(Some(3), Some("0,1")).unwrap_err().to_string();
        assert_eq!(err, "gpus: 3 declared but CUDA_VISIBLE_DEVICES shows 2");
    }

    /// Without libcuda discovery finds nothing (and does not panic); on a GPU host run with
    /// `GANTRY_TEST_EXPECT_GPUS=N`, it finds those N, named and sized.
    #[cfg(feature = "cuda")]
    #[test]
    fn discovery_finds_what_the_driver_shows_and_nothing_without_it() {
        let visible = std::env::var("CUDA_VISIBLE_DEVICES").ok();
        let found = gpus(None, visible.as_deref()).unwrap();
        // SAFETY: only tries to load the library.
        if !unsafe { cudarc::driver::sys::is_culib_present() } {
            assert_eq!(found, []);
            return;
        }
        if let Ok(n) = std::env::var("GANTRY_TEST_EXPECT_GPUS") {
            assert_eq!(found.len(), n.parse::<usize>().unwrap(), "{found:?}");
            assert!(
                found
                    .iter()
                    .all(|g| g.memory_bytes > 0 && !g.name.is_empty()),
                "{found:?}"
            );
        }
    }

    /// Without the `cuda` feature nothing is discovered.
    #[cfg(not(feature = "cuda"))]
    #[test]
    fn without_the_cuda_feature_only_declared_gpus_exist() {
        assert_eq!(gpus(None, None).unwrap(), []);
    }
}
