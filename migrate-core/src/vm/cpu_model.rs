//! The CPU model name both ends of a migration compare.

use kvm_bindings::CpuId;

/// A name for the CPU model the guest sees: vendor, brand and a hash of
/// the CPUID fields that define it.
pub fn cpu_model_name(cpuid: &CpuId) -> String {
    let entries = cpuid.as_slice();
    let leaf = |f: u32| entries.iter().find(|e| e.function == f && e.index == 0);
    let mut vendor = Vec::new();
    if let Some(e) = leaf(0) {
        for r in [e.ebx, e.edx, e.ecx] {
            vendor.extend_from_slice(&r.to_le_bytes());
        }
    }
    let mut brand = Vec::new();
    for f in 0x8000_0002..=0x8000_0004 {
        if let Some(e) = leaf(f) {
            for r in [e.eax, e.ebx, e.ecx, e.edx] {
                brand.extend_from_slice(&r.to_le_bytes());
            }
        }
    }
    // Hash what defines the CPU model the guest sees: signature and feature
    // flags. Topology fields (APIC IDs in leaves 1, 0xB, 0x1F, 0x8000001E)
    // come from whichever host core ran CPUID and must not count.
    let mut h = xxhash_rust::xxh3::Xxh3::new();
    for (f, i, regs) in [
        (1, 0, [true, false, true, true]),
        (7, 0, [false, true, true, true]),
        (0xd, 0, [true, false, false, true]),
        (0xd, 1, [true, false, false, false]),
        (0x8000_0001, 0, [false, false, true, true]),
    ] {
        if let Some(e) = entries.iter().find(|e| e.function == f && e.index == i) {
            for (keep, r) in regs.iter().zip([e.eax, e.ebx, e.ecx, e.edx]) {
                if *keep {
                    h.update(&r.to_le_bytes());
                }
            }
        }
    }
    let text = |b: &[u8]| {
        String::from_utf8_lossy(b)
            .trim_matches(char::from(0))
            .trim()
            .to_string()
    };
    format!(
        "{} {} cpuid:{:016x}",
        text(&vendor),
        text(&brand),
        h.digest()
    )
}
