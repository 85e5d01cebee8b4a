//! Receiving `CheckedPages` straight into guest memory.
//!
//! On the copy path the destination's socket read lands in a batch buffer
//! and the pages are then copied into guest memory: two copies of every
//! page, the second a third of the destination's time at loopback speed.
//! Here the kernel copies the pages from the socket into guest memory
//! itself (`readv` with one iovec per run of pages), and each page is then
//! checked against its CRC where it lies ([`PageApplier::apply_placed`],
//! the page still in the cache).
//!
//! That moves the check from before the write to after it, which is sound
//! only because this guest cannot run yet: the destination's vCPUs start
//! on `Commit`, after `Complete` found no page torn. A page that fails its
//! CRC is marked torn and written (so a later zero range clears it) until
//! a newer copy mends it, exactly as on the copy path; a frame whose
//! prefix or trailer fails fails the migration, and this guest is never
//! resumed. So a page is still verified before the guest can see it; what
//! it no longer keeps, for a torn page, is the older copy, which the newer
//! one replaces anyway.
//!
//! Used where RAM is allocated ahead (`--prefault`): into memory never
//! touched, each page the kernel writes would fault and be zeroed first,
//! which the copy path's `pwrite` into the memfd avoids.

use std::io::{self, BufRead, BufReader};
use std::os::fd::{AsRawFd, RawFd};

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::apply::PageApplier;
use super::direct::{host_run, region_runs};
use crate::transport::Stream;
use crate::wire::{
    read_message_into, read_message_placing, Limits, PagePlacement, Received, WireError, PAGE_SIZE,
};

/// Puts the pages of `CheckedPages` frames into `memory` (module docs).
pub(super) struct InPlace<'m> {
    memory: &'m GuestMemoryMmap,
}

impl<'m> InPlace<'m> {
    /// A placement into `memory`, which no vCPU may run on until the
    /// migration completed.
    pub(super) fn new(memory: &'m GuestMemoryMmap) -> Self {
        Self { memory }
    }

    /// The runs of guest memory the pages of `gpas` go to: (gpa, host
    /// address, bytes); `None` for gpas that are out of order or outside
    /// guest memory (the copy path reads and refuses those).
    fn runs(&self, gpas: &[u64]) -> Option<Vec<(u64, *mut u8, usize)>> {
        if gpas.windows(2).any(|w| w[0] >= w[1]) {
            return None;
        }
        region_runs(self.memory, gpas)
            .ok()?
            .into_iter()
            .map(|(i, n, region)| Some((gpas[i], host_run(region, gpas[i], n)?, n * PAGE_SIZE)))
            .collect()
    }
}

/// Reads the next frame of a destination connection: `CheckedPages`
/// straight into guest memory when `in_place` (RAM allocated ahead, the
/// guest not yet running), everything else as usual.
pub(super) fn read_next(
    r: &mut BufReader<Stream>,
    limits: &Limits,
    applier: &mut PageApplier,
    memory: &GuestMemoryMmap,
    in_place: bool,
) -> Result<Received, WireError> {
    if in_place {
        read_message_placing(r, limits, applier.spare_buffer(), &mut InPlace::new(memory))
    } else {
        read_message_into(r, limits, applier.spare_buffer()).map(Received::Message)
    }
}

impl PagePlacement<BufReader<Stream>> for InPlace<'_> {
    fn receive(&mut self, gpas: &[u64], r: &mut BufReader<Stream>) -> io::Result<bool> {
        let fd = match r.get_ref() {
            Stream::Tcp(s) => s.as_raw_fd(),
            Stream::Unix(s) => s.as_raw_fd(),
            // Encrypted streams decrypt into a buffer anyway.
            _ => return Ok(false),
        };
        let Some(runs) = self.runs(gpas) else {
            return Ok(false);
        };
        // What the reader holds already goes in by copy; the rest comes
        // from the socket.
        let mut skip = r.buffer().len().min(gpas.len() * PAGE_SIZE);
        let mut copied = 0;
        for &(gpa, _, len) in &runs {
            if copied == skip {
                break;
            }
            let n = len.min(skip - copied);
            self.memory
                .write_slice(&r.buffer()[copied..copied + n], GuestAddress(gpa))
                .map_err(io::Error::other)?;
            copied += n;
        }
        r.consume(skip);
        let mut iovecs: Vec<libc::iovec> = Vec::with_capacity(runs.len());
        for &(_, host, len) in &runs {
            if skip >= len {
                skip -= len;
                continue;
            }
            iovecs.push(libc::iovec {
                // SAFETY: `skip < len`, so this stays inside the run.
                iov_base: unsafe { host.add(skip) }.cast(),
                iov_len: len - skip,
            });
            skip = 0;
        }
        read_vectored_exact(fd, &mut iovecs)?;
        Ok(true)
    }
}

/// Fills every iovec from `fd`, retrying on `EINTR`.
fn read_vectored_exact(fd: RawFd, iovecs: &mut [libc::iovec]) -> io::Result<()> {
    let mut first = 0;
    while first < iovecs.len() {
        let count = (iovecs.len() - first).min(1024);
        // SAFETY: every iovec points inside a live mapping of guest memory
        // (`InPlace::runs` checked it against its region), borrowed by the
        // caller for this call. The kernel writes those bytes; no Rust
        // reference to them exists (vm-memory reaches guest memory through
        // raw pointers only), and no vCPU runs on this memory yet.
        let got = unsafe {
            libc::readv(
                fd,
                iovecs[first..].as_ptr(),
                libc::c_int::try_from(count).expect("at most 1024"),
            )
        };
        if got < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if got == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        let mut got = usize::try_from(got).expect("not negative");
        while got > 0 {
            let v = &mut iovecs[first];
            let n = got.min(v.iov_len);
            // SAFETY: `n <= iov_len`, so the base stays inside its run.
            v.iov_base = unsafe { v.iov_base.cast::<u8>().add(n) }.cast();
            v.iov_len -= n;
            got -= n;
            if v.iov_len == 0 {
                first += 1;
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::io::Write;
    use std::os::unix::net::UnixStream;

    use super::*;
    use crate::vm::memory::{map_memory, slot_layout};
    use crate::wire::write_checked_pages;

    const MEM: u64 = 2 << 20;

    fn page_of(memory: &GuestMemoryMmap, gpa: u64) -> Vec<u8> {
        let mut got = vec![0u8; PAGE_SIZE];
        memory.read_slice(&mut got, GuestAddress(gpa)).unwrap();
        got
    }

    /// Frames written by the source's writer land in guest memory in
    /// place, whatever part of them the reader had buffered; a page damaged
    /// on the way is found torn in place and the others are written.
    #[test]
    fn pages_land_in_place_and_a_damaged_one_is_found_torn() {
        let page = PAGE_SIZE as u64;
        let gpas = [3 * page, 4 * page, 5 * page, 9 * page, 40 * page];
        let data: Vec<u8> = (0..gpas.len())
            .flat_map(|i| vec![u8::try_from(i + 1).unwrap(); PAGE_SIZE])
            .collect();
        let mut frame = Vec::new();
        write_checked_pages(&mut frame, 0, &gpas, &[&data]).unwrap();
        // A bit flipped in the fourth page's data (the page at 9 × 4 KiB).
        let mut damaged = frame.clone();
        let fourth = frame.len() - (4 * gpas.len() + 4) - 2 * PAGE_SIZE + 100;
        damaged[fourth] ^= 1;
        // 64 bytes buffered (the header only), half the pages, all of it.
        for capacity in [64, 3 * PAGE_SIZE, 64 << 10] {
            let memory = map_memory(&slot_layout(MEM).unwrap()).unwrap();
            let (mut tx, rx) = UnixStream::pair().unwrap();
            let both = [frame.clone(), damaged.clone()].concat();
            let writer = std::thread::spawn(move || {
                tx.write_all(&both).unwrap();
            });
            let mut r = BufReader::with_capacity(capacity, Stream::Unix(rx));
            let mut applier = PageApplier::new(512).unwrap().via_mapping(true);
            let mut place = InPlace::new(&memory);
            for want_torn in [0, 1] {
                let got =
                    read_message_placing(&mut r, &Limits::default(), &mut Vec::new(), &mut place)
                        .unwrap();
                let Received::Placed(batch) = got else {
                    panic!("not placed (capacity {capacity})");
                };
                assert_eq!(batch.gpas, gpas);
                assert_eq!(
                    applier.apply_placed(&memory, &batch).unwrap(),
                    (5, want_torn)
                );
            }
            writer.join().unwrap();
            for (i, gpa) in gpas.iter().enumerate() {
                let want = u8::try_from(i + 1).unwrap();
                let got = page_of(&memory, *gpa);
                if i == 3 {
                    assert_eq!(got.iter().filter(|&&b| b != want).count(), 1);
                } else {
                    assert!(got.iter().all(|&b| b == want), "page {gpa:#x}");
                }
            }
            assert!(page_of(&memory, 6 * page).iter().all(|&b| b == 0));
            assert_eq!(applier.written().torn(), (1, Some(9)));
        }
    }

    /// Out-of-order gpas, gpas outside guest memory and encrypted streams
    /// are left to the copy path, which reads them as usual.
    #[test]
    fn what_it_cannot_place_is_read_as_usual() {
        let page = PAGE_SIZE as u64;
        let memory = map_memory(&slot_layout(MEM).unwrap()).unwrap();
        let place = InPlace::new(&memory);
        assert!(place.runs(&[2 * page, page]).is_none());
        assert!(place.runs(&[page, page]).is_none());
        assert!(place.runs(&[MEM]).is_none());
        assert_eq!(place.runs(&[0, page, 3 * page]).unwrap().len(), 2);
        let data = vec![7u8; 2 * PAGE_SIZE];
        let mut frame = Vec::new();
        write_checked_pages(&mut frame, 0, &[page, 0], &[&data]).unwrap();
        let (mut tx, rx) = UnixStream::pair().unwrap();
        tx.write_all(&frame).unwrap();
        let mut r = BufReader::new(Stream::Unix(rx));
        let mut place = InPlace::new(&memory);
        let got =
            read_message_placing(&mut r, &Limits::default(), &mut Vec::new(), &mut place).unwrap();
        assert!(matches!(
            got,
            Received::Message(crate::wire::Message::CheckedPages(_))
        ));
        assert!(page_of(&memory, page).iter().all(|&b| b == 0));
    }
}
