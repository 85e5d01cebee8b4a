//! Record real migration streams as the fuzzers' seed corpus.
//!
//! Each case migrates a [`MemoryVm`] with content (data pages, zero pages,
//! pages never written) from a real `send_migration` to a real
//! `receive_migration`, through a proxy that records what the source sent.
//! The recording is then replayed into a fresh receiver, which must resume
//! the guest: a seed is a whole, valid stream.
//!
//!     record-seeds OUT_DIR...      (every directory gets every seed)

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use migrate_core::engine::{
    receive_migration, send_migration, CompressMode, MemoryVm, MigratableVm, MigrationControl,
    MigrationStatus, ReceiveOptions, SendOptions, TimeoutAction,
};
use migrate_core::transport::Stream;
use vm_memory::{Bytes, GuestAddress};

/// Writes a recognisable, page-specific pattern into `pages` of `vm`.
fn write_pattern(vm: &MemoryVm, pages: &[u64]) {
    for &p in pages {
        let bytes: Vec<u8> = (0..4096u32).map(|i| (i as u8) ^ (p as u8)).collect();
        vm.memory()
            .write_slice(&bytes, GuestAddress(p * 4096))
            .expect("page inside guest memory");
    }
}

struct Case {
    name: &'static str,
    mem: u64,
    vcpus: usize,
    compress: CompressMode,
    verify: bool,
    /// Raw pages as `Pages` (copied) instead of `CheckedPages`.
    copy_pages: bool,
}

fn record(case: &Case) -> Vec<u8> {
    let blobs: Vec<Vec<u8>> = (0..case.vcpus).map(|i| vec![i as u8; 64]).collect();
    let src = MemoryVm::new(case.mem, blobs, "seed-cpu").expect("source VM");
    write_pattern(&src, &[0, 1, 7, 100, 300, 511]);
    let (src_end, proxy_in) = UnixStream::pair().expect("pair");
    let (proxy_out, dst_end) = UnixStream::pair().expect("pair");

    // Source → destination, recorded; destination → source, passed on.
    let mut from_src = proxy_in.try_clone().expect("clone");
    let mut to_dst = proxy_out.try_clone().expect("clone");
    let forward = std::thread::spawn(move || {
        let mut recorded = Vec::new();
        let mut buf = [0u8; 65536];
        loop {
            match from_src.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    recorded.extend_from_slice(&buf[..n]);
                    if to_dst.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
            }
        }
        let _ = to_dst.shutdown(std::net::Shutdown::Write);
        recorded
    });
    let mut from_dst = proxy_out;
    let mut to_src = proxy_in;
    let backward = std::thread::spawn(move || {
        let _ = std::io::copy(&mut from_dst, &mut to_src);
        let _ = to_src.shutdown(std::net::Shutdown::Write);
    });
    let dest = std::thread::spawn(move || {
        receive_migration(Stream::Unix(dst_end), &ReceiveOptions::default(), |hello| {
            let size: u64 = hello.regions.iter().map(|r| r.size).sum();
            let blobs = vec![Vec::new(); hello.vcpu_count as usize];
            Ok(MemoryVm::new(size, blobs, &hello.cpu_model)?)
        })
    });
    let opts = SendOptions {
        policy: policy::by_name("xen", &policy::PolicyParams::default()).expect("xen"),
        compress: case.compress,
        timeout: None,
        timeout_action: TimeoutAction::Cancel,
        verify_digest: case.verify,
        io_timeout: Duration::from_secs(10),
        downtime_limit: policy::DEFAULT_DOWNTIME_LIMIT,
        control: Arc::new(MigrationControl::new(None)),
        downtime_ramp: None,
        guest_paused: false,
        progress: None,
        destination: "record-seeds".into(),
        channels: None,
        copy_pages: case.copy_pages,
        skip_unchanged: false,
    };
    let report = send_migration(&src, Stream::Unix(src_end), opts);
    assert_eq!(
        report.status,
        MigrationStatus::Completed,
        "{:?}",
        report.error
    );
    let received = dest
        .join()
        .expect("dest thread")
        .expect("destination accepted");
    assert_eq!(received.vm.vcpu_blobs(), src.vcpu_blobs());
    let recorded = forward.join().expect("forward thread");
    backward.join().expect("backward thread");
    recorded
}

fn main() {
    let dirs: Vec<PathBuf> = std::env::args_os().skip(1).map(PathBuf::from).collect();
    if dirs.is_empty() {
        eprintln!("usage: record-seeds OUT_DIR...");
        std::process::exit(2);
    }
    let cases = [
        Case {
            name: "plain-verify",
            mem: 2 << 20,
            vcpus: 1,
            compress: CompressMode::None,
            verify: true,
            copy_pages: false,
        },
        Case {
            name: "copied-verify",
            mem: 2 << 20,
            vcpus: 1,
            compress: CompressMode::None,
            verify: true,
            copy_pages: true,
        },
        Case {
            name: "zstd-verify",
            mem: 2 << 20,
            vcpus: 1,
            compress: CompressMode::Zstd(1),
            verify: true,
            copy_pages: false,
        },
        Case {
            name: "zstd-2vcpus",
            mem: 4 << 20,
            vcpus: 2,
            compress: CompressMode::Zstd(3),
            verify: false,
            copy_pages: false,
        },
    ];
    for case in &cases {
        let stream = record(case);
        assert!(
            vmigrate_fuzz::feed_receiver(&stream),
            "{}: the recorded stream must replay into a resumed guest",
            case.name
        );
        for dir in &dirs {
            std::fs::create_dir_all(dir).expect("corpus directory");
            std::fs::write(dir.join(format!("seed-{}", case.name)), &stream).expect("write seed");
        }
        println!(
            "seed {}: {} bytes, replays to a resumed guest",
            case.name,
            stream.len()
        );
    }
}
