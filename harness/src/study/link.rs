//! Emulated network links: a veth pair into a private network namespace,
//! shaped with `tc`.
//!
//! Loopback is far faster (tens of Gbit/s) than the links migrations run on
//! in practice, and whether pre-copy converges depends on the link: a guest
//! that converges at 25 Gbit/s may never converge at 1 Gbit/s. So the study
//! builds the link it needs: the destination runs in its own network
//! namespace, joined to the root namespace by a veth pair whose sender-side
//! end has a token-bucket filter (`tbf`, the rate) and optionally `netem`
//! (a one-way delay). Everything is created with iproute2 when a link is
//! first used and deleted when the [`VethLink`] is dropped, on errors and
//! Ctrl-C too; [`sweep_stale`] removes what a killed runner left behind.
//!
//! Addresses: one /30 out of 10.77.0.0/24, chosen from the runner's pid so
//! that two runners do not collide; nothing outside the pair is ever
//! addressed.

use std::process::Command;

use thiserror::Error;

/// Prefix of every namespace this module creates: `vmstudy-<pid>-<n>`.
pub const NETNS_PREFIX: &str = "vmstudy-";

/// A failed `ip`/`tc` command.
#[derive(Debug, Error)]
pub enum LinkError {
    /// The command could not be started (iproute2 missing?).
    #[error("cannot run `{command}`")]
    Spawn {
        /// The command line.
        command: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The command failed.
    #[error("`{command}` failed: {stderr}")]
    Failed {
        /// The command line.
        command: String,
        /// What it printed on stderr.
        stderr: String,
    },
    /// No free /30 in 10.77.0.0/24.
    #[error("no free /30 left in 10.77.0.0/24 on this host")]
    NoSubnet,
}

/// Runs a command, returning its stdout.
fn run(args: &[&str]) -> Result<String, LinkError> {
    let command = args.join(" ");
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .map_err(|source| LinkError::Spawn {
            command: command.clone(),
            source,
        })?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(LinkError::Failed {
            command,
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        })
    }
}

/// A shaped veth link, torn down on drop.
#[derive(Debug)]
pub struct VethLink {
    netns: String,
    host_if: String,
    source_ip: String,
    dest_ip: String,
    rate_bps: u64,
    delay_ms: Option<f64>,
}

impl VethLink {
    /// Creates namespace, veth pair, addresses and shaping. `index`
    /// distinguishes links of one runner.
    ///
    /// # Errors
    /// [`LinkError`] from the first `ip`/`tc` command that fails; whatever
    /// was created before is removed again.
    pub fn create(index: usize, rate_bps: u64, delay_ms: Option<f64>) -> Result<Self, LinkError> {
        let pid = std::process::id();
        let subnet = free_subnet(pid)?;
        let link = VethLink {
            netns: format!("{NETNS_PREFIX}{pid}-{index}"),
            host_if: format!("vms{pid}s{index}"),
            source_ip: format!("10.77.0.{}", subnet * 4 + 1),
            dest_ip: format!("10.77.0.{}", subnet * 4 + 2),
            rate_bps,
            delay_ms,
        };
        // From here on, dropping `link` removes what exists.
        link.set_up()?;
        Ok(link)
    }

    fn set_up(&self) -> Result<(), LinkError> {
        let (ns, a) = (self.netns.as_str(), self.host_if.as_str());
        let b = format!("vms{}d", &a[3..]);
        let src = format!("{}/30", self.source_ip);
        let dst = format!("{}/30", self.dest_ip);
        run(&["ip", "netns", "add", ns])?;
        run(&["ip", "link", "add", a, "type", "veth", "peer", "name", &b])?;
        run(&["ip", "link", "set", &b, "netns", ns])?;
        run(&["ip", "addr", "add", &src, "dev", a])?;
        run(&["ip", "link", "set", a, "up"])?;
        run(&["ip", "-n", ns, "addr", "add", &dst, "dev", &b])?;
        run(&["ip", "-n", ns, "link", "set", &b, "up"])?;
        run(&["ip", "-n", ns, "link", "set", "lo", "up"])?;
        // tbf: burst ≥ a few ms of traffic (and ≥ one 64 KiB GSO packet),
        // queue ≤ 50 ms; the veth's own queue is unbounded otherwise.
        let burst = (self.rate_bps / 8 / 250).max(128 * 1024).to_string();
        let rate = format!("{}bit", self.rate_bps);
        let tbf = ["tbf", "rate", &rate, "burst", &burst, "latency", "50ms"];
        match self.delay_ms {
            Some(d) if d > 0.0 => {
                let delay = format!("{d}ms");
                run(&[
                    "tc", "qdisc", "add", "dev", a, "root", "handle", "1:", "netem", "delay",
                    &delay, "limit", "100000",
                ])?;
                let mut cmd = vec![
                    "tc", "qdisc", "add", "dev", a, "parent", "1:1", "handle", "10:",
                ];
                cmd.extend(tbf);
                run(&cmd)?;
            }
            _ => {
                let mut cmd = vec!["tc", "qdisc", "add", "dev", a, "root"];
                cmd.extend(tbf);
                run(&cmd)?;
            }
        }
        Ok(())
    }

    /// The destination's address (inside the namespace).
    #[must_use]
    pub fn dest_ip(&self) -> &str {
        &self.dest_ip
    }

    /// The source's address (root namespace).
    #[must_use]
    pub fn source_ip(&self) -> &str {
        &self.source_ip
    }

    /// The namespace name.
    #[must_use]
    pub fn netns(&self) -> &str {
        &self.netns
    }

    /// The prefix that runs a command inside the namespace.
    #[must_use]
    pub fn exec_prefix(&self) -> Vec<String> {
        vec![
            "ip".into(),
            "netns".into(),
            "exec".into(),
            self.netns.clone(),
        ]
    }

    /// What `tc` says about the shaping (for the study log).
    #[must_use]
    pub fn describe(&self) -> String {
        run(&["tc", "qdisc", "show", "dev", &self.host_if])
            .map(|s| s.trim().replace('\n', "; "))
            .unwrap_or_else(|e| e.to_string())
    }
}

impl Drop for VethLink {
    fn drop(&mut self) {
        remove_netns(&self.netns);
        // Deleting the namespace deletes the peer and with it the pair; the
        // host end is removed explicitly in case the peer never moved.
        let _ = run(&["ip", "link", "del", &self.host_if]);
    }
}

/// Kills whatever still runs in `netns`, then deletes it.
fn remove_netns(netns: &str) {
    if let Ok(pids) = run(&["ip", "netns", "pids", netns]) {
        for pid in pids.split_whitespace() {
            let _ = run(&["kill", "-KILL", pid]);
        }
    }
    let _ = run(&["ip", "netns", "del", netns]);
}

/// Picks a /30 (index 0..64 in 10.77.0.0/24) no interface on this host
/// already has an address in, starting from one derived from `pid`.
fn free_subnet(pid: u32) -> Result<u32, LinkError> {
    let used = run(&["ip", "-o", "-4", "addr", "show"])?;
    let taken: Vec<u32> = used
        .split_whitespace()
        .filter_map(|w| w.strip_prefix("10.77.0."))
        .filter_map(|rest| rest.split('/').next()?.parse::<u32>().ok())
        .map(|host| host / 4)
        .collect();
    (0..64)
        .map(|k| (pid + k) % 64)
        .find(|s| !taken.contains(s))
        .ok_or(LinkError::NoSubnet)
}

/// Deletes namespaces named `vmstudy-<pid>-*` whose runner `pid` is gone
/// (killed before it could clean up), with any process still inside.
/// Returns the names removed.
#[must_use]
pub fn sweep_stale() -> Vec<String> {
    let Ok(list) = run(&["ip", "netns", "list"]) else {
        return Vec::new();
    };
    let mut removed = Vec::new();
    for name in list.lines().filter_map(|l| l.split_whitespace().next()) {
        let Some(pid) = name
            .strip_prefix(NETNS_PREFIX)
            .and_then(|r| r.split('-').next())
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        if pid != std::process::id() && !std::path::Path::new(&format!("/proc/{pid}")).exists() {
            remove_netns(name);
            let _ = run(&[
                "ip",
                "link",
                "del",
                &format!("vms{pid}s{}", &name[name.rfind('-').unwrap_or(0) + 1..]),
            ]);
            removed.push(name.to_owned());
        }
    }
    removed
}
