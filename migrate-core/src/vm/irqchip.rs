//! The in-kernel interrupt controllers of a VM with several vCPUs.
//!
//! A VM with more than one vCPU gets KVM's in-kernel irqchip
//! (`KVM_CREATE_IRQCHIP`: two 8259 PICs, an IOAPIC and one local APIC per
//! vCPU, created before the vCPUs), because the application processors are
//! started the way a PC starts them: the boot processor's guest code sends
//! INIT and a start-up IPI through its LAPIC's ICR, and KVM moves the AP from
//! `UNINITIALIZED` to running in real mode at `vector × 0x1000` by itself.
//! A one-vCPU VM has no irqchip, so that `HLT` with interrupts off still
//! exits to the VMM (with an in-kernel LAPIC KVM handles `HLT` itself and
//! the vCPU sleeps in the kernel until an interrupt that never comes).
//!
//! No PIT is created: nothing here needs a timer interrupt, and a PIT would
//! be one more device whose state must cross a migration.
//!
//! The VM-wide part of the irqchip (both PICs and the IOAPIC, one
//! `kvm_irqchip` each) travels in vCPU 0's state blob (section `irqchip`,
//! see [`super::state`]); each vCPU's LAPIC travels in its own blob.

use kvm_bindings::{
    kvm_irqchip, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE,
};
use kvm_ioctls::VmFd;
use zerocopy::{FromBytes, IntoBytes};

use super::state::StateError;

/// The chips saved, in section order.
const CHIPS: [u32; 3] = [
    KVM_IRQCHIP_PIC_MASTER,
    KVM_IRQCHIP_PIC_SLAVE,
    KVM_IRQCHIP_IOAPIC,
];

/// Size of one chip in the section.
const CHIP_LEN: usize = std::mem::size_of::<kvm_irqchip>();

/// Create the in-kernel irqchip (before any vCPU exists).
pub fn create(fd: &VmFd) -> Result<(), kvm_ioctls::Error> {
    fd.create_irq_chip()
}

/// The state of the PICs and the IOAPIC.
#[derive(Clone, Copy)]
pub struct IrqchipState {
    /// Master PIC, slave PIC, IOAPIC (as `KVM_GET_IRQCHIP` returns them).
    pub chips: [kvm_irqchip; 3],
}

impl IrqchipState {
    /// Read the state of every chip.
    pub fn save(fd: &VmFd) -> Result<Self, StateError> {
        let mut chips = [kvm_irqchip::default(); 3];
        for (chip, id) in chips.iter_mut().zip(CHIPS) {
            chip.chip_id = id;
            fd.get_irqchip(chip).map_err(|source| StateError::VmIoctl {
                op: "KVM_GET_IRQCHIP",
                source,
            })?;
        }
        Ok(Self { chips })
    }

    /// Load the state of every chip.
    pub fn restore(&self, fd: &VmFd) -> Result<(), StateError> {
        for chip in &self.chips {
            fd.set_irqchip(chip).map_err(|source| StateError::VmIoctl {
                op: "KVM_SET_IRQCHIP",
                source,
            })?;
        }
        Ok(())
    }

    /// The section body: the three `kvm_irqchip` structs as their bytes.
    pub fn encode(&self) -> Vec<u8> {
        self.chips
            .iter()
            .flat_map(|c| c.as_bytes().to_vec())
            .collect()
    }

    /// Decode a section body, refusing a wrong size or chip order.
    pub fn decode(body: &[u8]) -> Result<Self, StateError> {
        let bad = |reason: String| StateError::Blob { reason };
        if body.len() != CHIP_LEN * CHIPS.len() {
            return Err(bad(format!(
                "irqchip section is {} bytes, expected {}",
                body.len(),
                CHIP_LEN * CHIPS.len()
            )));
        }
        let mut chips = [kvm_irqchip::default(); 3];
        for ((chip, id), bytes) in chips.iter_mut().zip(CHIPS).zip(body.chunks_exact(CHIP_LEN)) {
            *chip = kvm_irqchip::read_from_bytes(bytes)
                .map_err(|_| bad("irqchip section: bad chip".into()))?;
            if chip.chip_id != id {
                return Err(bad(format!(
                    "irqchip section: chip {} where chip {id} belongs",
                    chip.chip_id
                )));
            }
        }
        Ok(Self { chips })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn section_round_trips_and_refuses_garbage() {
        let mut chips = [kvm_irqchip::default(); 3];
        for (c, id) in chips.iter_mut().zip(CHIPS) {
            c.chip_id = id;
        }
        // Change a byte of the IOAPIC's state through the encoding.
        let state = IrqchipState { chips };
        let mut body = state.encode();
        body[2 * CHIP_LEN + 20] = 7;
        let back = IrqchipState::decode(&body).unwrap();
        assert_eq!(back.encode(), body);
        assert!(IrqchipState::decode(&body[..body.len() - 1]).is_err());
        let mut swapped = body.clone();
        swapped[..4].copy_from_slice(&KVM_IRQCHIP_IOAPIC.to_le_bytes());
        assert!(IrqchipState::decode(&swapped).is_err());
    }
}
