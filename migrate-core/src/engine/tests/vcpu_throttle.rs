//! `Decision::ThrottleVcpus`: the engine applies it and records each vCPU's
//! throttle in the report.

use super::*;

/// Throttles vCPU 0 after iteration 0, stops after iteration 1.
struct ThrottleVcpu0;
impl policy::ConvergencePolicy for ThrottleVcpu0 {
    fn name(&self) -> &'static str {
        "throttle-vcpu0"
    }
    fn decide(&mut self, h: &policy::MigrationHistory) -> policy::Decision {
        match h.last().map_or(0, |s| s.iteration) {
            0 => policy::Decision::ThrottleVcpus(vec![0.5, 0.0]),
            _ => policy::Decision::StopAndCopy(policy::StopReason::Other("test".into())),
        }
    }
}

#[test]
fn throttle_vcpus_reaches_the_vm_and_the_report() {
    let src = FakeVm::new(SIZE);
    src.running.store(true, Ordering::SeqCst);
    let (a, b) = UnixStream::pair().unwrap();
    let dest = std::thread::spawn(move || {
        receive_migration(Stream::Unix(b), &ReceiveOptions::default(), |_| {
            Ok(FakeVm::new(SIZE))
        })
    });
    let mut opts = options(CompressMode::None);
    opts.policy = Box::new(ThrottleVcpu0);
    let report = send_migration(&src, Stream::Unix(a), opts);
    let dst = dest.join().unwrap().unwrap().vm;
    assert_eq!(report.status, MigrationStatus::Completed, "{report:?}");
    assert_same_memory(&src, &dst);
    // The fake VM has one shared throttle: the trait's default gives every
    // vCPU the highest fraction asked, and the report says so.
    assert!((*src.throttle.lock().unwrap() - 0.5).abs() < 1e-9);
    assert_eq!(report.vcpu_throttle, [0.5, 0.5]);
    assert!((report.cpu_throttle_percentage - 50.0).abs() < 1e-9);
    assert!(report.iterations[0].vcpu_throttle.is_empty());
    assert_eq!(report.iterations[1].vcpu_throttle, [0.5, 0.5]);
    // No dirty rings: no per-vCPU counts.
    assert!(report
        .iterations
        .iter()
        .all(|i| i.vcpu_dirty_pages.is_empty()));
}

#[test]
fn per_iteration_counts_are_differences() {
    use super::super::precopy::per_iteration;
    let mut before = Some(vec![10, 5]);
    assert_eq!(per_iteration(&mut before, Some(vec![15, 5])), [5, 0]);
    assert_eq!(before, Some(vec![15, 5]));
    // A reading that shrank (not expected) counts 0, a new vCPU from 0.
    assert_eq!(per_iteration(&mut before, Some(vec![14, 7, 3])), [0, 2, 3]);
    assert!(per_iteration(&mut None, None).is_empty());
    assert!(per_iteration(&mut Some(vec![1]), None).is_empty());
}
