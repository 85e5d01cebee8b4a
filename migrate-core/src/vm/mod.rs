//! A KVM virtual machine: guest RAM, vCPU threads, port devices.
//!
//! The VM boots a raw boot-sector image the way a PC BIOS hands over (image at
//! 0x7C00, 16-bit real mode at 0000:7C00, DL = 0x80) with no BIOS services,
//! and exposes what a migration needs: the memory, the dirty log, pause and
//! resume, and the vCPU state.

mod cpu_model;
pub mod dirty_log;
pub mod dirty_ring;
mod events;
pub mod irqchip;
pub mod memory;
mod pending;
pub mod ports;
pub mod prefault;
pub mod ring_set;
mod saved;
pub mod state;
pub mod throttle;
pub mod vcpu;

pub use events::{VmError, VmEvent};
pub use prefault::PreparedRam;

use std::sync::mpsc::Sender;
use std::sync::Arc;

use kvm_bindings::{kvm_segment, KVM_MAX_CPUID_ENTRIES};
use kvm_ioctls::{Cap, Kvm, VmFd};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

use crate::dirty::DirtyBitmap;
use cpu_model::cpu_model_name;
use dirty_log::{DirtyLogMode, DirtyTrackConfig};
use dirty_ring::DirtyRing;
use memory::{MemoryError, Slot};
use ports::{PortBus, SerialSink};
use ring_set::{Reaper, RingSet};
use throttle::Throttles;
use vcpu::{VcpuCommand, VcpuHandle, VcpuThread};

/// Where a boot image is loaded, as a PC BIOS does.
pub const BOOT_LOAD_ADDR: u64 = 0x7C00;
/// Largest boot image accepted.
pub const MAX_BOOT_IMAGE: usize = 64 * 1024;
/// Largest vCPU count accepted.
pub const MAX_VCPUS: u32 = 64;
/// TSS address for Intel's real-mode emulation: three pages just below 4 GiB,
/// never inside guest RAM that reaches that high in practice, as QEMU does.
const TSS_ADDR: usize = 0xfffb_d000;

/// What a VM is made of.
pub struct VmConfig {
    /// Guest RAM in bytes.
    pub mem_size: u64,
    /// Number of vCPUs.
    pub vcpus: u32,
    /// Where COM1 output goes.
    pub serial: SerialSink,
    /// Dirty bitmap or dirty ring.
    pub dirty_track: DirtyTrackConfig,
    /// RAM allocated ahead ([`PreparedRam::prefaulted`]), of `mem_size`
    /// bytes; `None`: pages are allocated as they are first written.
    pub ram: Option<PreparedRam>,
}

/// A KVM VM with its memory and vCPU threads.
pub struct Vm {
    _kvm: Kvm,
    fd: Arc<VmFd>,
    memory: GuestMemoryMmap,
    slots: Vec<Slot>,
    dirty_mode: DirtyLogMode,
    /// The dirty rings, when the VM tracks with them (else the bitmap).
    rings: Option<Arc<RingSet>>,
    /// Empties the rings every few ms while the VM lives (ring mode).
    reaper: Option<Reaper>,
    vcpus: Vec<VcpuHandle>,
    ports: Arc<PortBus>,
    cpu_model: String,
    /// Each vCPU's throttle (auto-converge sets all alike, dirty-limit
    /// one by one).
    throttles: Throttles,
    /// Pages ever written (see [`Vm::written_pages`]).
    written: std::sync::Mutex<DirtyBitmap>,
    /// The VM has the in-kernel irqchip (two or more vCPUs, [`irqchip`]).
    irqchip: bool,
    /// Every page of RAM was allocated and mapped before the VM was made.
    prefaulted: bool,
}

impl Vm {
    /// Create a VM with paused vCPUs and zeroed RAM. Guest exits are sent to
    /// `events`.
    pub fn new(config: VmConfig, events: Sender<VmEvent>) -> Result<Self, VmError> {
        // Refuse a bad size before touching /dev/kvm.
        let slots = memory::slot_layout(config.mem_size)?;
        let kvm = Kvm::new().map_err(VmError::OpenKvm)?;
        let max = u32::try_from(kvm.get_max_vcpus())
            .unwrap_or(MAX_VCPUS)
            .min(MAX_VCPUS);
        if config.vcpus == 0 || config.vcpus > max {
            return Err(VmError::BadVcpuCount {
                vcpus: config.vcpus,
                max,
            });
        }
        let fd = kvm.create_vm().map_err(|source| VmError::Kvm {
            op: "KVM_CREATE_VM",
            source,
        })?;
        fd.set_tss_address(TSS_ADDR)
            .map_err(|source| VmError::Kvm {
                op: "KVM_SET_TSS_ADDR",
                source,
            })?;
        let fd = Arc::new(fd);
        let ring_bytes = ring_size(&fd, config.dirty_track)?;
        // The ring must be enabled before any vCPU exists; slots keep
        // KVM_MEM_LOG_DIRTY_PAGES (the kernel logs only such slots) and
        // manual protection is left off (it concerns the bitmap only).
        let dirty_mode = match ring_bytes {
            Some((offer, bytes)) => {
                dirty_ring::enable(&fd, offer, bytes)?;
                DirtyLogMode::Ring
            }
            None => dirty_log::enable_manual_protect(&fd),
        };
        let prefaulted = config.ram.is_some();
        let memory = match config.ram {
            Some(ram) if ram.size == config.mem_size => ram.memory,
            Some(ram) => {
                return Err(memory::MemoryError::BadSize {
                    size: config.mem_size,
                    reason: if ram.size < config.mem_size {
                        "larger than the RAM allocated ahead (--mem)"
                    } else {
                        "smaller than the RAM allocated ahead (--mem)"
                    },
                }
                .into())
            }
            None => memory::map_memory(&slots)?,
        };
        memory::register_slots(&fd, &memory, &slots)?;
        // Before any vCPU, so that each gets its LAPIC.
        let with_irqchip = config.vcpus > 1;
        if with_irqchip {
            irqchip::create(&fd).map_err(|source| VmError::Kvm {
                op: "KVM_CREATE_IRQCHIP",
                source,
            })?;
        }

        let cpuid = kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(|source| VmError::Kvm {
                op: "KVM_GET_SUPPORTED_CPUID",
                source,
            })?;
        let cpu_model = cpu_model_name(&cpuid);
        let listed_msrs = kvm
            .get_msr_index_list()
            .map_err(|source| VmError::Kvm {
                op: "KVM_GET_MSR_INDEX_LIST",
                source,
            })?
            .as_slice()
            .to_vec();
        let use_xsave = kvm.check_extension(Cap::Xsave) && kvm.check_extension(Cap::Xcrs);
        let ports = Arc::new(PortBus::new(config.serial));
        let throttles = Throttles::new(config.vcpus);
        vcpu::install_kick_handler().map_err(|e| VmError::SpawnVcpu {
            vcpu: 0,
            source: std::io::Error::from_raw_os_error(e.errno()),
        })?;

        let mut msrs = None;
        let mut vcpu_fds = Vec::new();
        let mut rings = Vec::new();
        for index in 0..config.vcpus {
            let vcpu_fd = fd
                .create_vcpu(u64::from(index))
                .map_err(|source| VmError::Kvm {
                    op: "KVM_CREATE_VCPU",
                    source,
                })?;
            vcpu_fd.set_cpuid2(&cpuid).map_err(|source| VmError::Kvm {
                op: "KVM_SET_CPUID2",
                source,
            })?;
            msrs.get_or_insert_with(|| {
                Arc::new(state::probe_saveable_msrs(&vcpu_fd, &listed_msrs))
            });
            if let Some((_, bytes)) = ring_bytes {
                rings.push(DirtyRing::map(&vcpu_fd, index, bytes)?);
            }
            vcpu_fds.push(vcpu_fd);
        }
        let pages =
            usize::try_from(config.mem_size / crate::PAGE_SIZE).expect("checked by slot_layout");
        let rings = ring_bytes.map(|_| Arc::new(RingSet::new(rings, slots.clone(), pages)));
        let reaper = rings
            .clone()
            .map(|set| Reaper::spawn(set, fd.clone()))
            .transpose()
            .map_err(|source| VmError::SpawnVcpu { vcpu: 0, source })?;
        let msrs = msrs.unwrap_or_default();
        let mut vcpus = Vec::new();
        for (index, vcpu_fd) in (0..config.vcpus).zip(vcpu_fds) {
            let handle = VcpuHandle::spawn(VcpuThread {
                index,
                fd: vcpu_fd,
                ports: ports.clone(),
                events: events.clone(),
                msrs: msrs.clone(),
                use_xsave,
                parked: index != 0 && !with_irqchip,
                lapic: with_irqchip,
                throttle: throttles.of(index),
                ring: rings.clone().map(|set| vcpu::RingHook {
                    set,
                    vm: fd.clone(),
                }),
            })
            .map_err(|source| VmError::SpawnVcpu {
                vcpu: index,
                source,
            })?;
            vcpus.push(handle);
        }
        Ok(Self {
            _kvm: kvm,
            fd,
            memory,
            slots,
            dirty_mode,
            rings,
            reaper,
            vcpus,
            ports,
            cpu_model,
            throttles,
            written: std::sync::Mutex::new(DirtyBitmap::new(pages)),
            irqchip: with_irqchip,
            prefaulted,
        })
    }

    /// Hold the vCPUs off `fraction` of the time (0.0 to 0.99), as QEMU's
    /// auto-converge does; 0.0 lifts the throttle.
    pub fn set_throttle(&self, fraction: f64) -> Result<(), VmError> {
        self.throttles
            .set_all(fraction, || self.kickables())
            .map_err(|source| VmError::SpawnVcpu { vcpu: 0, source })
    }

    /// Hold vCPU *i* off `fractions[i]` of the time (each clamped to 0.0 to
    /// 0.99; vCPUs beyond the list are unthrottled), as QEMU's dirty-limit
    /// does: only the vCPUs that dirty memory slow down.
    pub fn set_vcpu_throttles(&self, fractions: &[f64]) -> Result<(), VmError> {
        self.throttles
            .set_each(fractions, || self.kickables())
            .map_err(|source| VmError::SpawnVcpu { vcpu: 0, source })
    }

    fn kickables(&self) -> Vec<vcpu::Kickable> {
        self.vcpus.iter().map(VcpuHandle::kickable).collect()
    }

    /// The highest throttle in force (fraction of vCPU time held off).
    pub fn throttle(&self) -> f64 {
        self.throttles.max()
    }

    /// Each vCPU's throttle, in index order.
    pub fn vcpu_throttles(&self) -> Vec<f64> {
        self.throttles.each()
    }

    /// Guest RAM.
    pub fn memory(&self) -> &GuestMemoryMmap {
        &self.memory
    }

    /// Whether every page of RAM was allocated before the VM was made
    /// ([`VmConfig::ram`]): writes then go through the mapping.
    pub fn ram_prefaulted(&self) -> bool {
        self.prefaulted
    }

    /// The KVM memory slots.
    pub fn slots(&self) -> &[Slot] {
        &self.slots
    }

    /// Guest RAM size in bytes.
    pub fn mem_size(&self) -> u64 {
        self.slots.iter().map(|s| s.size).sum()
    }

    /// Whether the VM has the in-kernel irqchip (PICs, IOAPIC, a LAPIC per
    /// vCPU): VMs of two or more vCPUs, whose APs the guest starts with
    /// INIT and SIPI.
    pub fn has_irqchip(&self) -> bool {
        self.irqchip
    }

    /// Number of vCPUs.
    pub fn vcpu_count(&self) -> u32 {
        u32::try_from(self.vcpus.len()).expect("at most MAX_VCPUS")
    }

    /// A name for the CPU model the guest sees: vendor, brand and a hash of
    /// the CPUID table, so both ends of a migration can compare them.
    pub fn cpu_model(&self) -> &str {
        &self.cpu_model
    }

    /// How the dirty log is read.
    pub fn dirty_log_mode(&self) -> DirtyLogMode {
        self.dirty_mode
    }

    /// `"ring"` or `"bitmap"`: how dirty pages are tracked.
    pub fn dirty_track(&self) -> &'static str {
        if self.rings.is_some() {
            "ring"
        } else {
            "bitmap"
        }
    }

    /// Entries per vCPU dirty ring (`None`: bitmap).
    pub fn dirty_ring_entries(&self) -> Option<u32> {
        self.rings.as_ref().map(|r| r.entries())
    }

    /// Dirty-ring overruns detected (`None`: bitmap); see
    /// [`ring_set::RingSet`].
    pub fn dirty_ring_overruns(&self) -> Option<u64> {
        self.rings.as_ref().map(|r| r.overruns())
    }

    /// Phantom ring entries given back to the kernel after overruns
    /// (`None`: bitmap); see [`ring_set::RingSet`].
    pub fn dirty_ring_resynced(&self) -> Option<u64> {
        self.rings.as_ref().map(|r| r.resynced())
    }

    /// Reaper rounds and their total nanoseconds (`None`: bitmap).
    pub fn dirty_ring_reap_stats(&self) -> Option<(u64, u64)> {
        self.rings.as_ref().map(|r| r.reap_stats())
    }

    /// Pages consumed from each vCPU's dirty ring so far (`None`: bitmap).
    pub fn dirty_ring_harvested(&self) -> Option<Vec<u64>> {
        self.rings.as_ref().map(|r| r.harvested_per_vcpu())
    }

    /// The port devices (serial sink, counters).
    pub fn ports(&self) -> &PortBus {
        &self.ports
    }

    /// Exit counters per vCPU.
    pub fn exit_counts(&self) -> Vec<Arc<vcpu::ExitCounts>> {
        self.vcpus.iter().map(|v| v.counts.clone()).collect()
    }

    /// Load a boot image at 0x7C00 and point vCPU 0 at it in real mode, as
    /// a PC BIOS hands over a boot sector (CS:IP = 0000:7C00, DL = 0x80).
    pub fn load_boot_image(&self, image: &[u8]) -> Result<(), VmError> {
        if image.len() > MAX_BOOT_IMAGE {
            return Err(VmError::BootImageTooLarge {
                len: image.len(),
                max: MAX_BOOT_IMAGE,
            });
        }
        self.write_memory(BOOT_LOAD_ADDR, image)?;
        let mut state = self.save_vcpu(0)?;
        let seg = |selector: u16, type_: u8| kvm_segment {
            base: u64::from(selector) << 4,
            limit: 0xffff,
            selector,
            type_,
            present: 1,
            s: 1,
            ..Default::default()
        };
        state.sregs.cs = seg(0, 0xb);
        for s in [
            &mut state.sregs.ds,
            &mut state.sregs.es,
            &mut state.sregs.fs,
            &mut state.sregs.gs,
            &mut state.sregs.ss,
        ] {
            *s = seg(0, 0x3);
        }
        state.regs = kvm_bindings::kvm_regs {
            rip: BOOT_LOAD_ADDR,
            rdx: 0x80,
            rsp: BOOT_LOAD_ADDR,
            rflags: 0x2,
            ..Default::default()
        };
        state.halted = false;
        self.restore_vcpu(0, state)
    }

    /// Start or restart every vCPU.
    pub fn resume(&self) -> Result<(), VmError> {
        for v in &self.vcpus {
            v.request(VcpuCommand::Resume)
                .ok_or(VmError::VcpuGone { vcpu: v.index })?;
        }
        Ok(())
    }

    /// Stop every vCPU outside KVM_RUN with its pending I/O completed.
    pub fn pause(&self) -> Result<(), VmError> {
        for v in &self.vcpus {
            v.request(VcpuCommand::Pause)
                .ok_or(VmError::VcpuGone { vcpu: v.index })?;
        }
        Ok(())
    }

    /// OR the pages dirtied since the last harvest into `into` (which covers
    /// all of guest RAM) and reset the log. The pages also join the set of
    /// pages ever written ([`Vm::written_pages`]).
    pub fn harvest_dirty_log(&self, into: &mut DirtyBitmap) -> Result<(), VmError> {
        if let Some(rings) = &self.rings {
            // Straight into both sets: O(pages found), not O(RAM).
            let mut written = self.written.lock().unwrap_or_else(|e| e.into_inner());
            rings.harvest(&self.fd, into, &mut written)?;
            return Ok(());
        }
        let mut fresh = DirtyBitmap::new(into.len());
        dirty_log::harvest(&self.fd, self.dirty_mode, &self.slots, &mut fresh)?;
        into.union_with(&fresh);
        self.written
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .union_with(&fresh);
        Ok(())
    }

    /// Pages written since the VM was created, by the guest (as of the last
    /// dirty-log harvest) or by the VMM ([`Vm::write_memory`], boot image,
    /// pages received in a migration). Every other page is still zero: the
    /// mapping is anonymous and KVM logs every guest write from creation on.
    pub fn written_pages(&self) -> DirtyBitmap {
        self.written
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Record pages the VMM wrote behind KVM's back (received pages).
    pub fn note_written(&self, pages: &DirtyBitmap) {
        self.written
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .union_with(pages);
    }

    /// Write guest memory from the VMM (boot content), recording the pages
    /// as written, since KVM's dirty log only sees guest writes.
    pub fn write_memory(&self, gpa: u64, bytes: &[u8]) -> Result<(), VmError> {
        self.memory
            .write_slice(bytes, GuestAddress(gpa))
            .map_err(|_| MemoryError::OutOfRange {
                gpa,
                len: bytes.len(),
            })?;
        if let Some(last) = (bytes.len() as u64).checked_sub(1) {
            let mut w = self.written.lock().unwrap_or_else(|e| e.into_inner());
            let first = gpa / crate::PAGE_SIZE;
            let end = (gpa + last) / crate::PAGE_SIZE;
            for page in first..=end {
                w.set(usize::try_from(page).expect("checked by the write"));
            }
        }
        Ok(())
    }

    /// Stop the vCPU threads for good.
    pub fn shutdown(&mut self) {
        self.stop_ticker();
        self.reaper = None;
        for v in &mut self.vcpus {
            v.exit();
        }
    }

    fn stop_ticker(&self) {
        self.throttles.stop();
    }

    fn vcpu(&self, index: u32) -> Result<&VcpuHandle, VmError> {
        usize::try_from(index)
            .ok()
            .and_then(|i| self.vcpus.get(i))
            .ok_or(VmError::VcpuGone { vcpu: index })
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        self.stop_ticker();
    }
}

/// Total pages of guest RAM described by `memory`.
pub fn ram_pages(memory: &GuestMemoryMmap) -> u64 {
    memory
        .iter()
        .map(vm_memory::GuestMemoryRegion::len)
        .sum::<u64>()
        / crate::PAGE_SIZE
}

/// The ring to enable (offer, bytes per vCPU), or `None` for the bitmap.
fn ring_size(
    fd: &VmFd,
    config: DirtyTrackConfig,
) -> Result<Option<(dirty_ring::RingOffer, u32)>, VmError> {
    let offer = dirty_ring::offered(fd);
    let bytes = config.ring_bytes_for(offer)?;
    Ok(offer.zip(bytes))
}
