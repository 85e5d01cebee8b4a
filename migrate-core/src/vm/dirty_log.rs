//! Harvesting KVM's dirty log into a [`DirtyBitmap`].
//!
//! Where the kernel offers `KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2`, reading the
//! log (`KVM_GET_DIRTY_LOG`) no longer re-arms write protection by itself;
//! we clear (`KVM_CLEAR_DIRTY_LOG`) exactly the pages we are about to send.
//! Without it, `KVM_GET_DIRTY_LOG` reads and re-protects in one step.

use kvm_bindings::{
    kvm_clear_dirty_log, kvm_enable_cap, KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2,
    KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE,
};
use kvm_ioctls::VmFd;
use vmm_sys_util::ioctl::ioctl_with_ref;
use vmm_sys_util::ioctl_iowr_nr;

use super::dirty_ring::{check_size, DirtyRingError, RingOffer, DEFAULT_RING_BYTES};
use super::memory::Slot;
use crate::dirty::DirtyBitmap;
use crate::PAGE_SIZE;

const KVMIO: u32 = 0xAE;
ioctl_iowr_nr!(KVM_CLEAR_DIRTY_LOG, KVMIO, 0xc0, kvm_clear_dirty_log);

/// Errors from reading or clearing the dirty log.
#[derive(Debug, thiserror::Error)]
pub enum DirtyLogError {
    /// `KVM_GET_DIRTY_LOG` failed.
    #[error("KVM_GET_DIRTY_LOG failed on slot {slot}")]
    Get {
        /// Slot number.
        slot: u32,
        /// The ioctl error.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// `KVM_CLEAR_DIRTY_LOG` failed.
    #[error("KVM_CLEAR_DIRTY_LOG failed on slot {slot}")]
    Clear {
        /// Slot number.
        slot: u32,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
}

/// How the dirty log of a VM is read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DirtyLogMode {
    /// `KVM_GET_DIRTY_LOG` reads and re-protects in one step.
    GetClears,
    /// `KVM_GET_DIRTY_LOG` then `KVM_CLEAR_DIRTY_LOG` on the pages read.
    ManualProtect,
    /// No bitmap: the per-vCPU dirty rings ([`super::dirty_ring`]).
    Ring,
}

/// Which dirty tracking a VM is asked to use (`--dirty-track`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DirtyTrack {
    /// The per-slot bitmap (`KVM_GET_DIRTY_LOG`, manual protection where
    /// offered). The default: it is what every kernel has, and on our hosts
    /// its harvest is already cheap (see bench-data/README.md).
    #[default]
    Bitmap,
    /// The per-vCPU dirty ring; refused where the kernel does not offer it.
    Ring,
    /// The ring where offered, else the bitmap.
    Auto,
}

impl std::str::FromStr for DirtyTrack {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "bitmap" => Ok(Self::Bitmap),
            "ring" => Ok(Self::Ring),
            "auto" => Ok(Self::Auto),
            _ => Err(format!(
                "unknown dirty tracking `{s}` (expected bitmap, ring or auto)"
            )),
        }
    }
}

/// How a VM tracks dirty pages: the mode and, for the ring, its size.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct DirtyTrackConfig {
    /// Bitmap, ring or auto.
    pub track: DirtyTrack,
    /// Ring bytes per vCPU (a power of two, 4 KiB up to what the kernel
    /// offers); `None`: [`super::dirty_ring::DEFAULT_RING_BYTES`] or the
    /// kernel's maximum if that is smaller.
    pub ring_bytes: Option<u64>,
}

impl DirtyTrackConfig {
    /// The ring size to enable given what the kernel offers, or `None` for
    /// the bitmap: `auto` falls back to the bitmap, `ring` without an offer
    /// is refused, a size is checked against the offer.
    pub fn ring_bytes_for(&self, offer: Option<RingOffer>) -> Result<Option<u32>, DirtyRingError> {
        let offer = match (self.track, offer) {
            (DirtyTrack::Bitmap, _) | (DirtyTrack::Auto, None) => return Ok(None),
            (DirtyTrack::Ring, None) => return Err(DirtyRingError::NotOffered),
            (_, Some(offer)) => offer,
        };
        let bytes = self
            .ring_bytes
            .unwrap_or_else(|| u64::from(DEFAULT_RING_BYTES.min(offer.max_bytes)));
        check_size(bytes, offer).map(Some)
    }
}

/// Turn on manual protection where the kernel offers it. Must be called
/// before slots are registered.
pub fn enable_manual_protect(vm: &VmFd) -> DirtyLogMode {
    let offered = vm.check_extension_raw(libc::c_ulong::from(KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2));
    if offered & i32::try_from(KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE).unwrap_or(0) == 0 {
        return DirtyLogMode::GetClears;
    }
    let mut cap = kvm_enable_cap {
        cap: KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2,
        ..Default::default()
    };
    cap.args[0] = u64::from(KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE);
    match vm.enable_cap(&cap) {
        Ok(()) => DirtyLogMode::ManualProtect,
        Err(e) => {
            tracing::warn!("manual dirty-log protection offered but refused: {e}");
            DirtyLogMode::GetClears
        }
    }
}

/// Read (and reset) the dirty log of every slot into `into`, which must cover
/// all of guest RAM. Pages already set in `into` stay set.
pub fn harvest(
    vm: &VmFd,
    mode: DirtyLogMode,
    slots: &[Slot],
    into: &mut DirtyBitmap,
) -> Result<(), DirtyLogError> {
    for slot in slots {
        let size = usize::try_from(slot.size).expect("slot size fits usize");
        let words = vm
            .get_dirty_log(slot.index, size)
            .map_err(|source| DirtyLogError::Get {
                slot: slot.index,
                source,
            })?;
        let first_page = usize::try_from(slot.gpa / PAGE_SIZE).expect("page index fits usize");
        into.merge_words(first_page, &words);
        if mode == DirtyLogMode::ManualProtect && words.iter().any(|&w| w != 0) {
            clear(vm, slot, &words)?;
        }
    }
    Ok(())
}

/// Re-arm write protection for the pages set in `words` (one slot's log).
fn clear(vm: &VmFd, slot: &Slot, words: &[u64]) -> Result<(), DirtyLogError> {
    let mut arg = kvm_clear_dirty_log {
        slot: slot.index,
        num_pages: u32::try_from(slot.pages()).expect("slot is at most 1 GiB"),
        first_page: 0,
        ..Default::default()
    };
    arg.__bindgen_anon_1.dirty_bitmap = words.as_ptr().cast_mut().cast();
    // SAFETY: KVM_CLEAR_DIRTY_LOG reads `num_pages` bits from `dirty_bitmap`;
    // `words` came from KVM_GET_DIRTY_LOG on this very slot and so holds one
    // bit per page of it, rounded up to whole u64 words. The kernel only
    // reads the buffer, and it outlives the call.
    let ret = unsafe { ioctl_with_ref(vm, KVM_CLEAR_DIRTY_LOG(), &arg) };
    if ret < 0 {
        return Err(DirtyLogError::Clear {
            slot: slot.index,
            source: std::io::Error::last_os_error(),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mode_and_ring_size_follow_the_offer() {
        let offer = Some(RingOffer {
            acq_rel: true,
            max_bytes: 1 << 20,
        });
        let small = Some(RingOffer {
            acq_rel: false,
            max_bytes: 64 << 10,
        });
        let cfg = |track, ring_bytes| DirtyTrackConfig { track, ring_bytes };
        assert_eq!(
            cfg(DirtyTrack::Bitmap, None).ring_bytes_for(offer).unwrap(),
            None
        );
        assert_eq!(
            cfg(DirtyTrack::Auto, None).ring_bytes_for(None).unwrap(),
            None
        );
        assert!(matches!(
            cfg(DirtyTrack::Ring, None).ring_bytes_for(None),
            Err(DirtyRingError::NotOffered)
        ));
        assert_eq!(
            cfg(DirtyTrack::Auto, None).ring_bytes_for(offer).unwrap(),
            Some(DEFAULT_RING_BYTES)
        );
        // The default shrinks to what the kernel allows.
        assert_eq!(
            cfg(DirtyTrack::Ring, None).ring_bytes_for(small).unwrap(),
            Some(64 << 10)
        );
        assert_eq!(
            cfg(DirtyTrack::Ring, Some(4096))
                .ring_bytes_for(offer)
                .unwrap(),
            Some(4096)
        );
        assert!(matches!(
            cfg(DirtyTrack::Ring, Some(3 << 10)).ring_bytes_for(offer),
            Err(DirtyRingError::BadSize { .. })
        ));
        assert!(cfg(DirtyTrack::Ring, Some(2 << 20))
            .ring_bytes_for(offer)
            .is_err());
        assert_eq!("RING".parse::<DirtyTrack>(), Ok(DirtyTrack::Ring));
        assert!("sometimes".parse::<DirtyTrack>().is_err());
    }
}
