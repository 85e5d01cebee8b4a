//! Saving and restoring the vCPUs of a [`Vm`], with the VM-wide irqchip.
//!
//! The PICs and the IOAPIC (VMs with the in-kernel irqchip) are saved into
//! vCPU 0's state and restored from it, before vCPU 0 itself, so every user
//! of per-vCPU state (migration, live clone, checkpoint epochs, the clone
//! digest) carries them without knowing. A state that does not fit the VM
//! (a LAPIC where there is no irqchip, none where there is one, the irqchip
//! missing from vCPU 0 or present elsewhere) is refused before anything is
//! loaded.

use super::irqchip::IrqchipState;
use super::state::{StateError, VcpuState};
use super::vcpu::VcpuCommand;
use super::{Vm, VmError};

impl Vm {
    /// Save one vCPU's state (the VM must be paused); vCPU 0's includes the
    /// irqchip when the VM has one.
    pub fn save_vcpu(&self, index: u32) -> Result<VcpuState, VmError> {
        let v = self.vcpu(index)?;
        let mut state = v
            .request(VcpuCommand::Save)
            .ok_or(VmError::VcpuGone { vcpu: index })??;
        if index == 0 && self.irqchip {
            state.irqchip = Some(IrqchipState::save(&self.fd)?);
        }
        Ok(state)
    }

    /// Restore one vCPU's state (the VM must be paused); vCPU 0's state
    /// also restores the irqchip.
    pub fn restore_vcpu(&self, index: u32, state: VcpuState) -> Result<(), VmError> {
        let v = self.vcpu(index)?;
        let mismatch = |what| StateError::IrqchipMismatch { vcpu: index, what };
        if state.lapic.is_some() != self.irqchip {
            return Err(mismatch(if self.irqchip {
                "has no LAPIC, but this VM has an irqchip"
            } else {
                "has a LAPIC, but this VM has no irqchip"
            })
            .into());
        }
        if state.irqchip.is_some() != (index == 0 && self.irqchip) {
            return Err(mismatch(if index == 0 {
                "lacks the irqchip section this VM needs"
            } else {
                "carries an irqchip section (only vCPU 0's may)"
            })
            .into());
        }
        if let Some(chip) = &state.irqchip {
            chip.restore(&self.fd)?;
        }
        Ok(v.request(|tx| VcpuCommand::Restore(Box::new(state), tx))
            .ok_or(VmError::VcpuGone { vcpu: index })??)
    }

    /// Save every vCPU's state, in index order (the VM must be paused).
    pub fn save_vcpus(&self) -> Result<Vec<VcpuState>, VmError> {
        (0..self.vcpu_count()).map(|i| self.save_vcpu(i)).collect()
    }

    /// Restore every vCPU's state, in index order (the VM must be paused).
    pub fn restore_vcpus(&self, states: Vec<VcpuState>) -> Result<(), VmError> {
        if states.len() != self.vcpus.len() {
            return Err(VmError::VcpuCountMismatch {
                got: states.len(),
                want: self.vcpus.len(),
            });
        }
        for (i, s) in (0..self.vcpu_count()).zip(&states) {
            let wanted = (i == 0 && self.irqchip, self.irqchip);
            if (s.irqchip.is_some(), s.lapic.is_some()) != wanted {
                // Refused by restore_vcpu too; checked for all first, so
                // a bad vCPU 1 does not leave vCPU 0 restored.
                return Err(StateError::IrqchipMismatch {
                    vcpu: i,
                    what: "does not match this VM's interrupt controllers",
                }
                .into());
            }
        }
        for (i, s) in (0..self.vcpu_count()).zip(states) {
            self.restore_vcpu(i, s)?;
        }
        Ok(())
    }
}
