//! `vmigrate bench dirty-track`: what one harvest of the dirty log costs,
//! bitmap against ring, for guests of several sizes.
//!
//! For each size and mode a VM is built in this process (RAM is
//! `MAP_NORESERVE`, so an 8 GiB guest costs only what it touches) running
//! `sweep` over a fixed working set (64 MiB by default: 16,384 pages, each
//! re-dirtied every ~65 ms at the ~250,000 pages/s a guest manages here), so
//! every harvest finds the same known number of dirty pages. After a warm-up,
//! it sleeps one interval and times `Vm::harvest_dirty_log` (what the engine
//! calls once per iteration and once, with the vCPUs paused, in the
//! downtime), N times, then once more with the vCPUs paused. With the ring,
//! the reaper thread's time over each interval is recorded too: it is where
//! the ring does most of its work, off the engine's path.
//!
//! Output: `runs.csv` (one row per harvest), `summary.csv` and
//! `summary.json` (medians per size and mode) in the output folder, and the
//! table between the `dirty-track` markers of `bench-data/README.md`.

use std::fmt::Write as _;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::{Args, Subcommand};
use migrate_core::dirty::DirtyBitmap;
use migrate_core::vm::dirty_log::{DirtyTrack, DirtyTrackConfig};
use migrate_core::vm::{Vm, VmConfig};
use serde::Serialize;

#[derive(Subcommand)]
pub enum BenchCommand {
    /// Harvest cost of the dirty bitmap and the dirty ring (1, 4, 8 GiB).
    DirtyTrack(DirtyTrackArgs),
}

#[derive(Args)]
pub struct DirtyTrackArgs {
    /// Guest sizes.
    #[arg(long, default_value = "1G,4G,8G", value_delimiter = ',')]
    sizes: Vec<String>,
    /// Working set the guest re-dirties (from 1 MiB on).
    #[arg(long, default_value = "64M")]
    wss: String,
    /// Harvests per size and mode.
    #[arg(long, default_value_t = 20)]
    iterations: u32,
    /// Milliseconds between harvests.
    #[arg(long, default_value_t = 100)]
    interval_ms: u64,
    /// Results folder.
    #[arg(long, default_value = "bench-data/results/dirty-track")]
    out: PathBuf,
    /// README whose `dirty-track` table is regenerated (`-`: none).
    #[arg(long, default_value = "bench-data/README.md")]
    readme: String,
}

pub fn bench(c: BenchCommand) -> anyhow::Result<ExitCode> {
    match c {
        BenchCommand::DirtyTrack(a) => dirty_track(&a),
    }
}

/// One timed harvest.
#[derive(Serialize)]
struct Row {
    mem_gib: f64,
    mode: &'static str,
    iteration: u32,
    paused: bool,
    dirty_pages: u64,
    harvest_us: f64,
    reaper_us: f64,
    reaper_rounds: u64,
}

/// Medians for one size and mode.
#[derive(Serialize)]
struct Summary {
    mem_gib: f64,
    mode: &'static str,
    iterations: usize,
    dirty_pages: u64,
    harvest_us_median: f64,
    harvest_us_max: f64,
    paused_harvest_us: f64,
    reaper_us_per_interval: f64,
    total_us_per_interval: f64,
}

fn dirty_track(a: &DirtyTrackArgs) -> anyhow::Result<ExitCode> {
    let wss = harness::parse_size(&a.wss).context("--wss")?;
    let mut rows = Vec::new();
    for size in &a.sizes {
        let mem = harness::parse_size(size).context("--sizes")?;
        if wss + (1 << 20) > mem {
            bail!("--wss {} does not fit a {size} guest", a.wss);
        }
        for track in [DirtyTrack::Bitmap, DirtyTrack::Ring] {
            eprintln!("vmigrate bench: {size} {track:?} ...");
            rows.extend(measure(mem, wss, track, a)?);
        }
    }
    std::fs::create_dir_all(&a.out).with_context(|| format!("{}", a.out.display()))?;
    let mut csv = String::from(
        "mem_gib,mode,iteration,paused,dirty_pages,harvest_us,reaper_us,reaper_rounds\n",
    );
    for r in &rows {
        writeln!(
            csv,
            "{},{},{},{},{},{:.1},{:.1},{}",
            r.mem_gib,
            r.mode,
            r.iteration,
            r.paused,
            r.dirty_pages,
            r.harvest_us,
            r.reaper_us,
            r.reaper_rounds
        )?;
    }
    std::fs::write(a.out.join("runs.csv"), csv)?;
    let summary = summarize(&rows);
    let mut csv = String::from("mem_gib,mode,iterations,dirty_pages,harvest_us_median,harvest_us_max,paused_harvest_us,reaper_us_per_interval,total_us_per_interval\n");
    for s in &summary {
        writeln!(
            csv,
            "{},{},{},{},{:.1},{:.1},{:.1},{:.1},{:.1}",
            s.mem_gib,
            s.mode,
            s.iterations,
            s.dirty_pages,
            s.harvest_us_median,
            s.harvest_us_max,
            s.paused_harvest_us,
            s.reaper_us_per_interval,
            s.total_us_per_interval
        )?;
    }
    std::fs::write(a.out.join("summary.csv"), csv)?;
    std::fs::write(
        a.out.join("summary.json"),
        serde_json::to_string_pretty(&summary)?,
    )?;
    let table = table(&summary, a);
    print!("{table}");
    if a.readme != "-" {
        splice_readme(&a.readme, &table)?;
    }
    Ok(ExitCode::SUCCESS)
}

fn measure(mem: u64, wss: u64, track: DirtyTrack, a: &DirtyTrackArgs) -> anyhow::Result<Vec<Row>> {
    let (tx, _rx) = std::sync::mpsc::channel();
    let vm = Vm::new(
        VmConfig {
            mem_size: mem,
            vcpus: 1,
            serial: Box::new(std::io::sink()),
            dirty_track: DirtyTrackConfig {
                track,
                ring_bytes: None,
            },
            ram: None,
        },
        tx,
    )?;
    let spec: harness::GuestSpec = format!("sweep:end={}", (1 << 20) + wss).parse()?;
    let image = spec.build(&harness::BuildParams {
        mem_size: mem,
        tsc_hz: None,
        vcpus: 1,
    })?;
    vm.load_boot_image(&image.boot)?;
    vm.resume()?;
    let pages = usize::try_from(mem / migrate_core::PAGE_SIZE)?;
    let mut bm = DirtyBitmap::new(pages);
    // Warm up: the sweep covers its working set at least once.
    std::thread::sleep(Duration::from_millis(500));
    vm.harvest_dirty_log(&mut bm)?;
    let mode = if vm.dirty_track() == "ring" {
        "ring"
    } else {
        "bitmap"
    };
    let mem_gib = mem as f64 / f64::from(1u32 << 30);
    let mut rows = Vec::new();
    let reap = || vm.dirty_ring_reap_stats().unwrap_or((0, 0));
    for iteration in 0..=a.iterations {
        let paused = iteration == a.iterations;
        let (r0, ns0) = reap();
        std::thread::sleep(Duration::from_millis(a.interval_ms));
        if paused {
            vm.pause()?;
        }
        bm.clear();
        let t = Instant::now();
        vm.harvest_dirty_log(&mut bm)?;
        let harvest = t.elapsed();
        let (r1, ns1) = reap();
        rows.push(Row {
            mem_gib,
            mode,
            iteration,
            paused,
            dirty_pages: bm.count(),
            harvest_us: harvest.as_secs_f64() * 1e6,
            reaper_us: (ns1 - ns0) as f64 / 1e3,
            reaper_rounds: r1 - r0,
        });
    }
    let mut vm = vm;
    vm.shutdown();
    Ok(rows)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(0.0)
}

fn summarize(rows: &[Row]) -> Vec<Summary> {
    let mut out = Vec::new();
    let mut keys: Vec<(f64, &'static str)> = Vec::new();
    for r in rows {
        if !keys.contains(&(r.mem_gib, r.mode)) {
            keys.push((r.mem_gib, r.mode));
        }
    }
    for (mem_gib, mode) in keys {
        let live: Vec<&Row> = rows
            .iter()
            .filter(|r| r.mem_gib == mem_gib && r.mode == mode && !r.paused)
            .collect();
        let paused = rows
            .iter()
            .find(|r| r.mem_gib == mem_gib && r.mode == mode && r.paused);
        let h = median(live.iter().map(|r| r.harvest_us).collect());
        let reaper = median(live.iter().map(|r| r.reaper_us).collect());
        out.push(Summary {
            mem_gib,
            mode,
            iterations: live.len(),
            dirty_pages: {
                let mut d: Vec<u64> = live.iter().map(|r| r.dirty_pages).collect();
                d.sort_unstable();
                d.get(d.len() / 2).copied().unwrap_or(0)
            },
            harvest_us_median: h,
            harvest_us_max: live.iter().map(|r| r.harvest_us).fold(0.0, f64::max),
            paused_harvest_us: paused.map_or(0.0, |r| r.harvest_us),
            reaper_us_per_interval: reaper,
            total_us_per_interval: h + reaper,
        });
    }
    out
}

const BEGIN: &str =
    "<!-- dirty-track:begin (generated by vmigrate bench dirty-track; do not edit) -->";
const END: &str = "<!-- dirty-track:end -->";

fn table(summary: &[Summary], a: &DirtyTrackArgs) -> String {
    let mut t = format!(
        "Guest `sweep` over {} ({} harvests {} ms apart, then one with the vCPUs paused); times in µs, medians.\n\n",
        a.wss, a.iterations, a.interval_ms
    );
    t.push_str("| guest | mode | dirty pages per harvest | harvest (engine) | max | paused harvest | reaper per interval | total per interval |\n");
    t.push_str("|---:|---|---:|---:|---:|---:|---:|---:|\n");
    for s in summary {
        let reaper = if s.mode == "ring" {
            format!("{:.0}", s.reaper_us_per_interval)
        } else {
            "–".into()
        };
        let _ = writeln!(
            t,
            "| {} GiB | {} | {} | {:.0} | {:.0} | {:.0} | {} | {:.0} |",
            s.mem_gib,
            s.mode,
            s.dirty_pages,
            s.harvest_us_median,
            s.harvest_us_max,
            s.paused_harvest_us,
            reaper,
            s.total_us_per_interval
        );
    }
    t
}

fn splice_readme(path: &str, table: &str) -> anyhow::Result<()> {
    let text = std::fs::read_to_string(path).with_context(|| path.to_string())?;
    let (Some(b), Some(e)) = (text.find(BEGIN), text.find(END)) else {
        bail!("{path} has no {BEGIN} … {END} markers");
    };
    let new = format!("{}{BEGIN}\n{table}{}", &text[..b], &text[e..]);
    std::fs::write(path, new).with_context(|| path.to_string())?;
    Ok(())
}
