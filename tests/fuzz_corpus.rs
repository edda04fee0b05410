//! Replays the fuzz corpora on stable Rust, without libFuzzer: every file in
//! `fuzz/corpus/{header,index,dcp_item,dcp_pickle}/`, and every saved reproducer in
//! `fuzz/artifacts/{header,index,dcp_item}/`, goes through the same invariant checks as the fuzz targets
//! (`fuzz/checks.rs`, included here). See `fuzz/README.md`.
//!
//! The seed corpus is written by the ignored test `write_seed_corpus`:
//! `cargo test --test fuzz_corpus -- --ignored write_seed_corpus`.

#[path = "../fuzz/checks.rs"]
mod checks;

use pmad::format::safetensors::header::build_header;
use safetensors::Dtype;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

fn fuzz_dir(sub: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz").join(sub)
}

/// The files of a directory in name order; none if it does not exist.
fn files(dir: &Path) -> Vec<PathBuf> {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut v: Vec<PathBuf> = rd
        .map(|e| e.expect("read_dir entry").path())
        .filter(|p| p.is_file())
        .collect();
    v.sort();
    v
}

/// Run `check` over every file; fail naming each file whose check panicked.
fn replay(paths: &[PathBuf], check: fn(&[u8])) {
    let mut failed = Vec::new();
    for p in paths {
        let data = std::fs::read(p).expect("read corpus file");
        if std::panic::catch_unwind(|| check(&data)).is_err() {
            failed.push(p.display().to_string());
        }
    }
    assert!(
        failed.is_empty(),
        "{} of {} inputs break an invariant (messages above):\n{}",
        failed.len(),
        paths.len(),
        failed.join("\n")
    );
}

#[test]
fn header_corpus() {
    let paths = files(&fuzz_dir("corpus/header"));
    assert!(
        paths.len() >= 10,
        "fuzz/corpus/header is missing or nearly empty"
    );
    replay(&paths, checks::check_header_input);
}

#[test]
fn index_corpus() {
    let paths = files(&fuzz_dir("corpus/index"));
    assert!(
        paths.len() >= 5,
        "fuzz/corpus/index is missing or nearly empty"
    );
    replay(&paths, checks::check_index_input);
}

#[test]
fn dcp_item_corpus() {
    let paths = files(&fuzz_dir("corpus/dcp_item"));
    assert!(
        paths.len() >= 10,
        "fuzz/corpus/dcp_item is missing or nearly empty"
    );
    replay(&paths, checks::check_dcp_item);
}

#[test]
fn dcp_pickle_corpus() {
    let paths = files(&fuzz_dir("corpus/dcp_pickle"));
    assert!(
        paths.len() >= 10,
        "fuzz/corpus/dcp_pickle is missing or nearly empty"
    );
    replay(&paths, checks::check_dcp_pickle);
}

#[test]
fn dcp_item_artifacts() {
    replay(
        &files(&fuzz_dir("artifacts/dcp_item")),
        checks::check_dcp_item,
    );
}

#[test]
fn header_artifacts() {
    replay(
        &files(&fuzz_dir("artifacts/header")),
        checks::check_header_input,
    );
}

#[test]
fn index_artifacts() {
    replay(
        &files(&fuzz_dir("artifacts/index")),
        checks::check_index_input,
    );
}

/// A safetensors file as `build_header` writes it, data bytes counting up from `fill`.
fn built(meta: &[(&str, &str)], tensors: &[(&str, Dtype, &[usize])], fill: u8) -> Vec<u8> {
    let meta: BTreeMap<String, String> = meta
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    let spec: Vec<(String, Dtype, Vec<usize>)> = tensors
        .iter()
        .map(|(n, d, s)| (n.to_string(), *d, s.to_vec()))
        .collect();
    let (mut f, len) = build_header(&meta, &spec).expect("build_header");
    f.extend((0..len).map(|i| fill.wrapping_add(i as u8)));
    f
}

/// A file with this exact header text and `data` zero bytes after it.
fn framed(json: &str, data: usize) -> Vec<u8> {
    let mut f = (json.len() as u64).to_le_bytes().to_vec();
    f.extend_from_slice(json.as_bytes());
    f.resize(f.len() + data, 0);
    f
}

/// Writes the seed corpus: small valid safetensors files (and a few near misses) for
/// `header`, index JSON examples for `index`. Ignored: run it by hand after changing it.
#[test]
#[ignore]
fn write_seed_corpus() {
    let pt: &[(&str, &str)] = &[("format", "pt")];
    let header: Vec<(&str, Vec<u8>)> = vec![
        ("empty", built(&[], &[], 0)),
        ("meta-only", built(pt, &[], 0)),
        ("one-f32", built(pt, &[("w", Dtype::F32, &[2, 2])], 1)),
        (
            "mixed",
            built(
                pt,
                &[
                    ("model.embed.weight", Dtype::BF16, &[4, 3]),
                    ("scalar", Dtype::F64, &[]),
                    ("empty", Dtype::F16, &[0, 5]),
                    ("mask", Dtype::BOOL, &[3]),
                    ("ids", Dtype::I64, &[2]),
                ],
                7,
            ),
        ),
        (
            "all-int",
            built(
                &[("format", "pt"), ("step", "100")],
                &[
                    ("u8", Dtype::U8, &[3]),
                    ("i8", Dtype::I8, &[1]),
                    ("i16", Dtype::I16, &[2]),
                    ("u16", Dtype::U16, &[1]),
                    ("i32", Dtype::I32, &[1, 1]),
                    ("u32", Dtype::U32, &[1]),
                    ("u64", Dtype::U64, &[1]),
                ],
                3,
            ),
        ),
        (
            "fp8-c64",
            built(
                pt,
                &[
                    ("e4m3", Dtype::F8_E4M3, &[4]),
                    ("e5m2", Dtype::F8_E5M2, &[2]),
                    ("e8m0", Dtype::F8_E8M0, &[1]),
                    ("fnuz", Dtype::F8_E4M3FNUZ, &[1]),
                    ("fnuz2", Dtype::F8_E5M2FNUZ, &[1]),
                    ("c", Dtype::C64, &[1]),
                ],
                9,
            ),
        ),
        (
            "subbyte",
            built(
                &[],
                &[
                    ("f4", Dtype::F4, &[2, 4]),
                    ("f6a", Dtype::F6_E2M3, &[4]),
                    ("f6b", Dtype::F6_E3M2, &[8]),
                ],
                0,
            ),
        ),
        (
            "unicode-names",
            built(
                &[("note", "\u{e9}t\u{e9} \"q\" \\ \n")],
                &[("\u{e9}\u{1f600}", Dtype::F16, &[1]), ("a\"b", Dtype::U8, &[0])],
                0,
            ),
        ),
        (
            "name-order",
            framed(
                r#"{"b":{"dtype":"F32","shape":[1],"data_offsets":[4,8]},"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}"#,
                8,
            ),
        ),
        ("array-form", framed(r#"{"a":["I32",[2],[0,8]]}"#, 8)),
        ("ws-padded", framed("{\"a\":{\"dtype\":\"U8\",\"shape\":[2],\"data_offsets\":[0,2]}}\n\t  ", 2)),
        ("leading-space", framed(r#" {"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1]}}"#, 1)),
        (
            "duplicate",
            framed(
                r#"{"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1]},"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1]}}"#,
                1,
            ),
        ),
        ("gap", framed(r#"{"a":{"dtype":"U8","shape":[1],"data_offsets":[1,2]}}"#, 2)),
        (
            "overflow",
            framed(
                r#"{"a":{"dtype":"F64","shape":[4294967296,4294967296],"data_offsets":[0,8]}}"#,
                8,
            ),
        ),
        ("truncated", {
            let mut f = built(pt, &[("w", Dtype::F32, &[3])], 0);
            f.pop();
            f
        }),
        ("trailing", {
            let mut f = built(pt, &[("w", Dtype::F32, &[3])], 0);
            f.push(0);
            f
        }),
        // JSON header text alone: the target also frames its input as a header (checks.rs).
        (
            "json-two",
            br#"{"__metadata__":{"format":"pt"},"x":{"dtype":"BF16","shape":[2],"data_offsets":[0,4]},"y":{"dtype":"F32","shape":[],"data_offsets":[4,8]}}"#.to_vec(),
        ),
        ("json-empty", b"{}".to_vec()),
    ];
    let index: Vec<(&str, &str)> = vec![
        (
            "hf-two-shards",
            r#"{"metadata":{"total_size":24},"weight_map":{"a":"model-00001-of-00002.safetensors","b":"model-00002-of-00002.safetensors","c":"model-00001-of-00002.safetensors"}}"#,
        ),
        ("minimal", r#"{"weight_map":{"t":"s.safetensors"}}"#),
        (
            "extra-keys",
            r#"{"metadata":{"total_size":8,"format":"pt"},"weight_map":{"a":"x"},"other":[1,2,{"k":null}]}"#,
        ),
        ("dotdot", r#"{"weight_map":{"a":"../x.safetensors"}}"#),
        ("absolute", r#"{"weight_map":{"a":"/etc/passwd"}}"#),
        ("backslash", r#"{"weight_map":{"a":"a\\..\\b"}}"#),
        (
            "escaped-slash",
            r#"{"weight_map":{"a":"sub\/x","b":"\u002e\u002e"}}"#,
        ),
        ("nul", r#"{"weight_map":{"a":"x\u0000y"}}"#),
        ("empty-map", r#"{"weight_map":{}}"#),
        ("not-object", r#"{"weight_map":["a"]}"#),
        (
            "dots",
            r#"{"weight_map":{"a":"...","b":".hidden","c":"a..b"}}"#,
        ),
    ];
    for (sub, items) in [
        ("corpus/header", header),
        (
            "corpus/index",
            index
                .into_iter()
                .map(|(n, j)| (n, j.as_bytes().to_vec()))
                .collect(),
        ),
    ] {
        let dir = fuzz_dir(sub);
        std::fs::create_dir_all(&dir).expect("create corpus dir");
        for (name, bytes) in items {
            std::fs::write(dir.join(format!("seed-{name}")), bytes).expect("write seed");
        }
    }
}
