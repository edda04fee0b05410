//! `merge.json`: the provenance record written next to every output (one-shot and daemon),
//! and read back at restart to tell which steps an existing output holds.

use super::partition::{PartMarker, PartitionBy, PartitionPlan};
use super::write::WrittenFile;
use crate::error::{Error, Result};
use crate::fsio;
use crate::math::kinds::{Accumulator, OutDtype};
use crate::math::{MethodKind, Shape};
use std::path::Path;

/// File name of the record inside an output directory.
pub const RECORD_FILE: &str = "merge.json";

/// The provenance record written as `merge.json` next to every output.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct MergeRecord {
    /// pmad version that wrote it.
    pub pmad_version: String,
    /// Daemon recipe name, absent for `pmad merge`.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub recipe: Option<String>,
    /// The averaging method.
    pub method: MethodKind,
    /// EMA alpha, if any.
    pub alpha: Option<f64>,
    /// The decay shape a `schedule` recipe emulates.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub shape: Option<Shape>,
    /// The final LR ratio of a `schedule` recipe.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub final_lr_ratio: Option<f64>,
    /// Weights applied, oldest first, summing to 1.
    pub weights: Vec<f64>,
    /// Training steps of the inputs, oldest first (null where unknown).
    pub steps: Vec<Option<u64>>,
    /// Input paths, oldest first.
    pub inputs: Vec<String>,
    /// Output dtype setting.
    pub dtype: OutDtype,
    /// Accumulator precision.
    pub accumulator: Accumulator,
    /// Number of tensors.
    pub tensors: usize,
    /// Tensor data bytes.
    pub bytes: u64,
    /// Non-finite input values merged (allowed explicitly).
    pub nonfinite: u64,
    /// Seconds since the epoch when published.
    pub created_unix: u64,
    /// How the output was split between instances, when it was.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub partition: Option<PartitionRecord>,
}

/// `merge.json`'s record of an output written in parts by several instances.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct PartitionRecord {
    /// The plan's hash.
    pub plan: String,
    /// Instances.
    pub count: usize,
    /// The split used.
    pub by: PartitionBy,
    /// Each instance's files with their sizes and checksums, in instance order.
    pub parts: Vec<PartRecord>,
}

/// One instance's files in [`PartitionRecord`].
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct PartRecord {
    /// The instance.
    pub index: usize,
    /// Its files.
    pub files: Vec<WrittenFile>,
}

impl PartitionRecord {
    /// The record of `plan` committed from these markers (in instance order).
    pub fn new(plan: &PartitionPlan, markers: Vec<PartMarker>) -> PartitionRecord {
        PartitionRecord {
            plan: plan.hash.clone(),
            count: plan.count,
            by: plan.by,
            parts: markers
                .into_iter()
                .map(|m| PartRecord {
                    index: m.index,
                    files: m.files,
                })
                .collect(),
        }
    }
}

impl MergeRecord {
    /// Write it as `<dir>/merge.json` (durably, like every output file).
    pub fn write(&self, dir: &Path) -> Result<()> {
        let mut json = serde_json::to_vec_pretty(self).unwrap_or_default();
        json.push(b'\n');
        fsio::write_file(&dir.join(RECORD_FILE), &json)
    }

    /// Read `<dir>/merge.json`: `Ok(None)` when there is none, an error when it cannot be read
    /// or parsed.
    pub fn read(dir: &Path) -> Result<Option<MergeRecord>> {
        let path = dir.join(RECORD_FILE);
        let bytes = match std::fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(Error::io("read", &path, e)),
        };
        serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|e| Error::invalid(&path, format!("unreadable: {e}")))
    }
}

/// Seconds since the epoch (0 if the clock is before it).
pub fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}
