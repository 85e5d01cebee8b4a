//! Shared by the fuzz targets and the seed recorder: feeding bytes to a
//! real receiver over a real socket.

use std::io::Write;
use std::os::unix::net::UnixStream;
use std::time::Duration;

use migrate_core::engine::{receive_migration, MemoryVm, ReceiveOptions};
use migrate_core::transport::Stream;

/// Largest guest a fuzzed `Hello` may make the receiver create: the point is
/// the protocol, not mapping terabytes on every input.
pub const FUZZ_MAX_MEM: u64 = 64 << 20;

/// Run a real receiver (`receive_migration` with a [`MemoryVm`]) on `bytes`
/// as the source's side of the stream. Returns whether it resumed the guest.
/// Whatever the bytes, it must return (no panic, no hang, no huge
/// allocation: the harness enforces the last two with its time and RSS
/// limits).
///
/// Each input is fed twice: to a destination that copies pages in, and to
/// one whose RAM counts as allocated ahead, which receives `CheckedPages`
/// straight into guest memory and checks them there
/// (`engine/in_place.rs`). Both must come to the same end.
pub fn feed_receiver(bytes: &[u8]) -> bool {
    let copied = feed_receiver_once(bytes, false);
    let in_place = feed_receiver_once(bytes, true);
    assert_eq!(
        copied, in_place,
        "receiving in place must accept exactly what the copy path accepts"
    );
    copied
}

fn feed_receiver_once(bytes: &[u8], prefaulted: bool) -> bool {
    let (mut src, dst) = UnixStream::pair().expect("socket pair");
    let data = bytes.to_vec();
    let writer = std::thread::spawn(move || {
        // The receiver may stop reading early (an error); a failed write
        // then is expected.
        let _ = src.write_all(&data);
        let _ = src.shutdown(std::net::Shutdown::Write);
        // Keep our end open until the receiver is done, draining replies.
        let mut sink = Vec::new();
        let _ = std::io::Read::read_to_end(&mut src, &mut sink);
    });
    let opts = ReceiveOptions {
        io_timeout: Duration::from_secs(2),
        max_mem: FUZZ_MAX_MEM,
        ..ReceiveOptions::default()
    };
    let outcome = receive_migration(Stream::Unix(dst), &opts, |hello| {
        let size: u64 = hello.regions.iter().map(|r| r.size).sum();
        let blobs = vec![Vec::new(); usize::try_from(hello.vcpu_count).unwrap_or(0)];
        Ok(MemoryVm::new(size, blobs, &hello.cpu_model)?.prefaulted(prefaulted))
    });
    let resumed = match &outcome {
        Ok(o) => {
            assert!(o.vm.is_running(), "an Ok outcome means the guest resumed");
            true
        }
        Err(_) => false,
    };
    drop(outcome);
    writer.join().expect("writer thread");
    resumed
}
