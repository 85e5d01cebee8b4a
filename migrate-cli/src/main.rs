//! `vmigrate`: run KVM guests and live-migrate them between processes.
//!
//! Exit status: 0 success; 1 failure (the message says what failed); 2 bad
//! command line; for `run`, the guest's own exit status when it writes one
//! to port 0x501.

mod bench;
mod client;
mod demo;
mod run;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};

/// Live migration of KVM guests between vmigrate processes.
#[derive(Parser)]
#[command(name = "vmigrate", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run a guest, or wait for one to arrive (--incoming).
    Run(run::RunArgs),
    /// Migrate the guest of a running `vmigrate run` to another one.
    Send(client::SendArgs),
    /// Live-clone the guest of a running `vmigrate run` to a standby
    /// (`run --incoming --standby`): the guest runs on here, the standby
    /// holds a paused, verified copy. Options as `send` (--verify is
    /// always on).
    Clone(client::SendArgs),
    /// Digest of all guest memory and of the vCPU state of a stopped VM
    /// (a standby, a paused guest), computed by the VM process.
    Digest(client::DigestArgs),
    /// List the convergence policies and their settings (`send --param`).
    Policies,
    /// Show the state of a running VM.
    Status(client::StatusArgs),
    /// Show the state of a running VM (same as status; ch-remote's name).
    Info(client::StatusArgs),
    /// Stop the vCPUs of a running VM (QMP `stop`).
    Pause(client::SocketArgs),
    /// Start the vCPUs of a paused VM again (QMP `cont`).
    Resume(client::ResumeArgs),
    /// Write guest-physical memory to a file (QMP `pmemsave`).
    Memsave(client::MemsaveArgs),
    /// Show the running migration's report so far, or the last one.
    QueryMigrate(client::StatusArgs),
    /// Cancel the running migration; the source keeps the guest.
    Cancel(client::SocketArgs),
    /// Change the downtime limit or bandwidth cap of the running migration.
    SetParameters(client::SetParametersArgs),
    /// Stop a running VM; its process exits 0.
    Shutdown(client::SocketArgs),
    /// Print the VM's events (state changes, iterations, migration end,
    /// guest stopped) as JSON lines until its process ends.
    Events(client::EventsArgs),
    /// Built-in guest workloads.
    Workload {
        #[command(subcommand)]
        command: WorkloadCommand,
    },
    /// In-process benchmarks on real KVM guests (bench-data/README.md).
    Bench {
        #[command(subcommand)]
        command: bench::BenchCommand,
    },
    /// Start a destination and a source locally, migrate a self-checking
    /// guest over TCP while it runs, and print the report.
    Demo(demo::DemoArgs),
}

#[derive(Subcommand)]
enum WorkloadCommand {
    /// Write a workload's boot sector to a file (it also boots under QEMU).
    Export(ExportArgs),
}

#[derive(Args)]
struct ExportArgs {
    /// Workload spec, e.g. `sweep`, `hotset:wss=256M,rate=50000`.
    spec: String,
    /// Output file.
    #[arg(long)]
    out: PathBuf,
    /// Guest RAM size the image is built for.
    #[arg(long, default_value = "1G")]
    mem: String,
    /// vCPUs the image starts and splits its work among (boot it with as
    /// many, e.g. QEMU `-smp N`).
    #[arg(long, default_value_t = 1)]
    vcpus: u32,
}

fn main() -> ExitCode {
    // Test-only fault points (inert unless FAILPOINTS names one).
    let _faults = migrate_core::faults::setup_from_env();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("VMIGRATE_LOG")
                .unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Run(a) => run::run(a),
        Command::Send(a) => client::send(a),
        Command::Clone(a) => client::clone(a),
        Command::Digest(a) => client::digest(a),
        Command::Status(a) => client::status(a),
        Command::Info(a) => client::info(a),
        Command::Pause(a) => client::pause(a),
        Command::Resume(a) => client::resume(a),
        Command::Memsave(a) => client::memsave(a),
        Command::QueryMigrate(a) => client::query_migrate(a),
        Command::Cancel(a) => client::cancel(a),
        Command::SetParameters(a) => client::set_parameters(a),
        Command::Events(a) => client::events(a),
        Command::Policies => {
            policies();
            Ok(ExitCode::SUCCESS)
        }
        Command::Shutdown(a) => client::shutdown(a),
        Command::Workload {
            command: WorkloadCommand::Export(a),
        } => export(a),
        Command::Demo(a) => demo::demo(a),
        Command::Bench { command } => bench::bench(command),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("vmigrate: error: {e:#}");
            ExitCode::from(1)
        }
    }
}

fn export(a: ExportArgs) -> anyhow::Result<ExitCode> {
    let spec: harness::WorkloadSpec = a.spec.parse()?;
    let mem_size = harness::parse_size(&a.mem)?;
    let tsc_hz = run::tsc_hz_for(&spec);
    let image = harness::build(
        &spec,
        &harness::BuildParams {
            mem_size,
            tsc_hz,
            vcpus: a.vcpus,
        },
    )?;
    std::fs::write(&a.out, &image.boot)
        .map_err(|e| anyhow::anyhow!("cannot write {}: {e}", a.out.display()))?;
    println!(
        "wrote {} ({} bytes, boot sector for a {} guest)",
        a.out.display(),
        image.boot.len(),
        harness::format_size(mem_size)
    );
    if image.needs_vmm_content {
        println!(
            "note: `{spec}` expects the VMM to fill guest RAM before boot ({} range(s)); \
             QEMU will boot it, but without that content",
            image.fills.len()
        );
    }
    Ok(ExitCode::SUCCESS)
}

fn policies() {
    for &name in policy::POLICY_NAMES {
        println!("{name}");
        for s in policy::describe(name).unwrap_or_default() {
            let kv = format!("{}={}", s.key, s.default);
            println!("  --param {kv:<24} {}", s.meaning);
        }
    }
    println!("every policy also takes --downtime-limit MS (default 300)");
}
