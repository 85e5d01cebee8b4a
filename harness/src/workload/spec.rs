//! Parsing and printing of workload specs (`name[:key=value,...]`).
//!
//! The spec string is how a person (CLI, scenario files) names a workload;
//! [`WorkloadSpec`]'s `Display` prints the canonical form, which parses back
//! to the same value. Only what can be checked without knowing the VM is
//! checked here (syntax, keys, numbers, start ≥ 1 MiB, end > start); range
//! versus RAM size is checked by [`build`](super::build). Serde uses the same
//! string form, so scenario files and reports can hold specs as strings.

use std::collections::HashSet;

use super::*;

/// Keys accepted by the range workloads.
const RANGE_KEYS: &str = "start, end";
/// Keys accepted by hotset.
const HOTSET_KEYS: &str = "wss, rate";

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
            "sweep" => {
                let (start, end) = parse_range("sweep", &pairs)?;
                Ok(WorkloadSpec::Sweep { start, end })
            }
            "verify" => {
                let (start, end) = parse_range("verify", &pairs)?;
                Ok(WorkloadSpec::Verify { start, end })
            }
            "hotset" => {
                let mut wss = DEFAULT_HOTSET_WSS;
                let mut rate = None;
                for (k, v) in &pairs {
                    match k.as_str() {
                        "wss" => wss = size("wss", v)?,
                        "rate" => rate = Some(count("rate", v)?),
                        _ => return Err(unknown("hotset", k, HOTSET_KEYS)),
                    }
                }
                if wss == 0 {
                    return Err(WorkloadError::WssZero);
                }
                check_aligned("working-set size", wss)?;
                Ok(WorkloadSpec::Hotset { wss, rate })
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
    let bad = || WorkloadError::BadNumber {
        key,
        value: value.to_owned(),
    };
    let parsed = match value.get(..2) {
        Some(p) if p.eq_ignore_ascii_case("0x") => u64::from_str_radix(&value[2..], 16),
        _ => value.parse::<u64>(),
    };
    match parsed {
        Ok(n) if n > 0 => Ok(n),
        _ => Err(bad()),
    }
}

/// `start`/`end` of sweep and verify, with the checks that need no RAM size.
fn parse_range(
    workload: &'static str,
    pairs: &[(String, &str)],
) -> Result<(Option<u64>, Option<u64>), WorkloadError> {
    let (mut start, mut end) = (None, None);
    for (k, v) in pairs {
        match k.as_str() {
            "start" => start = Some(size("start", v)?),
            "end" => end = Some(size("end", v)?),
            _ => return Err(unknown(workload, k, RANGE_KEYS)),
        }
    }
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
    Ok((start, end))
}

impl fmt::Display for WorkloadSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (name, start, end) = match *self {
            WorkloadSpec::Idle => return f.write_str("idle"),
            WorkloadSpec::Hotset { wss, rate } => {
                write!(f, "hotset:wss={}", format_size(wss))?;
                if let Some(rate) = rate {
                    write!(f, ",rate={rate}")?;
                }
                return Ok(());
            }
            WorkloadSpec::Sweep { start, end } => ("sweep", start, end),
            WorkloadSpec::Verify { start, end } => ("verify", start, end),
        };
        f.write_str(name)?;
        let mut sep = ':';
        if let Some(start) = start {
            write!(f, "{sep}start={}", format_size(start))?;
            sep = ',';
        }
        if let Some(end) = end {
            write!(f, "{sep}end={}", format_size(end))?;
        }
        Ok(())
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
