//! `transfer-bench`: the page path against the wire, measured side by side
//! (see [`harness::transfer`]): a plain TCP stream, vmigrate migrating an
//! incompressible idle guest (1 channel and more), and QEMU migrating the
//! same amount of incompressible memory, interleaved over repetitions.
//!
//! Writes `OUT/runs.json` (every measurement) and `OUT/summary.md`, and
//! regenerates the `transfer` block of `bench-data/README.md`.

use std::path::PathBuf;

use anyhow::Context;
use clap::Parser;
use harness::study::procs::Stop;
use harness::transfer::{markdown_table, run, Binaries, TransferConfig};

#[derive(Parser)]
#[command(about = "Page-transfer rate of vmigrate and QEMU beside a plain TCP stream")]
struct Args {
    /// Guest RAM; everything above 1 MiB is pseudo-random.
    #[arg(long, default_value = "2G")]
    mem: String,
    /// Repetitions (interleaved).
    #[arg(long, default_value_t = 3)]
    reps: u32,
    /// vmigrate channel counts, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "1")]
    channels: Vec<u32>,
    /// vmigrate variants at each channel count, comma-separated: `direct`
    /// (the defaults), `copy-pages` (send --copy-pages), `prefault` (the
    /// destination allocates its RAM before it listens).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "direct,copy-pages,prefault"
    )]
    variants: Vec<String>,
    /// Leave out the memory-to-memory TCP stream.
    #[arg(long)]
    no_tcp_memory: bool,
    /// QEMU multifd channel counts, comma-separated (1: no multifd).
    #[arg(long, value_delimiter = ',', default_value = "1,2")]
    qemu_channels: Vec<u32>,
    /// Leave QEMU out (no QEMU rows).
    #[arg(long)]
    no_qemu: bool,
    /// Seconds of the plain TCP stream.
    #[arg(long, default_value_t = 3.0)]
    tcp_seconds: f64,
    /// Seconds before a migration counts as failed.
    #[arg(long, default_value_t = 60.0)]
    time_cap: f64,
    /// Directory of the programs (vmigrate, tcp-baseline); default: beside this one.
    #[arg(long)]
    bin_dir: Option<PathBuf>,
    /// QEMU binary.
    #[arg(long, default_value = "qemu-system-x86_64")]
    qemu: String,
    /// Results directory.
    #[arg(long, default_value = "bench-data/results/transfer")]
    out: PathBuf,
    /// README whose `transfer` block is regenerated ("-" for none).
    #[arg(long, default_value = "bench-data/README.md")]
    readme: PathBuf,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    anyhow::ensure!(args.reps > 0, "--reps must be at least 1");
    anyhow::ensure!(
        args.channels
            .iter()
            .chain(&args.qemu_channels)
            .all(|&n| n >= 1),
        "channel counts must be at least 1"
    );
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
        qemu: Some(args.qemu.clone()),
    };
    for b in [&bins.vmigrate, &bins.tcp_baseline] {
        anyhow::ensure!(
            b.exists(),
            "{} is missing (cargo build --release)",
            b.display()
        );
    }
    let variants = args
        .variants
        .iter()
        .map(|v| {
            harness::transfer::Variant::parse(v)
                .with_context(|| format!("unknown variant {v:?} (direct, copy-pages, prefault)"))
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let cfg = TransferConfig {
        mem: args.mem,
        reps: args.reps,
        channels: args.channels,
        variants,
        tcp_memory: !args.no_tcp_memory,
        qemu_channels: if args.no_qemu {
            Vec::new()
        } else {
            args.qemu_channels
        },
        tcp_seconds: args.tcp_seconds,
        time_cap_s: args.time_cap,
    };
    let work = tempdir()?;
    let stop = Stop::on_signals()?;
    let runs = run(&cfg, &bins, &work, &stop, |r| {
        eprintln!(
            "rep {} {} ×{}: {} {}{}",
            r.rep,
            r.system,
            r.channels,
            r.status,
            r.rate_mbps
                .map_or_else(String::new, |m| format!("{m:.0} Mbit/s")),
            r.note
                .as_ref()
                .map_or_else(String::new, |n| format!(" ({n})"))
        );
    });
    let _ = std::fs::remove_dir_all(&work);
    let runs = runs?;
    std::fs::create_dir_all(&args.out)?;
    std::fs::write(
        args.out.join("runs.json"),
        serde_json::to_string_pretty(&runs)?,
    )?;
    let table = markdown_table(&cfg, &runs);
    std::fs::write(args.out.join("summary.md"), &table)?;
    if args.readme.as_os_str() != "-" {
        let doc = std::fs::read_to_string(&args.readme).unwrap_or_default();
        let doc =
            harness::study::summary::replace_block_by(&doc, "transfer", &table, "transfer-bench");
        std::fs::write(&args.readme, doc)?;
    }
    print!("{table}");
    Ok(())
}

fn tempdir() -> anyhow::Result<PathBuf> {
    let dir = std::env::temp_dir().join(format!("transfer-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}
