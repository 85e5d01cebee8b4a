//! `skip_unchanged`: dirty pages whose content is the copy the destination
//! holds are left out, and only those. The "guest" writes between
//! iterations (from the progress callback), so each pass's counts are
//! known exactly; memory must still arrive byte-identical, over one
//! connection, with zstd, and over three channels.

use std::os::unix::net::UnixStream;

use super::channels::{connector, destination, Socket};
use super::*;
use crate::transport::Stream;

/// Stops after a fixed number of live iterations.
struct StopAfter(usize);
impl policy::ConvergencePolicy for StopAfter {
    fn name(&self) -> &'static str {
        "stop-after"
    }
    fn decide(&mut self, h: &policy::MigrationHistory) -> policy::Decision {
        if h.len() >= self.0 {
            policy::Decision::StopAndCopy(policy::StopReason::Other("script done".into()))
        } else {
            policy::Decision::Continue
        }
    }
}

fn a(page: usize) -> u64 {
    page as u64 * 7 + 1
}
fn b(page: usize) -> u64 {
    page as u64 * 11 + 5
}

/// The writes made after iteration `done - 1`: they are harvested at the
/// end of iteration `done` and sent in the one after it, which reads the
/// pages after the next step, so only every other step writes.
fn script(vm: &FakeVm, done: usize) {
    match done {
        1 => {
            (0..512).for_each(|p| vm.guest_write(p, a(p))); // rewritten as is
            (512..600).for_each(|p| vm.guest_write(p, b(p))); // changed
            (600..650).for_each(|p| vm.guest_write(p, 0)); // now zero
        }
        3 => {
            (0..512).for_each(|p| vm.guest_write(p, a(p)));
            (512..600).for_each(|p| vm.guest_write(p, b(p)));
            // Back to the content sent in iteration 0: sent again, since
            // the destination holds zeros now.
            (600..650).for_each(|p| vm.guest_write(p, a(p)));
        }
        5 => {
            vm.guest_write(700, 99); // changed and changed back
            vm.guest_write(700, a(700));
            vm.guest_write(800, 12345);
        }
        _ => {}
    }
}

fn source() -> Arc<FakeVm> {
    let src = Arc::new(FakeVm::new(SIZE));
    (0..1024).for_each(|p| src.guest_write(p, a(p)));
    src.running.store(true, Ordering::SeqCst);
    src
}

fn scripted_options(src: &Arc<FakeVm>, compress: CompressMode) -> SendOptions {
    let mut opts = options(compress);
    opts.policy = Box::new(StopAfter(6));
    opts.skip_unchanged = true;
    let vm = src.clone();
    opts.progress = Some(Box::new(move |r: &MigrationReport| {
        script(&vm, r.iterations.len());
    }));
    opts
}

/// (pages sent with data, zero pages, unchanged pages) of each pass.
fn passes(report: &MigrationReport) -> Vec<(u64, u64, u64)> {
    report
        .iterations
        .iter()
        .map(|i| (i.pages_sent, i.zero_pages, i.unchanged_pages))
        .collect()
}

fn check(src: &FakeVm, report: &MigrationReport, dst: &FakeVm) {
    assert_eq!(report.status, MigrationStatus::Completed, "{report:?}");
    assert!(report.digest.as_ref().unwrap().equal);
    assert_same_memory(src, dst);
    assert_eq!(report.page_path, "copy", "digests need the copy path");
    assert_eq!(
        passes(report),
        [
            (1024, 1024, 0), // the full copy; the upper half never written
            (0, 0, 0),
            (88, 50, 512),
            (0, 0, 0),
            (50, 0, 600),
            (0, 0, 0),
            (1, 0, 1), // the final pass
        ]
    );
    assert_eq!(report.ram.unchanged, 1113);
}

/// Migrates `src` over a Unix socket pair; the report and the destination.
fn over_a_socket_pair(src: &FakeVm, opts: SendOptions) -> (MigrationReport, FakeVm) {
    let (x, y) = UnixStream::pair().unwrap();
    let dest = std::thread::spawn(move || {
        receive_migration(Stream::Unix(y), &ReceiveOptions::default(), |_| {
            Ok(FakeVm::new(SIZE))
        })
    });
    let report = send_migration(src, Stream::Unix(x), opts);
    (report, dest.join().unwrap().unwrap().vm)
}

#[test]
fn unchanged_pages_are_left_out_and_memory_arrives_identical() {
    for compress in [CompressMode::None, CompressMode::Zstd(1)] {
        let src = source();
        let (report, dst) = over_a_socket_pair(&src, scripted_options(&src, compress));
        check(&src, &report, &dst);
    }
}

#[test]
fn unchanged_pages_are_left_out_over_three_channels() {
    let (sock, listener) = Socket::new("unchanged");
    let dest = destination(listener);
    let src = source();
    let mut opts = scripted_options(&src, CompressMode::None);
    opts.channels = Some(connector(sock.0.clone(), 3));
    let main = Stream::Unix(UnixStream::connect(&sock.0).unwrap());
    let report = send_migration(&*src, main, opts);
    let dst = dest.join().unwrap().unwrap().vm;
    check(&src, &report, &dst);
}

#[test]
fn without_the_option_every_dirty_page_is_sent() {
    let src = source();
    let mut opts = scripted_options(&src, CompressMode::None);
    opts.skip_unchanged = false;
    let (report, dst) = over_a_socket_pair(&src, opts);
    assert_eq!(report.status, MigrationStatus::Completed, "{report:?}");
    assert_same_memory(&src, &dst);
    assert_eq!(
        passes(&report),
        [
            (1024, 1024, 0),
            (0, 0, 0),
            (600, 50, 0),
            (0, 0, 0),
            (650, 0, 0),
            (0, 0, 0),
            (2, 0, 0)
        ]
    );
}
