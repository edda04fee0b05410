//! `pmad inspect`: a checkpoint's tensor table, totals and validity verdict.

use pmad::format::safetensors::header::dtype_name;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

/// `pmad inspect` arguments.
#[derive(clap::Args)]
pub struct InspectArgs {
    /// Checkpoint directory or .safetensors file.
    checkpoint: PathBuf,
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
    /// Show what `--include REGEX` (repeatable) would average, as in `pmad merge`.
    #[arg(long, value_name = "REGEX")]
    include: Vec<String>,
    /// Show what `--exclude REGEX` (repeatable) would leave out, as in `pmad merge`.
    #[arg(long, value_name = "REGEX")]
    exclude: Vec<String>,
}

/// Print the report; returns whether the checkpoint is valid.
pub fn run(args: InspectArgs) -> anyhow::Result<bool> {
    let select = pmad::format::Select::new(&args.include, &args.exclude)
        .map_err(|e| pmad::Error::Usage(format!("--{e}")))?;
    let i = inspect_with(&args.checkpoint, &select);
    if args.json {
        super::print_out(&format!("{}\n", serde_json::to_string_pretty(&i)?))?;
    } else {
        super::print_out(&render(&i))?;
    }
    Ok(i.valid)
}

/// Result of inspecting a checkpoint.
#[derive(Debug, serde::Serialize)]
pub struct Inspection {
    /// The path inspected.
    pub path: String,
    /// Whether every check passed.
    pub valid: bool,
    /// The first problem found (file, tensor and offset where known).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Step parsed from the name, if any.
    pub step: Option<u64>,
    /// `safetensors` or `dcp` (PyTorch Distributed Checkpoint), when it could be read.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub format: Option<&'static str>,
    /// Weight files.
    pub files: Vec<String>,
    /// Tensors, sorted by name (for DCP: the averaged chunks).
    pub tensors: Vec<TensorRow>,
    /// For a DCP checkpoint: every key of the state dict and whether it is averaged or copied.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub keys: Vec<KeyRow>,
    /// Number of tensors.
    pub total_tensors: usize,
    /// Number of elements.
    pub total_elements: u64,
    /// Tensor data bytes.
    pub total_bytes: u64,
}

/// One row of the table.
#[derive(Debug, serde::Serialize)]
pub struct TensorRow {
    /// Name.
    pub name: String,
    /// Dtype as in the header.
    pub dtype: String,
    /// Shape.
    pub shape: Vec<usize>,
    /// Data bytes.
    pub bytes: u64,
    /// File holding it.
    pub file: String,
    /// Its layout when not row-major (DCP strides).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub view: Option<String>,
    /// Whether it is averaged (else copied from the newest checkpoint: not floating-point, or
    /// not selected).
    pub averaged: bool,
}

/// One key of a DCP checkpoint.
#[derive(Debug, serde::Serialize)]
pub struct KeyRow {
    /// The state-dict key.
    pub key: String,
    /// `bytes`, or the tensor's torch dtype.
    pub kind: String,
    /// Global shape of a tensor.
    pub shape: Vec<u64>,
    /// Saved chunks.
    pub chunks: usize,
    /// `averaged`, or `copied` (byte for byte from the newest checkpoint).
    pub action: &'static str,
}

/// Inspect `path`, averaging what `select` chooses.
pub fn inspect_with(path: &Path, select: &pmad::format::Select) -> Inspection {
    match pmad::format::open_with(path, select) {
        Ok(c) => {
            let tensors: Vec<TensorRow> = c
                .tensors
                .iter()
                .map(|t| TensorRow {
                    name: t.name.clone(),
                    dtype: dtype_name(t.dtype),
                    shape: t.shape.clone(),
                    bytes: t.range.len() as u64,
                    file: c.files[t.file]
                        .path
                        .file_name()
                        .map(|n| n.to_string_lossy().into_owned())
                        .unwrap_or_default(),
                    view: t.view.clone(),
                    averaged: pmad::math::kinds::FloatKind::of_tensor(t).is_some(),
                })
                .collect();
            let keys = c
                .dcp
                .iter()
                .flat_map(|d| &d.keys)
                .map(|k| KeyRow {
                    key: k.fqn.clone(),
                    kind: k.kind.clone(),
                    shape: k.size.clone(),
                    chunks: k.chunks,
                    action: if k.averaged { "averaged" } else { "copied" },
                })
                .collect();
            Inspection {
                path: path.display().to_string(),
                valid: true,
                error: None,
                step: c.step,
                format: Some(if c.dcp.is_some() {
                    "dcp"
                } else {
                    "safetensors"
                }),
                files: c
                    .files
                    .iter()
                    .map(|f| f.path.display().to_string())
                    .collect(),
                total_tensors: tensors.len(),
                total_elements: c.tensors.iter().map(|t| t.elements() as u64).sum(),
                total_bytes: c.data_bytes(),
                tensors,
                keys,
            }
        }
        Err(e) => Inspection {
            path: path.display().to_string(),
            valid: false,
            error: Some(e.to_string()),
            step: None,
            format: None,
            files: Vec::new(),
            tensors: Vec::new(),
            keys: Vec::new(),
            total_tensors: 0,
            total_elements: 0,
            total_bytes: 0,
        },
    }
}

/// Render as a text table for people.
pub fn render(i: &Inspection) -> String {
    let mut s = String::new();
    if !i.keys.is_empty() {
        let w = i.keys.iter().map(|k| k.key.len()).max().unwrap_or(3).max(3);
        let _ = writeln!(
            s,
            "{:<w$}  {:<14}  {:<20}  {:>6}  action",
            "key", "kind", "shape", "chunks"
        );
        for k in &i.keys {
            let _ = writeln!(
                s,
                "{:<w$}  {:<14}  {:<20}  {:>6}  {}",
                k.key,
                k.kind,
                format!("{:?}", k.shape),
                k.chunks,
                k.action
            );
        }
        let averaged = i.keys.iter().filter(|k| k.action == "averaged").count();
        let _ = writeln!(
            s,
            "keys: {} averaged, {} copied from the newest checkpoint\n",
            averaged,
            i.keys.len() - averaged
        );
    }
    if !i.tensors.is_empty() {
        let w = i
            .tensors
            .iter()
            .map(|t| t.name.len())
            .max()
            .unwrap_or(4)
            .max(4);
        let _ = writeln!(
            s,
            "{:<w$}  {:<8}  {:<20}  {:>14}",
            "name", "dtype", "shape", "bytes"
        );
        for t in &i.tensors {
            let _ = writeln!(
                s,
                "{:<w$}  {:<8}  {:<20}  {:>14}{}",
                t.name,
                t.dtype,
                format!("{:?}", t.shape),
                t.bytes,
                t.view
                    .iter()
                    .map(String::as_str)
                    .chain((!t.averaged).then_some("copied"))
                    .fold(String::new(), |a, b| a + "  " + b)
            );
        }
        let _ = writeln!(
            s,
            "total: {} tensors, {} elements, {} bytes ({}) in {} file(s)",
            i.total_tensors,
            i.total_elements,
            i.total_bytes,
            bytesize::ByteSize(i.total_bytes).display().si(),
            i.files.len()
        );
    }
    match &i.error {
        None => {
            let _ = writeln!(s, "verdict: valid");
        }
        Some(e) => {
            let _ = writeln!(s, "verdict: INVALID: {e}");
        }
    }
    s
}
