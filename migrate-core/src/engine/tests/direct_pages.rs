//! Pages sent straight from guest memory while a "guest" rewrites them: a
//! page changed between its copy and its CRC arrives torn and is dropped
//! alone (made certain by a writer that changes guest memory right after
//! taking the bytes), and with a real racing writer memory still ends
//! identical, on a destination that receives pages in place too.

use super::*;

/// A guest hammering 16 pages during the migration, into a destination
/// that receives pages in place (`in_place`) or copies them in; returns
/// the torn count.
fn migrate_hammered(compress: CompressMode, in_place: bool) -> u64 {
    let src = Arc::new(FakeVm::new(SIZE));
    for page in 0..2048 {
        src.guest_write(page, page as u64 + 1);
    }
    src.running.store(true, Ordering::SeqCst);
    let guest_vm = src.clone();
    let guest = std::thread::spawn(move || {
        let mut n = 0u64;
        while guest_vm.guest_step(|vm| {
            n += 1;
            // Every word of the page changes, so a torn copy shows.
            let page = usize::try_from(n % 16).unwrap() * 97;
            let words = [n; 512];
            vm.memory
                .write_slice(
                    &words
                        .iter()
                        .flat_map(|w| w.to_le_bytes())
                        .collect::<Vec<_>>(),
                    GuestAddress(page as u64 * 4096),
                )
                .unwrap();
            vm.dirty.lock().unwrap().set(page);
        }) {}
    });
    let (a, b) = UnixStream::pair().unwrap();
    let dest = std::thread::spawn(move || {
        receive_migration(Stream::Unix(b), &ReceiveOptions::default(), |_| {
            let vm = FakeVm::new(SIZE);
            Ok(if in_place { vm.prefaulted() } else { vm })
        })
    });
    let mut opts = options(compress);
    opts.downtime_limit = Duration::from_millis(50);
    let report = send_migration(&*src, Stream::Unix(a), opts);
    guest.join().unwrap();
    let outcome = dest.join().unwrap().unwrap();
    assert_eq!(report.status, MigrationStatus::Completed, "{report:?}");
    assert_eq!(
        report.page_path,
        if compress == CompressMode::None {
            "guest-memory"
        } else {
            "copy"
        }
    );
    assert_same_memory(&src, &outcome.vm);
    assert!(report.digest.unwrap().equal);
    let direct = compress == CompressMode::None;
    assert_eq!(outcome.pages_in_place > 0, in_place && direct);
    outcome.torn_pages
}

/// A racing "guest" never breaks a migration from guest memory: memory
/// ends byte-identical whether or not a page tore (how often one does
/// depends on timing; the tear itself is made certain in
/// `a_page_changed_between_the_copy_and_its_crc_is_dropped_alone`).
#[test]
fn a_racing_guest_still_migrates_byte_identical() {
    for in_place in [false, true] {
        let torn: Vec<u64> = (0..4)
            .map(|_| migrate_hammered(CompressMode::None, in_place))
            .collect();
        eprintln!("torn pages per migration (in place: {in_place}): {torn:?}");
        // A compressing sender copies first: nothing can tear.
        assert_eq!(migrate_hammered(CompressMode::Zstd(1), in_place), 0);
    }
}

/// A writer that, right after taking its first frame's bytes, changes one
/// page of guest memory: the guest writing between the copy and the CRC.
struct Tearing<'m> {
    out: Vec<u8>,
    memory: &'m GuestMemoryMmap,
    gpa: u64,
    torn: bool,
}

impl std::io::Write for Tearing<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.write_vectored(&[std::io::IoSlice::new(buf)])
    }
    fn write_vectored(&mut self, bufs: &[std::io::IoSlice<'_>]) -> std::io::Result<usize> {
        let n = bufs.iter().map(|b| b.len()).sum();
        for b in bufs {
            self.out.extend_from_slice(b);
        }
        if !self.torn && self.out.len() > 2 * 4096 {
            self.memory
                .write_slice(&[0xAA; 4096], GuestAddress(self.gpa))
                .unwrap();
            self.torn = true;
        }
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[test]
fn a_page_changed_between_the_copy_and_its_crc_is_dropped_alone() {
    let src = FakeVm::new(SIZE);
    let pages = 8usize;
    for page in 0..pages {
        src.guest_write(page, page as u64 + 1);
    }
    let mut dirty = DirtyBitmap::new(usize::try_from(SIZE / 4096).unwrap());
    for page in 0..pages {
        dirty.set(page);
    }
    let mut sender = super::super::pages::PageSender::new(None).unwrap();
    sender.send_direct(true);
    let torn_gpa = 3 * 4096;
    let mut w = Tearing {
        out: Vec::new(),
        memory: &src.memory,
        gpa: torn_gpa,
        torn: false,
    };
    sender
        .send(&mut w, &src.memory, 0, &dirty, None, "test")
        .unwrap();
    assert!(w.torn);
    let dst = FakeVm::new(SIZE);
    let mut applier =
        super::super::apply::PageApplier::new(usize::try_from(SIZE / 4096).unwrap()).unwrap();
    let mut r = w.out.as_slice();
    let mut torn = 0;
    while let Ok(m) = crate::wire::read_message(&mut r, &crate::wire::Limits::default()) {
        match m {
            crate::wire::Message::CheckedPages(b) => {
                torn += applier.apply_checked(&dst.memory, &b).unwrap().1;
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(torn, 1);
    assert_eq!(applier.written().torn(), (1, Some(3)));
    for page in 0..pages {
        // The torn page never reached guest memory: still zero there.
        let want = if page == 3 {
            [0; 4096]
        } else {
            page_bytes(&src, page)
        };
        assert_eq!(page_bytes(&dst, page), want, "page {page}");
    }
    // Received in place, the torn page lands but is found torn there, and
    // only it.
    let dst = FakeVm::new(SIZE);
    let mut applier =
        super::super::apply::PageApplier::new(usize::try_from(SIZE / 4096).unwrap()).unwrap();
    let (mut a, b) = UnixStream::pair().unwrap();
    let frames = w.out.clone();
    let writer = std::thread::spawn(move || std::io::Write::write_all(&mut a, &frames).unwrap());
    let mut r = std::io::BufReader::new(Stream::Unix(b));
    let limits = crate::wire::Limits::default();
    let mut torn = 0;
    while let Ok(got) =
        super::super::in_place::read_next(&mut r, &limits, &mut applier, &dst.memory, true)
    {
        match got {
            crate::wire::Received::Placed(b) => {
                torn += applier.apply_placed(&dst.memory, &b).unwrap().1;
            }
            other => panic!("not placed: {other:?}"),
        }
    }
    writer.join().unwrap();
    assert_eq!(torn, 1);
    assert_eq!(applier.written().torn(), (1, Some(3)));
    for page in (0..pages).filter(|&p| p != 3) {
        assert_eq!(
            page_bytes(&dst, page),
            page_bytes(&src, page),
            "page {page}"
        );
    }
}

/// Page `page` of `vm`'s memory.
fn page_bytes(vm: &FakeVm, page: usize) -> [u8; 4096] {
    let mut out = [0u8; 4096];
    vm.memory
        .read_slice(&mut out, GuestAddress(page as u64 * 4096))
        .unwrap();
    out
}
