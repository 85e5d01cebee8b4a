//! vCPU state that crosses a migration, and its blob encoding.
//!
//! The blob is a list of sections, each `tag: u16 | len: u32 | bytes`, all
//! little-endian. KVM structs travel as their exact `repr(C)` bytes (this is
//! an x86-64 to x86-64 protocol, so the layouts agree); each section's length
//! is checked against the struct's size before it is read, and an unknown
//! tag, a duplicate or a missing required section is refused.
//!
//! With the in-kernel irqchip (VMs of two or more vCPUs, [`super::irqchip`])
//! every blob also has the vCPU's LAPIC (`lapic`), and vCPU 0's blob carries
//! the VM-wide PIC and IOAPIC state (`irqchip`): one blob per vCPU already
//! crosses every path a migration, a clone or a checkpoint epoch takes, so
//! the VM-wide state rides along instead of needing a message of its own.

use kvm_bindings::{
    kvm_debugregs, kvm_fpu, kvm_lapic_state, kvm_mp_state, kvm_msr_entry, kvm_regs, kvm_sregs,
    kvm_vcpu_events, kvm_xcrs, kvm_xsave, Msrs,
};
use kvm_ioctls::VcpuFd;
use zerocopy::{FromBytes, IntoBytes};

use super::irqchip::IrqchipState;

/// Errors from saving, restoring or decoding vCPU state.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// A KVM get/set ioctl failed.
    #[error("vCPU {vcpu}: {op} failed")]
    Ioctl {
        /// vCPU index.
        vcpu: u32,
        /// The ioctl, e.g. "KVM_SET_SREGS".
        op: &'static str,
        /// The ioctl error.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// A VM-wide KVM get/set ioctl failed (the irqchip).
    #[error("{op} failed")]
    VmIoctl {
        /// The ioctl, e.g. "KVM_SET_IRQCHIP".
        op: &'static str,
        /// The ioctl error.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// A blob that does not fit this VM's interrupt controllers: a LAPIC
    /// section where the VM has none or none where it has one, or the
    /// irqchip section missing from vCPU 0 or present in another vCPU.
    #[error("vCPU {vcpu}: state {what}")]
    IrqchipMismatch {
        /// vCPU index.
        vcpu: u32,
        /// What does not match.
        what: &'static str,
    },
    /// KVM read or wrote fewer MSRs than asked.
    #[error("vCPU {vcpu}: {op} handled {done} of {wanted} MSRs")]
    Msrs {
        /// vCPU index.
        vcpu: u32,
        /// "KVM_GET_MSRS" or "KVM_SET_MSRS".
        op: &'static str,
        /// MSRs handled.
        done: usize,
        /// MSRs asked for.
        wanted: usize,
    },
    /// The blob is malformed.
    #[error("vCPU state blob: {reason}")]
    Blob {
        /// What is wrong with it.
        reason: String,
    },
}

/// Everything of one vCPU that a migration carries.
pub struct VcpuState {
    /// General-purpose registers.
    pub regs: kvm_regs,
    /// Segment, control and descriptor-table registers.
    pub sregs: kvm_sregs,
    /// x87/SSE state when XSAVE is not available.
    pub fpu: Option<kvm_fpu>,
    /// XSAVE area (x87, SSE, AVX, ...).
    pub xsave: Option<kvm_xsave>,
    /// Extended control registers (XCR0).
    pub xcrs: Option<kvm_xcrs>,
    /// Debug registers.
    pub debugregs: kvm_debugregs,
    /// Saveable MSRs as (index, value), the TSC among them.
    pub msrs: Vec<(u32, u64)>,
    /// Pending exceptions, interrupts, NMIs.
    pub events: kvm_vcpu_events,
    /// KVM multiprocessing state.
    pub mp_state: kvm_mp_state,
    /// The vCPU was parked on `HLT` with interrupts enabled, waiting for an
    /// interrupt that this VM never delivers; it stays parked after restore.
    pub halted: bool,
    /// The local APIC (VMs with the in-kernel irqchip).
    pub lapic: Option<kvm_lapic_state>,
    /// The PICs and IOAPIC: VM-wide, carried by vCPU 0 only (with the
    /// in-kernel irqchip); the VM saves and restores it, not the vCPU.
    pub irqchip: Option<IrqchipState>,
}

const TAG_REGS: u16 = 1;
const TAG_SREGS: u16 = 2;
const TAG_FPU: u16 = 3;
const TAG_XSAVE: u16 = 4;
const TAG_XCRS: u16 = 5;
const TAG_DEBUGREGS: u16 = 6;
const TAG_MSRS: u16 = 7;
const TAG_EVENTS: u16 = 8;
const TAG_MP_STATE: u16 = 9;
const TAG_HALTED: u16 = 10;
const TAG_LAPIC: u16 = 11;
const TAG_IRQCHIP: u16 = 12;

fn ioctl_err(vcpu: u32, op: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> StateError {
    move |source| StateError::Ioctl { vcpu, op, source }
}

impl VcpuState {
    /// Read the state of a vCPU that is not running. `msr_indices` is the
    /// list of MSRs to save (see [`probe_saveable_msrs`]); `lapic`: the VM
    /// has the in-kernel irqchip. The VM-wide `irqchip` is left `None`.
    pub fn save(
        vcpu: &VcpuFd,
        index: u32,
        msr_indices: &[u32],
        use_xsave: bool,
        halted: bool,
        lapic: bool,
    ) -> Result<Self, StateError> {
        let regs = vcpu.get_regs().map_err(ioctl_err(index, "KVM_GET_REGS"))?;
        let sregs = vcpu
            .get_sregs()
            .map_err(ioctl_err(index, "KVM_GET_SREGS"))?;
        let (fpu, xsave, xcrs) = if use_xsave {
            let xsave = vcpu
                .get_xsave()
                .map_err(ioctl_err(index, "KVM_GET_XSAVE"))?;
            let xcrs = vcpu.get_xcrs().map_err(ioctl_err(index, "KVM_GET_XCRS"))?;
            (None, Some(xsave), Some(xcrs))
        } else {
            let fpu = vcpu.get_fpu().map_err(ioctl_err(index, "KVM_GET_FPU"))?;
            (Some(fpu), None, None)
        };
        let debugregs = vcpu
            .get_debug_regs()
            .map_err(ioctl_err(index, "KVM_GET_DEBUGREGS"))?;
        let msrs = get_msrs(vcpu, index, msr_indices)?;
        let events = vcpu
            .get_vcpu_events()
            .map_err(ioctl_err(index, "KVM_GET_VCPU_EVENTS"))?;
        let mp_state = vcpu
            .get_mp_state()
            .map_err(ioctl_err(index, "KVM_GET_MP_STATE"))?;
        let lapic = lapic
            .then(|| vcpu.get_lapic())
            .transpose()
            .map_err(ioctl_err(index, "KVM_GET_LAPIC"))?;
        Ok(Self {
            regs,
            sregs,
            fpu,
            xsave,
            xcrs,
            debugregs,
            msrs,
            events,
            mp_state,
            halted,
            lapic,
            irqchip: None,
        })
    }

    /// Load this state into a vCPU that is not running (Firecracker's order:
    /// MP state, registers, FPU/XSAVE, debug registers, MSRs, events last;
    /// the LAPIC after the special registers, whose APIC base it relies on,
    /// and before the MSRs, among which the TSC deadline needs it). The
    /// VM-wide `irqchip` is not touched here (see `Vm::restore_vcpu`).
    pub fn restore(&self, vcpu: &VcpuFd, index: u32) -> Result<(), StateError> {
        vcpu.set_mp_state(self.mp_state)
            .map_err(ioctl_err(index, "KVM_SET_MP_STATE"))?;
        vcpu.set_regs(&self.regs)
            .map_err(ioctl_err(index, "KVM_SET_REGS"))?;
        vcpu.set_sregs(&self.sregs)
            .map_err(ioctl_err(index, "KVM_SET_SREGS"))?;
        if let Some(xsave) = &self.xsave {
            // SAFETY: `xsave` is a plain `kvm_xsave` read from a vCPU of the
            // same kind (or decoded from exactly its size); KVM_SET_XSAVE
            // reads only the fixed 4 KiB legacy area this struct holds.
            unsafe { vcpu.set_xsave(xsave) }.map_err(ioctl_err(index, "KVM_SET_XSAVE"))?;
        }
        if let Some(xcrs) = &self.xcrs {
            vcpu.set_xcrs(xcrs)
                .map_err(ioctl_err(index, "KVM_SET_XCRS"))?;
        }
        if let Some(fpu) = &self.fpu {
            vcpu.set_fpu(fpu).map_err(ioctl_err(index, "KVM_SET_FPU"))?;
        }
        vcpu.set_debug_regs(&self.debugregs)
            .map_err(ioctl_err(index, "KVM_SET_DEBUGREGS"))?;
        if let Some(lapic) = &self.lapic {
            vcpu.set_lapic(lapic)
                .map_err(ioctl_err(index, "KVM_SET_LAPIC"))?;
        }
        set_msrs(vcpu, index, &self.msrs)?;
        vcpu.set_vcpu_events(&self.events)
            .map_err(ioctl_err(index, "KVM_SET_VCPU_EVENTS"))?;
        Ok(())
    }

    /// A digest of the state that defines where the guest is and what it
    /// computes: every section except the time-stamp counter MSR. The TSC
    /// is left out because it keeps counting on the host while a vCPU is
    /// paused, so two saves of the same stopped vCPU differ there; the two
    /// ends of a live clone compare this value (xxh3-64 of the encoded
    /// sections, TSC value zeroed).
    pub fn clone_point_digest(&self) -> u64 {
        const IA32_TSC: u32 = 0x10;
        let mut stable = Self::decode(&self.encode()).expect("own encoding decodes");
        for (index, value) in &mut stable.msrs {
            if *index == IA32_TSC {
                *value = 0;
            }
        }
        xxhash_rust::xxh3::xxh3_64(&stable.encode())
    }

    /// Encode as a section blob.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(8192);
        section(&mut out, TAG_REGS, self.regs.as_bytes());
        section(&mut out, TAG_SREGS, self.sregs.as_bytes());
        if let Some(fpu) = &self.fpu {
            section(&mut out, TAG_FPU, &encode_fpu(fpu));
        }
        if let Some(xsave) = &self.xsave {
            section(&mut out, TAG_XSAVE, xsave.as_bytes());
        }
        if let Some(xcrs) = &self.xcrs {
            section(&mut out, TAG_XCRS, xcrs.as_bytes());
        }
        section(&mut out, TAG_DEBUGREGS, self.debugregs.as_bytes());
        let mut msrs = Vec::with_capacity(self.msrs.len() * 12);
        for (index, value) in &self.msrs {
            msrs.extend_from_slice(&index.to_le_bytes());
            msrs.extend_from_slice(&value.to_le_bytes());
        }
        section(&mut out, TAG_MSRS, &msrs);
        section(&mut out, TAG_EVENTS, self.events.as_bytes());
        section(&mut out, TAG_MP_STATE, self.mp_state.as_bytes());
        section(&mut out, TAG_HALTED, &[u8::from(self.halted)]);
        if let Some(lapic) = &self.lapic {
            section(&mut out, TAG_LAPIC, lapic.as_bytes());
        }
        if let Some(irqchip) = &self.irqchip {
            section(&mut out, TAG_IRQCHIP, &irqchip.encode());
        }
        out
    }

    /// Decode a section blob, refusing anything malformed.
    pub fn decode(mut blob: &[u8]) -> Result<Self, StateError> {
        let bad = |reason: String| StateError::Blob { reason };
        let mut regs = None;
        let mut sregs = None;
        let mut fpu = None;
        let mut xsave = None;
        let mut xcrs = None;
        let mut debugregs = None;
        let mut msrs = None;
        let mut events = None;
        let mut mp_state = None;
        let mut halted = None;
        let mut lapic = None;
        let mut irqchip = None;
        while !blob.is_empty() {
            if blob.len() < 6 {
                return Err(bad(format!("{} stray bytes at the end", blob.len())));
            }
            let tag = u16::from_le_bytes([blob[0], blob[1]]);
            let len = u32::from_le_bytes([blob[2], blob[3], blob[4], blob[5]]);
            let len = usize::try_from(len).map_err(|_| bad("section too long".into()))?;
            let body = blob
                .get(6..6 + len)
                .ok_or_else(|| bad(format!("section {tag} truncated: {len} bytes announced")))?;
            blob = &blob[6 + len..];
            let dup = match tag {
                TAG_REGS => regs.replace(pod::<kvm_regs>(tag, body)?).is_some(),
                TAG_SREGS => sregs.replace(pod::<kvm_sregs>(tag, body)?).is_some(),
                TAG_FPU => fpu.replace(decode_fpu(body)?).is_some(),
                TAG_XSAVE => xsave.replace(pod::<kvm_xsave>(tag, body)?).is_some(),
                TAG_XCRS => xcrs.replace(pod::<kvm_xcrs>(tag, body)?).is_some(),
                TAG_DEBUGREGS => debugregs
                    .replace(pod::<kvm_debugregs>(tag, body)?)
                    .is_some(),
                TAG_MSRS => msrs.replace(decode_msrs(body)?).is_some(),
                TAG_EVENTS => events.replace(pod::<kvm_vcpu_events>(tag, body)?).is_some(),
                TAG_MP_STATE => mp_state.replace(pod::<kvm_mp_state>(tag, body)?).is_some(),
                TAG_HALTED => match body {
                    [b @ (0 | 1)] => halted.replace(*b == 1).is_some(),
                    _ => return Err(bad("halted flag is not one byte of 0 or 1".into())),
                },
                TAG_LAPIC => lapic.replace(pod::<kvm_lapic_state>(tag, body)?).is_some(),
                TAG_IRQCHIP => irqchip.replace(IrqchipState::decode(body)?).is_some(),
                other => return Err(bad(format!("unknown section tag {other}"))),
            };
            if dup {
                return Err(bad(format!("section {tag} appears twice")));
            }
        }
        let missing = |name: &str| bad(format!("missing section {name}"));
        if fpu.is_none() && xsave.is_none() {
            return Err(missing("fpu or xsave"));
        }
        Ok(Self {
            regs: regs.ok_or_else(|| missing("regs"))?,
            sregs: sregs.ok_or_else(|| missing("sregs"))?,
            fpu,
            xsave,
            xcrs,
            debugregs: debugregs.ok_or_else(|| missing("debugregs"))?,
            msrs: msrs.ok_or_else(|| missing("msrs"))?,
            events: events.ok_or_else(|| missing("events"))?,
            mp_state: mp_state.ok_or_else(|| missing("mp_state"))?,
            halted: halted.ok_or_else(|| missing("halted"))?,
            lapic,
            irqchip,
        })
    }
}

fn section(out: &mut Vec<u8>, tag: u16, body: &[u8]) {
    out.extend_from_slice(&tag.to_le_bytes());
    let len = u32::try_from(body.len()).expect("state sections are small");
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(body);
}

fn pod<T: FromBytes>(tag: u16, body: &[u8]) -> Result<T, StateError> {
    T::read_from_bytes(body).map_err(|_| StateError::Blob {
        reason: format!(
            "section {tag} is {} bytes, expected {}",
            body.len(),
            std::mem::size_of::<T>()
        ),
    })
}

fn decode_msrs(body: &[u8]) -> Result<Vec<(u32, u64)>, StateError> {
    if !body.len().is_multiple_of(12) {
        return Err(StateError::Blob {
            reason: format!("MSR section of {} bytes is not whole entries", body.len()),
        });
    }
    Ok(body
        .chunks_exact(12)
        .map(|c| {
            let index = u32::from_le_bytes(c[..4].try_into().expect("4 bytes"));
            let value = u64::from_le_bytes(c[4..].try_into().expect("8 bytes"));
            (index, value)
        })
        .collect())
}

/// `kvm_fpu` has no zerocopy derive in kvm-bindings; encode it field by field.
const FPU_LEN: usize = 416;

fn encode_fpu(f: &kvm_fpu) -> Vec<u8> {
    let mut v = Vec::with_capacity(FPU_LEN);
    f.fpr.iter().for_each(|r| v.extend_from_slice(r));
    v.extend_from_slice(&f.fcw.to_le_bytes());
    v.extend_from_slice(&f.fsw.to_le_bytes());
    v.push(f.ftwx);
    v.push(0);
    v.extend_from_slice(&f.last_opcode.to_le_bytes());
    v.extend_from_slice(&f.last_ip.to_le_bytes());
    v.extend_from_slice(&f.last_dp.to_le_bytes());
    f.xmm.iter().for_each(|r| v.extend_from_slice(r));
    v.extend_from_slice(&f.mxcsr.to_le_bytes());
    v.extend_from_slice(&[0; 4]);
    v
}

fn decode_fpu(b: &[u8]) -> Result<kvm_fpu, StateError> {
    if b.len() != FPU_LEN {
        return Err(StateError::Blob {
            reason: format!("fpu section is {} bytes, expected {FPU_LEN}", b.len()),
        });
    }
    let u16_at = |o: usize| u16::from_le_bytes([b[o], b[o + 1]]);
    let u64_at = |o: usize| u64::from_le_bytes(b[o..o + 8].try_into().expect("8 bytes"));
    let mut f = kvm_fpu::default();
    for (i, r) in f.fpr.iter_mut().enumerate() {
        r.copy_from_slice(&b[i * 16..i * 16 + 16]);
    }
    f.fcw = u16_at(128);
    f.fsw = u16_at(130);
    f.ftwx = b[132];
    f.last_opcode = u16_at(134);
    f.last_ip = u64_at(136);
    f.last_dp = u64_at(144);
    for (i, r) in f.xmm.iter_mut().enumerate() {
        r.copy_from_slice(&b[152 + i * 16..168 + i * 16]);
    }
    f.mxcsr = u32::from_le_bytes(b[408..412].try_into().expect("4 bytes"));
    Ok(f)
}

fn get_msrs(vcpu: &VcpuFd, index: u32, indices: &[u32]) -> Result<Vec<(u32, u64)>, StateError> {
    let entries: Vec<kvm_msr_entry> = indices
        .iter()
        .map(|&i| kvm_msr_entry {
            index: i,
            ..Default::default()
        })
        .collect();
    let mut msrs = Msrs::from_entries(&entries).map_err(|_| StateError::Msrs {
        vcpu: index,
        op: "KVM_GET_MSRS",
        done: 0,
        wanted: indices.len(),
    })?;
    let done = vcpu
        .get_msrs(&mut msrs)
        .map_err(ioctl_err(index, "KVM_GET_MSRS"))?;
    if done != indices.len() {
        return Err(StateError::Msrs {
            vcpu: index,
            op: "KVM_GET_MSRS",
            done,
            wanted: indices.len(),
        });
    }
    Ok(msrs.as_slice().iter().map(|e| (e.index, e.data)).collect())
}

fn set_msrs(vcpu: &VcpuFd, index: u32, values: &[(u32, u64)]) -> Result<(), StateError> {
    let entries: Vec<kvm_msr_entry> = values
        .iter()
        .map(|&(i, data)| kvm_msr_entry {
            index: i,
            data,
            ..Default::default()
        })
        .collect();
    let err = |done| StateError::Msrs {
        vcpu: index,
        op: "KVM_SET_MSRS",
        done,
        wanted: values.len(),
    };
    let msrs = Msrs::from_entries(&entries).map_err(|_| err(0))?;
    let done = vcpu
        .set_msrs(&msrs)
        .map_err(ioctl_err(index, "KVM_SET_MSRS"))?;
    if done != values.len() {
        return Err(err(done));
    }
    Ok(())
}

/// Of the MSRs KVM lists as saveable, the ones this vCPU can actually read
/// and write back (some hosts list MSRs their CPU model refuses).
pub fn probe_saveable_msrs(vcpu: &VcpuFd, listed: &[u32]) -> Vec<u32> {
    listed
        .iter()
        .copied()
        .filter(|&msr| match get_msrs(vcpu, 0, &[msr]) {
            Ok(v) => set_msrs(vcpu, 0, &v).is_ok(),
            Err(_) => false,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> VcpuState {
        let regs = kvm_regs {
            rip: 0x7c00,
            rdx: 0x80,
            ..Default::default()
        };
        let mut xmm = [[0u8; 16]; 16];
        xmm[3][7] = 9;
        let fpu = kvm_fpu {
            fcw: 0x37f,
            mxcsr: 0x1f80,
            xmm,
            ..Default::default()
        };
        VcpuState {
            regs,
            sregs: kvm_sregs::default(),
            fpu: Some(fpu),
            xsave: None,
            xcrs: None,
            debugregs: kvm_debugregs::default(),
            msrs: vec![(0x10, 12345), (0xc000_0080, 0x500)],
            events: kvm_vcpu_events::default(),
            mp_state: kvm_mp_state::default(),
            halted: true,
            lapic: None,
            irqchip: None,
        }
    }

    #[test]
    fn blob_round_trips() {
        let s = sample();
        let d = VcpuState::decode(&s.encode()).unwrap();
        assert_eq!(d.regs, s.regs);
        assert_eq!(d.fpu, s.fpu);
        assert_eq!(d.msrs, s.msrs);
        assert!(d.halted);
        assert_eq!(d.encode(), s.encode());
    }

    #[test]
    fn blob_refuses_wrong_sizes_and_garbage() {
        let blob = sample().encode();
        // Truncated anywhere: an error, never a panic.
        for cut in 0..blob.len() {
            assert!(VcpuState::decode(&blob[..cut]).is_err(), "cut at {cut}");
        }
        // A regs section one byte short.
        let mut short = blob.clone();
        let regs_len = std::mem::size_of::<kvm_regs>();
        short[2..6].copy_from_slice(&u32::try_from(regs_len - 1).unwrap().to_le_bytes());
        short.remove(6);
        assert!(matches!(
            VcpuState::decode(&short),
            Err(StateError::Blob { .. })
        ));
        // Unknown tag.
        let mut unknown = blob.clone();
        unknown.extend_from_slice(&[99, 0, 0, 0, 0, 0]);
        assert!(VcpuState::decode(&unknown).is_err());
        // Duplicate section.
        let mut dup = blob.clone();
        dup.extend_from_slice(&TAG_HALTED.to_le_bytes());
        dup.extend_from_slice(&[1, 0, 0, 0, 1]);
        assert!(VcpuState::decode(&dup).is_err());
    }

    #[test]
    fn lapic_and_irqchip_sections_round_trip() {
        let mut s = sample();
        let mut lapic = kvm_lapic_state::default();
        lapic.regs[0x23] = 1; // APIC ID 1
        s.lapic = Some(lapic);
        let blob = s.encode();
        let d = VcpuState::decode(&blob).unwrap();
        assert_eq!(d.lapic.unwrap().regs[0x23], 1);
        assert!(d.irqchip.is_none());
        assert_eq!(d.encode(), blob);
        // A LAPIC section of the wrong size is refused.
        let mut short = blob.clone();
        let at = short.len() - std::mem::size_of::<kvm_lapic_state>() - 4;
        let len = u32::try_from(std::mem::size_of::<kvm_lapic_state>() - 1).unwrap();
        short[at..at + 4].copy_from_slice(&len.to_le_bytes());
        short.pop();
        assert!(VcpuState::decode(&short).is_err());
    }
}
