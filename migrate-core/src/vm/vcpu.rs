//! vCPU threads: one per vCPU, each owning its `VcpuFd`.
//!
//! Every KVM vCPU ioctl runs on the thread that owns the fd; other threads
//! talk to it through a command channel. A vCPU inside `KVM_RUN` does not read
//! its channel, so a sender kicks it with [`KICK_SIGNAL`], which makes
//! `KVM_RUN` return `EINTR`; the kick is repeated until the command is
//! answered, because a signal that lands just before the thread enters
//! `KVM_RUN` is otherwise lost.
//!
//! States of one vCPU thread:
//! ```text
//!  Paused --Resume--> Running --Pause--> Paused
//!  Running --HLT, IF=1--> Parked (waits for an interrupt that never comes)
//!  Running --HLT, IF=0 / exit port / error--> Stopped (VM event sent)
//!  (with the in-kernel irqchip, KVM handles HLT itself: the thread stays
//!  inside KVM_RUN until an interrupt or a kick; an AP likewise until its
//!  start-up IPI)
//!  any --Exit--> thread ends
//! ```
//!
//! Throttling (QEMU's auto-converge and dirty-limit): with its own throttle
//! `p` in force, a vCPU sleeps `p / (1 - p)` × 10 ms after every 10 ms it
//! ran, as QEMU's `cpu_throttle` does; a ticker kicks the throttled vCPUs
//! every 10 ms so that a guest that never exits (a store loop) still leaves
//! KVM_RUN to take its sleep (see [`super::throttle`]). The sleep waits on
//! the command channel, so a throttled vCPU still pauses at once.
//!
//! Dirty ring: a vCPU whose ring is full exits with
//! `KVM_EXIT_DIRTY_RING_FULL`; its thread consumes the ring, resets it and
//! sets the pages aside for the engine's next harvest
//! ([`super::ring_set::RingSet::on_ring_full`]), then re-enters the guest.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use kvm_ioctls::{VcpuExit, VcpuFd};
use vmm_sys_util::signal::{register_signal_handler, Killable, SIGRTMIN};

use kvm_bindings::KVM_EXIT_DIRTY_RING_FULL;
use kvm_ioctls::VmFd;

use super::ports::{PortAction, PortBus};
use super::ring_set::RingSet;
use super::state::{StateError, VcpuState};
use super::throttle::{Throttle, THROTTLE_SLICE};
use super::VmEvent;

/// The signal that kicks a vCPU thread out of `KVM_RUN`.
pub fn kick_signal() -> i32 {
    SIGRTMIN()
}

/// Interval between kicks while a command waits for its answer.
const KICK_INTERVAL: Duration = Duration::from_millis(1);

/// A vCPU thread's join handle, shared with whoever kicks it. The handle is
/// taken out under the lock before joining, so nobody signals a thread
/// whose `pthread_t` is no longer valid.
#[derive(Clone, Default)]
pub struct Kickable(Arc<Mutex<Option<JoinHandle<()>>>>);

impl Kickable {
    /// Send the kick signal if the thread has not been joined.
    pub fn kick(&self) {
        if let Some(t) = &*self.0.lock().unwrap_or_else(|e| e.into_inner()) {
            let _ = t.kill(kick_signal());
        }
    }

    /// Kick one last time and wait for the thread to end.
    fn join(&self) {
        let taken = self.0.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(t) = taken {
            let _ = t.kill(kick_signal());
            let _ = t.join();
        }
    }
}

/// RFLAGS.IF.
const RFLAGS_IF: u64 = 1 << 9;

/// Install the no-op handler for the kick signal (once per process).
pub fn install_kick_handler() -> Result<(), vmm_sys_util::errno::Error> {
    extern "C" fn noop(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}
    static INSTALLED: std::sync::OnceLock<Result<(), i32>> = std::sync::OnceLock::new();
    INSTALLED
        .get_or_init(|| register_signal_handler(kick_signal(), noop).map_err(|e| e.errno()))
        .map_err(vmm_sys_util::errno::Error::new)
}

/// Exit counters of one vCPU, by kind.
#[derive(Debug, Default)]
pub struct ExitCounts {
    /// Port writes.
    pub io_out: AtomicU64,
    /// Port reads.
    pub io_in: AtomicU64,
    /// MMIO accesses (no device answers them).
    pub mmio: AtomicU64,
    /// HLT exits.
    pub hlt: AtomicU64,
    /// Returns from KVM_RUN because of a kick.
    pub interrupted: AtomicU64,
    /// `KVM_EXIT_DIRTY_RING_FULL` exits (the ring was harvested by the vCPU
    /// thread itself).
    pub dirty_ring_full: AtomicU64,
}

/// What a vCPU thread needs to empty its own full dirty ring.
pub struct RingHook {
    /// The VM's rings.
    pub set: Arc<RingSet>,
    /// The VM, for `KVM_RESET_DIRTY_RINGS`.
    pub vm: Arc<VmFd>,
}

/// A request to a vCPU thread.
pub enum VcpuCommand {
    /// Leave KVM_RUN (completing any pending I/O) and wait.
    Pause(Sender<()>),
    /// Run the guest again (unless parked on HLT).
    Resume(Sender<()>),
    /// Read the vCPU state (the vCPU must be paused).
    Save(Sender<Result<VcpuState, StateError>>),
    /// Load a vCPU state (the vCPU must be paused).
    Restore(Box<VcpuState>, Sender<Result<(), StateError>>),
    /// End the thread.
    Exit,
}

/// What the owner of the VM keeps of a vCPU thread.
pub struct VcpuHandle {
    /// vCPU index.
    pub index: u32,
    commands: Sender<VcpuCommand>,
    thread: Kickable,
    /// Exit counters.
    pub counts: Arc<ExitCounts>,
}

/// Everything a vCPU thread owns.
pub struct VcpuThread {
    /// vCPU index.
    pub index: u32,
    /// The KVM vCPU.
    pub fd: VcpuFd,
    /// Port devices.
    pub ports: Arc<PortBus>,
    /// Where guest exits are reported.
    pub events: Sender<VmEvent>,
    /// MSRs to save.
    pub msrs: Arc<Vec<u32>>,
    /// Whether to save XSAVE (else FPU).
    pub use_xsave: bool,
    /// Starts parked: the application processors of a VM without an
    /// irqchip, which have no LAPIC to receive a start-up IPI on. With the
    /// irqchip an AP is not parked: it sits in `KVM_RUN` (KVM keeps it in
    /// `UNINITIALIZED`) until the boot processor's INIT and SIPI start it.
    pub parked: bool,
    /// The VM has the in-kernel irqchip: save and restore the LAPIC.
    pub lapic: bool,
    /// This vCPU's throttle (each vCPU has its own: dirty-limit slows
    /// only the vCPUs that dirty memory).
    pub throttle: Arc<Throttle>,
    /// The dirty rings (`None`: the VM uses the bitmap).
    pub ring: Option<RingHook>,
}

impl VcpuHandle {
    /// Start the thread of `vcpu`; it begins paused.
    pub fn spawn(vcpu: VcpuThread) -> std::io::Result<Self> {
        let (tx, rx) = mpsc::channel();
        let index = vcpu.index;
        let counts = Arc::new(ExitCounts::default());
        let thread_counts = counts.clone();
        let thread = std::thread::Builder::new()
            .name(format!("vcpu{index}"))
            .spawn(move || vcpu.run(rx, &thread_counts))?;
        Ok(Self {
            index,
            commands: tx,
            thread: Kickable(Arc::new(Mutex::new(Some(thread)))),
            counts,
        })
    }

    /// A handle to kick this vCPU from another thread.
    pub fn kickable(&self) -> Kickable {
        self.thread.clone()
    }

    /// Send a command and wait for its answer, kicking the thread out of
    /// KVM_RUN until it answers. `None` if the thread is gone.
    pub fn request<T>(&self, make: impl FnOnce(Sender<T>) -> VcpuCommand) -> Option<T> {
        let (tx, rx) = mpsc::channel();
        self.commands.send(make(tx)).ok()?;
        loop {
            self.thread.kick();
            match rx.recv_timeout(KICK_INTERVAL) {
                Ok(v) => return Some(v),
                Err(RecvTimeoutError::Timeout) => continue,
                Err(RecvTimeoutError::Disconnected) => return None,
            }
        }
    }

    /// End the thread and wait for it.
    pub fn exit(&mut self) {
        let _ = self.commands.send(VcpuCommand::Exit);
        self.thread.join();
    }
}

impl Drop for VcpuHandle {
    fn drop(&mut self) {
        self.exit();
    }
}

impl VcpuThread {
    fn run(mut self, commands: Receiver<VcpuCommand>, counts: &ExitCounts) {
        let mut running = false;
        let mut slice_start = Instant::now();
        loop {
            let command = if running && !self.parked {
                // A throttled vCPU that ran a full slice sleeps, listening.
                let sleep = self
                    .throttle
                    .sleep_per_slice()
                    .filter(|_| slice_start.elapsed() >= THROTTLE_SLICE);
                match sleep {
                    Some(d) => {
                        let c = match commands.recv_timeout(d) {
                            Ok(c) => Some(c),
                            Err(RecvTimeoutError::Timeout) => None,
                            Err(RecvTimeoutError::Disconnected) => return,
                        };
                        slice_start = Instant::now();
                        c
                    }
                    None => match commands.try_recv() {
                        Ok(c) => Some(c),
                        Err(mpsc::TryRecvError::Empty) => None,
                        Err(mpsc::TryRecvError::Disconnected) => return,
                    },
                }
            } else {
                match commands.recv() {
                    Ok(c) => Some(c),
                    Err(_) => return,
                }
            };
            if let Some(command) = command {
                match command {
                    VcpuCommand::Pause(reply) => {
                        self.complete_pending_io();
                        running = false;
                        let _ = reply.send(());
                    }
                    VcpuCommand::Resume(reply) => {
                        running = true;
                        slice_start = Instant::now();
                        let _ = reply.send(());
                    }
                    VcpuCommand::Save(reply) => {
                        let state = VcpuState::save(
                            &self.fd,
                            self.index,
                            &self.msrs,
                            self.use_xsave,
                            self.parked,
                            self.lapic,
                        );
                        let _ = reply.send(state);
                    }
                    VcpuCommand::Restore(state, reply) => {
                        let r = state.restore(&self.fd, self.index);
                        if r.is_ok() {
                            self.parked = state.halted;
                        }
                        let _ = reply.send(r);
                    }
                    VcpuCommand::Exit => return,
                }
                continue;
            }
            if let Some(event) = self.run_once(counts) {
                running = false;
                let _ = self.events.send(event);
            }
        }
    }

    /// Enter the guest once and handle the exit; `Some` when the VM must stop.
    fn run_once(&mut self, counts: &ExitCounts) -> Option<VmEvent> {
        let exit = match self.fd.run() {
            Ok(exit) => exit,
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                counts.interrupted.fetch_add(1, Ordering::Relaxed);
                return None;
            }
            Err(e) => {
                return Some(VmEvent::Failed {
                    vcpu: self.index,
                    reason: format!("KVM_RUN failed: {e}"),
                })
            }
        };
        match exit {
            VcpuExit::IoOut(port, data) => {
                counts.io_out.fetch_add(1, Ordering::Relaxed);
                if let PortAction::Exit(status) = self.ports.io_out(port, data) {
                    return Some(VmEvent::Exited { status });
                }
            }
            VcpuExit::IoIn(port, data) => {
                counts.io_in.fetch_add(1, Ordering::Relaxed);
                self.ports.io_in(port, data);
            }
            VcpuExit::MmioRead(_, data) => {
                counts.mmio.fetch_add(1, Ordering::Relaxed);
                data.fill(0xFF);
            }
            VcpuExit::MmioWrite(..) => {
                counts.mmio.fetch_add(1, Ordering::Relaxed);
            }
            VcpuExit::Hlt => {
                counts.hlt.fetch_add(1, Ordering::Relaxed);
                let rflags = self.fd.get_regs().map(|r| r.rflags).unwrap_or(0);
                if rflags & RFLAGS_IF == 0 {
                    return Some(VmEvent::Halted { vcpu: self.index });
                }
                self.parked = true;
            }
            VcpuExit::Unsupported(KVM_EXIT_DIRTY_RING_FULL) => {
                counts.dirty_ring_full.fetch_add(1, Ordering::Relaxed);
                let Some(hook) = &self.ring else {
                    return Some(VmEvent::Failed {
                        vcpu: self.index,
                        reason: "dirty ring full exit without a dirty ring".into(),
                    });
                };
                if let Err(e) = hook.set.on_ring_full(&hook.vm, self.index) {
                    return Some(VmEvent::Failed {
                        vcpu: self.index,
                        reason: format!("full dirty ring: {e}"),
                    });
                }
            }
            VcpuExit::Shutdown => {
                return Some(VmEvent::Failed {
                    vcpu: self.index,
                    reason: "guest shut down (triple fault)".into(),
                })
            }
            other => {
                return Some(VmEvent::Failed {
                    vcpu: self.index,
                    reason: format!("unhandled vCPU exit: {other:?}"),
                })
            }
        }
        None
    }

    /// Re-enter KVM_RUN with `immediate_exit` set so KVM finishes an I/O
    /// instruction whose exit we handled (an `IN` result lands in RAX only on
    /// the next KVM_RUN); saved state is then consistent.
    fn complete_pending_io(&mut self) {
        self.fd.set_kvm_immediate_exit(1);
        let _ = self.fd.run();
        self.fd.set_kvm_immediate_exit(0);
    }
}
