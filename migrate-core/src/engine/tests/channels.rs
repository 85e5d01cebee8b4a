//! Several channels: a running guest arrives byte-identical over 3
//! connections; a stranger joining, a channel that dies, and a destination
//! that does not take channels all fail cleanly with the source running.

use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;

use super::*;
use crate::transport::Stream;

pub(super) struct Socket(pub(super) PathBuf);

impl Socket {
    pub(super) fn new(name: &str) -> (Self, UnixListener) {
        let path = std::env::temp_dir().join(format!(
            "vmigrate-ch-{}-{name}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        let _ = std::fs::remove_file(&path);
        let l = UnixListener::bind(&path).unwrap();
        (Self(path), l)
    }
}

impl Drop for Socket {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

pub(super) fn connector(path: PathBuf, count: u16) -> ChannelConnector {
    ChannelConnector {
        count,
        connect: Box::new(move || {
            UnixStream::connect(&path)
                .map(Stream::Unix)
                .map_err(|e| e.to_string())
        }),
    }
}

/// Runs a destination on `listener` that accepts channels from it.
pub(super) fn destination(
    listener: UnixListener,
) -> std::thread::JoinHandle<Result<ReceiveOutcome<FakeVm>, MigrationError>> {
    std::thread::spawn(move || {
        let (main, _) = listener.accept().unwrap();
        let mut accept = || -> Result<Stream, String> {
            listener
                .accept()
                .map(|(s, _)| Stream::Unix(s))
                .map_err(|e| e.to_string())
        };
        receive_migration_with_channels(
            Stream::Unix(main),
            &ReceiveOptions::default(),
            Some(&mut accept),
            |_| Ok(FakeVm::new(SIZE)),
        )
    })
}

fn running_source() -> (Arc<FakeVm>, std::thread::JoinHandle<()>) {
    let src = Arc::new(FakeVm::new(SIZE));
    for page in (0..2048).step_by(3) {
        src.guest_write(page, page as u64 * 7 + 1);
    }
    src.running.store(true, Ordering::SeqCst);
    let vm = src.clone();
    let guest = std::thread::spawn(move || {
        let mut n = 0u64;
        while vm.guest_step(|vm| {
            n += 1;
            vm.guest_write(usize::try_from(n * 13 % 2048).unwrap(), n);
        }) {}
    });
    (src, guest)
}

#[test]
fn three_channels_carry_a_running_guest_byte_identical() {
    for compress in [CompressMode::None, CompressMode::Zstd(1)] {
        let (sock, listener) = Socket::new("ok");
        let dest = destination(listener);
        let (src, guest) = running_source();
        let mut opts = options(compress);
        opts.channels = Some(connector(sock.0.clone(), 3));
        let main = Stream::Unix(UnixStream::connect(&sock.0).unwrap());
        let report = send_migration(&*src, main, opts);
        guest.join().unwrap();
        let dst = dest.join().unwrap().unwrap().vm;
        assert_eq!(report.status, MigrationStatus::Completed, "{report:?}");
        assert!(report.digest.as_ref().unwrap().equal);
        assert!(dst.running.load(Ordering::SeqCst));
        assert_same_memory(&src, &dst);
        assert_eq!(*dst.vcpus.lock().unwrap(), *src.vcpus.lock().unwrap());
        assert_eq!(
            report.ram.duplicate + report.ram.normal,
            report
                .iterations
                .iter()
                .map(|i| i.pages_sent + i.zero_pages)
                .sum::<u64>(),
            "every channel's pages are counted once"
        );
    }
}

#[test]
fn a_destination_without_channels_is_refused_and_the_source_runs_on() {
    let (a, b) = UnixStream::pair().unwrap();
    let dest = std::thread::spawn(move || {
        receive_migration(Stream::Unix(b), &ReceiveOptions::default(), |_| {
            Ok(FakeVm::new(SIZE))
        })
    });
    let (src, guest) = running_source();
    let mut opts = options(CompressMode::None);
    opts.channels = Some(connector(PathBuf::from("/nonexistent"), 2));
    let report = send_migration(&*src, Stream::Unix(a), opts);
    assert_eq!(report.status, MigrationStatus::Failed);
    assert!(
        report
            .error
            .as_deref()
            .unwrap()
            .contains("several channels"),
        "{report:?}"
    );
    assert!(src.running.load(Ordering::SeqCst), "source keeps running");
    src.running.store(false, Ordering::SeqCst);
    guest.join().unwrap();
    assert!(dest.join().unwrap().is_err());
}

#[test]
fn a_stranger_on_a_channel_fails_the_migration_and_nothing_runs() {
    let (sock, listener) = Socket::new("stranger");
    let dest = destination(listener);
    let (src, guest) = running_source();
    let mut opts = options(CompressMode::None);
    // The second connection claims another session.
    let path = sock.0.clone();
    opts.channels = Some(ChannelConnector {
        count: 2,
        connect: Box::new(move || {
            let mut s = Stream::Unix(UnixStream::connect(&path).map_err(|e| e.to_string())?);
            let join = crate::wire::Message::ChannelJoin(crate::wire::ChannelJoin {
                session: 1,
                index: 1,
                count: 2,
            });
            crate::wire::write_message(&mut s, &join).map_err(|e| e.to_string())?;
            Ok(s)
        }),
    });
    let main = Stream::Unix(UnixStream::connect(&sock.0).unwrap());
    let report = send_migration(&*src, main, opts);
    assert_ne!(report.status, MigrationStatus::Completed, "{report:?}");
    assert!(src.running.load(Ordering::SeqCst), "source keeps running");
    src.running.store(false, Ordering::SeqCst);
    guest.join().unwrap();
    let err = dest.join().unwrap().err().expect("destination refused");
    assert!(
        err.to_string().contains("another migration")
            || err.to_string().contains("twice")
            || err.to_string().contains("Pages"),
        "{err}"
    );
}

#[test]
fn a_channel_that_dies_mid_pass_fails_both_ends_and_nothing_runs() {
    let (sock, listener) = Socket::new("dies");
    let dest = destination(listener);
    let (src, guest) = running_source();
    let mut opts = options(CompressMode::None);
    // The second channel joins properly, then its connection is cut in the
    // middle of its first share (a relay that stops after 1 MiB and hangs
    // up both ways): the destination's channel sees a truncated frame.
    let path = sock.0.clone();
    opts.channels = Some(ChannelConnector {
        count: 2,
        connect: Box::new(move || {
            use std::io::{Read, Write};
            let mut real = UnixStream::connect(&path).map_err(|e| e.to_string())?;
            let (ours, mut theirs) = UnixStream::pair().map_err(|e| e.to_string())?;
            std::thread::spawn(move || {
                let mut buf = vec![0u8; 64 << 10];
                let mut left = 1usize << 20;
                while left > 0 {
                    let n = match theirs.read(&mut buf[..left.min(64 << 10)]) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => n,
                    };
                    if real.write_all(&buf[..n]).is_err() {
                        break;
                    }
                    left -= n;
                }
                let _ = real.shutdown(std::net::Shutdown::Both);
                let _ = theirs.shutdown(std::net::Shutdown::Both);
            });
            Ok(Stream::Unix(ours))
        }),
    });
    let main = Stream::Unix(UnixStream::connect(&sock.0).unwrap());
    let report = send_migration(&*src, main, opts);
    let outcome = dest.join().unwrap();
    let source_runs = src.running.load(Ordering::SeqCst);
    src.running.store(false, Ordering::SeqCst);
    guest.join().unwrap();
    assert_eq!(report.status, MigrationStatus::Failed, "{report:?}");
    assert!(source_runs, "a failed migration leaves the source running");
    let err = outcome.err().expect("the destination must not resume");
    assert!(err.to_string().contains("channel 1"), "{err}");
}
