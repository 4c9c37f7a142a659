//! A stand-in for `cubecl-llvm` 0.11.3, for `cubecl-cuda` 0.11.3 built with its `cpp` feature.
//!
//! `cubecl-cuda` always compiles both of its kernel compilers and picks one at run time:
//! CUDA C++ through NVRTC when its `cpp` feature is on (Gantry's build), LLVM otherwise. The LLVM
//! one lives in `cubecl-llvm`, whose build script downloads an LLVM bundle, so it cannot build
//! offline. This crate provides exactly the items `cubecl-cuda` names (its `compiler.rs`,
//! `runtime.rs` and `compute/context.rs`), with the upstream shapes, and nothing else:
//!
//! - [`PlironCompiler::compile`] always returns an error naming this stub, so a build in which the
//!   LLVM path is selected fails its first kernel loudly instead of running something else;
//! - [`nvptx::ptx_version::PtxVersion::for_driver`] keeps upstream's table, because the runtime
//!   calls it on every device whichever compiler is selected (it only feeds the LLVM path);
//! - [`shared::lowered_features::restrict_features`] is only called when LLVM is selected, and
//!   leaves the properties as they are.
//!
//! Upstream: cubecl 0.11.3 (`crates/cubecl-llvm`), pinned with `=0.11.3` in the workspace.

use cubecl_core::ir::nvidia::SmArch;
use cubecl_core::prelude::KernelDefinition;
use cubecl_environment::backtrace::BackTrace;
use cubecl_server::compiler::CompilationError;
use cubecl_server::kernel::BufferIOAttr;

/// What the LLVM backend would emit for; `cubecl-cuda` only asks for [`LlvmTarget::Nvptx`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum LlvmTarget {
    #[default]
    Cpu,
    Nvptx,
}

/// The LLVM kernel compiler. Never compiles here: see the crate documentation.
#[derive(Clone, Debug, Default)]
pub struct PlironCompiler {
    pub target: LlvmTarget,
}

/// Upstream's options, with the fields `cubecl-cuda` sets (`arch` is AMD's, always `None`).
#[derive(Clone, Debug, Default)]
pub struct PlironOptions {
    pub cpu_buffer_alignment: Option<u32>,
    pub arch: Option<u32>,
    pub sm_arch: Option<SmArch>,
    pub ptx_version: Option<nvptx::ptx_version::PtxVersion>,
    pub grid_constants: bool,
}

/// A compiled PTX module, as upstream describes one.
#[derive(Clone, Debug)]
pub struct NvptxModule {
    pub ptx: Vec<core::ffi::c_char>,
    pub entrypoint: String,
    pub ir: String,
    pub shared_memory_size: usize,
    pub io: Vec<BufferIOAttr>,
}

/// What a compile produces; only the PTX form exists in this stub.
#[derive(Clone, Debug)]
pub enum PlironArtifact {
    NvptxCode(NvptxModule),
}

/// The message of every compile through this stub.
pub const REFUSAL: &str = "cubecl-llvm is a stub in this build (Gantry compiles CUDA kernels with NVRTC, \
     cubecl-cuda's `cpp` feature); the LLVM backend was selected, which this build cannot run";

impl PlironCompiler {
    pub fn compile(
        &mut self,
        _kernel: KernelDefinition,
        _options: &PlironOptions,
    ) -> Result<PlironArtifact, CompilationError> {
        Err(CompilationError::Generic {
            reason: REFUSAL.to_string(),
            backtrace: BackTrace::capture(),
        })
    }

    pub fn lang_tag(&self) -> &'static str {
        match self.target {
            LlvmTarget::Cpu => "mlir",
            LlvmTarget::Nvptx => "llvm",
        }
    }
}

pub mod nvptx {
    pub mod ptx_version {
        use core::fmt;

        /// A PTX ISA version as the NVPTX target feature spells it (8.7 is `87`).
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
        pub struct PtxVersion(u32);

        /// Upstream's table: the first driver (as `cuDriverGetVersion` reports it) of each PTX
        /// ISA version, newest first.
        const DRIVER_PTX: &[(i32, u32)] = &[
            (13030, 93),
            (13020, 92),
            (13010, 91),
            (13000, 90),
            (12090, 88),
            (12080, 87),
            (12050, 85),
            (12040, 84),
            (12030, 83),
            (12020, 82),
            (12010, 81),
            (12000, 80),
            (11080, 78),
            (11070, 77),
            (11060, 76),
            (11050, 75),
            (11040, 74),
            (11030, 73),
            (11020, 72),
            (11010, 71),
            (11000, 70),
            (10020, 65),
            (10010, 64),
            (10000, 63),
        ];

        impl PtxVersion {
            /// The newest version a driver of CUDA `driver` loads; `None` below CUDA 10.0.
            pub fn for_driver(driver: i32) -> Option<Self> {
                DRIVER_PTX
                    .iter()
                    .find(|(first_driver, _)| driver >= *first_driver)
                    .map(|(_, ptx)| Self(*ptx))
            }
        }

        impl fmt::Display for PtxVersion {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "ptx{}", self.0)
            }
        }
    }
}

pub mod shared {
    pub mod lowered_features {
        use cubecl_core::ir::DeviceProperties;

        /// The GPU target a device's features would be narrowed for.
        #[derive(Clone, Copy, Debug, PartialEq, Eq)]
        pub enum GpuTarget {
            Nvptx,
        }

        /// Upstream narrows `props` to what LLVM lowers; it is only called when the LLVM backend
        /// is selected, and this stub's compile refuses every kernel then anyway.
        pub fn restrict_features(_props: &mut DeviceProperties, _target: GpuTarget) {}
    }
}
