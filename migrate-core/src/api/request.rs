//! Requests on the API socket, and their parsing with errors that name the
//! offending command or field.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::engine::{DowntimeRamp, TimeoutAction};

/// A request on the API socket. Empty struct variants, not unit ones, so
/// that unknown fields are refused. QEMU's QMP names are accepted as
/// aliases where the meaning is the same (`stop`, `cont`, `pmemsave`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "command", rename_all = "kebab-case", deny_unknown_fields)]
// One request per line, parsed and dropped: its size does not matter.
#[allow(clippy::large_enum_variant)]
pub enum ApiRequest {
    /// API and protocol versions, and the commands this server knows.
    Version {},
    /// State of the VM (and of the running or last migration).
    Status {},
    /// Same answer as `status`, under the name ch-remote uses.
    Info {},
    /// Stop the vCPUs (QMP `stop`).
    #[serde(alias = "stop")]
    Pause {},
    /// Start the vCPUs again (QMP `cont`). `force` is required, and only
    /// accepted, in state `outcome-unknown`: the operator asserts that the
    /// destination does not run the guest.
    #[serde(alias = "cont")]
    Resume {
        /// Resume a source whose migration outcome is unknown.
        #[serde(default)]
        force: bool,
    },
    /// Write guest-physical memory to a file (QMP `pmemsave`).
    #[serde(alias = "pmemsave")]
    Memsave(MemsaveRequest),
    /// The running migration's report so far, or the last one.
    QueryMigrate {},
    /// Cancel the running migration; the source keeps the guest.
    #[serde(alias = "cancel")]
    MigrateCancel {},
    /// Change the downtime limit or bandwidth cap of the running migration.
    #[serde(alias = "set-parameters")]
    MigrateSetParameters(SetParameters),
    /// Migrate the VM to another vmigrate process.
    Send(SendRequest),
    /// Live-clone the VM to a standby (`run --incoming --standby`): the
    /// same fields as `send` (`verify` is always on); this VM runs on as
    /// the primary and the standby holds a paused copy.
    Clone(SendRequest),
    /// Digest of all guest memory and of the vCPU state, computed now from
    /// the VM itself; only while the vCPUs are stopped (`paused`,
    /// `standby`, `postmigrate`), so that the answer means something.
    Digest {},
    /// Stop the VM and end the process (exit status 0).
    Shutdown {},
    /// Turn this connection into an event stream: `ok`, then one line per
    /// event until the VM process ends. No further requests are read on it.
    Events {},
}

/// Every command name [`ApiRequest`] accepts (aliases after the names).
pub const COMMANDS: &[&str] = &[
    "version",
    "status",
    "info",
    "pause",
    "resume",
    "memsave",
    "query-migrate",
    "migrate-cancel",
    "migrate-set-parameters",
    "send",
    "clone",
    "digest",
    "shutdown",
    "events",
    "stop",
    "cont",
    "pmemsave",
    "cancel",
    "set-parameters",
];

/// Parameters of `memsave`. QMP's `val` and `filename` are accepted too.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct MemsaveRequest {
    /// First guest-physical byte.
    #[serde(alias = "val")]
    pub addr: u64,
    /// Bytes to write (> 0; `addr + size` within guest RAM).
    pub size: u64,
    /// Absolute path of the file the VM process writes (created or
    /// truncated). Absolute because the server's working directory is not
    /// the client's; `vmigrate memsave` makes a relative path absolute.
    #[serde(alias = "filename")]
    pub file: String,
}

/// Parameters of `migrate-set-parameters`; at least one must be given.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct SetParameters {
    /// New downtime limit in milliseconds (> 0), from the next policy
    /// decision on; ends a `downtime-ramp`.
    #[serde(default)]
    pub downtime_limit: Option<u64>,
    /// New bandwidth cap in bytes per second, 0 for none, from the next
    /// write on.
    #[serde(default)]
    pub max_bandwidth: Option<u64>,
}

/// Parameters of a migration (`vmigrate send`). Defaults as QEMU's where
/// QEMU has the knob.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct SendRequest {
    /// Destination, `tcp:HOST:PORT` or `unix:PATH`.
    pub to: String,
    /// Convergence policy name (default `qemu`).
    #[serde(default = "default_policy")]
    pub policy: String,
    /// Policy-specific settings, `key -> value` (default none).
    #[serde(default)]
    pub params: BTreeMap<String, String>,
    /// Downtime limit in milliseconds (default 300, as QEMU). Ignored when
    /// `downtime-ramp` is given: the ramp's start is the first limit.
    #[serde(default = "default_downtime")]
    pub downtime_limit: u64,
    /// Raise the downtime limit from `start-ms` to `end-ms` in `steps`
    /// steps, one per iteration (default: no ramp).
    #[serde(default)]
    pub downtime_ramp: Option<DowntimeRamp>,
    /// Bytes per second cap (default: none).
    #[serde(default)]
    pub max_bandwidth: Option<u64>,
    /// `none` or `zstd` (default `none`).
    #[serde(default = "default_compress")]
    pub compress: String,
    /// Give up after this many seconds (default: never).
    #[serde(default)]
    pub timeout: Option<f64>,
    /// What the timeout does: `cancel` (default; the source runs on) or
    /// `force` (stop-and-copy whatever the downtime).
    #[serde(default)]
    pub timeout_action: TimeoutAction,
    /// Seconds to wait for the connection to open (default 10).
    #[serde(default)]
    pub connect_timeout: Option<f64>,
    /// Seconds any one read or write on the migration stream may block,
    /// the completion exchange included (default 30): a stalled or vanished
    /// destination fails the migration after this long.
    #[serde(default)]
    pub io_timeout: Option<f64>,
    /// Digest all guest memory on both ends at the switch-over and commit
    /// only if they agree (default false: hashing all RAM lengthens the
    /// downtime by the time it takes, reported as `digest-time`).
    #[serde(default)]
    pub verify: bool,
    /// Connections to carry the pages, 1..=16 (default 1): each pass is
    /// split across them by 2 MiB block, in the spirit of QEMU's multifd.
    #[serde(default = "default_channels")]
    pub channels: u16,
    /// Copy each page out of guest memory before sending it (`Pages`
    /// frames), as before `CheckedPages`, even where the destination takes
    /// pages straight from guest memory (default false); for measuring what
    /// the direct path saves.
    #[serde(default)]
    pub copy_pages: bool,
    /// Leave out dirty pages whose content is the copy the destination
    /// already holds, found by a 128-bit digest of each page sent (default
    /// false; 16 bytes of memory a page, and pages take the copy path).
    #[serde(default)]
    pub skip_unchanged: bool,
    /// Pre-shared key file (absolute path, read by the VM process): the
    /// channel authenticates both ends and every record with it. One of
    /// `psk-file` and `insecure` is required.
    #[serde(default)]
    pub psk_file: Option<PathBuf>,
    /// Migrate over a plaintext channel: anyone who can reach or sit on
    /// the path can read and change guest memory (default false).
    #[serde(default)]
    pub insecure: bool,
    /// TLS: this end's certificate chain (PEM, absolute path); with
    /// `tls-key` and `tls-ca`.
    #[serde(default)]
    pub tls_cert: Option<PathBuf>,
    /// TLS: this end's private key (PEM, absolute path).
    #[serde(default)]
    pub tls_key: Option<PathBuf>,
    /// TLS: the CA that signed the destination's certificate (PEM,
    /// absolute path).
    #[serde(default)]
    pub tls_ca: Option<PathBuf>,
    /// `clone` only: after the clone, checkpoint the guest to the standby
    /// every this many milliseconds (≥ 1; default: no checkpoints, the
    /// standby keeps the clone point).
    #[serde(default)]
    pub epoch_ms: Option<u64>,
}

fn default_policy() -> String {
    "qemu".into()
}
fn default_downtime() -> u64 {
    300
}
fn default_channels() -> u16 {
    1
}
fn default_compress() -> String {
    "none".into()
}

impl SendRequest {
    /// A request with every default, to `to`.
    pub fn new(to: impl Into<String>) -> Self {
        Self {
            to: to.into(),
            policy: default_policy(),
            params: Default::default(),
            downtime_limit: default_downtime(),
            downtime_ramp: None,
            max_bandwidth: None,
            compress: default_compress(),
            timeout: None,
            timeout_action: TimeoutAction::Cancel,
            connect_timeout: None,
            io_timeout: None,
            verify: false,
            channels: default_channels(),
            copy_pages: false,
            skip_unchanged: false,
            psk_file: None,
            insecure: false,
            tls_cert: None,
            tls_key: None,
            tls_ca: None,
            epoch_ms: None,
        }
    }
}

/// Why a request line was refused before it reached the VM.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RequestError {
    /// Not JSON, or not an object.
    #[error("bad request: not a JSON object ({reason})")]
    NotAnObject {
        /// What the JSON parser said.
        reason: String,
    },
    /// No `"command"` member, or not a string.
    #[error("bad request: no \"command\" string (known commands: {})", COMMANDS.join(", "))]
    NoCommand,
    /// A command this server does not know.
    #[error("bad request: unknown command {command:?} (known commands: {})", COMMANDS.join(", "))]
    UnknownCommand {
        /// The name given.
        command: String,
    },
    /// A known command with an unknown, missing or mistyped field.
    #[error("bad request: command {command:?}: {reason}")]
    BadArguments {
        /// The command.
        command: String,
        /// serde's explanation, which names the field.
        reason: String,
    },
}

/// Parse one request line. Errors name the unknown command, or the command
/// and the field at fault, so that a typo in a script is obvious.
pub fn parse_request(line: &str) -> Result<ApiRequest, RequestError> {
    let value: serde_json::Value =
        serde_json::from_str(line).map_err(|e| RequestError::NotAnObject {
            reason: e.to_string(),
        })?;
    let Some(obj) = value.as_object() else {
        return Err(RequestError::NotAnObject {
            reason: "a JSON value that is not an object".into(),
        });
    };
    let Some(command) = obj.get("command").and_then(|c| c.as_str()) else {
        return Err(RequestError::NoCommand);
    };
    let command = command.to_string();
    if !COMMANDS.contains(&command.as_str()) {
        return Err(RequestError::UnknownCommand { command });
    }
    serde_json::from_value(value).map_err(|e| RequestError::BadArguments {
        command,
        reason: e.to_string(),
    })
}
