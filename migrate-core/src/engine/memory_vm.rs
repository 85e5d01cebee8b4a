//! A VM that is only guest memory: no KVM, no vCPU runs, nothing dirties
//! its pages but the engine. For fuzzing the receiver and for recording real
//! migration streams (the fuzz seed corpus) on machines without `/dev/kvm`;
//! compiled only with the `memory-vm` feature, never into `vmigrate`.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

use vm_memory::GuestMemoryMmap;

use super::{MigratableVm, VmOpError};
use crate::dirty::DirtyBitmap;
use crate::vm::memory::{map_memory, slot_layout, MemoryError};

/// Guest memory laid out as a real VM of that size, plus opaque vCPU blobs.
pub struct MemoryVm {
    memory: GuestMemoryMmap,
    model: String,
    vcpus: Mutex<Vec<Vec<u8>>>,
    vcpu_count: u32,
    running: AtomicBool,
    prefaulted: bool,
}

impl MemoryVm {
    /// A VM of `mem_size` bytes (the slot layout of a real one) whose
    /// vCPUs' saved state is `vcpus` (one blob each) and CPU model `model`.
    pub fn new(mem_size: u64, vcpus: Vec<Vec<u8>>, model: &str) -> Result<Self, MemoryError> {
        let memory = map_memory(&slot_layout(mem_size)?)?;
        let vcpu_count = u32::try_from(vcpus.len()).unwrap_or(u32::MAX);
        Ok(Self {
            memory,
            model: model.to_string(),
            vcpus: Mutex::new(vcpus),
            vcpu_count,
            running: AtomicBool::new(false),
            prefaulted: false,
        })
    }

    /// Count the RAM as allocated ahead (`--prefault`), so that a
    /// destination receives pages straight into it (`engine/in_place.rs`).
    #[must_use]
    pub fn prefaulted(mut self, yes: bool) -> Self {
        self.prefaulted = yes;
        self
    }

    /// Whether `resume` was called last (the destination "runs" the guest).
    pub fn is_running(&self) -> bool {
        self.running.load(Ordering::SeqCst)
    }

    /// The vCPU blobs held (restored ones on a destination).
    pub fn vcpu_blobs(&self) -> Vec<Vec<u8>> {
        self.vcpus.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

impl MigratableVm for MemoryVm {
    fn memory(&self) -> &GuestMemoryMmap {
        &self.memory
    }
    fn vcpu_count(&self) -> u32 {
        self.vcpu_count
    }
    fn ram_prefaulted(&self) -> bool {
        self.prefaulted
    }
    fn cpu_model(&self) -> String {
        self.model.clone()
    }
    fn harvest_dirty_log(&self, _into: &mut DirtyBitmap) -> Result<(), VmOpError> {
        // No vCPU ever runs: nothing is dirtied behind the engine's back.
        Ok(())
    }
    fn pause(&self) -> Result<(), VmOpError> {
        self.running.store(false, Ordering::SeqCst);
        Ok(())
    }
    fn resume(&self) -> Result<(), VmOpError> {
        self.running.store(true, Ordering::SeqCst);
        Ok(())
    }
    fn set_throttle(&self, _fraction: f64) -> Result<(), VmOpError> {
        Ok(())
    }
    fn throttle(&self) -> f64 {
        0.0
    }
    fn save_vcpus(&self) -> Result<Vec<Vec<u8>>, VmOpError> {
        Ok(self.vcpu_blobs())
    }
    fn restore_vcpus(&self, blobs: Vec<Vec<u8>>) -> Result<(), VmOpError> {
        if blobs.len() != self.vcpus.lock().unwrap_or_else(|e| e.into_inner()).len() {
            return Err("wrong number of vCPU blobs".into());
        }
        *self.vcpus.lock().unwrap_or_else(|e| e.into_inner()) = blobs;
        Ok(())
    }
}
