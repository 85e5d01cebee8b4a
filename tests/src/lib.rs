//! Helpers shared by the end-to-end tests: KVM gating, process spawning,
//! serial capture.
//!
//! Tests that need `/dev/kvm` call [`kvm_available`] first. Without KVM they
//! print a loud SKIP line and return; with `VMIGRATE_REQUIRE_KVM=1` (set by
//! CI whenever `/dev/kvm` exists) a missing KVM is a failure instead.

/// True when `/dev/kvm` can be opened read-write. Otherwise prints why the
/// calling test is skipped, or panics if `VMIGRATE_REQUIRE_KVM=1`.
pub fn kvm_available(test: &str) -> bool {
    let ok = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok();
    if !ok {
        let required = std::env::var("VMIGRATE_REQUIRE_KVM").is_ok_and(|v| v == "1");
        assert!(
            !required,
            "{test}: /dev/kvm cannot be opened but VMIGRATE_REQUIRE_KVM=1"
        );
        eprintln!("!!!!!!!! SKIPPED {test}: /dev/kvm is not available !!!!!!!!");
    }
    ok
}
