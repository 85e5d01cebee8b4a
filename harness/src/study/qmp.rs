//! A minimal QMP client (QEMU's JSON control protocol), enough to set
//! migration parameters, start a migration and poll `query-migrate`.
//!
//! QMP over a Unix socket: a greeting line, `qmp_capabilities`, then one
//! JSON command per line; the answer is the next line with `return` or
//! `error`, and asynchronous `event` lines may come in between (skipped).

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use thiserror::Error;

/// A QMP exchange failed.
#[derive(Debug, Error)]
pub enum QmpError {
    /// Socket I/O.
    #[error("QMP socket: {0}")]
    Io(#[from] std::io::Error),
    /// QEMU answered with an error.
    #[error("QMP {command}: {message}")]
    Command {
        /// The command.
        command: String,
        /// QEMU's `desc`.
        message: String,
    },
    /// Not JSON, or the connection closed.
    #[error("QMP: {0}")]
    Protocol(String),
}

/// A QMP connection.
pub struct Qmp {
    writer: UnixStream,
    reader: BufReader<UnixStream>,
}

impl Qmp {
    /// Connects (retrying until `timeout`, as QEMU creates the socket a
    /// moment after it starts) and negotiates capabilities.
    ///
    /// # Errors
    /// [`QmpError`] when no connection can be made or QEMU refuses.
    pub fn connect(path: &Path, timeout: Duration) -> Result<Self, QmpError> {
        let deadline = Instant::now() + timeout;
        let stream = loop {
            match UnixStream::connect(path) {
                Ok(s) => break s,
                Err(e) if Instant::now() > deadline => return Err(e.into()),
                Err(_) => std::thread::sleep(Duration::from_millis(50)),
            }
        };
        stream.set_read_timeout(Some(Duration::from_secs(30)))?;
        let mut q = Self {
            writer: stream.try_clone()?,
            reader: BufReader::new(stream),
        };
        let greeting = q.read_line()?;
        if greeting.get("QMP").is_none() {
            return Err(QmpError::Protocol(format!("no greeting: {greeting}")));
        }
        q.execute("qmp_capabilities", None)?;
        Ok(q)
    }

    fn read_line(&mut self) -> Result<Value, QmpError> {
        let mut line = String::new();
        if self.reader.read_line(&mut line)? == 0 {
            return Err(QmpError::Protocol("connection closed".into()));
        }
        serde_json::from_str(&line).map_err(|e| QmpError::Protocol(format!("{e}: {line:?}")))
    }

    /// Runs a command and returns its `return` value.
    ///
    /// # Errors
    /// [`QmpError::Command`] with QEMU's description when it refuses.
    pub fn execute(&mut self, command: &str, arguments: Option<Value>) -> Result<Value, QmpError> {
        let mut req = json!({ "execute": command });
        if let Some(a) = arguments {
            req["arguments"] = a;
        }
        let mut line = req.to_string();
        line.push('\n');
        self.writer.write_all(line.as_bytes())?;
        loop {
            let v = self.read_line()?;
            if let Some(r) = v.get("return") {
                return Ok(r.clone());
            }
            if let Some(e) = v.get("error") {
                return Err(QmpError::Command {
                    command: command.to_owned(),
                    message: e
                        .get("desc")
                        .and_then(Value::as_str)
                        .unwrap_or("?")
                        .to_owned(),
                });
            }
            // An event: skip.
        }
    }
}
