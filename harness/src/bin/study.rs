//! `vmigrate-study`: runs a performance study described by a TOML file
//! (see `bench-data/README.md`) and writes its results, summary, charts and
//! README table.
//!
//! Exit status: 0 when every run was carried out (completed or failed: both
//! are results); 3 when some runs could not be carried out (`error` rows:
//! unknown policy, a spec that does not parse, a VM that did not start);
//! 130 when stopped by Ctrl-C/SIGTERM (results so far are kept); 1 when the
//! study itself cannot run (bad files, unwritable results); 2 for a bad
//! command line.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use clap::Parser;
use harness::study::procs::Stop;
use harness::study::{run_study, Options};

/// Run a vmigrate performance study.
#[derive(Parser)]
#[command(name = "vmigrate-study", version, about)]
struct Cli {
    /// The study file (e.g. bench-data/study.toml).
    #[arg(default_value = "bench-data/study.toml")]
    config: PathBuf,
    /// Run `study-quick.toml` from the same folder instead (the smoke test:
    /// one repetition, 256 MiB guests, loopback).
    #[arg(long)]
    quick: bool,
    /// Results folder (default: results/NAME in the study file's folder).
    #[arg(long)]
    out: Option<PathBuf>,
    /// The vmigrate binary (default: next to this program).
    #[arg(long)]
    vmigrate: Option<PathBuf>,
    /// The tcp-baseline binary (default: next to this program).
    #[arg(long)]
    tcp_baseline: Option<PathBuf>,
    /// Only these workloads (comma-separated profile names).
    #[arg(long, value_delimiter = ',')]
    only: Vec<String>,
    /// Only these links (comma-separated).
    #[arg(long = "link", value_delimiter = ',')]
    links: Vec<String>,
    /// Only these policy labels (comma-separated; QEMU rows by their study label).
    #[arg(long = "policy", value_delimiter = ',')]
    policies: Vec<String>,
    /// Repetitions (overrides the study's).
    #[arg(long)]
    reps: Option<u32>,
    /// First repetition to run (with --reps: add repetitions to a folder).
    #[arg(long, default_value_t = 1)]
    first_rep: u32,
    /// Start the results folder afresh instead of merging into it.
    #[arg(long)]
    fresh: bool,
    /// Skip QEMU rows even if the study asks for them.
    #[arg(long)]
    no_qemu: bool,
    /// Check the study and profile files and print the plan; run nothing
    /// (exit 3 if a profile's workload spec does not parse).
    #[arg(long)]
    dry_run: bool,
    /// Do not touch the README table (default: regenerate the block in
    /// README.md in the study file's folder).
    #[arg(long)]
    no_readme: bool,
}

fn beside_self(name: &str) -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe().context("cannot find this program's path")?;
    Ok(exe.parent().unwrap_or(Path::new(".")).join(name))
}

fn main() -> ExitCode {
    match real_main() {
        Ok(code) => code,
        Err(e) => {
            eprintln!("vmigrate-study: error: {e:#}");
            ExitCode::from(1)
        }
    }
}

fn real_main() -> anyhow::Result<ExitCode> {
    let cli = Cli::parse();
    let config = if cli.quick {
        cli.config
            .parent()
            .unwrap_or(Path::new("."))
            .join("study-quick.toml")
    } else {
        cli.config.clone()
    };
    let vmigrate = match cli.vmigrate {
        Some(p) => p,
        None => beside_self("vmigrate")?,
    };
    let tcp_baseline = match cli.tcp_baseline {
        Some(p) => p,
        None => beside_self("tcp-baseline")?,
    };
    for (what, p) in [("vmigrate", &vmigrate), ("tcp-baseline", &tcp_baseline)] {
        anyhow::ensure!(
            p.is_file(),
            "{what} binary not found at {} (build it: cargo build --release -p migrate-cli -p harness, \
             or pass --{what} PATH)",
            p.display()
        );
    }
    // Absolute: the children run with other working directories' names.
    let vmigrate = std::fs::canonicalize(&vmigrate)?;
    let tcp_baseline = std::fs::canonicalize(&tcp_baseline)?;
    let readme =
        (!cli.no_readme).then(|| config.parent().unwrap_or(Path::new(".")).join("README.md"));
    let opts = Options {
        config,
        out: cli.out,
        vmigrate,
        tcp_baseline,
        only: cli.only,
        links: cli.links,
        policies: cli.policies,
        reps: cli.reps,
        first_rep: cli.first_rep,
        fresh: cli.fresh,
        readme,
        qemu: !cli.no_qemu,
        dry_run: cli.dry_run,
    };
    let stop = Stop::on_signals().context("cannot install signal handlers")?;
    let report = run_study(&opts, &stop, &mut |line| println!("{line}"))?;
    if opts.dry_run {
        return Ok(if report.errors > 0 {
            ExitCode::from(3)
        } else {
            ExitCode::SUCCESS
        });
    }
    println!("\n{}", report.table);
    println!("results: {}", report.dir.display());
    for p in &report.plots {
        println!("  {}", p.display());
    }
    if report.stopped {
        eprintln!(
            "vmigrate-study: stopped by a signal after {} runs; results so far are saved",
            report.runs
        );
        return Ok(ExitCode::from(130));
    }
    if report.errors > 0 {
        eprintln!(
            "vmigrate-study: {} of {} runs could not be carried out (outcome `error` in runs.csv)",
            report.errors, report.runs
        );
        return Ok(ExitCode::from(3));
    }
    Ok(ExitCode::SUCCESS)
}
