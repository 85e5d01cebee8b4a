//! `scale-bench`: cost against size (see [`harness::scale`]): idle and
//! sweep guests from 256 MiB to 8 GiB migrated over loopback; total time,
//! downtime, bytes and the engine's own resident memory.
//!
//! Writes `OUT/runs.json`, `OUT/points.json`, `OUT/summary.md` and
//! `OUT/cost-vs-size.svg`, and regenerates the `scale` block of
//! `bench-data/README.md`.

use std::path::PathBuf;

use anyhow::Context;
use clap::Parser;
use harness::scale::{markdown_table, points, run, write_plot, ScaleConfig, ScaleWorkload};
use harness::study::procs::Stop;
use harness::transfer::Binaries;

#[derive(Parser)]
#[command(about = "Migration cost against guest size")]
struct Args {
    /// Guest sizes, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "256M,1G,2G,4G,8G")]
    sizes: Vec<String>,
    /// WORKLOAD=POLICY pairs, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "idle=qemu,sweep=mp")]
    workloads: Vec<String>,
    /// Repetitions.
    #[arg(long, default_value_t = 1)]
    reps: u32,
    /// Seconds before a migration counts as failed.
    #[arg(long, default_value_t = 120.0)]
    time_cap: f64,
    /// Directory of `vmigrate`; default: beside this program.
    #[arg(long)]
    bin_dir: Option<PathBuf>,
    /// Results directory.
    #[arg(long, default_value = "bench-data/results/scale")]
    out: PathBuf,
    /// README whose `scale` block is regenerated ("-" for none).
    #[arg(long, default_value = "bench-data/README.md")]
    readme: PathBuf,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    anyhow::ensure!(args.reps > 0, "--reps must be at least 1");
    for s in &args.sizes {
        harness::parse_size(s).with_context(|| format!("--sizes {s}"))?;
    }
    let workloads = args
        .workloads
        .iter()
        .map(|w| {
            let (workload, policy) = w
                .rsplit_once('=')
                .with_context(|| format!("--workloads {w}: want WORKLOAD=POLICY"))?;
            Ok(ScaleWorkload {
                workload: workload.to_owned(),
                policy: policy.to_owned(),
            })
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let bin_dir = match args.bin_dir {
        Some(d) => d,
        None => std::env::current_exe()?
            .parent()
            .context("no directory for this program")?
            .to_owned(),
    };
    let bins = Binaries {
        vmigrate: bin_dir.join("vmigrate"),
        tcp_baseline: bin_dir.join("tcp-baseline"),
        qemu: None,
    };
    anyhow::ensure!(
        bins.vmigrate.exists(),
        "{} is missing (cargo build --release)",
        bins.vmigrate.display()
    );
    let cfg = ScaleConfig {
        sizes: args.sizes,
        workloads,
        reps: args.reps,
        time_cap_s: args.time_cap,
    };
    let work = std::env::temp_dir().join(format!("scale-bench-{}", std::process::id()));
    let stop = Stop::on_signals()?;
    let runs = run(&cfg, &bins, &work, &stop, |r| {
        eprintln!(
            "rep {} {} {}: {} {:.0} ms, downtime {:.2} ms{}",
            r.rep,
            r.workload,
            r.mem,
            r.status,
            r.total_ms.unwrap_or(f64::NAN),
            r.downtime_ms.unwrap_or(f64::NAN),
            r.note
                .as_ref()
                .map_or_else(String::new, |n| format!(" ({n})"))
        );
    });
    let _ = std::fs::remove_dir_all(&work);
    let runs = runs?;
    let pts = points(&runs);
    std::fs::create_dir_all(&args.out)?;
    std::fs::write(
        args.out.join("runs.json"),
        serde_json::to_string_pretty(&runs)?,
    )?;
    std::fs::write(
        args.out.join("points.json"),
        serde_json::to_string_pretty(&pts)?,
    )?;
    let table = markdown_table(&cfg, &pts);
    std::fs::write(args.out.join("summary.md"), &table)?;
    write_plot(&args.out.join("cost-vs-size.svg"), &pts).map_err(anyhow::Error::msg)?;
    if args.readme.as_os_str() != "-" {
        let doc = std::fs::read_to_string(&args.readme).unwrap_or_default();
        let doc = harness::study::summary::replace_block_by(&doc, "scale", &table, "scale-bench");
        std::fs::write(&args.readme, doc)?;
    }
    print!("{table}");
    Ok(())
}
