//! The in-iteration sampler: windows counted, nothing lost.

use super::*;

#[test]
fn sampling_counts_windows_and_loses_no_dirty_page() {
    let vm = Arc::new(FakeVm::new(SIZE));
    vm.running.store(true, Ordering::SeqCst);
    let guest_vm = vm.clone();
    // Dirty 100 pages in a burst, then idle, then 40 more, while the
    // "iteration" (a sleep) runs.
    let guest = std::thread::spawn(move || {
        for p in 0..100 {
            guest_vm.guest_write(p, 1);
        }
        std::thread::sleep(Duration::from_millis(260));
        for p in 1000..1040 {
            guest_vm.guest_write(p, 2);
        }
    });
    let mut next = DirtyBitmap::new(usize::try_from(SIZE / 4096).unwrap());
    let (out, windows) = super::super::windows::sampled(&*vm, &mut next, || {
        std::thread::sleep(Duration::from_millis(450));
        7
    })
    .unwrap();
    guest.join().unwrap();
    assert_eq!(out, 7);
    // Four whole 100 ms windows fit in 450 ms (the machine may be slow:
    // at least two).
    assert!((2..=4).contains(&windows.len()), "{windows:?}");
    // What the windows harvested plus what is left in the log: every page
    // the guest wrote, each once.
    vm.harvest_dirty_log(&mut next).unwrap();
    assert_eq!(next.count(), 140);
    assert!(windows.iter().sum::<u64>() <= 140);
    assert!(windows.iter().any(|&n| n >= 40), "{windows:?}");
}
