//! The performance study: does the MP policy migrate memory-intensive
//! guests that QEMU's pre-copy never finishes, in less time and with fewer
//! bytes than QEMU's ways out (relaxed downtime, auto-converge), without
//! harming guests that converge anyway?
//!
//! A claim like that is only as good as the data behind it, and data only
//! as good as the ability of someone else to re-run it. So the study is
//! files, not code: workload profiles (`bench-data/workloads/*.toml`) and a
//! study file (`bench-data/study.toml`: workloads × policies × links ×
//! repetitions, a time cap, a warm-up) that `vmigrate-study` runs end to
//! end on real KVM guests, with real `vmigrate` processes, over loopback or
//! emulated links it builds itself, writing every run, a summary, SVG
//! charts and the README table.
//!
//! | module | its job |
//! |---|---|
//! | [`config`] | read and check the study and profile files |
//! | [`runner`] | the loop: links × repetitions × workloads × policies |
//! | `plan` | which runs exist, how rows are labelled, the progress line |
//! | [`run`] | one vmigrate migration between fresh processes |
//! | [`qemu`], [`qmp`] | the same migration done by QEMU, for comparison |
//! | [`marks`] | guest speed from the COM1 pass marks |
//! | [`link`] | veth + netns + `tc` links, and their teardown |
//! | [`baseline`] | plain TCP throughput of each link |
//! | [`procs`] | child processes that never outlive the runner; Ctrl-C |
//! | [`record`] | the per-run row, read from a migration report |
//! | [`summary`], [`plot`], [`output`] | summary CSV, charts, README table |

pub mod baseline;
pub mod config;
pub mod link;
pub mod marks;
pub mod output;
mod plan;
pub mod plot;
pub mod procs;
pub mod qemu;
pub mod qmp;
pub mod record;
pub mod run;
pub mod runner;
pub mod summary;

pub use runner::{run_study, Options, StudyError, StudyReport};
