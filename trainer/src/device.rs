//! The device a rank trains on, from its spec's `resources.device`.
//!
//! A cuda rank sees one GPU: its worker daemon starts it with `CUDA_VISIBLE_DEVICES` naming the
//! GPU the coordinator assigned, so the rank's device is always CUDA device 0. Every CUDA library
//! (driver, NVRTC, NCCL) is loaded at run time; a machine without them gets an error that says so,
//! never a crash.

use burn::tensor::Device;
use gantry_core::spec::{DeviceKind, JobSpec};

/// The device of a rank of `spec`.
pub fn for_spec(spec: &JobSpec) -> anyhow::Result<Device> {
    match spec.resources.device {
        DeviceKind::Cpu => Ok(Device::flex()),
        DeviceKind::Cuda => cuda(),
    }
}

/// Makes the spec's device burn's default (`BURN_DEVICE`). burn creates some tensors on its
/// default device rather than a given one (a loaded optimizer's state, before its first step
/// moves it), and in a build with CUDA that default is CUDA, even for a cpu job on a machine
/// without a GPU. Call it while the process has one thread: it writes the environment.
pub fn set_default(spec: &JobSpec) {
    let name = match spec.resources.device {
        DeviceKind::Cpu => "flex",
        DeviceKind::Cuda => "cuda",
    };
    // SAFETY: called at the start of a rank process, before it starts any other thread, so
    // nothing reads the environment while it changes.
    unsafe { std::env::set_var("BURN_DEVICE", name) };
}

/// This rank's GPU: CUDA device 0 of those `CUDA_VISIBLE_DEVICES` shows it.
#[cfg(feature = "cuda")]
pub fn cuda() -> anyhow::Result<Device> {
    use burn::tensor::DeviceType;
    if !gantry_collective::nccl::driver_present() {
        anyhow::bail!(
            "resources.device = \"cuda\": the CUDA driver library (libcuda.so.1) is not on this \
             machine's library path"
        );
    }
    let visible = Device::enumerate(DeviceType::Cuda).into_iter().count();
    if visible == 0 {
        anyhow::bail!(
            "resources.device = \"cuda\": no CUDA device is visible to this rank \
             (CUDA_VISIBLE_DEVICES={:?})",
            std::env::var("CUDA_VISIBLE_DEVICES").unwrap_or_default()
        );
    }
    Ok(Device::cuda(0))
}

#[cfg(not(feature = "cuda"))]
pub fn cuda() -> anyhow::Result<Device> {
    anyhow::bail!(
        "resources.device = \"cuda\": this gantry-worker was built without CUDA support; build \
         it with `cargo build --release --bins --features gantry-cli/cuda`"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(device: &str) -> JobSpec {
        JobSpec::from_json(&format!(
            r#"{{"name":"d","model":{{"kind":"mlp"}},"train":{{"steps":1,"global_batch":2,"lr":0.1}},"resources":{{"device":"{device}"}}}}"#
        ))
        .unwrap()
    }

    #[test]
    fn cpu_is_flex_and_cuda_without_a_gpu_is_a_clear_error() {
        assert_eq!(for_spec(&spec("cpu")).unwrap(), Device::flex());
        // Without a GPU (this machine, CI), whichever build, the error names the field; a GPU
        // machine's cuda build gets its device.
        match for_spec(&spec("cuda")) {
            Ok(device) => assert_ne!(device, Device::flex(), "a cuda job fell back to the cpu"),
            Err(e) => {
                let err = e.to_string();
                assert!(err.starts_with("resources.device = \"cuda\""), "{err}");
            }
        }
    }

    /// cubecl-cuda compiles kernels either as CUDA C++ through NVRTC (its `cpp` feature) or
    /// through LLVM, which this build replaces by a stub that refuses (vendor/cubecl-llvm-stub):
    /// the NVRTC one must be the one selected.
    #[cfg(feature = "cuda")]
    #[test]
    fn cuda_kernels_compile_through_nvrtc_not_the_llvm_stub() {
        use cubecl_cuda::CudaCompiler;
        use cubecl_cuda::compiler::CudaBackend;
        assert_eq!(CudaBackend::default(), CudaBackend::Cpp);
        assert!(matches!(CudaCompiler::default(), CudaCompiler::Cpp(_)));
    }
}
