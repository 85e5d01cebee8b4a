//! The study loop: links × repetitions × workloads × policies.
//!
//! Order: each link is set up once (and measured with plain TCP), then the
//! repetitions run in the outer loop, so an interrupted study has complete
//! repetitions of every workload and policy rather than all repetitions of
//! a few. Each run's record is saved as soon as it ends. On a stop request
//! the current run is abandoned (its processes stopped, its row not
//! recorded), the link is torn down, and what was measured is summarised.

use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use thiserror::Error;

use super::baseline;
use super::config::{load_profile, load_study, ConfigError, LinkConfig, LinkKind};
use super::link::{sweep_stale, VethLink};
use super::output::{LinkRecord, OutputError, Results};
use super::plan::{error_row, label_qemu, order, progress_line, qemu_runs, qemu_setup, Job};
use super::procs::Stop;
use super::qemu::{free_port, run_qemu, QemuEnv};
use super::record::{Outcome, RunRow};
use super::run::{run_vmigrate, RunEnv};
use super::summary::{markdown_table, SummaryRow};

/// What to run and where things are.
#[derive(Debug, Clone)]
pub struct Options {
    /// The study file.
    pub config: PathBuf,
    /// Results folder (default: `<config dir>/results/<study name>`).
    pub out: Option<PathBuf>,
    /// The `vmigrate` binary.
    pub vmigrate: PathBuf,
    /// The `tcp-baseline` binary.
    pub tcp_baseline: PathBuf,
    /// Only these workloads (empty: all).
    pub only: Vec<String>,
    /// Only these links (empty: all).
    pub links: Vec<String>,
    /// Only these policy labels (empty: all).
    pub policies: Vec<String>,
    /// Repetitions instead of the study's.
    pub reps: Option<u32>,
    /// First repetition to run (default 1): `--first-rep 2 --reps 3` adds
    /// repetitions 2 and 3 to a folder that has the first.
    pub first_rep: u32,
    /// Discard earlier results in the folder.
    pub fresh: bool,
    /// README whose table block to regenerate (None: leave it).
    pub readme: Option<PathBuf>,
    /// Run the QEMU rows when the study asks for them.
    pub qemu: bool,
    /// Check the files and print the plan, run nothing.
    pub dry_run: bool,
}

/// What a study produced.
#[derive(Debug)]
pub struct StudyReport {
    /// Results folder.
    pub dir: PathBuf,
    /// The summary (all runs in the folder).
    pub summary: Vec<SummaryRow>,
    /// The summary as a Markdown table.
    pub table: String,
    /// SVG files written.
    pub plots: Vec<PathBuf>,
    /// Runs carried out now.
    pub runs: usize,
    /// Of those, runs that produced no measurement.
    pub errors: usize,
    /// A stop request cut the study short.
    pub stopped: bool,
}

/// The study could not run.
#[derive(Debug, Error)]
pub enum StudyError {
    /// Bad study or profile file.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// Results could not be written.
    #[error(transparent)]
    Output(#[from] OutputError),
    /// A filter names nothing in the study.
    #[error("{0}")]
    Filter(String),
    /// The scratch folder could not be created.
    #[error("cannot create scratch folder {path}")]
    Scratch {
        /// The folder.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
}

/// A scratch folder removed on drop.
struct Scratch(PathBuf);

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn keep(filter: &[String], name: &str) -> bool {
    filter.is_empty() || filter.iter().any(|f| f == name)
}

fn check_filter(filter: &[String], known: &[&str], what: &str) -> Result<(), StudyError> {
    match filter.iter().find(|f| !known.contains(&f.as_str())) {
        Some(f) => Err(StudyError::Filter(format!(
            "{what} {f:?} is not in the study (it has: {})",
            known.join(", ")
        ))),
        None => Ok(()),
    }
}

/// Runs the study in `opts`, printing progress through `say`.
///
/// # Errors
/// [`StudyError`] for bad input files or unwritable results; failed and
/// impossible runs are results, not errors.
pub fn run_study(
    opts: &Options,
    stop: &Stop,
    say: &mut dyn FnMut(&str),
) -> Result<StudyReport, StudyError> {
    let study = load_study(&opts.config)?;
    let base = opts.config.parent().unwrap_or(Path::new("."));
    check_filter(
        &opts.only,
        &study
            .workloads
            .iter()
            .map(String::as_str)
            .collect::<Vec<_>>(),
        "workload",
    )?;
    check_filter(
        &opts.links,
        &study
            .links
            .iter()
            .map(|l| l.name.as_str())
            .collect::<Vec<_>>(),
        "link",
    )?;
    let mut labels: Vec<&str> = study.policies.iter().map(|p| p.label.as_str()).collect();
    labels.extend(
        study
            .qemu
            .iter()
            .flat_map(|q| q.policies.iter().map(|p| p.label.as_str())),
    );
    check_filter(&opts.policies, &labels, "policy")?;

    let profiles_dir = base.join(&study.profiles_dir);
    let mut profiles = Vec::new();
    for w in study.workloads.iter().filter(|w| keep(&opts.only, w)) {
        let p = load_profile(&profiles_dir, w)?;
        if let Some(e) = &p.spec_error {
            say(&format!(
                "warning: profile {}: {e} (its runs will be recorded as errors)",
                p.name
            ));
        }
        profiles.push(p);
    }
    let qemu = qemu_setup(&study, opts);
    let reps = opts.reps.unwrap_or(study.repetitions);
    let first_rep = opts.first_rep.max(1);
    if first_rep > reps {
        return Err(StudyError::Filter(format!(
            "--first-rep {first_rep} is above the {reps} repetitions"
        )));
    }
    let rep_count = reps - first_rep + 1;
    let links: Vec<&LinkConfig> = study
        .links
        .iter()
        .filter(|l| keep(&opts.links, &l.name))
        .collect();
    let policies: Vec<_> = study
        .policies
        .iter()
        .filter(|p| keep(&opts.policies, &p.label))
        .collect();
    let qpolicies: Vec<_> = match (&study.qemu, &qemu) {
        (Some(q), Some(_)) => q
            .policies
            .iter()
            .filter(|p| keep(&opts.policies, &p.label))
            .collect(),
        _ => Vec::new(),
    };
    let with_qemu = profiles
        .iter()
        .filter(|p| qemu_runs(&study, &p.name))
        .count();
    let vmigrate_runs: usize = profiles
        .iter()
        .map(|pr| policies.iter().filter(|p| p.applies_to(pr)).count())
        .sum();
    let per_link = (vmigrate_runs + with_qemu * qpolicies.len()) * rep_count as usize;
    let total = per_link * links.len();
    let worst_s: f64 = links
        .iter()
        .map(|l| {
            per_link as f64 * (study.warmup_s + l.time_cap_s.unwrap_or(study.time_cap_s) + 8.0)
        })
        .sum();
    say(&format!(
        "study {}: {total} runs ({} workloads × {} policies × {} links × {rep_count} reps); at most ~{:.0} min",
        study.name,
        profiles.len(),
        policies
            .iter()
            .filter(|p| profiles.iter().any(|pr| p.applies_to(pr)))
            .count()
            + qpolicies.len(),
        links.len(),
        worst_s / 60.0
    ));
    if opts.dry_run {
        for p in &profiles {
            let status = p.spec_error.as_deref().unwrap_or("ok");
            say(&format!(
                "  {:<20} {:<5} {:<40} {status}",
                p.name, p.mem, p.workload
            ));
        }
        if let Some(Err(e)) = &qemu {
            say(&format!("  QEMU rows: {e}"));
        }
        return Ok(StudyReport {
            dir: opts.out.clone().unwrap_or_default(),
            summary: Vec::new(),
            table: String::new(),
            plots: Vec::new(),
            runs: 0,
            errors: profiles.iter().filter(|p| p.spec_error.is_some()).count(),
            stopped: false,
        });
    }

    for gone in sweep_stale() {
        say(&format!(
            "removed stale namespace {gone} (a killed earlier runner)"
        ));
    }
    let dir = opts
        .out
        .clone()
        .unwrap_or_else(|| base.join("results").join(&study.name));
    let mut results = Results::open(&dir, opts.fresh)?;
    let scratch_path = std::env::temp_dir().join(format!("vmstudy-{}", std::process::id()));
    std::fs::create_dir_all(&scratch_path).map_err(|source| StudyError::Scratch {
        path: scratch_path.clone(),
        source,
    })?;
    let scratch = Scratch(scratch_path);

    let (mut done, mut errors) = (0usize, 0usize);
    'links: for (li, link) in links.iter().enumerate() {
        if stop.requested() {
            break;
        }
        let cap = link.time_cap_s.unwrap_or(study.time_cap_s);
        let rate = link.rate_bps().ok().flatten();
        let mut rec = LinkRecord {
            link: link.name.clone(),
            kind: if link.kind == LinkKind::Veth {
                "veth"
            } else {
                "loopback"
            }
            .into(),
            rate_bps: rate,
            delay_ms: link.delay_ms,
            measured_mbps: None,
            qdisc: String::new(),
            error: None,
            measured_unix: unix_now(),
        };
        let veth = match (link.kind, rate) {
            (LinkKind::Veth, Some(r)) => match VethLink::create(li, r, link.delay_ms) {
                Ok(v) => {
                    rec.qdisc = v.describe();
                    say(&format!(
                        "link {}: namespace {}, {} → {}, {}",
                        link.name,
                        v.netns(),
                        v.source_ip(),
                        v.dest_ip(),
                        rec.qdisc
                    ));
                    Some(v)
                }
                Err(e) => {
                    rec.error = Some(format!("link set-up failed: {e}"));
                    None
                }
            },
            _ => None,
        };
        let (prefix, dest_ip) = match &veth {
            Some(v) => (v.exec_prefix(), v.dest_ip().to_owned()),
            None => (Vec::new(), "127.0.0.1".to_owned()),
        };
        if rec.error.is_none() {
            match baseline::measure(
                &opts.tcp_baseline,
                &prefix,
                &dest_ip,
                study.link_baseline_s,
                &scratch.0,
                stop,
            ) {
                Ok(mbps) => {
                    rec.measured_mbps = Some(mbps);
                    say(&format!("link {}: plain TCP {mbps:.0} Mbit/s", link.name));
                }
                Err(e) => {
                    say(&format!("link {}: TCP baseline failed: {e}", link.name));
                    rec.error = Some(format!("TCP baseline: {e}"));
                }
            }
        }
        let link_error = rec
            .error
            .clone()
            .filter(|_| link.kind == LinkKind::Veth && veth.is_none());
        let link_mbps = rec.measured_mbps;
        results.set_link(rec);
        results.save()?;
        let env = RunEnv {
            vmigrate: &opts.vmigrate,
            dest_prefix: prefix,
            dest_ip,
            time_cap_s: cap,
            warmup_s: study.warmup_s,
            stop,
        };
        for rep in first_rep..=reps {
            for profile in &profiles {
                let jobs = policies
                    .iter()
                    .filter(|p| p.applies_to(profile))
                    .map(|p| Job::Vmigrate(p))
                    .chain(
                        qpolicies
                            .iter()
                            .map(|p| Job::Qemu(p))
                            .filter(|_| qemu_runs(&study, &profile.name)),
                    );
                for job in jobs {
                    let mut row = RunRow {
                        study: study.name.clone(),
                        engine: "vmigrate".into(),
                        workload: profile.name.clone(),
                        spec: profile.workload.clone(),
                        mem: profile.mem_bytes,
                        link: link.name.clone(),
                        rep,
                        link_mbps,
                        started_unix: unix_now(),
                        ..RunRow::default()
                    };
                    let work = scratch.0.join(format!("run-{done}"));
                    let record = match (&job, &link_error, &qemu) {
                        (_, Some(e), _) => error_row(row, &job, e, qemu.as_ref()),
                        (Job::Vmigrate(p), None, _) => {
                            row.policy = p.label.clone();
                            row.policy_name = p.policy.clone();
                            row.downtime_limit_ms = p.downtime_limit_ms;
                            run_vmigrate(&env, &work, profile, p, row)
                        }
                        (Job::Qemu(p), None, Some(Ok((binary, version, boot)))) => {
                            label_qemu(&mut row, p, version);
                            let port = if veth.is_some() {
                                Some(47_000)
                            } else {
                                free_port("127.0.0.1")
                            };
                            let q = QemuEnv {
                                binary,
                                boot_timeout_s: *boot,
                                port: port.unwrap_or(47_000),
                            };
                            run_qemu(&env, &q, &work, profile, p, row)
                        }
                        (Job::Qemu(..), None, _) => error_row(row, &job, "", qemu.as_ref()),
                    };
                    let _ = std::fs::remove_dir_all(&work);
                    if stop.requested() {
                        break 'links;
                    }
                    done += 1;
                    if record.row.outcome == Some(Outcome::Error) {
                        errors += 1;
                    }
                    say(&progress_line(done, total, &record));
                    results.add_run(record);
                    results.save()?;
                }
            }
        }
        drop(veth);
    }
    let order = order(&study, &qemu);
    let (summary, plots) = results.finish(&study.name, &order, opts.readme.as_deref())?;
    Ok(StudyReport {
        dir: results.dir().to_owned(),
        table: markdown_table(&summary),
        summary,
        plots,
        runs: done,
        errors,
        stopped: stop.requested(),
    })
}
