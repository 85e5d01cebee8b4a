//! The study's input files: `study.toml` (what to run) and the workload
//! profiles in `workloads/*.toml` (what each guest is).
//!
//! Both are plain TOML so that anyone can change a study without touching
//! code, and both are checked completely before the first guest starts: a
//! typo found after an hour of migrations wastes the hour. A workload spec
//! that does not parse is the one exception (the workload generators evolve
//! independently of the runner): its profile loads, and its runs are
//! recorded as errors with the parser's message.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use thiserror::Error;

use crate::size::parse_size;
use crate::workload::{build, BuildParams, WorkloadSpec};

/// Why a study or profile file could not be used.
#[derive(Debug, Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read {path}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The file is not valid TOML for its schema.
    #[error("{path}: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// The TOML parser's message (line and column included).
        message: String,
    },
    /// A value that parses but makes no sense.
    #[error("{path}: {message}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
}

/// `study.toml`: one study.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StudyConfig {
    /// Study name: results go to `results/<name>/`.
    pub name: String,
    /// What the study shows (free text).
    #[serde(default)]
    pub description: String,
    /// Profile names (files `<profiles_dir>/<name>.toml`).
    pub workloads: Vec<String>,
    /// Policies, each run on every workload and link.
    pub policies: Vec<PolicyConfig>,
    /// Links, each set up once and used for every run on it.
    pub links: Vec<LinkConfig>,
    /// Runs per workload × policy × link.
    pub repetitions: u32,
    /// Seconds a migration may take; one that has not completed by then is
    /// a failure (the way QEMU's default never finishes).
    pub time_cap_s: f64,
    /// Seconds the guest runs after boot before the migration starts (its
    /// speed is measured over this window).
    pub warmup_s: f64,
    /// Seconds of plain TCP streaming per link to measure its throughput.
    #[serde(default = "default_baseline_s")]
    pub link_baseline_s: f64,
    /// Folder of the workload profiles, relative to the study file.
    #[serde(default = "default_profiles_dir")]
    pub profiles_dir: String,
    /// QEMU side by side (optional).
    #[serde(default)]
    pub qemu: Option<QemuConfig>,
}

fn default_baseline_s() -> f64 {
    3.0
}

fn default_profiles_dir() -> String {
    "workloads".into()
}

/// One policy as run by `vmigrate send`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicyConfig {
    /// Label in results and plots (`qemu-2000ms`).
    pub label: String,
    /// `--policy` name (`qemu`, `xen`, `mp`, ...).
    pub policy: String,
    /// `--downtime-limit` in milliseconds.
    #[serde(default = "default_downtime_ms")]
    pub downtime_limit_ms: u64,
    /// `--param KEY=VALUE` settings (values may be TOML strings or numbers).
    #[serde(default)]
    pub params: BTreeMap<String, toml::Value>,
    /// `--max-bandwidth` (bytes/s, K/M/G suffixes), none by default.
    #[serde(default)]
    pub max_bandwidth: Option<String>,
    /// Run this policy only on profiles whose `dirty_track` is this one
    /// (`ring` for `dirty-limit`, which needs per-vCPU counts and refuses
    /// the bitmap): elsewhere it is not planned, rather than recorded as a
    /// failure.
    #[serde(default)]
    pub only_dirty_track: Option<String>,
    /// `send --skip-unchanged`: leave out dirty pages whose content the
    /// destination already holds.
    #[serde(default)]
    pub skip_unchanged: bool,
}

fn default_downtime_ms() -> u64 {
    300
}

impl PolicyConfig {
    /// Whether this policy runs on `profile` (see
    /// [`PolicyConfig::only_dirty_track`]).
    #[must_use]
    pub fn applies_to(&self, profile: &Profile) -> bool {
        match &self.only_dirty_track {
            Some(t) => profile.dirty_track.as_deref() == Some(t.as_str()),
            None => true,
        }
    }

    /// The `--param` arguments, `KEY=VALUE`, in key order.
    #[must_use]
    pub fn param_args(&self) -> Vec<String> {
        self.params
            .iter()
            .map(|(k, v)| match v {
                toml::Value::String(s) => format!("{k}={s}"),
                other => format!("{k}={other}"),
            })
            .collect()
    }
}

/// The kind of a link.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum LinkKind {
    /// 127.0.0.1, both processes in the root network namespace, unshaped.
    Loopback,
    /// A veth pair into a private network namespace, shaped with `tc`.
    Veth,
}

/// One network link between source and destination.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LinkConfig {
    /// Label in results (`1gbit`).
    pub name: String,
    /// Loopback or an emulated veth link.
    pub kind: LinkKind,
    /// Veth only: `tc` rate, e.g. `1gbit`, `10gbit`, `500mbit`.
    #[serde(default)]
    pub rate: Option<String>,
    /// Veth only: one-way delay added by `netem`, milliseconds.
    #[serde(default)]
    pub delay_ms: Option<f64>,
    /// Overrides the study's `time_cap_s` on this link.
    #[serde(default)]
    pub time_cap_s: Option<f64>,
}

impl LinkConfig {
    /// The shaping rate in bits per second (veth links).
    ///
    /// # Errors
    /// A message when `rate` is missing or not `<number><kbit|mbit|gbit>`.
    pub fn rate_bps(&self) -> Result<Option<u64>, String> {
        match (&self.kind, &self.rate) {
            (LinkKind::Loopback, None) => Ok(None),
            (LinkKind::Loopback, Some(_)) => {
                Err(format!("link {}: loopback takes no rate", self.name))
            }
            (LinkKind::Veth, None) => Err(format!("link {}: a veth link needs `rate`", self.name)),
            (LinkKind::Veth, Some(r)) => parse_rate(r).map(Some).ok_or_else(|| {
                format!(
                    "link {}: bad rate {r:?} (expected e.g. 1gbit, 500mbit)",
                    self.name
                )
            }),
        }
    }
}

/// Parses a `tc` rate: `1gbit`, `10gbit`, `500mbit`, `800kbit`, `1000000bit`.
#[must_use]
pub fn parse_rate(s: &str) -> Option<u64> {
    let s = s.trim().to_ascii_lowercase();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (n, unit) = s.split_at(split);
    let n: u64 = n.parse().ok()?;
    let mult = match unit {
        "bit" => 1,
        "kbit" => 1_000,
        "mbit" => 1_000_000,
        "gbit" => 1_000_000_000,
        _ => return None,
    };
    n.checked_mul(mult).filter(|&v| v > 0)
}

/// `[qemu]`: the same workloads in QEMU, beside vmigrate.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QemuConfig {
    /// Run QEMU rows at all.
    #[serde(default = "yes")]
    pub enabled: bool,
    /// The QEMU binary.
    #[serde(default = "default_qemu_binary")]
    pub binary: String,
    /// Seconds to wait for the guest's boot mark (SeaBIOS is slow here).
    #[serde(default = "default_boot_timeout")]
    pub boot_timeout_s: f64,
    /// Only these workloads get QEMU rows (default: all of the study's);
    /// each QEMU run spends seconds in SeaBIOS before the guest starts.
    #[serde(default)]
    pub workloads: Option<Vec<String>>,
    /// QEMU settings to compare; each row is labelled `qemu-<version>:<label>`.
    pub policies: Vec<QemuPolicyConfig>,
}

fn yes() -> bool {
    true
}

fn default_qemu_binary() -> String {
    "qemu-system-x86_64".into()
}

fn default_boot_timeout() -> f64 {
    60.0
}

/// One QEMU migration setting.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QemuPolicyConfig {
    /// Label after `qemu-<version>:`.
    pub label: String,
    /// `downtime-limit` in milliseconds.
    #[serde(default = "default_downtime_ms")]
    pub downtime_limit_ms: u64,
    /// The `auto-converge` capability.
    #[serde(default)]
    pub auto_converge: bool,
    /// `max-bandwidth` in bytes/s (K/M/G suffixes); none = unlimited, as
    /// vmigrate's own runs are.
    #[serde(default)]
    pub max_bandwidth: Option<String>,
}

/// A workload profile file, `workloads/<name>.toml`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct ProfileFile {
    name: String,
    description: String,
    workload: String,
    mem: String,
    #[serde(default = "default_mark")]
    mark: String,
    #[serde(default = "default_vcpus")]
    vcpus: u32,
    #[serde(default)]
    dirty_track: Option<String>,
}

fn default_mark() -> String {
    ".".into()
}

fn default_vcpus() -> u32 {
    1
}

/// A loaded workload profile.
#[derive(Debug, Clone)]
pub struct Profile {
    /// Profile name (the file's stem).
    pub name: String,
    /// What the guest does and why it is in the study.
    pub description: String,
    /// The `vmigrate run --workload` spec.
    pub workload: String,
    /// The `--mem` string as written.
    pub mem: String,
    /// Guest RAM in bytes.
    pub mem_bytes: u64,
    /// The COM1 byte printed once per pass, whose rate measures guest speed.
    pub mark: u8,
    /// Why the spec cannot be used, if it cannot (runs become errors).
    pub spec_error: Option<String>,
    /// The guest needs VMM-written content, so a QEMU run boots it without
    /// that content and is not the same guest.
    pub needs_vmm_content: bool,
    /// vCPUs of the guest (`vmigrate run --vcpus`; default 1).
    pub vcpus: u32,
    /// `vmigrate run --dirty-track` for the source (`None`: the default,
    /// the bitmap); `dirty-limit` needs `ring`.
    pub dirty_track: Option<String>,
}

/// Reads and checks a study file.
///
/// # Errors
/// [`ConfigError`] for an unreadable file, bad TOML, or inconsistent values
/// (empty lists, duplicate labels, non-positive times, bad link rates).
pub fn load_study(path: &Path) -> Result<StudyConfig, ConfigError> {
    let text = read(path)?;
    let study: StudyConfig = toml::from_str(&text).map_err(|e| ConfigError::Parse {
        path: path.to_owned(),
        message: e.to_string(),
    })?;
    let invalid = |message: String| ConfigError::Invalid {
        path: path.to_owned(),
        message,
    };
    if study.name.is_empty()
        || !study
            .name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
    {
        return Err(invalid(format!(
            "name {:?}: use letters, digits, - _ .",
            study.name
        )));
    }
    for (what, empty) in [
        ("workloads", study.workloads.is_empty()),
        ("policies", study.policies.is_empty()),
        ("links", study.links.is_empty()),
    ] {
        if empty {
            return Err(invalid(format!("`{what}` is empty")));
        }
    }
    if study.repetitions == 0 {
        return Err(invalid("repetitions must be at least 1".into()));
    }
    let caps = study.links.iter().filter_map(|l| l.time_cap_s);
    for (what, v) in [
        ("time_cap_s", study.time_cap_s),
        ("link_baseline_s", study.link_baseline_s),
    ]
    .into_iter()
    .chain(caps.map(|c| ("a link's time_cap_s", c)))
    {
        if !(v.is_finite() && v > 0.0) {
            return Err(invalid(format!(
                "{what} must be a positive number of seconds"
            )));
        }
    }
    if !(study.warmup_s.is_finite() && study.warmup_s >= 0.0) {
        return Err(invalid("warmup_s must be ≥ 0".into()));
    }
    check_unique(
        study.policies.iter().map(|p| p.label.as_str()),
        "policy label",
    )
    .map_err(invalid)?;
    check_unique(study.links.iter().map(|l| l.name.as_str()), "link name").map_err(invalid)?;
    check_unique(study.workloads.iter().map(String::as_str), "workload").map_err(invalid)?;
    for l in &study.links {
        l.rate_bps().map_err(invalid)?;
        if l.delay_ms.is_some_and(|d| !(d.is_finite() && d >= 0.0))
            || (l.kind == LinkKind::Loopback && l.delay_ms.is_some())
        {
            return Err(invalid(format!(
                "link {}: delay_ms needs a veth link and a value ≥ 0",
                l.name
            )));
        }
    }
    if let Some(q) = &study.qemu {
        check_unique(
            q.policies.iter().map(|p| p.label.as_str()),
            "qemu policy label",
        )
        .map_err(invalid)?;
        if let Some(w) = q
            .workloads
            .iter()
            .flatten()
            .find(|w| !study.workloads.contains(w))
        {
            return Err(invalid(format!(
                "qemu.workloads: {w:?} is not one of the study's workloads"
            )));
        }
    }
    Ok(study)
}

fn check_unique<'a>(items: impl Iterator<Item = &'a str>, what: &str) -> Result<(), String> {
    let mut seen = std::collections::HashSet::new();
    for i in items {
        if !seen.insert(i) {
            return Err(format!("{what} {i:?} appears twice"));
        }
    }
    Ok(())
}

/// Reads the profile `<dir>/<name>.toml`.
///
/// # Errors
/// [`ConfigError`] when the file is missing or malformed, its `name` differs
/// from the file name, or its `mem`/`mark` are unusable. A workload spec
/// that does not parse or build is not an error here: it is kept in
/// [`Profile::spec_error`].
pub fn load_profile(dir: &Path, name: &str) -> Result<Profile, ConfigError> {
    let path = dir.join(format!("{name}.toml"));
    let text = read(&path)?;
    let file: ProfileFile = toml::from_str(&text).map_err(|e| ConfigError::Parse {
        path: path.clone(),
        message: e.to_string(),
    })?;
    let invalid = |message: String| ConfigError::Invalid {
        path: path.clone(),
        message,
    };
    if file.name != name {
        return Err(invalid(format!(
            "name {:?} differs from the file name {name:?}",
            file.name
        )));
    }
    let mem_bytes = parse_size(&file.mem).map_err(|e| invalid(format!("mem: {e}")))?;
    let mark = match file.mark.as_bytes() {
        [b] if b.is_ascii_graphic() => *b,
        _ => {
            return Err(invalid(format!(
                "mark {:?}: expected one printable ASCII character",
                file.mark
            )))
        }
    };
    if file.vcpus == 0 {
        return Err(invalid("vcpus must be at least 1".into()));
    }
    if let Some(t) = file.dirty_track.as_deref() {
        if !["bitmap", "ring", "auto"].contains(&t) {
            return Err(invalid(format!(
                "dirty_track {t:?}: expected bitmap, ring or auto"
            )));
        }
    }
    let (spec_error, needs_vmm_content) = match check_spec(&file.workload, mem_bytes, file.vcpus) {
        Ok(needs) => (None, needs),
        Err(e) => (Some(e), false),
    };
    Ok(Profile {
        name: file.name,
        description: file.description,
        workload: file.workload,
        mem: file.mem,
        mem_bytes,
        mark,
        spec_error,
        needs_vmm_content,
        vcpus: file.vcpus,
        dirty_track: file.dirty_track,
    })
}

/// Parses and builds a spec for `mem` bytes of RAM (with a nominal TSC rate
/// so that paced workloads build); returns whether it needs VMM content.
fn check_spec(spec: &str, mem: u64, vcpus: u32) -> Result<bool, String> {
    let parsed: WorkloadSpec = spec
        .parse()
        .map_err(|e| format!("workload `{spec}`: {e}"))?;
    let params = BuildParams {
        mem_size: mem,
        tsc_hz: Some(2_000_000_000),
        vcpus,
    };
    build(&parsed, &params)
        .map(|image| image.needs_vmm_content)
        .map_err(|e| format!("workload `{spec}` for {mem} bytes: {e}"))
}

fn read(path: &Path) -> Result<String, ConfigError> {
    std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_owned(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates() {
        assert_eq!(parse_rate("1gbit"), Some(1_000_000_000));
        assert_eq!(parse_rate("10Gbit"), Some(10_000_000_000));
        assert_eq!(parse_rate("500mbit"), Some(500_000_000));
        assert_eq!(parse_rate("1000bit"), Some(1000));
        assert_eq!(parse_rate("1g"), None);
        assert_eq!(parse_rate("0gbit"), None);
        assert_eq!(parse_rate("gbit"), None);
    }

    /// A policy limited to the ring is planned on ring profiles only.
    #[test]
    fn a_ring_only_policy_applies_to_ring_profiles() {
        let dir = std::env::temp_dir().join(format!("study-ring-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let profile = "description = \"d\"\nworkload = \"sweep\"\nmem = \"256M\"\n";
        std::fs::write(dir.join("b.toml"), format!("name = \"b\"\n{profile}")).unwrap();
        std::fs::write(
            dir.join("r.toml"),
            format!("name = \"r\"\n{profile}dirty_track = \"ring\"\n"),
        )
        .unwrap();
        let (bitmap, ring) = (
            load_profile(&dir, "b").unwrap(),
            load_profile(&dir, "r").unwrap(),
        );
        let mut policy: PolicyConfig =
            toml::from_str("label = \"dl\"\npolicy = \"dirty-limit\"\nonly_dirty_track = \"ring\"")
                .unwrap();
        assert!(!policy.applies_to(&bitmap) && policy.applies_to(&ring));
        policy.only_dirty_track = None;
        assert!(policy.applies_to(&bitmap) && policy.applies_to(&ring));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn study_round_trip_and_checks() {
        let dir = std::env::temp_dir().join(format!("study-cfg-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let good = r#"
            name = "t"
            workloads = ["idle-256m"]
            repetitions = 1
            time_cap_s = 10
            warmup_s = 1
            [[policies]]
            label = "mp"
            policy = "mp"
            params = { window = 3, mode = "fast" }
            [[links]]
            name = "1gbit"
            kind = "veth"
            rate = "1gbit"
        "#;
        let p = dir.join("s.toml");
        std::fs::write(&p, good).unwrap();
        let s = load_study(&p).unwrap();
        assert_eq!(s.policies[0].param_args(), ["mode=fast", "window=3"]);
        assert_eq!(s.links[0].rate_bps(), Ok(Some(1_000_000_000)));
        std::fs::write(&p, good.replace("rate = \"1gbit\"", "")).unwrap();
        assert!(matches!(load_study(&p), Err(ConfigError::Invalid { .. })));
        std::fs::write(
            &p,
            good.replace("repetitions = 1", "repetitions = 1\nbogus = 2"),
        )
        .unwrap();
        assert!(matches!(load_study(&p), Err(ConfigError::Parse { .. })));

        std::fs::write(
            dir.join("w.toml"),
            "name = \"w\"\ndescription = \"d\"\nworkload = \"sweep\"\nmem = \"256M\"\n",
        )
        .unwrap();
        let w = load_profile(&dir, "w").unwrap();
        assert_eq!(
            (w.mem_bytes, w.mark, w.spec_error.is_none()),
            (256 << 20, b'.', true)
        );
        std::fs::write(
            dir.join("x.toml"),
            "name = \"x\"\ndescription = \"d\"\nworkload = \"nosuch:a=1\"\nmem = \"256M\"\n",
        )
        .unwrap();
        assert!(load_profile(&dir, "x").unwrap().spec_error.is_some());
        assert!(matches!(
            load_profile(&dir, "w2"),
            Err(ConfigError::Read { .. })
        ));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
