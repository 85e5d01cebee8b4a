//! Guest workloads with known memory-dirtying patterns, as boot sectors.
//!
//! A migration engine is only as well tested as the guests it moves. Each
//! workload here is a tiny x86 program, generated with iced-x86, that boots
//! like a PC boot sector (loaded at [`BOOT_LOAD_ADDR`], 16-bit real mode, no
//! BIOS services used), switches to long mode with all guest RAM
//! identity-mapped, and then dirties memory in a documented way:
//!
//! | spec | what the guest does after boot |
//! | --- | --- |
//! | `idle` | nothing but a register-only loop |
//! | `sweep[:start=S,end=E,mode=M]` | one byte store on every page of `[S, E)`, forever: `inc` (default), the same nonzero byte (`same`) or zero (`zero`) |
//! | `hotset[:wss=W,rate=R]` | one qword store per page, random order, in a VMM-filled incompressible `[1 MiB, 1 MiB + W)`, optionally `R` pages/s |
//! | `burst[:start=S,end=E\|wss=W,quiet=Q,storm=T,cycles=N]` | quiet `Q` ms (no stores), then `inc byte` sweeps over `[S, E)` for `T` ms, repeating (`N` storms, default forever) |
//! | `verify[:start=S,end=E]` | writes then checks address- and pass-dependent values in every page of `[S, E)`, halts on a mismatch |
//!
//! Parameters (RAM size, ranges, TSC rate) are baked into the image as
//! immediates, so [`build`] takes the guest RAM size, and for the timed
//! workloads (a paced `hotset`, `burst`; see [`WorkloadSpec::needs_tsc_hz`])
//! the guest TSC frequency. The same image boots
//! unchanged under QEMU/SeaBIOS (`-drive format=raw,file=IMG`), except that
//! QEMU cannot provide VMM-written content ([`GuestImage::needs_vmm_content`]).
//!
//! Progress is reported on COM1 (port 0x3F8) as single bytes: [`BOOT_MARK`]
//! once when long mode is reached, [`PASS_MARK`] once per pass, and, from
//! `verify` only, [`MISMATCH_MARK`] followed by exit status
//! [`MISMATCH_EXIT_STATUS`] on port 0x501.
//!
//! Guest-physical memory used by every workload: the boot sector at 0x7C00,
//! page tables from 0x10000 ([`PML4_GPA`], [`PDPT_GPA`], then one page
//! directory per GiB of RAM from [`PD_GPA`], at most 64 → below 0x52000),
//! written once during boot. Workloads touch only GPAs ≥ 1 MiB
//! ([`GuestImage::dirty_range`]).

mod asm;
mod burst;
mod fill;
mod guest;
mod hotset;
mod idle;
mod smp;
mod spec;
mod sweep;
mod verify;

use std::fmt;
use std::ops::Range;
use std::str::FromStr;

use thiserror::Error;

pub use asm::{COM1_DATA, COM1_LSR, EXIT_PORT, PDPT_GPA, PD_GPA, PML4_GPA, STACK_TOP};
pub use burst::{BURST_CHECK_PAGES, DEFAULT_BURST_QUIET_MS, DEFAULT_BURST_STORM_MS};
pub use fill::{fill_pseudo_random, FillContent, MemoryFill};
pub use guest::{GuestSpec, DEFAULT_FILL_SEED};
#[cfg(target_arch = "x86_64")]
pub use hotset::measure_tsc_hz;
pub use hotset::{HOTSET_FILL_SEED, HOTSET_MAX_CATCH_UP_MS};
pub use idle::IDLE_ITERATIONS_PER_PASS;
pub use smp::{AP_TRAMPOLINE_GPA, MAX_SMP_VCPUS, SIPI_VECTOR, VCPU_MARK_BASE};
pub use sweep::{SweepMode, SWEEP_SAME_BYTE};
pub use verify::expected_value as verify_expected_value;
#[doc(hidden)]
pub use verify::VerifyFault;

use crate::size::{format_size, parse_size, ParseSizeError, GIB, MIB};

/// Guest-physical address where the VMM loads [`GuestImage::boot`] (the PC
/// boot-sector address); the vCPU starts there in real mode, CS=0.
pub const BOOT_LOAD_ADDR: u64 = 0x7C00;
/// Size of [`GuestImage::boot`]: one boot sector.
pub const BOOT_SECTOR_SIZE: usize = 512;
/// Guest page size the workloads dirty memory in.
pub const PAGE_SIZE: u64 = 4096;
/// Lowest address a workload may touch: everything below (boot sector, page
/// tables, BIOS areas under QEMU) is off limits.
pub const MIN_WORKLOAD_ADDR: u64 = MIB;
/// Smallest guest RAM size accepted by [`build`].
pub const MIN_MEM_SIZE: u64 = 2 * MIB;
/// Largest guest RAM size accepted by [`build`] (the page directories must
/// fit below the 640 KiB conventional-memory limit).
pub const MAX_MEM_SIZE: u64 = 64 * GIB;
/// Default working-set size of `hotset`.
pub const DEFAULT_HOTSET_WSS: u64 = 64 * MIB;
/// Default size of `burst`'s range (from its start) when no `end` is given.
pub const DEFAULT_BURST_WSS: u64 = 64 * MIB;
/// Default end of `verify`'s range (clamped to the RAM size).
pub const DEFAULT_VERIFY_END: u64 = 64 * MIB;

/// Printed once on COM1 when the guest has reached long mode.
pub const BOOT_MARK: u8 = b'B';
/// Printed on COM1 once per pass of the workload (see each workload for
/// what a pass is); the rate of these marks measures guest speed.
pub const PASS_MARK: u8 = b'.';
/// Printed on COM1 by `verify` at its first mismatch, just before it exits.
pub const MISMATCH_MARK: u8 = b'X';
/// Exit status `verify` writes to [`EXIT_PORT`] after a mismatch.
pub const MISMATCH_EXIT_STATUS: u8 = 0x0F;

/// A workload, as chosen on the command line (`sweep:start=1M,end=512M`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WorkloadSpec {
    /// No memory writes after boot.
    Idle,
    /// Halts with interrupts enabled after boot and never wakes: no memory
    /// writes and no vCPU time, so a benchmark of the transfer path does
    /// not share the host's cores with an emulated guest loop.
    Halt,
    /// One store per page over `[start, end)`, forever.
    Sweep {
        /// First byte of the range (default 1 MiB).
        start: Option<u64>,
        /// End of the range, exclusive (default: end of RAM).
        end: Option<u64>,
        /// What is stored (default [`SweepMode::Inc`]).
        mode: SweepMode,
    },
    /// Random-order stores into an incompressible working set at 1 MiB.
    Hotset {
        /// Working-set size in bytes.
        wss: u64,
        /// Pages per second; `None` for as fast as the guest can.
        rate: Option<u64>,
        /// With several vCPUs, only vCPUs `0..writers` store (the working
        /// set is split among them); the others run the register-only
        /// `idle` loop and print their own marks. `None`: every vCPU
        /// writes (the image is then the same as before this option). A
        /// guest with one vCPU that dirties and one that only computes is
        /// what the `dirty-limit` policy is for.
        writers: Option<u32>,
    },
    /// Quiet phases alternating with storms of one store per page over
    /// `[start, end)`; needs [`BuildParams::tsc_hz`].
    Burst {
        /// First byte of the range (default 1 MiB).
        start: Option<u64>,
        /// End of the range, exclusive; at most one of `end` and `wss` is
        /// given (default: `start + wss`).
        end: Option<u64>,
        /// Size of the range when `end` is not given (default
        /// [`DEFAULT_BURST_WSS`]).
        wss: Option<u64>,
        /// Length of a quiet phase in ms (default [`DEFAULT_BURST_QUIET_MS`]).
        quiet_ms: u64,
        /// Bytes at the start of the range that the guest keeps sweeping
        /// during the quiet phases (`None`: quiet phases store nothing). A
        /// nonzero value makes the dirty rate a sawtooth between a small and
        /// a large working set instead of an on/off burst.
        quiet_wss: Option<u64>,
        /// Length of a storm in ms (default [`DEFAULT_BURST_STORM_MS`]).
        storm_ms: u64,
        /// Number of storms, after which the guest stays quiet; 0 (the
        /// default) for forever.
        cycles: u64,
    },
    /// Self-checking writes and reads over `[start, end)`.
    Verify {
        /// First byte of the range (default 1 MiB).
        start: Option<u64>,
        /// End of the range, exclusive (default 64 MiB, or the end of RAM
        /// if smaller).
        end: Option<u64>,
        /// `seq=1`: each pass mark is followed by the pass number's low 16
        /// bits in 4 hex digits (`.0001.0002…`), so that a serial stream
        /// can be checked for a gap or a repeat (fault-tolerance tests).
        seq: bool,
    },
}

impl WorkloadSpec {
    /// Whether [`build`] needs [`BuildParams::tsc_hz`] for this spec: true
    /// for a `hotset` with a `rate` and for `burst`, which time themselves
    /// with `rdtsc`.
    #[must_use]
    pub fn needs_tsc_hz(&self) -> bool {
        matches!(
            self,
            WorkloadSpec::Hotset { rate: Some(_), .. } | WorkloadSpec::Burst { .. }
        )
    }
}

/// Inputs of [`build`] that come from the VM rather than the spec.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BuildParams {
    /// Guest RAM size in bytes (RAM is contiguous from GPA 0).
    pub mem_size: u64,
    /// Guest TSC frequency in Hz; required by a paced `hotset` and by
    /// `burst` (see [`WorkloadSpec::needs_tsc_hz`]).
    pub tsc_hz: Option<u64>,
    /// vCPUs the guest runs on (1 to [`MAX_SMP_VCPUS`]). With more than
    /// one, the sector starts the APs by INIT + SIPI and `sweep`, `hotset`
    /// and `verify` split their range among the vCPUs (`idle` idles on
    /// each; `burst` needs one vCPU); see the `smp` module. With one, the
    /// image is exactly the single-vCPU sector.
    pub vcpus: u32,
}

/// A built workload: what the VMM puts in guest RAM before boot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuestImage {
    /// The boot sector, exactly [`BOOT_SECTOR_SIZE`] bytes ending in 0x55
    /// 0xAA, to load at [`BOOT_LOAD_ADDR`].
    pub boot: Vec<u8>,
    /// Content to write into guest RAM before boot.
    pub fills: Vec<MemoryFill>,
    /// True when the workload depends on `fills` (booting the sector alone,
    /// e.g. under QEMU, runs but does not reproduce the intended content).
    pub needs_vmm_content: bool,
    /// The GPA range the workload writes to after boot; `None` for `idle`.
    pub dirty_range: Option<Range<u64>>,
}

/// Why a spec did not parse or an image could not be built.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum WorkloadError {
    /// The name before `:` is not a known workload.
    #[error("unknown workload `{0}` (expected idle, halt, sweep, hotset, burst or verify)")]
    UnknownWorkload(String),
    /// A `key=value` parameter the workload does not have.
    #[error("unknown parameter `{key}` for workload `{workload}` (allowed: {allowed})")]
    UnknownKey {
        /// The workload.
        workload: &'static str,
        /// The offending key.
        key: String,
        /// The keys the workload accepts.
        allowed: &'static str,
    },
    /// A `mode=` value the workload does not have.
    #[error("unknown mode `{mode}` for workload `{workload}` (allowed: {allowed})")]
    UnknownMode {
        /// The workload.
        workload: &'static str,
        /// The mode given.
        mode: String,
        /// The modes the workload accepts.
        allowed: &'static str,
    },
    /// Two parameters that exclude each other.
    #[error("parameters `{first}` and `{second}` of workload `{workload}` exclude each other")]
    ConflictingKeys {
        /// The workload.
        workload: &'static str,
        /// One parameter.
        first: &'static str,
        /// The other.
        second: &'static str,
    },
    /// A parameter without `=value`, or an empty one.
    #[error("malformed parameter `{0}`: expected key=value")]
    MalformedParam(String),
    /// The same key given twice.
    #[error("parameter `{0}` given more than once")]
    DuplicateKey(String),
    /// A size value that does not parse.
    #[error("bad size for `{key}`: {source}")]
    BadSize {
        /// The parameter.
        key: &'static str,
        /// The parse error.
        #[source]
        source: ParseSizeError,
    },
    /// A count that is not a positive (or, where 0 is allowed, a
    /// non-negative) integer.
    #[error("bad value `{value}` for `{key}`: expected {expected}")]
    BadNumber {
        /// The parameter.
        key: &'static str,
        /// The text given.
        value: String,
        /// What was expected ("a positive integer", "a non-negative
        /// integer").
        expected: &'static str,
    },
    /// An address or size that must be a multiple of 4 KiB.
    #[error("{what} {value:#x} is not a multiple of 4 KiB")]
    NotPageAligned {
        /// What the value is.
        what: &'static str,
        /// The value.
        value: u64,
    },
    /// A range starting below [`MIN_WORKLOAD_ADDR`].
    #[error("start {start:#x} is below 1 MiB (low memory holds the boot sector and page tables)")]
    StartBelowMin {
        /// The requested start.
        start: u64,
    },
    /// A range whose end is not above its start.
    #[error("empty range: end {end:#x} is not above start {start:#x}")]
    EmptyRange {
        /// Start of the range.
        start: u64,
        /// End of the range.
        end: u64,
    },
    /// A range that extends past the end of guest RAM.
    #[error("range end {end:#x} is beyond guest RAM ({mem_size:#x} bytes)")]
    RangeOutsideRam {
        /// End of the range.
        end: u64,
        /// Guest RAM size.
        mem_size: u64,
    },
    /// A zero working-set size.
    #[error("working-set size must be nonzero")]
    WssZero,
    /// A working set that does not fit between 1 MiB and the end of RAM.
    #[error("working-set size {wss:#x} exceeds guest RAM minus 1 MiB ({available:#x})")]
    WssTooLarge {
        /// The requested working-set size.
        wss: u64,
        /// The space available above 1 MiB.
        available: u64,
    },
    /// A timed workload (paced hotset, burst) without
    /// [`BuildParams::tsc_hz`].
    #[error("hotset with a rate, and burst, need the guest TSC frequency (BuildParams::tsc_hz)")]
    MissingTscHz,
    /// A duration that is zero TSC ticks, or too many for 64 bits.
    #[error("`{key}` = {ms} ms is not a usable number of ticks of a {tsc_hz} Hz TSC")]
    DurationOutOfRange {
        /// The parameter.
        key: &'static str,
        /// The duration given, in ms.
        ms: u64,
        /// The TSC frequency.
        tsc_hz: u64,
    },
    /// A rate above one page per TSC tick.
    #[error("rate {rate} pages/s is not below the TSC frequency {tsc_hz} Hz")]
    RateTooHigh {
        /// The requested rate.
        rate: u64,
        /// The TSC frequency.
        tsc_hz: u64,
    },
    /// A guest RAM size outside what the guests support.
    #[error("unsupported guest RAM size {0:#x}: must be a multiple of 4 KiB from 2 MiB to 64 GiB")]
    BadMemSize(u64),
    /// A vCPU count the workloads cannot run on.
    #[error("{vcpus} vCPUs: the workloads run on 1 to {max}")]
    BadVcpuCount {
        /// The count given.
        vcpus: u32,
        /// The largest supported.
        max: u32,
    },
    /// A range too small to give every vCPU at least one page.
    #[error("a range of {len:#x} bytes cannot give each of {vcpus} vCPUs a page")]
    RangeTooSmallForVcpus {
        /// Bytes in the range.
        len: u64,
        /// The vCPU count.
        vcpus: u32,
    },
    /// `writers` is 0 or more than the vCPUs.
    #[error("writers={writers}: must be 1 to the {vcpus} vCPUs")]
    BadWriters {
        /// The `writers` given.
        writers: u32,
        /// The vCPU count.
        vcpus: u32,
    },
    /// A workload that runs on one vCPU only.
    #[error("workload `{0}` runs on one vCPU only")]
    SingleVcpuOnly(&'static str),
    /// The generated code does not fit in one boot sector.
    #[error("generated boot code is {0} bytes; only 510 fit in a boot sector")]
    ImageTooLarge(usize),
    /// iced-x86 refused to assemble (a bug in the generator).
    #[error("assembler: {0}")]
    Assemble(String),
}

impl From<iced_x86::IcedError> for WorkloadError {
    fn from(e: iced_x86::IcedError) -> Self {
        WorkloadError::Assemble(e.to_string())
    }
}

/// Builds the boot image of `spec` for a guest with `params.mem_size` bytes
/// of RAM.
///
/// # Errors
/// [`WorkloadError`] for a RAM size or parameters the workload cannot use
/// (range outside RAM or below 1 MiB, empty range, misaligned values, working
/// set too large, both `end` and `wss` for burst, paced hotset or burst
/// without TSC frequency, durations that are not a usable tick count).
pub fn build(spec: &WorkloadSpec, params: &BuildParams) -> Result<GuestImage, WorkloadError> {
    build_inner(spec, params, None).map(|(image, _)| image)
}

/// [`build`], with a deliberate fault injected into a `verify` guest (for
/// testing that the checker fires). Ignored by other workloads.
#[doc(hidden)]
pub fn build_with_verify_fault(
    spec: &WorkloadSpec,
    params: &BuildParams,
    fault: VerifyFault,
) -> Result<GuestImage, WorkloadError> {
    build_inner(spec, params, Some(fault)).map(|(image, _)| image)
}

/// Builds the image and also returns the sector's layout (for tests).
fn build_inner(
    spec: &WorkloadSpec,
    params: &BuildParams,
    fault: Option<VerifyFault>,
) -> Result<(GuestImage, asm::Sector), WorkloadError> {
    let mem = params.mem_size;
    if !(MIN_MEM_SIZE..=MAX_MEM_SIZE).contains(&mem) || !page_aligned(mem) {
        return Err(WorkloadError::BadMemSize(mem));
    }
    smp::check_vcpus(params.vcpus)?;
    let multi = params.vcpus > 1;
    let mut fills = Vec::new();
    let (sector, dirty_range) = match *spec {
        WorkloadSpec::Idle => (
            asm::boot_sector(mem, multi, |a| idle::emit(a, multi))?,
            None,
        ),
        WorkloadSpec::Halt => (
            asm::boot_sector(mem, multi, |a| idle::emit_halt(a, multi))?,
            None,
        ),
        WorkloadSpec::Sweep { start, end, mode } => {
            let r = check_range(start.unwrap_or(MIN_WORKLOAD_ADDR), end.unwrap_or(mem), mem)?;
            let per = smp::split(&r, params.vcpus)?;
            let sector =
                asm::boot_sector(mem, multi, |a| sweep::emit(a, r.start, r.end, mode, per))?;
            (sector, Some(r))
        }
        WorkloadSpec::Burst {
            start,
            end,
            wss,
            quiet_ms,
            quiet_wss,
            storm_ms,
            cycles,
        } => {
            if multi {
                return Err(WorkloadError::SingleVcpuOnly("burst"));
            }
            let r = burst_range(start, end, wss, mem)?;
            let quiet_end = match quiet_wss {
                None => None,
                Some(q) if q > r.end - r.start => {
                    return Err(WorkloadError::WssTooLarge {
                        wss: q,
                        available: r.end - r.start,
                    })
                }
                Some(q) => Some(r.start + q),
            };
            let tsc_hz = params.tsc_hz.ok_or(WorkloadError::MissingTscHz)?;
            let timing = burst::Timing {
                quiet_ticks: ms_to_ticks("quiet", quiet_ms, tsc_hz)?,
                storm_ticks: ms_to_ticks("storm", storm_ms, tsc_hz)?,
            };
            let sector = asm::boot_sector(mem, false, |a| {
                burst::emit(a, r.start, r.end, quiet_end, timing, cycles)
            })?;
            (sector, Some(r))
        }
        WorkloadSpec::Hotset { wss, rate, writers } => {
            let available = mem - MIN_WORKLOAD_ADDR;
            if wss == 0 {
                return Err(WorkloadError::WssZero);
            }
            check_aligned("working-set size", wss)?;
            if wss > available {
                return Err(WorkloadError::WssTooLarge { wss, available });
            }
            let pacing = match rate {
                None => None,
                Some(rate) => Some(hotset::pacing(rate, params.tsc_hz)?),
            };
            let r = MIN_WORKLOAD_ADDR..MIN_WORKLOAD_ADDR + wss;
            // Only some vCPUs write: split among them, the rest idle. All
            // of them writing is the plain split (the same image).
            let (per, idle_from) = smp::split_writers(&r, params.vcpus, writers)?;
            let pages = per.map_or(wss, |p| p.chunk) / PAGE_SIZE;
            let sector = asm::boot_sector(mem, multi, |a| {
                hotset::emit(a, r.start, pages, pacing, per, idle_from)
            })?;
            fills.push(MemoryFill {
                gpa: r.start,
                len: wss,
                content: FillContent::PseudoRandom {
                    seed: HOTSET_FILL_SEED,
                },
            });
            (sector, Some(r))
        }
        WorkloadSpec::Verify { start, end, seq } => {
            let end = end.unwrap_or(DEFAULT_VERIFY_END.min(mem));
            let r = check_range(start.unwrap_or(MIN_WORKLOAD_ADDR), end, mem)?;
            let per = smp::split(&r, params.vcpus)?;
            let sector = asm::boot_sector(mem, multi, |a| {
                verify::emit(a, r.start, r.end, fault, per, seq)
            })?;
            (sector, Some(r))
        }
    };
    let image = GuestImage {
        boot: sector.bytes.clone(),
        needs_vmm_content: !fills.is_empty(),
        fills,
        dirty_range,
    };
    Ok((image, sector))
}

/// Whether `value` is a multiple of [`PAGE_SIZE`] (a power of two).
fn page_aligned(value: u64) -> bool {
    value & (PAGE_SIZE - 1) == 0
}

fn check_aligned(what: &'static str, value: u64) -> Result<(), WorkloadError> {
    if page_aligned(value) {
        Ok(())
    } else {
        Err(WorkloadError::NotPageAligned { what, value })
    }
}

/// Validates `[start, end)` against the rules shared by sweep and verify.
fn check_range(start: u64, end: u64, mem_size: u64) -> Result<Range<u64>, WorkloadError> {
    check_aligned("start", start)?;
    check_aligned("end", end)?;
    if start < MIN_WORKLOAD_ADDR {
        return Err(WorkloadError::StartBelowMin { start });
    }
    if end <= start {
        return Err(WorkloadError::EmptyRange { start, end });
    }
    if end > mem_size {
        return Err(WorkloadError::RangeOutsideRam { end, mem_size });
    }
    Ok(start..end)
}

/// `burst`'s range: from `start` (default 1 MiB) to `end`, or to `start +
/// wss` (default [`DEFAULT_BURST_WSS`]), with the checks of [`check_range`].
fn burst_range(
    start: Option<u64>,
    end: Option<u64>,
    wss: Option<u64>,
    mem_size: u64,
) -> Result<Range<u64>, WorkloadError> {
    let start = start.unwrap_or(MIN_WORKLOAD_ADDR);
    let end = match (end, wss) {
        (Some(_), Some(_)) => {
            return Err(WorkloadError::ConflictingKeys {
                workload: "burst",
                first: "end",
                second: "wss",
            })
        }
        (Some(end), None) => end,
        (None, wss) => {
            let wss = wss.unwrap_or(DEFAULT_BURST_WSS);
            if wss == 0 {
                return Err(WorkloadError::WssZero);
            }
            check_aligned("working-set size", wss)?;
            start.saturating_add(wss)
        }
    };
    check_range(start, end, mem_size)
}

/// `ms` milliseconds in ticks of a `tsc_hz` TSC: nonzero, fits in 64 bits.
fn ms_to_ticks(key: &'static str, ms: u64, tsc_hz: u64) -> Result<u64, WorkloadError> {
    if ms == 0 {
        return Err(WorkloadError::BadNumber {
            key,
            value: "0".into(),
            expected: "a positive integer",
        });
    }
    let ticks = u128::from(tsc_hz) * u128::from(ms) / 1000;
    match u64::try_from(ticks) {
        Ok(t) if t > 0 => Ok(t),
        _ => Err(WorkloadError::DurationOutOfRange { key, ms, tsc_hz }),
    }
}

#[cfg(test)]
mod tests;
