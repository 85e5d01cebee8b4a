//! A workload plus RAM content for any workload: `fill=random`.
//!
//! `WORKLOAD[:params][,fill=random[,fill-seed=N]]` — e.g. `idle:fill=random`,
//! `sweep:end=64M,fill=random,fill-seed=7`. With `fill=random` the VMM writes
//! pseudo-random bytes ([`super::fill_pseudo_random`], SplitMix64: several
//! GB/s, incompressible) into all of RAM above 1 MiB before boot, so that a
//! transfer benchmark measures the path and not zstd. Below 1 MiB are the
//! boot sector, page tables and stack, which the guest sets up itself. The
//! workloads still work on such RAM: each writes what it later reads (`verify`
//! checks a page only after its own first pass wrote it), and the fill is
//! applied before the workload's own fills (hotset's working set), so those
//! win. The VMM writes the fill through `Vm::write_memory`, which records the
//! pages as written, so a migration sends them with data.

use std::fmt;
use std::str::FromStr;

use super::{
    build, BuildParams, FillContent, GuestImage, MemoryFill, WorkloadError, WorkloadSpec,
    MIN_WORKLOAD_ADDR,
};

/// Seed of `fill=random` when `fill-seed` is not given.
pub const DEFAULT_FILL_SEED: u64 = 0x5EED_F111;

/// A workload and the content the VMM puts in the rest of RAM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GuestSpec {
    /// The workload.
    pub workload: WorkloadSpec,
    /// `Some(seed)`: fill RAM above 1 MiB with pseudo-random bytes.
    pub random_fill: Option<u64>,
}

impl FromStr for GuestSpec {
    type Err = WorkloadError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim();
        let (name, params) = match s.split_once(':') {
            Some((n, p)) => (n.trim(), p),
            None => (s, ""),
        };
        let mut rest = Vec::new();
        let mut fill = None;
        let mut seed = None;
        for item in params.split(',').filter(|i| !i.trim().is_empty()) {
            let (k, v) = item
                .split_once('=')
                .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim()))
                .ok_or_else(|| WorkloadError::MalformedParam(item.trim().to_owned()))?;
            let slot = match k.as_str() {
                "fill" => &mut fill,
                "fill-seed" => &mut seed,
                _ => {
                    rest.push(item);
                    continue;
                }
            };
            if slot.replace(v).is_some() {
                return Err(WorkloadError::DuplicateKey(k));
            }
        }
        let random_fill = match fill.map(str::to_ascii_lowercase).as_deref() {
            None | Some("none") => None,
            Some("random") => Some(DEFAULT_FILL_SEED),
            Some(other) => {
                return Err(WorkloadError::BadNumber {
                    key: "fill",
                    value: other.to_owned(),
                    expected: "`random` or `none`",
                })
            }
        };
        let random_fill = match (random_fill, seed) {
            (Some(_), Some(v)) => Some(parse_seed(v)?),
            (None, Some(v)) => {
                return Err(WorkloadError::BadNumber {
                    key: "fill-seed",
                    value: v.to_owned(),
                    expected: "to come with fill=random",
                })
            }
            (f, None) => f,
        };
        let workload = if rest.is_empty() {
            name.parse()?
        } else {
            format!("{name}:{}", rest.join(",")).parse()?
        };
        Ok(Self {
            workload,
            random_fill,
        })
    }
}

fn parse_seed(v: &str) -> Result<u64, WorkloadError> {
    let parsed = match v.strip_prefix("0x").or_else(|| v.strip_prefix("0X")) {
        Some(hex) => u64::from_str_radix(hex, 16),
        None => v.parse(),
    };
    parsed.map_err(|_| WorkloadError::BadNumber {
        key: "fill-seed",
        value: v.to_owned(),
        expected: "an integer (decimal or 0x hex)",
    })
}

impl fmt::Display for GuestSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let w = self.workload.to_string();
        write!(f, "{w}")?;
        if let Some(seed) = self.random_fill {
            let sep = if w.contains(':') { ',' } else { ':' };
            write!(f, "{sep}fill=random")?;
            if seed != DEFAULT_FILL_SEED {
                write!(f, ",fill-seed={seed:#x}")?;
            }
        }
        Ok(())
    }
}

impl GuestSpec {
    /// Build the workload's image, with the random fill (if any) first in
    /// its fills.
    pub fn build(&self, params: &BuildParams) -> Result<GuestImage, WorkloadError> {
        let mut image = build(&self.workload, params)?;
        if let Some(seed) = self.random_fill {
            image.fills.insert(
                0,
                MemoryFill {
                    gpa: MIN_WORKLOAD_ADDR,
                    len: params.mem_size - MIN_WORKLOAD_ADDR,
                    content: FillContent::PseudoRandom { seed },
                },
            );
            image.needs_vmm_content = true;
        }
        Ok(image)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_fill_for_any_workload_and_prints_back() {
        let g: GuestSpec = "idle:fill=random".parse().unwrap();
        assert_eq!(g.workload, WorkloadSpec::Idle);
        assert_eq!(g.random_fill, Some(DEFAULT_FILL_SEED));
        assert_eq!(g.to_string(), "idle:fill=random");
        let g: GuestSpec = "verify:end=8M, FILL=random,fill-seed=0x2a".parse().unwrap();
        assert_eq!(g.workload, "verify:end=8M".parse().unwrap());
        assert_eq!(g.random_fill, Some(42));
        assert_eq!(g.to_string().parse::<GuestSpec>().unwrap(), g);
        let g: GuestSpec = "sweep".parse().unwrap();
        assert_eq!(g.random_fill, None);
        assert_eq!(g.to_string(), "sweep");
        let g: GuestSpec = "sweep:fill=none".parse().unwrap();
        assert_eq!(g.random_fill, None);
    }

    #[test]
    fn refuses_bad_fill_params() {
        assert!(matches!(
            "idle:fill=zeros".parse::<GuestSpec>(),
            Err(WorkloadError::BadNumber { key: "fill", .. })
        ));
        assert!(matches!(
            "idle:fill-seed=3".parse::<GuestSpec>(),
            Err(WorkloadError::BadNumber {
                key: "fill-seed",
                ..
            })
        ));
        assert!(matches!(
            "idle:fill=random,fill-seed=x".parse::<GuestSpec>(),
            Err(WorkloadError::BadNumber {
                key: "fill-seed",
                ..
            })
        ));
        assert!(matches!(
            "idle:fill=random,fill=random".parse::<GuestSpec>(),
            Err(WorkloadError::DuplicateKey(_))
        ));
        // Other keys still go to the workload's own parser.
        assert!("idle:wss=1M,fill=random".parse::<GuestSpec>().is_err());
    }

    #[test]
    fn fill_covers_ram_above_1m_before_the_workloads_own() {
        let params = BuildParams {
            mem_size: 64 << 20,
            tsc_hz: None,
            vcpus: 1,
        };
        let g: GuestSpec = "hotset:wss=4M,fill=random,fill-seed=9".parse().unwrap();
        let image = g.build(&params).unwrap();
        assert_eq!(image.fills.len(), 2);
        assert_eq!(
            image.fills[0],
            MemoryFill {
                gpa: 1 << 20,
                len: 63 << 20,
                content: FillContent::PseudoRandom { seed: 9 },
            }
        );
        assert!(image.needs_vmm_content);
        let plain = GuestSpec {
            random_fill: None,
            ..g
        };
        assert_eq!(plain.build(&params).unwrap().fills.len(), 1);
    }
}
