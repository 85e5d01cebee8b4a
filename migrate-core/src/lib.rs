//! vmigrate's core: a KVM VM, dirty tracking, the wire protocol and the
//! pre-copy migration engine.
//!
//! - [`vm`]: guest RAM, vCPU threads, port devices, vCPU state (KVM).
//! - [`dirty`]: dirty-page bitmaps (pure).
//! - [`wire`]: the framed, checksummed migration protocol (pure).
//! - [`transport`]: `tcp:` and `unix:` migration addresses.
//! - [`engine`]: the source and destination sides of a migration.

pub mod api;
pub mod dirty;
pub mod engine;
pub mod faults;
pub mod transport;
pub mod vm;
pub mod wire;

/// Guest page size: 4 KiB.
pub const PAGE_SIZE: u64 = 4096;
