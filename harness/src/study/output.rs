//! The results folder, `results/<study>/`: `runs.json`, `runs.csv`,
//! `links.csv`, `summary.csv`, `plot-*.svg`, and the README table.
//!
//! A full study takes hours, so it is run in parts (`--only`, `--link`,
//! `--policy`, `--reps`). Each part merges into the folder: runs already
//! there stay unless the part re-runs the same engine × workload × policy ×
//! link × repetition, and the summary, plots and README table are rebuilt
//! from everything the folder holds. Runs are saved after each migration, so
//! an interrupted study keeps what it measured.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use thiserror::Error;

use super::plot::{write_plots, PlotError};
use super::record::{update_efficiency, RunRecord};
use super::summary::{markdown_table, replace_block, summarize, SummaryRow};

/// A results file could not be read or written.
#[derive(Debug, Error)]
pub enum OutputError {
    /// File I/O.
    #[error("{path}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// An existing `runs.json`/`links.json` that does not parse.
    #[error("{path}: {message} (use --fresh to start over)")]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// The parser's message.
        message: String,
    },
    /// CSV writing.
    #[error("{path}")]
    Csv {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: csv::Error,
    },
    /// A chart.
    #[error(transparent)]
    Plot(#[from] PlotError),
}

/// A link's measured throughput (`links.csv`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LinkRecord {
    /// Link name.
    pub link: String,
    /// `loopback` or `veth`.
    pub kind: String,
    /// Configured rate, bit/s (veth).
    pub rate_bps: Option<u64>,
    /// Configured one-way delay, ms.
    pub delay_ms: Option<f64>,
    /// Plain TCP throughput measured, Mbit/s.
    pub measured_mbps: Option<f64>,
    /// `tc qdisc show` of the shaped interface.
    pub qdisc: String,
    /// Why the measurement or set-up failed.
    pub error: Option<String>,
    /// Unix time of the measurement.
    pub measured_unix: u64,
}

/// The results folder of one study.
pub struct Results {
    dir: PathBuf,
    runs: Vec<RunRecord>,
    links: Vec<LinkRecord>,
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> OutputError + '_ {
    move |source| OutputError::Io {
        path: path.to_owned(),
        source,
    }
}

fn load<T: for<'de> Deserialize<'de>>(path: &Path) -> Result<Vec<T>, OutputError> {
    match std::fs::read_to_string(path) {
        Ok(text) => serde_json::from_str(&text).map_err(|e| OutputError::Corrupt {
            path: path.to_owned(),
            message: e.to_string(),
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
        Err(e) => Err(io(path)(e)),
    }
}

impl Results {
    /// Opens (creates) `dir`, loading earlier runs unless `fresh`.
    ///
    /// # Errors
    /// [`OutputError`] when the folder cannot be created or an existing
    /// results file is unreadable.
    pub fn open(dir: &Path, fresh: bool) -> Result<Self, OutputError> {
        std::fs::create_dir_all(dir).map_err(io(dir))?;
        let (runs, links) = if fresh {
            (Vec::new(), Vec::new())
        } else {
            (
                load(&dir.join("runs.json"))?,
                load(&dir.join("links.json"))?,
            )
        };
        Ok(Self {
            dir: dir.to_owned(),
            runs,
            links,
        })
    }

    /// The folder.
    #[must_use]
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// All runs held (earlier parts included).
    #[must_use]
    pub fn runs(&self) -> &[RunRecord] {
        &self.runs
    }

    /// Adds a run, replacing one with the same key.
    pub fn add_run(&mut self, rec: RunRecord) {
        let key = rec.key();
        self.runs.retain(|r| r.key() != key);
        self.runs.push(rec);
    }

    /// Records a link measurement (replacing the link's previous one) and
    /// refreshes the efficiency of that link's earlier runs if it has none.
    pub fn set_link(&mut self, link: LinkRecord) {
        self.links.retain(|l| l.link != link.link);
        self.links.push(link);
    }

    /// The measured throughput of `link`, Mbit/s.
    #[must_use]
    pub fn link_mbps(&self, link: &str) -> Option<f64> {
        self.links.iter().find(|l| l.link == link)?.measured_mbps
    }

    /// Writes `runs.json`, `runs.csv`, `links.json` and `links.csv`.
    ///
    /// # Errors
    /// [`OutputError`] on any write failure.
    pub fn save(&mut self) -> Result<(), OutputError> {
        let links = self.links.clone();
        for r in &mut self.runs {
            if r.row.link_mbps.is_none() {
                r.row.link_mbps = links
                    .iter()
                    .find(|l| l.link == r.row.link)
                    .and_then(|l| l.measured_mbps);
                update_efficiency(&mut r.row);
            }
        }
        self.write_json("runs.json", &self.runs)?;
        self.write_json("links.json", &self.links)?;
        self.write_csv("runs.csv", self.runs.iter().map(|r| &r.row))?;
        self.write_csv("links.csv", self.links.iter())
    }

    /// Builds `summary.csv`, the plots and (if `readme` is given) the
    /// README block for `study` from every run held; returns the summary.
    ///
    /// # Errors
    /// [`OutputError`] on any write failure.
    pub fn finish(
        &self,
        study: &str,
        order: &[(String, String, String)],
        readme: Option<&Path>,
    ) -> Result<(Vec<SummaryRow>, Vec<PathBuf>), OutputError> {
        let rows = summarize(&self.runs, order);
        self.write_csv("summary.csv", rows.iter())?;
        // Old charts of links or metrics no longer present must not linger.
        if let Ok(entries) = std::fs::read_dir(&self.dir) {
            for e in entries.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                if name.starts_with("plot-") && name.ends_with(".svg") {
                    let _ = std::fs::remove_file(e.path());
                }
            }
        }
        let plots = write_plots(&self.dir, study, &rows)?;
        if let Some(readme) = readme {
            let doc = match std::fs::read_to_string(readme) {
                Ok(d) => d,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
                Err(e) => return Err(io(readme)(e)),
            };
            let body = format!(
                "{}\n{}\n",
                self.provenance(study, readme),
                markdown_table(&rows)
            );
            std::fs::write(readme, replace_block(&doc, study, &body)).map_err(io(readme))?;
        }
        Ok((rows, plots))
    }

    /// The lines above a README table: where the data is, link speeds.
    fn provenance(&self, study: &str, readme: &Path) -> String {
        let rel = readme
            .parent()
            .and_then(|p| self.dir.strip_prefix(p).ok())
            .unwrap_or(&self.dir);
        let links: Vec<String> = self
            .links
            .iter()
            .map(|l| match l.measured_mbps {
                Some(m) => format!("`{}` {:.0} Mbit/s", l.link, m),
                None => format!("`{}` not measured", l.link),
            })
            .collect();
        format!(
            "Study `{study}`: {} runs; data in `{}/` (runs.csv, summary.csv, plot-*.svg). \
             Plain TCP on each link, measured in the same run: {}. Medians over completed runs; \
             `guest speed` is passes/s during the migration ÷ before (1 = no slowdown).\n",
            self.runs.len(),
            rel.display(),
            if links.is_empty() {
                "–".to_owned()
            } else {
                links.join(", ")
            }
        )
    }

    fn write_json<T: Serialize>(&self, name: &str, value: &T) -> Result<(), OutputError> {
        let path = self.dir.join(name);
        let text = serde_json::to_string_pretty(value).map_err(|e| OutputError::Corrupt {
            path: path.clone(),
            message: e.to_string(),
        })?;
        std::fs::write(&path, text + "\n").map_err(io(&path))
    }

    fn write_csv<T: Serialize>(
        &self,
        name: &str,
        rows: impl Iterator<Item = T>,
    ) -> Result<(), OutputError> {
        let path = self.dir.join(name);
        let csv_err = |source| OutputError::Csv {
            path: path.clone(),
            source,
        };
        let mut w = csv::Writer::from_path(&path).map_err(csv_err)?;
        for r in rows {
            w.serialize(r).map_err(csv_err)?;
        }
        w.flush().map_err(io(&path))
    }
}
