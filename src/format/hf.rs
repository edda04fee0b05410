//! The Hugging Face layout: a checkpoint directory holding `model.safetensors`, or shards
//! named by `model.safetensors.index.json`, plus config and tokenizer files; or a bare
//! `.safetensors` file.
//!
//! Owns the layout's rules: the index names only plain files inside the directory (links that
//! leave it are refused) and agrees exactly with the shard headers; no tensor appears twice;
//! the aux files an output must carry are read when the checkpoint is opened. A directory
//! without safetensors weights gets an error that says what the trainer wrote instead.

use super::checkpoint::{Checkpoint, Tensor};
use super::dir::Dir;
use super::safetensors::{self, header};
use super::source::SourceFile;
use crate::error::{Error, IoContext, Result};
use std::path::{Path, PathBuf};

/// Single-file weights name in an HF checkpoint directory.
pub const SINGLE_FILE: &str = "model.safetensors";
/// Shard index name in an HF checkpoint directory.
pub const INDEX_FILE: &str = "model.safetensors.index.json";

/// Files copied from the newest input into a merged output (docs/formats.md). Optimizer,
/// scheduler, RNG and trainer state are never copied.
pub const AUX_FILES: &[&str] = &[
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "special_tokens_map.json",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
    "added_tokens.json",
    "preprocessor_config.json",
];

/// Parse a JSON file written by Python's `json` module, as `trainer_state.json` is: besides
/// standard JSON it may hold the bare tokens `NaN`, `Infinity` and `-Infinity` (the loss of a
/// diverged run), which serde_json refuses. They are read as the strings `"NaN"`,
/// `"Infinity"` and `"-Infinity"`; [`json_f64`] turns either form into a number.
pub fn parse_python_json(bytes: &[u8]) -> serde_json::Result<serde_json::Value> {
    let text = String::from_utf8_lossy(bytes);
    let mut out = String::with_capacity(text.len() + 16);
    let (mut in_string, mut escaped) = (false, false);
    let mut rest = text.as_ref();
    while let Some(c) = rest.chars().next() {
        if in_string {
            out.push(c);
            if escaped {
                escaped = false;
            } else if c == '\\' {
                escaped = true;
            } else if c == '"' {
                in_string = false;
            }
            rest = &rest[c.len_utf8()..];
            continue;
        }
        if c == '"' {
            in_string = true;
        } else if let Some(token) = ["NaN", "Infinity", "-Infinity"]
            .into_iter()
            .find(|t| rest.starts_with(t))
        {
            out.push('"');
            out.push_str(token);
            out.push('"');
            rest = &rest[token.len()..];
            continue;
        }
        out.push(c);
        rest = &rest[c.len_utf8()..];
    }
    serde_json::from_str(&out)
}

/// A number of a JSON file read by [`parse_python_json`], including its non-finite tokens.
pub fn json_f64(v: &serde_json::Value) -> Option<f64> {
    match v {
        serde_json::Value::String(s) => match s.as_str() {
            "NaN" => Some(f64::NAN),
            "Infinity" => Some(f64::INFINITY),
            "-Infinity" => Some(f64::NEG_INFINITY),
            _ => None,
        },
        v => v.as_f64(),
    }
}

/// Whether `dtype` is a floating-point type pmad can average.
pub fn is_float(d: ::safetensors::Dtype) -> bool {
    use ::safetensors::Dtype::*;
    matches!(d, F64 | F32 | F16 | BF16 | F8_E4M3 | F8_E5M2)
}

/// Whether `name` is a weights file of this layout: a shard or the index.
pub fn is_weight_file(name: &str) -> bool {
    name.ends_with(".safetensors") || name == INDEX_FILE
}

/// Open and validate a checkpoint directory or bare `.safetensors` file.
pub fn open(path: &Path) -> Result<Checkpoint> {
    let meta = std::fs::metadata(path).ctx("stat", path)?;
    if meta.is_file() {
        let (tensors, files) = catalog(vec![safetensors::open_file(path)?], None)?;
        return Ok(Checkpoint {
            path: path.to_path_buf(),
            step: step_from_name(path),
            files,
            tensors,
            aux: Vec::new(),
            dcp: None,
        });
    }
    if !meta.is_dir() {
        return Err(Error::invalid(
            path,
            "neither a directory nor a regular file",
        ));
    }
    open_dir(Dir::Live(path))
}

/// Open and validate a checkpoint directory, live or from a snapshot of its files.
pub fn open_dir(dir: Dir<'_>) -> Result<Checkpoint> {
    let path = dir.path();
    // A weights file, validated and mapped; None when the directory has no such file.
    let shard = |name: &str| -> Result<Option<(SourceFile, header::Header)>> {
        dir.open(name)?
            .map(|f| safetensors::open_fd(f, &dir.join(name)))
            .transpose()
    };
    let (files, index) = if let Some(bytes) = dir.read(INDEX_FILE)? {
        let index_path = dir.join(INDEX_FILE);
        if bytes.iter().all(|b| b.is_ascii_whitespace()) {
            return Err(Error::not_ready(&index_path, "index file is empty"));
        }
        let index = header::parse_index(&bytes).map_err(|d| Error::invalid(&index_path, d))?;
        let mut files = Vec::new();
        for name in index.shards() {
            dir.confine(&name, &index_path)?;
            match shard(&name)? {
                Some(f) => files.push(f),
                None => {
                    return Err(Error::not_ready(
                        &index_path,
                        format!(
                            "names shard {} which does not exist (yet)",
                            dir.join(&name).display()
                        ),
                    ))
                }
            }
        }
        (files, Some((index_path, index)))
    } else if let Some(f) = shard(SINGLE_FILE)? {
        (vec![f], None)
    } else {
        return Err(no_weights(&dir));
    };
    let (tensors, files) = catalog(files, index)?;
    let mut aux = Vec::new();
    for name in AUX_FILES {
        // Regular files only: a link could point anywhere.
        if dir.has_file(name) {
            if let Some(bytes) = dir.read(name)? {
                aux.push((name.to_string(), bytes));
            }
        }
    }
    Ok(Checkpoint {
        path: path.to_path_buf(),
        step: step_of(&dir),
        files,
        tensors,
        aux,
        dcp: None,
    })
}

/// Build the sorted tensor catalog over opened files and their validated headers, checking
/// the index (if any) against the shard headers.
fn catalog(
    opened: Vec<(SourceFile, header::Header)>,
    index: Option<(PathBuf, header::Index)>,
) -> Result<(Vec<Tensor>, Vec<SourceFile>)> {
    let mut tensors = Vec::with_capacity(opened.iter().map(|(_, h)| h.tensors.len()).sum());
    let mut files: Vec<SourceFile> = Vec::with_capacity(opened.len());
    for (fi, (f, h)) in opened.into_iter().enumerate() {
        tensors.extend(h.tensors.into_iter().map(|t| Tensor {
            range: h.data_start + t.begin..h.data_start + t.end,
            name: t.name,
            dtype: t.dtype,
            shape: t.shape,
            file: fi,
            view: None,
            average: true,
        }));
        files.push(f);
    }
    // Sorted by name (then file), a name in two shards is two neighbours.
    tensors.sort_unstable_by(|a, b| a.name.cmp(&b.name).then(a.file.cmp(&b.file)));
    if let Some(w) = tensors.windows(2).find(|w| w[0].name == w[1].name) {
        return Err(Error::invalid(
            &files[w[1].file].path,
            format!(
                "tensor {} also appears in {}",
                w[1].name,
                files[w[0].file].path.display()
            ),
        ));
    }
    let by_name = |name: &str| {
        tensors
            .binary_search_by(|t| t.name.as_str().cmp(name))
            .ok()
            .map(|i| &tensors[i])
    };
    if let Some((index_path, index)) = &index {
        for (name, file) in &index.weight_map {
            match by_name(name) {
                None => {
                    return Err(Error::invalid(
                        index_path,
                        format!("maps tensor {name} to {file}, which does not contain it"),
                    ))
                }
                Some(t)
                    if files[t.file].path.file_name().and_then(|s| s.to_str()) != Some(file) =>
                {
                    return Err(Error::invalid(
                        index_path,
                        format!(
                            "maps tensor {name} to {file} but it is in {}",
                            files[t.file].path.display()
                        ),
                    ))
                }
                _ => {}
            }
        }
        if let Some(extra) = tensors
            .iter()
            .find(|t| !index.weight_map.contains_key(&t.name))
        {
            return Err(Error::invalid(
                index_path,
                format!(
                    "does not list tensor {}, which is in {}",
                    extra.name,
                    files[extra.file].path.display()
                ),
            ));
        }
    }
    Ok((tensors, files))
}

/// The error for a directory without safetensors weights, saying what to do about it.
fn no_weights(dir: &Dir<'_>) -> Error {
    let names = dir.names();
    let has = |pred: &dyn Fn(&str) -> bool| names.iter().any(|n| pred(n));
    let hint = if has(&|n| n == "pytorch_model.bin" || n.starts_with("pytorch_model-")) {
        "weights are in pytorch_model*.bin (pickle); save with safetensors (Trainer: save_safetensors=True)"
    } else if has(&|n| n.ends_with(".distcp")) {
        "it has DCP data files (.distcp) but no .metadata"
    } else if has(&|n| n.starts_with("zero_pp_rank_") || n.starts_with("mp_rank_")) {
        "this is a DeepSpeed checkpoint without gathered weights; enable stage3_gather_16bit_weights_on_model_save or run zero_to_fp32.py --safe_serialization"
    } else if has(&|n| n.ends_with(".safetensors")) {
        "it has .safetensors files but neither model.safetensors nor model.safetensors.index.json"
    } else {
        "no model.safetensors or model.safetensors.index.json found"
    };
    Error::invalid(dir.path(), format!("no safetensors weights: {hint}"))
}

/// Training step of a checkpoint: `global_step` from its `trainer_state.json` when present,
/// else the number in a known directory name (`checkpoint-N`, `iter_N`, `global_stepN`,
/// `step-N`, `step_N`, `stepN`), else unknown.
pub fn step_from_name(path: &Path) -> Option<u64> {
    if path.is_dir() {
        return step_of(&Dir::Live(path));
    }
    let name = if path.is_file() {
        path.file_stem()?.to_str()?
    } else {
        path.file_name()?.to_str()?
    };
    step_in_name(name)
}

/// The step of a checkpoint directory: its `trainer_state.json`'s `global_step`, else the
/// number in its name.
fn step_of(dir: &Dir<'_>) -> Option<u64> {
    if let Ok(Some(bytes)) = dir.read("trainer_state.json") {
        if let Some(s) = parse_python_json(&bytes)
            .ok()
            .and_then(|v| v.get("global_step").and_then(|g| g.as_u64()))
        {
            return Some(s);
        }
    }
    step_in_name(dir.path().file_name()?.to_str()?)
}

/// The number in a known checkpoint name (`checkpoint-N`, `iter_N`, `global_stepN`,
/// `step-N`, `step_N`, `stepN`).
pub fn step_in_name(name: &str) -> Option<u64> {
    [
        "checkpoint-",
        "iter_",
        "global_step",
        "step-",
        "step_",
        "step",
    ]
    .iter()
    .find_map(|p| name.strip_prefix(p))
    .filter(|d| !d.is_empty() && d.bytes().all(|b| b.is_ascii_digit()))
    .and_then(|d| d.parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn python_json_non_finite_tokens_are_read() {
        let v = parse_python_json(
            br#"{"log_history": [{"step": 10, "loss": NaN, "grad_norm": Infinity},
                {"step": 20, "loss": -Infinity, "note": "NaN in a string: \"Infinity\""}]}"#,
        )
        .unwrap();
        let h = v["log_history"].as_array().unwrap();
        assert!(json_f64(&h[0]["loss"]).unwrap().is_nan());
        assert_eq!(json_f64(&h[0]["grad_norm"]), Some(f64::INFINITY));
        assert_eq!(json_f64(&h[1]["loss"]), Some(f64::NEG_INFINITY));
        assert_eq!(h[1]["note"], "NaN in a string: \"Infinity\"");
        assert_eq!(json_f64(&h[0]["step"]), Some(10.0));
        assert!(parse_python_json(b"{\"a\": Nan}").is_err());
    }

    proptest! {
        #[test]
        fn standard_json_reads_as_serde_json_reads_it(v in any::<Vec<(String, f64, bool)>>()) {
            let json = serde_json::to_vec(&v).unwrap();
            let want: serde_json::Value = serde_json::from_slice(&json).unwrap();
            prop_assert_eq!(parse_python_json(&json).unwrap(), want);
        }

        #[test]
        fn arbitrary_bytes_never_panic(b in proptest::collection::vec(any::<u8>(), 0..256)) {
            let _ = parse_python_json(&b);
        }
    }

    #[test]
    fn steps_come_from_trainer_state_or_known_names() {
        let d = tempfile::tempdir().unwrap();
        for (name, step) in [
            ("checkpoint-1200", Some(1200)),
            ("iter_0001000", Some(1000)),
            ("global_step300", Some(300)),
            ("step-7", Some(7)),
            ("bf1", None),
            ("checkpoint-12a", None),
        ] {
            let p = d.path().join(name);
            std::fs::create_dir(&p).unwrap();
            assert_eq!(step_from_name(&p), step, "{name}");
        }
        let p = d.path().join("run");
        std::fs::create_dir(&p).unwrap();
        std::fs::write(p.join("trainer_state.json"), br#"{"global_step": 42}"#).unwrap();
        assert_eq!(step_from_name(&p), Some(42));
    }
}
