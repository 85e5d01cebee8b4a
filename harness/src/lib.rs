//! Test harness for vmigrate: guest workloads with known memory-dirtying
//! patterns, and the pieces a scenario runner needs to drive them.
//!
//! The guests are generated boot sectors (see [`workload`]): the VMM loads one
//! at [`BOOT_LOAD_ADDR`], applies its [`MemoryFill`]s, and starts the vCPU in
//! real mode; the guest reports progress on COM1 with single-byte marks
//! ([`BOOT_MARK`], [`PASS_MARK`], [`MISMATCH_MARK`]). Sizes in specs and on
//! the command line are parsed by [`parse_size`]. The performance study that
//! migrates these guests under each policy and link is in [`study`] (binary
//! `vmigrate-study`).

pub mod scale;
pub mod size;
pub mod study;
pub mod transfer;
pub mod workload;

pub use size::{format_size, parse_size, ParseSizeError};
#[cfg(target_arch = "x86_64")]
pub use workload::measure_tsc_hz;
pub use workload::{
    build, BuildParams, FillContent, GuestImage, GuestSpec, MemoryFill, SweepMode, WorkloadError,
    WorkloadSpec, BOOT_LOAD_ADDR, BOOT_MARK, MAX_SMP_VCPUS, MISMATCH_EXIT_STATUS, MISMATCH_MARK,
    PASS_MARK, VCPU_MARK_BASE,
};
