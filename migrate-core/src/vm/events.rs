//! How a guest stopped ([`VmEvent`]) and what can go wrong running one
//! ([`VmError`]).

use super::dirty_log::DirtyLogError;
use super::dirty_ring::DirtyRingError;
use super::memory::MemoryError;
use super::state::StateError;

/// How the guest stopped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VmEvent {
    /// The guest wrote `status` to the exit port.
    Exited {
        /// Value written.
        status: u32,
    },
    /// A vCPU executed HLT with interrupts disabled.
    Halted {
        /// The vCPU.
        vcpu: u32,
    },
    /// A vCPU could not go on.
    Failed {
        /// The vCPU.
        vcpu: u32,
        /// What happened.
        reason: String,
    },
}

/// Errors from building or driving a VM.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    /// `/dev/kvm` could not be opened.
    #[error("cannot open /dev/kvm")]
    OpenKvm(#[source] kvm_ioctls::Error),
    /// A VM-level KVM ioctl failed.
    #[error("{op} failed")]
    Kvm {
        /// The operation.
        op: &'static str,
        /// The ioctl error.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// Guest memory could not be set up.
    #[error(transparent)]
    Memory(#[from] MemoryError),
    /// The dirty log could not be read.
    #[error(transparent)]
    DirtyLog(#[from] DirtyLogError),
    /// The dirty ring could not be set up or read.
    #[error(transparent)]
    DirtyRing(#[from] DirtyRingError),
    /// vCPU state could not be saved or restored.
    #[error(transparent)]
    State(#[from] StateError),
    /// The vCPU count is out of range.
    #[error("{vcpus} vCPUs requested; this host allows 1 to {max}")]
    BadVcpuCount {
        /// Requested count.
        vcpus: u32,
        /// Largest allowed.
        max: u32,
    },
    /// The boot image does not fit.
    #[error("boot image of {len} bytes is too large (at most {max})")]
    BootImageTooLarge {
        /// Image size.
        len: usize,
        /// Largest allowed.
        max: usize,
    },
    /// A vCPU thread could not be started.
    #[error("cannot start vCPU thread {vcpu}")]
    SpawnVcpu {
        /// The vCPU.
        vcpu: u32,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// A vCPU thread is gone.
    #[error("vCPU {vcpu} thread is gone")]
    VcpuGone {
        /// The vCPU.
        vcpu: u32,
    },
    /// The number of vCPU states does not match the VM.
    #[error("{got} vCPU states for a VM with {want} vCPUs")]
    VcpuCountMismatch {
        /// States given.
        got: usize,
        /// vCPUs in the VM.
        want: usize,
    },
}
