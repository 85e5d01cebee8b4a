//! `vmigrate run`: a VM process, source or destination.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::mpsc;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::Args;
use migrate_core::api::{ApiServer, ProcessEvent, StandbyEnd, VmController};
use migrate_core::engine::{
    error_chain, receive_migration_with_channels, ReceiveOptions, SessionEnd,
};
use migrate_core::transport::{
    ChannelSecurity, Listener, MigrationUri, Psk, Stream, TlsCredentials, TlsFiles,
};
use migrate_core::vm::dirty_log::{DirtyTrack, DirtyTrackConfig};
use migrate_core::vm::ports::SerialSink;
use migrate_core::vm::{PreparedRam, Vm, VmConfig, VmEvent};

#[derive(Args)]
#[command(group(clap::ArgGroup::new("channel").args(["psk_file", "tls_cert", "insecure"])))]
pub struct RunArgs {
    /// Raw boot image loaded at 0x7C00 (up to 64 KiB).
    #[arg(long, conflicts_with_all = ["workload", "incoming"])]
    boot: Option<PathBuf>,
    /// Built-in workload, e.g. `verify`, `sweep`, `hotset:wss=256M`; any of
    /// them with `fill=random[,fill-seed=N]` (e.g. `idle:fill=random`): RAM
    /// above 1 MiB filled with pseudo-random bytes before boot.
    #[arg(long, conflicts_with = "incoming")]
    workload: Option<String>,
    /// Wait for a migration on `tcp:HOST:PORT` or `unix:PATH` (needs
    /// --psk-file, or --insecure for a plaintext channel).
    #[arg(long, requires = "channel")]
    incoming: Option<String>,
    /// With --incoming: accept only a source that proves it holds this
    /// pre-shared key, and check the tag of every (AES-256-GCM) record it sends.
    #[arg(long, requires = "incoming")]
    psk_file: Option<PathBuf>,
    /// With --incoming: TLS 1.3 with this certificate (PEM); the source
    /// must present a certificate signed by --tls-ca.
    #[arg(long, requires_all = ["incoming", "tls_key", "tls_ca"])]
    tls_cert: Option<PathBuf>,
    /// With --tls-cert: its private key (PEM).
    #[arg(long, requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// With --tls-cert: the CA the source's certificate must be signed by.
    #[arg(long, requires = "tls_cert")]
    tls_ca: Option<PathBuf>,
    /// With --incoming: accept a plaintext migration (whoever reaches the
    /// port can write this guest's memory).
    #[arg(long, requires = "incoming")]
    insecure: bool,
    /// Guest RAM (e.g. 256M, 1G). Required unless --incoming, where it is
    /// checked against the incoming guest.
    #[arg(long)]
    mem: Option<String>,
    /// vCPUs (with --incoming: checked against the incoming guest).
    #[arg(long)]
    vcpus: Option<u32>,
    /// Where guest serial output goes: a file, or `-` for stdout.
    #[arg(long)]
    serial: String,
    /// Control socket (JSON lines; docs/API.md) for `send`, `info`,
    /// `pause`, `memsave`, `cancel`, ….
    #[arg(long)]
    api_socket: Option<PathBuf>,
    /// With --incoming: seconds to wait on a silent source.
    #[arg(long, default_value_t = 60)]
    incoming_timeout: u64,
    /// With --incoming: be a live clone's standby (`vmigrate clone`): hold
    /// the copy paused and never run it; a migration is refused.
    #[arg(long, requires = "incoming")]
    standby: bool,
    /// With --standby: once the primary commits its output (clone
    /// --epochs), milliseconds of silence (no epoch, no heartbeat) after
    /// which the primary counts as gone and the guest resumes here from the
    /// last checkpoint; a closed or broken connection counts at once.
    #[arg(long, requires = "standby", default_value_t = DEFAULT_FAILOVER_MS,
          value_parser = clap::value_parser!(u64).range(200..=3_600_000))]
    failover_timeout: u64,
    /// With --incoming: refuse a guest larger than this (default 1T, the
    /// most this VMM builds); checked on the Hello, before any memory is
    /// mapped.
    #[arg(long, requires = "incoming")]
    max_mem: Option<String>,
    /// Dirty-page tracking: `bitmap` (KVM_GET_DIRTY_LOG per slot), `ring`
    /// (per-vCPU KVM dirty ring; refused where the kernel lacks it) or
    /// `auto` (ring where offered, else bitmap). Also for --incoming: how
    /// the arrived guest is tracked when it migrates on.
    #[arg(long, default_value = "bitmap")]
    dirty_track: DirtyTrack,
    /// Allocate every page of guest RAM up front (QEMU's -mem-prealloc,
    /// Cloud Hypervisor's prefault=on): before the guest boots, or with
    /// --incoming before listening (then --mem is needed). A migration then
    /// receives pages straight from the socket into memory that is already
    /// there (each checked against its CRC in place before the guest can
    /// run), which is faster and steadier on these hosts; the price is all
    /// of RAM resident from the start.
    #[arg(long)]
    prefault: bool,
    /// Dirty ring size per vCPU in bytes (16 per page; a power of two from
    /// 4K to the kernel's maximum; default 1M or the maximum if smaller).
    #[arg(long)]
    dirty_ring_size: Option<String>,
}

/// `--failover-timeout` default: ten of the primary's heartbeats (every
/// 100 ms between epochs), so a primary starved of CPU for a moment on a
/// busy host is not taken for dead, while a real silence costs about a
/// second of guest time.
const DEFAULT_FAILOVER_MS: u64 = 1000;

fn serial_sink(path: &str) -> anyhow::Result<SerialSink> {
    if path == "-" {
        return Ok(Box::new(std::io::stdout()));
    }
    let f =
        std::fs::File::create(path).with_context(|| format!("cannot create serial file {path}"))?;
    Ok(Box::new(f))
}

/// The TSC rate a paced workload is built for (the host's: KVM guests see
/// the host TSC rate unless it is scaled, which our hosts cannot do).
pub fn tsc_hz_for(spec: &harness::WorkloadSpec) -> Option<u64> {
    spec.needs_tsc_hz().then(harness::measure_tsc_hz)
}

pub fn run(a: RunArgs) -> anyhow::Result<ExitCode> {
    let serial = serial_sink(&a.serial)?;
    let mem = a.mem.as_deref().map(harness::parse_size).transpose()?;
    let mut ram = match (a.prefault, mem) {
        (false, _) => None,
        (true, None) => bail!(
            "--prefault needs --mem (with --incoming, the size must be known before the source connects)"
        ),
        (true, Some(size)) => {
            let ram = PreparedRam::prefaulted(size).context("--prefault")?;
            eprintln!(
                "vmigrate: {} MiB of guest RAM allocated ahead in {} ms",
                size >> 20,
                ram.took().as_millis()
            );
            Some(ram)
        }
    };
    let dirty_track = DirtyTrackConfig {
        track: a.dirty_track,
        ring_bytes: a
            .dirty_ring_size
            .as_deref()
            .map(harness::parse_size)
            .transpose()
            .context("--dirty-ring-size")?,
    };
    let (vm_tx, vm_rx) = mpsc::channel::<VmEvent>();
    let api = a.api_socket.as_deref().map(ApiServer::bind).transpose()?;
    // Remove the socket file however this function returns.
    let _api_path = api.as_ref().map(|s| RemoveOnDrop(s.path().to_path_buf()));

    let mut arrived_paused = false;
    let mut standby_session = None;
    let vm = if let Some(uri) = &a.incoming {
        let uri: MigrationUri = uri.parse()?;
        let security = match (&a.psk_file, &a.tls_cert, &a.tls_key, &a.tls_ca) {
            (Some(path), ..) => ChannelSecurity::Psk(Arc::new(Psk::from_file(path)?)),
            (None, Some(cert), Some(key), Some(ca)) => {
                ChannelSecurity::Tls(Arc::new(TlsCredentials::load(&TlsFiles {
                    cert: cert.clone(),
                    key: key.clone(),
                    ca: ca.clone(),
                })?))
            }
            _ => ChannelSecurity::Insecure,
        };
        let listener = Listener::bind(&uri)?;
        // Scripts (and `vmigrate demo`) read the bound address from here.
        println!("vmigrate: listening on {}", listener.uri());
        std::io::stdout().flush()?;
        let stream = listener.accept()?;
        stream.set_timeouts(Some(Duration::from_secs(a.incoming_timeout)))?;
        let stream = stream.secure_accept(&security).context(
            "refused the incoming connection before reading any guest data; the guest was not started here",
        )?;
        match security {
            ChannelSecurity::Psk(_) => eprintln!(
                "vmigrate: source authenticated (pre-shared key); every record is encrypted and authenticated"
            ),
            ChannelSecurity::Tls(_) => {
                eprintln!("vmigrate: source authenticated (TLS 1.3, client certificate)")
            }
            ChannelSecurity::Insecure => {}
        }
        let max_mem = match a.max_mem.as_deref() {
            Some(s) => harness::parse_size(s).context("--max-mem")?,
            None => ReceiveOptions::default().max_mem,
        };
        let opts = ReceiveOptions {
            io_timeout: Duration::from_secs(a.incoming_timeout),
            expect_mem: mem,
            expect_vcpus: a.vcpus,
            max_mem,
            standby: a.standby,
        };
        let mut serial = Some(serial);
        // Further channels of this migration (`send --channels N`) come in
        // on the same listener, secured the same way, once the source has
        // announced them; they must arrive within the incoming timeout.
        let channel_timeout = Duration::from_secs(a.incoming_timeout);
        let mut accept_channel = || -> Result<Stream, String> {
            let s = listener
                .accept_timeout(channel_timeout)
                .map_err(|e| e.to_string())?;
            s.set_timeouts(Some(channel_timeout))
                .map_err(|e| e.to_string())?;
            s.secure_accept(&security).map_err(|e| e.to_string())
        };
        let outcome = receive_migration_with_channels(
            stream,
            &opts,
            Some(&mut accept_channel),
            |hello| {
                let mem_size = hello.regions.iter().map(|r| r.size).sum();
                let vm = Vm::new(
                    VmConfig {
                        mem_size,
                        vcpus: hello.vcpu_count,
                        serial: serial.take().expect("one VM per migration"),
                        dirty_track,
                        ram: ram.take(),
                    },
                    vm_tx.clone(),
                )?;
                Ok(vm)
            },
        )
        .context(if a.standby {
            "incoming live clone failed; no standby copy is held and the guest was not started here"
        } else {
            "incoming migration failed; the guest was not started here"
        })?;
        drop(listener);
        if let Some(session) = outcome.standby {
            eprintln!(
                "vmigrate: standby: holding a paused copy of the primary ({} iterations, {} pages, \
                 digest {:016x}); it does not run here",
                outcome.iterations,
                outcome.pages,
                outcome.digest.unwrap_or(0)
            );
            standby_session = Some(session);
        } else {
            if outcome.torn_pages > 0 {
                eprintln!(
                    "vmigrate: {} pages changed while they were sent (failed their CRC); each was sent again",
                    outcome.torn_pages
                );
            }
            if outcome.pages_in_place > 0 {
                eprintln!(
                    "vmigrate: {} pages received straight into guest memory and checked there",
                    outcome.pages_in_place
                );
            }
            eprintln!(
            "vmigrate: migration received ({} iterations, {} pages; resident memory {} MiB before resume); {}",
            outcome.iterations,
            outcome.pages,
            outcome.rss_before_resume.unwrap_or(0) >> 20,
            if outcome.paused {
                "guest paused, as it was on the source (`vmigrate resume` starts it)"
            } else {
                "guest running"
            }
        );
        }
        arrived_paused = outcome.paused;
        outcome.vm
    } else {
        let Some(mem_size) = mem else {
            bail!("--mem is required (e.g. --mem 256M)");
        };
        // Read and build the guest before creating the VM, so that bad input
        // is reported as such, not as a KVM failure.
        let (boot, fills) = if let Some(path) = &a.boot {
            let image =
                std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
            (image, Vec::new())
        } else if let Some(spec) = &a.workload {
            let spec: harness::GuestSpec = spec.parse()?;
            let image = spec.build(&harness::BuildParams {
                mem_size,
                tsc_hz: tsc_hz_for(&spec.workload),
                vcpus: a.vcpus.unwrap_or(1),
            })?;
            (image.boot, image.fills)
        } else {
            bail!("one of --boot, --workload or --incoming is required");
        };
        let vm = Vm::new(
            VmConfig {
                mem_size,
                vcpus: a.vcpus.unwrap_or(1),
                serial,
                dirty_track,
                ram: ram.take(),
            },
            vm_tx.clone(),
        )?;
        write_fills(&vm, &fills)?;
        vm.load_boot_image(&boot)?;
        vm.resume()?;
        vm
    };

    let vm = Arc::new(vm);
    let (tx, rx) = mpsc::channel::<ProcessEvent>();
    let forward = tx.clone();
    std::thread::spawn(move || {
        for ev in vm_rx {
            if forward.send(ProcessEvent::Guest(ev)).is_err() {
                return;
            }
        }
    });
    if let Some(session) = standby_session.take() {
        let controller = Arc::new(VmController::new_standby(vm.clone(), tx));
        // Checkpoints are applied until the primary ends the session or goes
        // away: a planned stop leaves the copy held, paused; a primary gone
        // while it commits its output makes the guest resume here.
        let follower = controller.clone();
        let failover = Duration::from_millis(a.failover_timeout);
        std::thread::spawn(move || match follower.follow_primary(session, failover) {
            StandbyEnd::TookOver {
                epoch,
                replayed,
                why,
            } => eprintln!(
                "vmigrate: standby: FAILOVER: {why}; the guest resumes here from checkpoint \
                 epoch {epoch} ({replayed} bytes of output the primary held written first)"
            ),
            StandbyEnd::Held(SessionEnd::Closed) => eprintln!(
                "vmigrate: standby: the primary closed the clone session; still holding the \
                 last checkpoint, paused"
            ),
            StandbyEnd::Held(SessionEnd::Ended { reason }) => eprintln!(
                "vmigrate: standby: the primary ended the clone session ({reason}); still \
                 holding the last checkpoint, paused"
            ),
            StandbyEnd::Held(SessionEnd::Failed(e)) => eprintln!(
                "vmigrate: standby: the clone session failed ({}); still holding the last \
                 whole checkpoint, paused",
                error_chain(&e)
            ),
        });
        if let Some(server) = api {
            server.spawn(controller.clone())?;
        }
        return Ok(main_loop(&rx, &controller));
    }
    let controller = Arc::new(if arrived_paused {
        VmController::new_paused(vm.clone(), tx)
    } else {
        VmController::new(vm.clone(), tx)
    });
    if let Some(server) = api {
        server.spawn(controller.clone())?;
    }
    Ok(main_loop(&rx, &controller))
}

/// Deletes a file when dropped (the API socket of this process).
struct RemoveOnDrop(PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Wait for the event that ends this process and turn it into its status.
fn main_loop(rx: &mpsc::Receiver<ProcessEvent>, controller: &VmController) -> ExitCode {
    let Ok(ev) = rx.recv() else {
        return ExitCode::from(1);
    };
    // A planned stop tells the standby first (it must not take over), then
    // lets held output out; a no-op without a standby.
    let planned = |why: &str| controller.end_protection(why);
    match ev {
        ProcessEvent::Guest(VmEvent::Exited { status }) => {
            planned(&format!("the primary's guest exited with status {status}"));
            controller.set_stopped(&format!("guest exited with status {status}"));
            eprintln!("vmigrate: guest exited with status {status}");
            ExitCode::from(u8::try_from(status).unwrap_or(u8::MAX))
        }
        ProcessEvent::Guest(VmEvent::Halted { vcpu }) => {
            planned("the primary's guest halted");
            controller.set_stopped(&format!("vCPU {vcpu} halted with interrupts off"));
            eprintln!("vmigrate: vCPU {vcpu} halted with interrupts off; VM stopped");
            ExitCode::SUCCESS
        }
        ProcessEvent::Guest(VmEvent::Failed { vcpu, reason }) => {
            planned("the primary's vCPU failed");
            controller.set_stopped(&format!("vCPU {vcpu} failed: {reason}"));
            eprintln!("vmigrate: error: vCPU {vcpu}: {reason}");
            ExitCode::from(1)
        }
        ProcessEvent::MigratedAway => {
            eprintln!("vmigrate: guest migrated away; exiting");
            ExitCode::SUCCESS
        }
        ProcessEvent::Shutdown => {
            eprintln!("vmigrate: shutdown requested");
            let _ = controller.vm().pause();
            planned("the primary shuts down (a planned stop: do not take over)");
            ExitCode::SUCCESS
        }
    }
}

/// Write workload fills into guest memory before boot.
fn write_fills(vm: &Vm, fills: &[harness::MemoryFill]) -> anyhow::Result<()> {
    let mut buf = vec![0u8; 1 << 20];
    for f in fills {
        let mut off = 0u64;
        while off < f.len {
            let n = usize::try_from((f.len - off).min(buf.len() as u64))?;
            f.generate(off, &mut buf[..n]);
            vm.write_memory(f.gpa + off, &buf[..n])
                .with_context(|| format!("fill at {:#x}", f.gpa + off))?;
            off += n as u64;
        }
    }
    Ok(())
}
