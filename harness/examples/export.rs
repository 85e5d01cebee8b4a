//! Writes a workload's boot sector to a file, for booting it by hand:
//!
//! ```text
//! cargo run -p harness --example export -- SPEC MEM OUT [--tsc-hz HZ] [--fault KIND:PASS:GPA]
//! qemu-system-x86_64 -accel tcg -m MEM -drive format=raw,file=OUT -serial stdio \
//!     -display none -no-reboot -device isa-debug-exit,iobase=0x501,iosize=1
//! ```
//!
//! `--tsc-hz` defaults to this host's measured TSC frequency (used by a paced
//! hotset only). `--fault skip:PASS:GPA` builds a `verify` guest that skips
//! writing page GPA in pass PASS; `--fault corrupt:PASS:GPA` one that
//! corrupts page GPA after pass PASS checked clean: to see the guest report
//! it (MISMATCH_MARK, exit status 0x0F).
//! QEMU cannot apply the image's memory fills, so a hotset guest then runs
//! over whatever RAM holds (the dirtying pattern is the same).

use std::process::ExitCode;

use harness::workload::{build_with_verify_fault, VerifyFault};
use harness::{build, parse_size, BuildParams, WorkloadSpec};

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("export: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [spec, mem, out, rest @ ..] = args.as_slice() else {
        return Err("usage: export SPEC MEM OUT [--tsc-hz HZ] [--fault KIND:PASS:GPA]".into());
    };
    let spec: WorkloadSpec = spec.parse()?;
    let mut tsc_hz = None;
    let mut fault = None;
    let mut it = rest.iter();
    while let Some(flag) = it.next() {
        let value = it.next().ok_or_else(|| format!("{flag} needs a value"))?;
        match flag.as_str() {
            "--tsc-hz" => tsc_hz = Some(value.parse()?),
            "--fault" => {
                let usage = "--fault wants skip:PASS:GPA or corrupt:PASS:GPA";
                let mut parts = value.splitn(3, ':');
                let (Some(kind), Some(pass), Some(page)) =
                    (parts.next(), parts.next(), parts.next())
                else {
                    return Err(usage.into());
                };
                let (pass, page) = (pass.parse()?, parse_size(page)?);
                fault = Some(match kind {
                    "skip" => VerifyFault::SkipWrite { pass, page },
                    "corrupt" => VerifyFault::CorruptAfterCheck { pass, page },
                    _ => return Err(usage.into()),
                });
            }
            _ => return Err(format!("unknown option {flag}").into()),
        }
    }
    let tsc_hz = tsc_hz.or_else(host_tsc_hz);
    let params = BuildParams {
        mem_size: parse_size(mem)?,
        tsc_hz,
        vcpus: 1,
    };
    let image = match fault {
        Some(f) => build_with_verify_fault(&spec, &params, f)?,
        None => build(&spec, &params)?,
    };
    std::fs::write(out, &image.boot)?;
    eprintln!("{spec}: wrote {} bytes to {out}", image.boot.len());
    eprintln!("  dirty range: {:x?}", image.dirty_range);
    eprintln!("  tsc_hz: {tsc_hz:?}");
    for fill in &image.fills {
        eprintln!(
            "  fill: {:#x}+{:#x} {:?} (not applied by QEMU)",
            fill.gpa, fill.len, fill.content
        );
    }
    Ok(())
}

#[cfg(target_arch = "x86_64")]
fn host_tsc_hz() -> Option<u64> {
    Some(harness::measure_tsc_hz())
}

#[cfg(not(target_arch = "x86_64"))]
fn host_tsc_hz() -> Option<u64> {
    None
}
