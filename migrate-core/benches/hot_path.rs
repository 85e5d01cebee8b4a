//! The host-side hot path of a migration, piece by piece: what every page
//! costs before it reaches the socket and after it leaves it. On our
//! machines guest code is emulated but this runs at native speed, so these
//! figures are the floor under downtime and total time.
//!
//!     cargo bench -p migrate-core --bench hot_path
//!
//! Throughputs are in bytes of guest memory handled per second.

use std::hint::black_box;
use std::io::Cursor;

use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use migrate_core::dirty::DirtyBitmap;
use migrate_core::engine::{is_zero_page, memory_digest, SentDigests};
use migrate_core::wire::{read_message, write_message, Limits, Message, PageBatch};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

const PAGE: usize = 4096;
const BATCH: usize = 256;

/// Incompressible bytes (SplitMix64), so compression and zero detection
/// see the worst case.
fn noise(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed;
    let mut out = Vec::with_capacity(len);
    while out.len() < len {
        x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = x;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        out.extend_from_slice(&(z ^ (z >> 31)).to_le_bytes());
    }
    out.truncate(len);
    out
}

fn batch(data: Vec<u8>) -> PageBatch {
    let gpas = (0..BATCH as u64).map(|i| i * PAGE as u64).collect();
    PageBatch::raw(0, gpas, data).expect("valid batch")
}

fn codec(c: &mut Criterion) {
    let mut g = c.benchmark_group("codec");
    g.throughput(Throughput::Bytes((BATCH * PAGE) as u64));
    let raw = Message::Pages(batch(noise(BATCH * PAGE, 1)));
    g.bench_function("encode 256 raw pages (CRC included)", |b| {
        let mut out = Vec::with_capacity(BATCH * PAGE + 4096);
        b.iter(|| {
            out.clear();
            write_message(&mut out, black_box(&raw)).unwrap();
        })
    });
    let mut frame = Vec::new();
    write_message(&mut frame, &raw).unwrap();
    g.bench_function("decode 256 raw pages (CRC checked)", |b| {
        b.iter(|| read_message(&mut Cursor::new(black_box(&frame)), &Limits::default()).unwrap())
    });
    let text: Vec<u8> = (0..BATCH * PAGE).map(|i| b"vmigrate "[i % 9]).collect();
    for (name, data) in [
        ("incompressible", noise(BATCH * PAGE, 2)),
        ("text-like", text),
    ] {
        g.bench_function(format!("zstd-1 compress 256 {name} pages"), |b| {
            let mut z = zstd::bulk::Compressor::new(1).unwrap();
            b.iter(|| z.compress(black_box(&data)).unwrap())
        });
    }
    g.finish();
}

fn zero_detection(c: &mut Criterion) {
    let mut g = c.benchmark_group("zero detection");
    g.throughput(Throughput::Bytes(PAGE as u64));
    let zero = vec![0u8; PAGE];
    let mut last = vec![0u8; PAGE];
    last[PAGE - 1] = 1;
    let first = noise(PAGE, 3);
    for (name, page) in [
        ("zero page (scans all)", &zero),
        ("last byte set (scans all)", &last),
        ("random page (stops at once)", &first),
    ] {
        g.bench_function(name, |b| b.iter(|| is_zero_page(black_box(page))));
    }
    g.finish();
}

fn bitmaps(c: &mut Criterion) {
    let mut g = c.benchmark_group("bitmap, 1 GiB of RAM");
    let pages = (1usize << 30) / PAGE;
    g.throughput(Throughput::Bytes(1 << 30));
    let words: Vec<u64> = (0..pages / 64)
        .map(|i| if i % 16 == 0 { 0xFFFF } else { 0 })
        .collect();
    g.bench_function("merge a KVM log (1/64 dirty)", |b| {
        b.iter_batched_ref(
            || DirtyBitmap::new(pages),
            |m| m.merge_words(0, black_box(&words)),
            BatchSize::LargeInput,
        )
    });
    let mut sparse = DirtyBitmap::new(pages);
    sparse.merge_words(0, &words);
    let dense = DirtyBitmap::all(pages);
    g.bench_function("iterate dirty pages (1/64 dirty)", |b| {
        b.iter(|| black_box(&sparse).iter_ones().count())
    });
    g.bench_function("iterate runs (all dirty)", |b| {
        b.iter(|| black_box(&dense).runs().count())
    });
    g.bench_function("overlap count", |b| {
        b.iter(|| black_box(&sparse).overlap_count(black_box(&dense)))
    });
    g.finish();
}

fn digest(c: &mut Criterion) {
    let mut g = c.benchmark_group("memory digest");
    let size = 64usize << 20;
    g.throughput(Throughput::Bytes(size as u64));
    let memory = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), size)]).unwrap();
    memory
        .write_slice(&noise(size, 4), GuestAddress(0))
        .unwrap();
    g.bench_function("64 MiB, every page written", |b| {
        b.iter(|| memory_digest(black_box(&memory), None).unwrap())
    });
    g.finish();
}

/// `send --skip-unchanged`: the check of each copied page against the
/// digest of the copy last sent (one xxh3-128 of the page in cache).
fn unchanged_check(c: &mut Criterion) {
    let mut g = c.benchmark_group("skip-unchanged");
    let pages = noise(BATCH * PAGE, 5);
    g.throughput(Throughput::Bytes((BATCH * PAGE) as u64));
    let table = SentDigests::new(BATCH);
    let check = |table: &SentDigests| {
        pages
            .chunks(PAGE)
            .enumerate()
            .filter(|&(i, p)| table.unchanged_or_record(i, p))
            .count()
    };
    check(&table);
    g.bench_function("256 pages, all unchanged", |b| {
        b.iter(|| assert_eq!(check(black_box(&table)), BATCH))
    });
    g.finish();
}

criterion_group!(
    benches,
    codec,
    zero_detection,
    bitmaps,
    digest,
    unchanged_check
);
criterion_main!(benches);
