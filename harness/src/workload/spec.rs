//! Parsing and printing of workload specs (`name[:key=value,...]`).
//!
//! The spec string is how a person (CLI, scenario files) names a workload;
//! [`WorkloadSpec`]'s `Display` prints the canonical form, which parses back
//! to the same value. Only what can be checked without knowing the VM is
//! checked here (syntax, keys, numbers, modes, start ≥ 1 MiB, end > start,
//! keys that exclude each other); range versus RAM size and durations versus
//! the TSC are checked by [`build`](super::build). Serde uses the same string
//! form, so scenario files and reports can hold specs as strings.
//!
//! Grammar (names and keys case-insensitive, blanks around tokens ignored,
//! keys in any order, each at most once; SIZE as [`parse_size`], COUNT a
//! decimal or `0x` hex integer):
//!
//! ```text
//! idle
//! sweep[:start=SIZE,end=SIZE,mode=inc|same|zero]
//! hotset[:wss=SIZE,rate=COUNT,writers=COUNT]
//! burst[:start=SIZE,end=SIZE|wss=SIZE,quiet=COUNT,quiet-wss=SIZE,storm=COUNT,cycles=COUNT]
//! verify[:start=SIZE,end=SIZE]
//! ```
//!
//! Canonical forms (what `Display` prints) list keys in the order above and
//! leave out defaults that are represented as "not given": `sweep` omits
//! `mode=inc`; `hotset` always prints `wss`; `burst` prints `start`, `end` and
//! `wss` only when given, `quiet` and `storm` always, `quiet-wss` when given,
//! `cycles` when nonzero.

use std::collections::HashSet;

use super::*;

/// Keys accepted by verify.
const VERIFY_KEYS: &str = "start, end, seq";
/// Keys accepted by sweep.
const SWEEP_KEYS: &str = "start, end, mode";
/// Keys accepted by hotset.
const HOTSET_KEYS: &str = "wss, rate, writers";
/// Keys accepted by burst.
const BURST_KEYS: &str = "start, end, wss, quiet, quiet-wss, storm, cycles";

impl FromStr for WorkloadSpec {
    type Err = WorkloadError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim();
        let (name, params) = match s.split_once(':') {
            Some((n, p)) => (n.trim(), Some(p)),
            None => (s, None),
        };
        let mut pairs = Vec::new();
        if let Some(params) = params {
            let mut seen = HashSet::new();
            for item in params.split(',') {
                let (k, v) = item
                    .split_once('=')
                    .map(|(k, v)| (k.trim(), v.trim()))
                    .filter(|(k, v)| !k.is_empty() && !v.is_empty())
                    .ok_or_else(|| WorkloadError::MalformedParam(item.trim().to_owned()))?;
                if !seen.insert(k.to_ascii_lowercase()) {
                    return Err(WorkloadError::DuplicateKey(k.to_owned()));
                }
                pairs.push((k.to_ascii_lowercase(), v));
            }
        }
        match name.to_ascii_lowercase().as_str() {
            "idle" => match pairs.first() {
                Some((k, _)) => Err(WorkloadError::UnknownKey {
                    workload: "idle",
                    key: k.clone(),
                    allowed: "none",
                }),
                None => Ok(WorkloadSpec::Idle),
            },
            "halt" => match pairs.first() {
                Some((k, _)) => Err(WorkloadError::UnknownKey {
                    workload: "halt",
                    key: k.clone(),
                    allowed: "none",
                }),
                None => Ok(WorkloadSpec::Halt),
            },
            "sweep" => {
                let mut mode = SweepMode::Inc;
                let mut range = Vec::new();
                for (k, v) in pairs {
                    if k == "mode" {
                        mode = v.parse()?;
                    } else {
                        range.push((k, v));
                    }
                }
                let (start, end) = parse_range("sweep", &range, SWEEP_KEYS)?;
                Ok(WorkloadSpec::Sweep { start, end, mode })
            }
            "verify" => {
                let mut seq = false;
                let mut range = Vec::new();
                for (k, v) in pairs {
                    if k == "seq" {
                        seq = match v {
                            "1" | "on" | "true" => true,
                            "0" | "off" | "false" => false,
                            _ => return Err(unknown("verify", &format!("seq={v}"), VERIFY_KEYS)),
                        };
                    } else {
                        range.push((k, v));
                    }
                }
                let (start, end) = parse_range("verify", &range, VERIFY_KEYS)?;
                Ok(WorkloadSpec::Verify { start, end, seq })
            }
            "burst" => parse_burst(&pairs),
            "hotset" => {
                let mut wss = DEFAULT_HOTSET_WSS;
                let mut rate = None;
                let mut writers = None;
                for (k, v) in &pairs {
                    match k.as_str() {
                        "wss" => wss = size("wss", v)?,
                        "rate" => rate = Some(count("rate", v)?),
                        "writers" => writers = Some(count_u32("writers", v)?),
                        _ => return Err(unknown("hotset", k, HOTSET_KEYS)),
                    }
                }
                if wss == 0 {
                    return Err(WorkloadError::WssZero);
                }
                check_aligned("working-set size", wss)?;
                Ok(WorkloadSpec::Hotset { wss, rate, writers })
            }
            _ => Err(WorkloadError::UnknownWorkload(name.to_owned())),
        }
    }
}

fn unknown(workload: &'static str, key: &str, allowed: &'static str) -> WorkloadError {
    WorkloadError::UnknownKey {
        workload,
        key: key.to_owned(),
        allowed,
    }
}

fn size(key: &'static str, value: &str) -> Result<u64, WorkloadError> {
    parse_size(value).map_err(|source| WorkloadError::BadSize { key, source })
}

/// A positive integer count (decimal or `0x` hex, no unit suffix).
fn count(key: &'static str, value: &str) -> Result<u64, WorkloadError> {
    match integer(value) {
        Some(n) if n > 0 => Ok(n),
        _ => Err(WorkloadError::BadNumber {
            key,
            value: value.to_owned(),
            expected: "a positive integer",
        }),
    }
}

/// A positive count that fits a `u32`.
fn count_u32(key: &'static str, value: &str) -> Result<u32, WorkloadError> {
    u32::try_from(count(key, value)?).map_err(|_| WorkloadError::BadNumber {
        key,
        value: value.to_owned(),
        expected: "a positive integer below 2^32",
    })
}

/// A non-negative integer count (decimal or `0x` hex, no unit suffix).
fn count_or_zero(key: &'static str, value: &str) -> Result<u64, WorkloadError> {
    integer(value).ok_or_else(|| WorkloadError::BadNumber {
        key,
        value: value.to_owned(),
        expected: "a non-negative integer",
    })
}

fn integer(value: &str) -> Option<u64> {
    match value.get(..2) {
        Some(p) if p.eq_ignore_ascii_case("0x") => u64::from_str_radix(&value[2..], 16).ok(),
        _ => value.parse::<u64>().ok(),
    }
}

/// `start`/`end` of sweep and verify, with the checks that need no RAM size.
fn parse_range(
    workload: &'static str,
    pairs: &[(String, &str)],
    allowed: &'static str,
) -> Result<(Option<u64>, Option<u64>), WorkloadError> {
    let (mut start, mut end) = (None, None);
    for (k, v) in pairs {
        match k.as_str() {
            "start" => start = Some(size("start", v)?),
            "end" => end = Some(size("end", v)?),
            _ => return Err(unknown(workload, k, allowed)),
        }
    }
    check_start_end(start, end)?;
    Ok((start, end))
}

/// The checks of an optional `start`/`end` pair that need no RAM size.
fn check_start_end(start: Option<u64>, end: Option<u64>) -> Result<(), WorkloadError> {
    if let Some(s) = start {
        check_aligned("start", s)?;
        if s < MIN_WORKLOAD_ADDR {
            return Err(WorkloadError::StartBelowMin { start: s });
        }
    }
    if let Some(e) = end {
        check_aligned("end", e)?;
        let s = start.unwrap_or(MIN_WORKLOAD_ADDR);
        if e <= s {
            return Err(WorkloadError::EmptyRange { start: s, end: e });
        }
    }
    Ok(())
}

/// The parameters of `burst`.
fn parse_burst(pairs: &[(String, &str)]) -> Result<WorkloadSpec, WorkloadError> {
    let (mut start, mut end, mut wss) = (None, None, None);
    let mut quiet_ms = DEFAULT_BURST_QUIET_MS;
    let mut storm_ms = DEFAULT_BURST_STORM_MS;
    let mut cycles = 0;
    let mut quiet_wss = None;
    for (k, v) in pairs {
        match k.as_str() {
            "start" => start = Some(size("start", v)?),
            "end" => end = Some(size("end", v)?),
            "wss" => wss = Some(size("wss", v)?),
            "quiet" => quiet_ms = count("quiet", v)?,
            "quiet-wss" => quiet_wss = Some(size("quiet-wss", v)?),
            "storm" => storm_ms = count("storm", v)?,
            "cycles" => cycles = count_or_zero("cycles", v)?,
            _ => return Err(unknown("burst", k, BURST_KEYS)),
        }
    }
    check_start_end(start, end)?;
    if end.is_some() && wss.is_some() {
        return Err(WorkloadError::ConflictingKeys {
            workload: "burst",
            first: "end",
            second: "wss",
        });
    }
    if let Some(w) = wss {
        if w == 0 {
            return Err(WorkloadError::WssZero);
        }
        check_aligned("working-set size", w)?;
    }
    if let Some(q) = quiet_wss {
        if q == 0 {
            return Err(WorkloadError::WssZero);
        }
        check_aligned("quiet working-set size", q)?;
    }
    Ok(WorkloadSpec::Burst {
        start,
        end,
        wss,
        quiet_ms,
        quiet_wss,
        storm_ms,
        cycles,
    })
}

/// Writes `name`, then `:key=value` for the first parameter and `,key=value`
/// for the others.
struct SpecWriter<'a, 'b> {
    f: &'a mut fmt::Formatter<'b>,
    sep: char,
}

impl<'a, 'b> SpecWriter<'a, 'b> {
    fn new(f: &'a mut fmt::Formatter<'b>, name: &str) -> Result<Self, fmt::Error> {
        f.write_str(name)?;
        Ok(SpecWriter { f, sep: ':' })
    }

    fn param(&mut self, key: &str, value: impl fmt::Display) -> fmt::Result {
        write!(self.f, "{}{key}={value}", self.sep)?;
        self.sep = ',';
        Ok(())
    }

    fn size(&mut self, key: &str, value: Option<u64>) -> fmt::Result {
        match value {
            Some(v) => self.param(key, format_size(v)),
            None => Ok(()),
        }
    }
}

impl fmt::Display for WorkloadSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            WorkloadSpec::Idle => f.write_str("idle"),
            WorkloadSpec::Halt => f.write_str("halt"),
            WorkloadSpec::Sweep { start, end, mode } => {
                let mut w = SpecWriter::new(f, "sweep")?;
                w.size("start", start)?;
                w.size("end", end)?;
                if mode != SweepMode::Inc {
                    w.param("mode", mode)?;
                }
                Ok(())
            }
            WorkloadSpec::Hotset { wss, rate, writers } => {
                let mut w = SpecWriter::new(f, "hotset")?;
                w.size("wss", Some(wss))?;
                if let Some(rate) = rate {
                    w.param("rate", rate)?;
                }
                if let Some(writers) = writers {
                    w.param("writers", writers)?;
                }
                Ok(())
            }
            WorkloadSpec::Burst {
                start,
                end,
                wss,
                quiet_ms,
                quiet_wss,
                storm_ms,
                cycles,
            } => {
                let mut w = SpecWriter::new(f, "burst")?;
                w.size("start", start)?;
                w.size("end", end)?;
                w.size("wss", wss)?;
                w.param("quiet", quiet_ms)?;
                w.size("quiet-wss", quiet_wss)?;
                w.param("storm", storm_ms)?;
                if cycles != 0 {
                    w.param("cycles", cycles)?;
                }
                Ok(())
            }
            WorkloadSpec::Verify { start, end, seq } => {
                let mut w = SpecWriter::new(f, "verify")?;
                w.size("start", start)?;
                w.size("end", end)?;
                if seq {
                    w.param("seq", 1)?;
                }
                Ok(())
            }
        }
    }
}

impl serde::Serialize for WorkloadSpec {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for WorkloadSpec {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}
