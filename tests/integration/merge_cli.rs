//! End-to-end tests of `pmad merge`: the real binary, fixtures written by
//! `tests/py/fixtures.py`, results checked by the independent float64 oracle
//! (`tests/py/oracle.py`) and by the reference `safetensors` reader. The hostile-input tests
//! also check that `pmad inspect` calls each refused input invalid (see `inspect`).
//!
//! Set `PMAD_TEST_KEEP=1` to keep a failing test's temp directory.

use crate::harness::{
    assert_no_failures, file_metadata, list_dir, load_tensors, read_json, s, Run, TestEnv,
    FIXTURE_TENSORS,
};
use crate::inspect::expect_inspect_invalid;
use std::path::{Path, PathBuf};

/// Where `fixtures.py make --nonfinite` puts its NaN/Inf.
const NONFINITE_TENSOR: &str = "model.layers.0.self_attn.q_proj.weight";

const SINGLE_KINDS: [&str; 8] = [
    "truncated",
    "corrupt-header",
    "header-too-large",
    "overlap",
    "gap",
    "bad-size",
    "not-utf8",
    "duplicate-name",
];
const INDEX_KINDS: [&str; 5] = [
    "index-missing-shard",
    "index-dotdot",
    "index-absolute",
    "index-symlink-out",
    "index-disagree",
];

/// One merge configuration: method arguments (shared by pmad and the oracle), output dtype and
/// pmad-only extra arguments.
struct Case {
    method: Vec<&'static str>,
    dtype: &'static str,
    extra: Vec<&'static str>,
}

impl Case {
    fn new(method: &[&'static str], dtype: &'static str, extra: &[&'static str]) -> Case {
        Case {
            method: method.to_vec(),
            dtype,
            extra: extra.to_vec(),
        }
    }

    fn label(&self) -> String {
        format!(
            "{} --dtype {} {}",
            self.method.join(" "),
            self.dtype,
            self.extra.join(" ")
        )
    }

    fn pmad_args(&self) -> Vec<&'static str> {
        let mut a = self.method.clone();
        a.extend(["--dtype", self.dtype]);
        a.extend(self.extra.iter().copied());
        a
    }

    fn oracle_args(&self) -> Vec<&'static str> {
        let mut a = self.method.clone();
        a.extend(["--dtype", self.dtype]);
        a
    }
}

const SMA: &[&str] = &["--method", "sma"];
const WMA: &[&str] = &["--method", "wma"];
const EMA: &[&str] = &["--method", "ema", "--alpha", "0.2"];
const WEIGHTS: &[&str] = &["--method", "weights", "--weights", "1,2,3,4"];

/// Merge `inputs` per case into `<env>/<prefix>-<i>`, run the oracle on each, and return the
/// failures (pmad or oracle) instead of stopping at the first.
fn merge_and_check(env: &TestEnv, prefix: &str, cases: &[Case], inputs: &[PathBuf]) -> Vec<String> {
    let mut failures = Vec::new();
    for (i, case) in cases.iter().enumerate() {
        let out = env.join(format!("{prefix}-{i}"));
        let r = env.merge(&case.pmad_args(), &out, inputs);
        if r.code != 0 {
            failures.push(format!(
                "[{}] pmad merge failed\n{}",
                case.label(),
                r.describe()
            ));
            continue;
        }
        let o = env.oracle(&case.oracle_args(), &out, inputs);
        if o.code != 0 {
            failures.push(format!(
                "[{}] oracle disagrees\n{}",
                case.label(),
                o.describe()
            ));
        }
    }
    failures
}

/// The standard method matrix for `src` inputs, plus conversions to `convert_to`.
fn matrix(src: &'static str, convert_to: &[&'static str]) -> Vec<Case> {
    let mut cases = vec![
        Case::new(SMA, "source", &[]),
        Case::new(WMA, "source", &[]),
        Case::new(EMA, "source", &[]),
        Case::new(WEIGHTS, "source", &[]),
        Case::new(WMA, "source", &["--accumulator", "f64"]),
        Case::new(EMA, "source", &["--accumulator", "f64"]),
        // Naming the source dtype explicitly is the same as "source".
        Case::new(WEIGHTS, src, &[]),
    ];
    for &d in convert_to {
        cases.push(Case::new(SMA, d, &[]));
        cases.push(Case::new(EMA, d, &["--accumulator", "f64"]));
        cases.push(Case::new(WEIGHTS, d, &[]));
    }
    cases
}

// ------------------------------------------------------------------ 1. oracle agreement

#[test]
fn oracle_matrix_bf16_inputs() {
    let env = TestEnv::new();
    let inputs = env.make_series("ckpts", "bf16", 4, &[]);
    assert_no_failures(&merge_and_check(
        &env,
        "out",
        &matrix("bf16", &["f32"]),
        &inputs,
    ));
}

#[test]
fn oracle_matrix_f16_inputs() {
    let env = TestEnv::new();
    let inputs = env.make_series("ckpts", "f16", 4, &[]);
    assert_no_failures(&merge_and_check(
        &env,
        "out",
        &matrix("f16", &["bf16", "f32"]),
        &inputs,
    ));
}

#[test]
fn oracle_matrix_f32_inputs() {
    let env = TestEnv::new();
    let inputs = env.make_series("ckpts", "f32", 4, &[]);
    assert_no_failures(&merge_and_check(
        &env,
        "out",
        &matrix("f32", &["bf16"]),
        &inputs,
    ));
}

/// Decay-emulating weights: each shape, with and without a final LR floor, on bf16 and f32
/// inputs; the oracle computes the weights from the closed forms on its own.
#[test]
fn oracle_schedule_weights() {
    let env = TestEnv::new();
    let bf16s = env.make_series("bf16", "bf16", 5, &[]);
    let f32s = env.make_series("f32", "f32", 3, &[]);
    let shapes: [&[&str]; 4] = [
        &["--method", "schedule", "--shape", "minus_sqrt"],
        &["--method", "schedule", "--shape", "linear"],
        &["--method", "schedule", "--shape", "cosine"],
        &[
            "--method",
            "schedule",
            "--shape",
            "minus_sqrt",
            "--final-lr-ratio",
            "0.1",
        ],
    ];
    let cases: Vec<Case> = shapes.iter().map(|m| Case::new(m, "source", &[])).collect();
    let mut failures = merge_and_check(&env, "out-bf16", &cases, &bf16s);
    failures.extend(merge_and_check(
        &env,
        "out-f32",
        &[
            Case::new(shapes[2], "source", &[]),
            Case::new(shapes[3], "bf16", &[]),
        ],
        &f32s,
    ));
    assert_no_failures(&failures);
    // The n = 5 minus_sqrt weights put the most on the oldest checkpoint, as recorded.
    let rec = read_json(&env.join("out-bf16-0/merge.json"));
    let w: Vec<f64> = rec["weights"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap())
        .collect();
    assert!((w[0] - 0.2f64.sqrt()).abs() < 1e-12, "{w:?}");
    assert!(w.windows(2).all(|p| p[0] > p[1]), "{w:?}");
    assert_eq!(rec["shape"], "minus_sqrt");
    // Wrong uses name the flag.
    let out = env.join("bad");
    for (args, flag) in [
        (&["--method", "schedule"][..], "--shape"),
        (&["--method", "sma", "--shape", "cosine"][..], "--shape"),
        (
            &[
                "--method",
                "schedule",
                "--shape",
                "cosine",
                "--final-lr-ratio",
                "2",
            ][..],
            "--final-lr-ratio",
        ),
    ] {
        let r = env.merge(args, &out, &bf16s);
        assert_eq!(r.code, 2, "{args:?}\n{}", r.describe());
        assert!(r.stderr.contains(flag), "{args:?}: {}", r.stderr);
    }
}

/// f32 inputs that are far from each other (one is the negation of another, the newest is
/// tiny): their mean is small against the inputs, where an f32 accumulator's rounding errors
/// dominate. `pmad merge` to f32 therefore accumulates in f64 unless told otherwise, and the
/// result is within 1e-6 of the mean itself.
#[test]
fn f32_outputs_accumulate_in_f64_unless_told_otherwise() {
    let env = TestEnv::new();
    let inputs = vec![
        env.make("a/checkpoint-100", "f32", 1, 100, &["--no-edge"]),
        env.make(
            "a/checkpoint-200",
            "f32",
            1,
            200,
            &["--no-edge", "--scale", "-1"],
        ),
        env.make(
            "a/checkpoint-300",
            "f32",
            2,
            300,
            &["--no-edge", "--scale", "1e-4"],
        ),
    ];
    let strict = [
        "--method",
        "sma",
        "--dtype",
        "source",
        "--f32-within",
        "mean",
    ];
    let auto = env.join("auto");
    env.merge(&["--method", "sma"], &auto, &inputs).expect_ok();
    assert_eq!(read_json(&auto.join("merge.json"))["accumulator"], "f64");
    let o = env.oracle(&strict, &auto, &inputs);
    assert_eq!(o.code, 0, "{}", o.describe());
    // Forcing f32 still works, and misses the mean by far more than 1e-6 of it (the check
    // has teeth).
    let forced = env.join("forced");
    env.merge(
        &["--method", "sma", "--accumulator", "f32"],
        &forced,
        &inputs,
    )
    .expect_ok();
    assert_eq!(read_json(&forced.join("merge.json"))["accumulator"], "f32");
    let o = env.oracle(&strict, &forced, &inputs);
    assert_eq!(o.code, 1, "{}", o.describe());
    // bf16 outputs keep the f32 accumulator (within 1 ulp either way).
    let bf16 = env.join("bf16");
    env.merge(&["--method", "sma", "--dtype", "bf16"], &bf16, &inputs)
        .expect_ok();
    assert_eq!(read_json(&bf16.join("merge.json"))["accumulator"], "f32");
}

/// Narrowing to f16 without the edge values (half of f32/bf16 max does not fit in f16).
#[test]
fn oracle_narrowing_to_f16_without_edge_values() {
    let env = TestEnv::new();
    let f32s = env.make_series("f32", "f32", 3, &["--no-edge"]);
    let bf16s = env.make_series("bf16", "bf16", 3, &["--no-edge"]);
    let mut failures = merge_and_check(
        &env,
        "out-f32",
        &[
            Case::new(SMA, "f16", &[]),
            Case::new(EMA, "f16", &["--accumulator", "f64"]),
        ],
        &f32s,
    );
    failures.extend(merge_and_check(
        &env,
        "out-bf16",
        &[Case::new(WMA, "f16", &[])],
        &bf16s,
    ));
    assert_no_failures(&failures);
}

/// Sharded inputs (3 shards + index each) merged into a sharded output (1 KB shards), and a
/// mix of layouts (sharded, single file, bare file) in one merge.
#[test]
fn oracle_sharded_inputs_and_sharded_output() {
    let env = TestEnv::new();
    let inputs = env.make_series("sharded", "bf16", 4, &["--sharded", "3"]);
    for i in &inputs {
        assert!(
            i.join("model.safetensors.index.json").is_file(),
            "fixture not sharded: {i:?}"
        );
    }
    let cases = [
        Case::new(WMA, "source", &["--shard-size", "1KB"]),
        Case::new(EMA, "f32", &["--shard-size", "1KB", "--accumulator", "f64"]),
        Case::new(SMA, "source", &[]),
    ];
    let mut failures = merge_and_check(&env, "out", &cases, &inputs);
    // The 1 KB outputs really are sharded: several shards, an index, no single file.
    for i in 0..2 {
        let out = env.join(format!("out-{i}"));
        if !out.exists() {
            continue;
        }
        let names = list_dir(&out);
        let shards: Vec<_> = names
            .iter()
            .filter(|n| n.starts_with("model-") && n.ends_with(".safetensors"))
            .collect();
        if shards.len() < 2
            || !names.contains(&"model.safetensors.index.json".to_string())
            || names.contains(&"model.safetensors".to_string())
        {
            failures.push(format!(
                "{}: expected several shards + index, found {names:?}",
                s(&out)
            ));
        }
        // HF-style total_size: sum of tensor data bytes.
        let index = read_json(&out.join("model.safetensors.index.json"));
        let data: usize = load_tensors(&out).values().map(|t| t.data.len()).sum();
        if index["metadata"]["total_size"].as_u64() != Some(data as u64) {
            failures.push(format!(
                "{}: index total_size {} != {data}",
                s(&out),
                index["metadata"]
            ));
        }
    }
    // Default shard size: one model.safetensors, no index.
    let out2 = env.join("out-2");
    if out2.exists() {
        let names = list_dir(&out2);
        if !names.contains(&"model.safetensors".to_string())
            || names
                .iter()
                .any(|n| n.contains("index") || n.starts_with("model-"))
        {
            failures.push(format!(
                "{}: expected one model.safetensors, found {names:?}",
                s(&out2)
            ));
        }
    }

    // Mixed layouts: sharded dir, single-file dir, bare file, sharded dir.
    let mixed = vec![
        inputs[0].clone(),
        env.make("mixed/checkpoint-200", "bf16", 2, 200, &[]),
        env.make(
            "mixed/checkpoint-300.safetensors",
            "bf16",
            3,
            300,
            &["--layout", "file"],
        ),
        inputs[3].clone(),
    ];
    failures.extend(merge_and_check(
        &env,
        "out-mixed",
        &[Case::new(WEIGHTS, "source", &["--shard-size", "1KB"])],
        &mixed,
    ));
    assert_no_failures(&failures);
}

/// Bare `.safetensors` files as inputs (no directory, so no side files to copy).
#[test]
fn oracle_bare_file_inputs() {
    let env = TestEnv::new();
    let inputs: Vec<PathBuf> = (1..=4)
        .map(|i| {
            env.make(
                &format!("files/checkpoint-{}.safetensors", 100 * i),
                "f16",
                i,
                100 * i,
                &["--layout", "file"],
            )
        })
        .collect();
    let cases = [
        Case::new(EMA, "source", &[]),
        Case::new(WEIGHTS, "bf16", &["--shard-size", "1KB"]),
    ];
    let mut failures = merge_and_check(&env, "out", &cases, &inputs);
    let out = env.join("out-0");
    if out.exists() {
        let names = list_dir(&out);
        if names != ["merge.json", "model.safetensors"] {
            failures.push(format!("{}: unexpected files {names:?}", s(&out)));
        }
        let m = read_json(&out.join("merge.json"));
        if m["steps"] != serde_json::json!([100, 200, 300, 400]) {
            failures.push(format!("merge.json steps {} (from file names)", m["steps"]));
        }
    }
    assert_no_failures(&failures);
}

// ------------------------------------------------- 2. determinism / independence of batching

#[test]
fn output_is_independent_of_threads_chunk_size_and_memory_budget() {
    let env = TestEnv::new();
    let inputs = env.make_series("ckpts", "f32", 4, &[]);
    // (threads, chunk, memory budget): a 41MB budget leaves no room to map the inputs, so
    // they are read through small buffers instead.
    let runs: [(&str, Option<&str>, Option<&str>); 8] = [
        ("1", None, None),
        ("2", None, None),
        ("1", Some("64B"), None),
        ("2", Some("64B"), None),
        ("1", Some("1KiB"), None),
        ("2", Some("1KiB"), None),
        ("1", None, Some("41MB")),
        ("2", Some("1KiB"), Some("41MB")),
    ];
    let mut failures = Vec::new();
    for (method, tag) in [(WMA, "wma"), (EMA, "ema-bf16")] {
        let mut reference: Option<(String, Vec<u8>)> = None;
        for (threads, chunk, budget) in runs {
            let label = format!(
                "{tag} threads={threads} chunk={} budget={}",
                chunk.unwrap_or("default"),
                budget.unwrap_or("default")
            );
            let out = env.join(format!(
                "out-{tag}-{threads}-{}-{}",
                chunk.unwrap_or("default"),
                budget.unwrap_or("default")
            ));
            let mut args = method.to_vec();
            if tag == "ema-bf16" {
                args.extend(["--dtype", "bf16"]);
            }
            args.extend(["--threads", threads]);
            if let Some(c) = chunk {
                args.extend(["--chunk-size", c]);
            }
            if let Some(b) = budget {
                args.extend(["--memory-budget", b]);
            }
            env.merge(&args, &out, &inputs).expect_ok();
            let bytes = std::fs::read(out.join("model.safetensors")).expect("model.safetensors");
            match &reference {
                None => reference = Some((label, bytes)),
                Some((ref_label, ref_bytes)) => {
                    if &bytes != ref_bytes {
                        failures.push(format!(
                            "{label}: model.safetensors differs from {ref_label}"
                        ));
                    }
                }
            }
        }
    }
    // Sharded output: every file but merge.json is identical.
    let a = env.join("sharded-a");
    let b = env.join("sharded-b");
    env.merge(
        &[
            "--method",
            "sma",
            "--shard-size",
            "1KB",
            "--threads",
            "1",
            "--chunk-size",
            "64B",
        ],
        &a,
        &inputs,
    )
    .expect_ok();
    env.merge(
        &["--method", "sma", "--shard-size", "1KB", "--threads", "2"],
        &b,
        &inputs,
    )
    .expect_ok();
    let (na, nb) = (list_dir(&a), list_dir(&b));
    if na != nb {
        failures.push(format!(
            "sharded outputs list different files: {na:?} vs {nb:?}"
        ));
    }
    for n in na.iter().filter(|n| *n != "merge.json") {
        if std::fs::read(a.join(n)).ok() != std::fs::read(b.join(n)).ok() {
            failures.push(format!("sharded outputs differ in {n}"));
        }
    }
    // And the shared result is right.
    let o = env.oracle(&["--method", "sma"], &a, &inputs);
    if o.code != 0 {
        failures.push(format!("oracle on the sharded output\n{}", o.describe()));
    }
    assert_no_failures(&failures);
}

// ------------------------------------------------------------ 3. identical inputs are exact

#[test]
fn identical_inputs_give_back_the_input_bit_for_bit() {
    let env = TestEnv::new();
    let mut failures = Vec::new();
    for dtype in ["bf16", "f16", "f32"] {
        let ckpt = env.make(&format!("{dtype}/checkpoint-100"), dtype, 7, 100, &[]);
        let inputs = vec![ckpt.clone(); 5];
        let want = load_tensors(&ckpt);
        let weights5: &[&str] = &["--method", "weights", "--weights", "3,1,4,1,5"];
        let cases: [(&str, &[&str]); 6] = [
            ("sma", SMA),
            ("wma", WMA),
            ("ema", EMA),
            ("weights", weights5),
            ("wma-acc64", &["--method", "wma", "--accumulator", "f64"]),
            ("sma-1KB", &["--method", "sma", "--shard-size", "1KB"]),
        ];
        for (tag, args) in cases {
            let out = env.join(format!("{dtype}/out-{tag}"));
            let r = env.merge(args, &out, &inputs);
            if r.code != 0 {
                failures.push(format!("[{dtype} {tag}] merge failed\n{}", r.describe()));
                continue;
            }
            let got = load_tensors(&out);
            if got.keys().collect::<Vec<_>>() != want.keys().collect::<Vec<_>>() {
                failures.push(format!("[{dtype} {tag}] tensor names differ"));
                continue;
            }
            for (name, w) in &want {
                let g = &got[name];
                if (g.dtype.as_str(), &g.shape) != (w.dtype.as_str(), &w.shape) {
                    failures.push(format!(
                        "[{dtype} {tag}] {name}: {} {:?} != input {} {:?}",
                        g.dtype, g.shape, w.dtype, w.shape
                    ));
                } else if g.data != w.data {
                    failures.push(format!(
                        "[{dtype} {tag}] {name}: bytes differ from the input at {}",
                        element_diffs(&w.dtype, &w.data, &g.data)
                    ));
                }
            }
        }
        // The oracle agrees too (5 identical inputs, 1/5 weights).
        let o = env.oracle(
            &["--method", "sma"],
            &env.join(format!("{dtype}/out-sma")),
            &inputs,
        );
        if o.code != 0 {
            failures.push(format!("[{dtype}] oracle\n{}", o.describe()));
        }
    }
    assert_no_failures(&failures);
}

/// "element i: input 0x.. output 0x.." for the first few differing elements (little-endian
/// words, so the sign bit of a float is the top bit shown).
fn element_diffs(dtype: &str, want: &[u8], got: &[u8]) -> String {
    let size = match dtype {
        "F64" | "I64" | "U64" => 8,
        "F32" | "I32" | "U32" => 4,
        "F16" | "BF16" | "I16" | "U16" => 2,
        _ => 1,
    };
    let hex = |c: &[u8]| {
        c.iter()
            .rev()
            .map(|b| format!("{b:02x}"))
            .collect::<String>()
    };
    let diffs: Vec<String> = want
        .chunks(size)
        .zip(got.chunks(size))
        .enumerate()
        .filter(|(_, (w, g))| w != g)
        .map(|(i, (w, g))| format!("element {i}: input 0x{} output 0x{}", hex(w), hex(g)))
        .collect();
    let shown = diffs.iter().take(5).cloned().collect::<Vec<_>>().join(", ");
    format!("{} element(s): {shown}", diffs.len())
}

// ---------------------------------------------------------- 4. side files and provenance

#[test]
fn side_files_come_from_the_newest_input_and_merge_json_records_provenance() {
    let env = TestEnv::new();
    let inputs = env.make_series("ckpts", "bf16", 4, &[]);
    let newest = &inputs[3];
    let out = env.join("merged");
    env.merge(WEIGHTS, &out, &inputs).expect_ok();

    for name in ["config.json", "tokenizer_config.json"] {
        let got = std::fs::read(out.join(name)).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(
            got,
            std::fs::read(newest.join(name)).unwrap(),
            "{name} is not the newest's"
        );
    }
    let config = read_json(&out.join("config.json"));
    assert_eq!(
        config["fixture_seed"], 4,
        "config.json not from the newest input"
    );
    assert_eq!(
        config["fixture_step"], 400,
        "config.json not from the newest input"
    );
    assert_eq!(
        read_json(&out.join("tokenizer_config.json"))["fixture_seed"],
        4
    );
    for decoy in ["optimizer.pt", "training_args.bin", "trainer_state.json"] {
        assert!(newest.join(decoy).exists(), "fixture lacks {decoy}");
        assert!(
            !out.join(decoy).exists(),
            "{decoy} must not be copied into the output"
        );
    }
    let names = list_dir(&out);
    assert_eq!(
        names,
        [
            "config.json",
            "merge.json",
            "model.safetensors",
            "tokenizer_config.json"
        ],
        "unexpected output files"
    );

    let m = read_json(&out.join("merge.json"));
    assert_eq!(m["method"], "weights");
    let w: Vec<f64> = m["weights"]
        .as_array()
        .expect("weights array")
        .iter()
        .map(|x| x.as_f64().expect("weight"))
        .collect();
    let want = [0.1, 0.2, 0.3, 0.4];
    assert!(
        w.len() == 4 && w.iter().zip(want).all(|(a, b)| (a - b).abs() < 1e-12),
        "merge.json weights {w:?}, want {want:?} (oldest -> newest)"
    );
    assert_eq!(m["steps"], serde_json::json!([100, 200, 300, 400]));
    let want_inputs: Vec<String> = inputs
        .iter()
        .map(|p| s(&std::fs::canonicalize(p).unwrap()))
        .collect();
    assert_eq!(
        m["inputs"],
        serde_json::json!(want_inputs),
        "merge.json inputs"
    );
    assert_eq!(m["dtype"], "source");
    assert_eq!(m["pmad_version"], env!("CARGO_PKG_VERSION"));
    assert_eq!(m["nonfinite"], 0);

    // Header provenance: format=pt always.
    let meta = file_metadata(&out.join("model.safetensors"));
    assert_eq!(
        meta.get("format").map(String::as_str),
        Some("pt"),
        "__metadata__ {meta:?}"
    );

    // A second merge records alpha and the requested dtype and accumulator.
    let out2 = env.join("merged-ema");
    env.merge(
        &[
            "--method",
            "ema",
            "--alpha",
            "0.2",
            "--dtype",
            "f32",
            "--accumulator",
            "f64",
        ],
        &out2,
        &inputs,
    )
    .expect_ok();
    let m2 = read_json(&out2.join("merge.json"));
    assert_eq!(m2["method"], "ema");
    assert_eq!(m2["alpha"], 0.2);
    assert_eq!(m2["dtype"], "f32");
    assert_eq!(m2["accumulator"], "f64");
    env.oracle(
        &["--method", "ema", "--alpha", "0.2", "--dtype", "f32"],
        &out2,
        &inputs,
    )
    .expect_ok();
}

// -------------------------------------------------------------------- 5. output protection

#[test]
fn existing_output_is_refused_without_force_and_replaced_with_force() {
    let env = TestEnv::new();
    let inputs = env.make_series("ckpts", "bf16", 2, &[]);
    let parent = env.mkdir("outs");
    let out = parent.join("merged");
    std::fs::create_dir_all(out.join("sub")).unwrap();
    std::fs::write(out.join("keep.txt"), b"precious").unwrap();
    std::fs::write(out.join("sub/inner"), b"also precious").unwrap();

    let r = env.merge(SMA, &out, &inputs);
    r.expect_code(2);
    assert!(
        r.stderr.contains("--force"),
        "stderr should mention --force\n{}",
        r.describe()
    );
    assert_eq!(
        list_dir(&out),
        ["keep.txt", "sub"],
        "existing output was modified"
    );
    assert_eq!(std::fs::read(out.join("keep.txt")).unwrap(), b"precious");
    assert_eq!(
        std::fs::read(out.join("sub/inner")).unwrap(),
        b"also precious"
    );
    assert_eq!(
        list_dir(&parent),
        ["merged"],
        "refused merge left something in the parent"
    );

    env.merge(&["--method", "sma", "--force"], &out, &inputs)
        .expect_ok();
    assert!(
        !out.join("keep.txt").exists() && !out.join("sub").exists(),
        "old contents remain"
    );
    assert!(
        out.join("model.safetensors").is_file(),
        "no model.safetensors after --force"
    );
    assert_eq!(
        list_dir(&parent),
        ["merged"],
        "--force left temp dirs or old copies behind"
    );
    env.oracle(SMA, &out, &inputs).expect_ok();

    // --force onto a fresh name works like a plain merge.
    let fresh = parent.join("fresh");
    env.merge(&["--method", "sma", "--force"], &fresh, &inputs)
        .expect_ok();
    assert_eq!(list_dir(&parent), ["fresh", "merged"]);
}

/// `--out` naming an existing regular file: pmad may refuse (exit 2, file untouched) or
/// replace it, but must never leave a `.pmad-tmp-*` entry behind.
#[test]
fn force_over_an_existing_file_leaves_no_temp_entry() {
    let env = TestEnv::new();
    let inputs = env.make_series("ckpts", "bf16", 2, &[]);
    let parent = env.mkdir("outs");
    let out = parent.join("merged");
    std::fs::write(&out, b"a file, not a dir").unwrap();

    let r = env.merge(&["--method", "sma", "--force"], &out, &inputs);
    match r.code {
        0 => assert!(
            out.join("model.safetensors").is_file(),
            "exit 0 but no output\n{}",
            r.describe()
        ),
        2 => assert_eq!(std::fs::read(&out).unwrap(), b"a file, not a dir"),
        _ => panic!(
            "expected exit 0 (replaced) or 2 (refused)\n{}",
            r.describe()
        ),
    }
    assert_eq!(
        list_dir(&parent),
        ["merged"],
        "leftovers in the parent of --out\n{}",
        r.describe()
    );
}

/// `--force --out` naming one of the inputs would delete a training checkpoint (optimizer
/// state included) to put the merge there: it must be refused as a usage error.
#[test]
fn force_never_replaces_an_input_checkpoint() {
    let env = TestEnv::new();
    let inputs = env.make_series("ckpts", "bf16", 2, &[]);
    let before = list_dir(&inputs[1]);
    let model = std::fs::read(inputs[1].join("model.safetensors")).unwrap();
    let r = env.merge(&["--method", "sma", "--force"], &inputs[1], &inputs);
    assert_eq!(
        r.code,
        2,
        "--out is an input: want a usage error\n{}",
        r.describe()
    );
    assert_eq!(
        list_dir(&inputs[1]),
        before,
        "the input checkpoint was modified"
    );
    assert_eq!(
        std::fs::read(inputs[1].join("model.safetensors")).unwrap(),
        model
    );
    assert_eq!(
        list_dir(&env.join("ckpts")),
        ["checkpoint-100", "checkpoint-200"]
    );
}

// ------------------------------------------------------------------------ 6. hostile inputs

/// Expect a refused merge: exit 1, `needles` all in stderr, and nothing new in `parent`.
fn expect_refused(
    label: &str,
    r: &Run,
    parent: &Path,
    needles: &[&str],
    any_of: &[&str],
) -> Vec<String> {
    let mut f = Vec::new();
    if r.code != 1 {
        f.push(format!("[{label}] expected exit 1\n{}", r.describe()));
    }
    for n in needles {
        if !r.stderr.contains(n) {
            f.push(format!(
                "[{label}] stderr does not name {n:?}\n{}",
                r.describe()
            ));
        }
    }
    if !any_of.is_empty() && !any_of.iter().any(|n| r.stderr.contains(n)) {
        f.push(format!(
            "[{label}] stderr names none of {any_of:?}\n{}",
            r.describe()
        ));
    }
    let left = list_dir(parent);
    if !left.is_empty() {
        f.push(format!(
            "[{label}] refused merge left {left:?} in {}",
            s(parent)
        ));
    }
    f
}

/// The part of fixtures.py's hostile description after "<out>: ".
fn what(desc: &str, out: &Path) -> String {
    let key = format!("{}: ", s(out));
    desc.split_once(&key)
        .map(|(_, w)| w.to_string())
        .unwrap_or_else(|| desc.to_string())
}

/// Tensor names of a good single-file checkpoint in data-offset order.
fn offset_order(file: &Path) -> Vec<String> {
    let bytes = std::fs::read(file).unwrap();
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    meta.offset_keys()
}

#[test]
fn hostile_single_file_inputs_are_refused() {
    let env = TestEnv::new();
    let good = env.make("good/checkpoint-100", "bf16", 1, 100, &[]);
    let order = offset_order(&good.join("model.safetensors"));
    let mut failures = Vec::new();
    for (k, kind) in SINGLE_KINDS.iter().enumerate() {
        let (bad, desc) = env.hostile(kind, &format!("{kind}/checkpoint-500"), &good);
        let file = bad.join("model.safetensors");
        let w = what(&desc, &bad);
        let first_word = w.split_whitespace().next().unwrap_or("").to_string();
        // The tensor(s) an error message must name, per kind.
        let tensors: Vec<String> = match *kind {
            "bad-size" => vec![first_word.clone()],
            "duplicate-name" => {
                let dup = w
                    .split("renamed to ")
                    .nth(1)
                    .and_then(|x| x.split(':').next());
                vec![dup.expect("duplicate-name description").to_string()]
            }
            // The defect sits between the victim and the tensor after it: either may be named.
            "overlap" | "gap" => {
                let at = order
                    .iter()
                    .position(|n| *n == first_word)
                    .expect("victim in order");
                vec![first_word.clone(), order[at + 1].clone()]
            }
            _ => vec![],
        };
        let any: Vec<&str> = tensors.iter().map(String::as_str).collect();
        // As a checkpoint directory (newest, or oldest for every other kind).
        let parent = env.mkdir(format!("outs-{kind}"));
        let ins = if k % 2 == 0 {
            vec![good.clone(), bad.clone()]
        } else {
            vec![bad.clone(), good.clone()]
        };
        let r = env.merge(SMA, &parent.join("merged"), &ins);
        failures.extend(expect_refused(
            &format!("{kind} dir"),
            &r,
            &parent,
            &[&s(&file)],
            &any,
        ));
        // As a bare file.
        let parent = env.mkdir(format!("outs-{kind}-file"));
        let r = env.merge(
            SMA,
            &parent.join("merged"),
            &[file.clone(), good.join("model.safetensors")],
        );
        failures.extend(expect_refused(
            &format!("{kind} bare file"),
            &r,
            &parent,
            &[&s(&file)],
            &any,
        ));
        failures.extend(expect_inspect_invalid(&env, kind, &bad, &s(&file)));
        failures.extend(expect_inspect_invalid(
            &env,
            &format!("{kind} bare file"),
            &file,
            &s(&file),
        ));
    }
    assert_no_failures(&failures);
}

#[test]
fn hostile_index_inputs_are_refused() {
    let env = TestEnv::new();
    let good = env.make("good/checkpoint-100", "f16", 1, 100, &["--sharded", "2"]);
    let mut failures = Vec::new();
    for kind in INDEX_KINDS {
        let (bad, desc) = env.hostile(kind, &format!("{kind}/checkpoint-500"), &good);
        let index = s(&bad.join("model.safetensors.index.json"));
        let shard_prefix = s(&bad.join("model-0000"));
        let tensors: Vec<String> = match kind {
            "index-disagree" => {
                vec![what(&desc, &bad)
                    .split_whitespace()
                    .next()
                    .unwrap()
                    .to_string()]
            }
            _ => vec![],
        };
        let parent = env.mkdir(format!("outs-{kind}"));
        let r = env.merge(SMA, &parent.join("merged"), &[good.clone(), bad.clone()]);
        let mut f = expect_refused(kind, &r, &parent, &[], &[&index, &shard_prefix]);
        for t in &tensors {
            if !r.stderr.contains(t.as_str()) {
                f.push(format!(
                    "[{kind}] stderr does not name tensor {t}\n{}",
                    r.describe()
                ));
            }
        }
        failures.extend(f);
        failures.extend(expect_inspect_invalid(&env, kind, &bad, &s(&bad)));
    }
    assert_no_failures(&failures);
}

/// Rewrite a fixture's model.safetensors in place: reshape / drop-row / remove / add a tensor.
const EDIT_PY: &str = r#"
import sys
import ml_dtypes  # noqa: F401  (registers bfloat16 for safetensors.numpy)
import numpy as np
from safetensors.numpy import load_file, save_file
path, op, name = sys.argv[1:4]
t = load_file(path)
if op == "reshape":
    t[name] = t[name].reshape([int(x) for x in sys.argv[4].split(",")])
elif op == "drop-row":
    t[name] = np.ascontiguousarray(t[name][:-1])
elif op == "remove":
    del t[name]
elif op == "add":
    t[name] = np.zeros((2,), dtype=np.float32)
else:
    sys.exit("bad op " + op)
save_file(t, path, metadata={"format": "pt"})
"#;

#[test]
fn incompatible_inputs_are_refused() {
    let env = TestEnv::new();
    let a = env.make("ckpts/checkpoint-100", "bf16", 1, 100, &[]);
    let b = env.make("ckpts/checkpoint-200", "bf16", 2, 200, &[]);
    let edits: [(&str, &[&str], &str); 4] = [
        (
            "reshape",
            &["model.norm.weight", "2,12"],
            "model.norm.weight",
        ),
        (
            "drop-row",
            &["model.layers.0.mlp.up_proj.weight"],
            "model.layers.0.mlp.up_proj.weight",
        ),
        ("remove", &["mask"], "mask"),
        ("add", &["extra.bias"], "extra.bias"),
    ];
    let mut failures = Vec::new();
    let mut odd = Vec::new();
    for (i, (op, args, tensor)) in edits.iter().enumerate() {
        let c = env.make(
            &format!("{op}/checkpoint-300"),
            "bf16",
            3 + i as u32,
            300,
            &[],
        );
        let mut pa = vec![s(&c.join("model.safetensors")), op.to_string()];
        pa.extend(args.iter().map(|x| x.to_string()));
        env.python(EDIT_PY, &pa).expect_ok();
        odd.push((format!("{op} {tensor}"), c, *tensor));
    }
    // Another dtype altogether (f32 where the others are bf16): every float tensor differs.
    let f = env.make("dtype/checkpoint-300", "f32", 9, 300, &[]);
    odd.push(("dtype f32 vs bf16".into(), f, ""));
    for (label, c, tensor) in &odd {
        for (pos, ins) in [
            ("newest", vec![a.clone(), b.clone(), c.clone()]),
            ("middle", vec![a.clone(), c.clone(), b.clone()]),
        ] {
            let parent = env.mkdir(format!("outs-{}-{pos}", label.replace(' ', "_")));
            let r = env.merge(SMA, &parent.join("merged"), &ins);
            let names: Vec<&str> = if tensor.is_empty() {
                FIXTURE_TENSORS.to_vec()
            } else {
                vec![tensor]
            };
            failures.extend(expect_refused(
                &format!("{label} ({pos})"),
                &r,
                &parent,
                &[&s(c)],
                &names,
            ));
        }
    }
    assert_no_failures(&failures);
}

#[test]
fn nonfinite_inputs_are_refused_unless_allowed() {
    let env = TestEnv::new();
    let good = env.make("ckpts/checkpoint-100", "bf16", 1, 100, &[]);
    let nan = env.make(
        "ckpts/checkpoint-200",
        "bf16",
        2,
        200,
        &["--nonfinite", "nan"],
    );
    let inf = env.make("inf/checkpoint-50", "bf16", 3, 50, &["--nonfinite", "inf"]);
    let mut failures = Vec::new();
    let cases = [
        ("nan newest", vec![good.clone(), nan.clone()], nan.clone()),
        ("inf oldest", vec![inf.clone(), good.clone()], inf.clone()),
    ];
    for (label, ins, culprit) in &cases {
        let parent = env.mkdir(format!("outs-{}", label.replace(' ', "-")));
        let r = env.merge(SMA, &parent.join("merged"), ins);
        failures.extend(expect_refused(
            label,
            &r,
            &parent,
            &[&s(culprit), NONFINITE_TENSOR],
            &[],
        ));
        if !r.stderr.contains("--allow-nonfinite") {
            failures.push(format!(
                "[{label}] stderr should point at --allow-nonfinite\n{}",
                r.describe()
            ));
        }
    }
    // Allowed: the merge succeeds, records the count, and the values follow IEEE rules.
    for (label, ins, _) in &cases {
        let out = env.join(format!("allowed-{}", label.replace(' ', "-")));
        let r = env.merge(&["--method", "sma", "--allow-nonfinite"], &out, ins);
        if r.code != 0 {
            failures.push(format!("[{label} allowed] merge failed\n{}", r.describe()));
            continue;
        }
        let m = read_json(&out.join("merge.json"));
        if m["nonfinite"].as_u64().unwrap_or(0) == 0 {
            failures.push(format!(
                "[{label} allowed] merge.json nonfinite = {}",
                m["nonfinite"]
            ));
        }
        let o = env.oracle(SMA, &out, ins);
        if o.code != 0 {
            failures.push(format!("[{label} allowed] oracle\n{}", o.describe()));
        }
    }
    assert_no_failures(&failures);
}

#[test]
fn directory_without_safetensors_is_refused() {
    let env = TestEnv::new();
    let good = env.make("ckpts/checkpoint-100", "bf16", 1, 100, &[]);
    let pt = env.mkdir("ckpts/checkpoint-200");
    std::fs::write(
        pt.join("pytorch_model.bin"),
        b"PK\x03\x04 not really a pickle",
    )
    .unwrap();
    std::fs::write(pt.join("config.json"), b"{}\n").unwrap();
    let empty = env.mkdir("ckpts/checkpoint-300");
    let mut failures = Vec::new();
    for (label, dir) in [("pytorch_model.bin only", &pt), ("empty dir", &empty)] {
        let parent = env.mkdir(format!("outs-{}", label.replace(' ', "-")));
        let r = env.merge(SMA, &parent.join("merged"), &[good.clone(), dir.clone()]);
        failures.extend(expect_refused(label, &r, &parent, &[&s(dir)], &[]));
        failures.extend(expect_inspect_invalid(&env, label, dir, &s(dir)));
    }
    assert_no_failures(&failures);
}

/// An input path that does not exist: exit 1, the path named, the OS error said once.
#[test]
fn missing_input_is_refused_with_one_clear_message() {
    let env = TestEnv::new();
    let good = env.make("ckpts/checkpoint-100", "bf16", 1, 100, &[]);
    let missing = env.join("ckpts/checkpoint-200");
    let parent = env.mkdir("outs");
    let r = env.merge(SMA, &parent.join("merged"), &[good, missing.clone()]);
    let mut failures = expect_refused("missing input", &r, &parent, &[&s(&missing)], &[]);
    let n = r.stderr.matches("No such file or directory").count();
    if n != 1 {
        failures.push(format!(
            "the OS error appears {n} times in stderr\n{}",
            r.describe()
        ));
    }
    failures.extend(expect_inspect_invalid(
        &env,
        "missing input",
        &missing,
        &s(&missing),
    ));
    assert_no_failures(&failures);
}

// -------------------------------------------------------------------------- 7. usage errors

#[test]
fn usage_errors_exit_2() {
    let env = TestEnv::new();
    let inputs = env.make_series("ckpts", "bf16", 2, &[]);
    let parent = env.mkdir("outs");
    let out = parent.join("merged");
    let cases: [(&str, &[&str]); 17] = [
        ("ema without --alpha", &["--method", "ema"]),
        ("ema --alpha 0", &["--method", "ema", "--alpha", "0"]),
        ("ema --alpha 1.5", &["--method", "ema", "--alpha", "1.5"]),
        ("ema --alpha nan", &["--method", "ema", "--alpha", "NaN"]),
        ("weights without --weights", &["--method", "weights"]),
        (
            "3 weights for 2 inputs",
            &["--method", "weights", "--weights", "1,2,3"],
        ),
        (
            "1 weight for 2 inputs",
            &["--method", "weights", "--weights", "1"],
        ),
        (
            "negative weight",
            &["--method", "weights", "--weights", "1,-1"],
        ),
        ("zero weights", &["--method", "weights", "--weights", "0,0"]),
        ("--alpha with sma", &["--method", "sma", "--alpha", "0.5"]),
        (
            "--weights with wma",
            &["--method", "wma", "--weights", "1,2"],
        ),
        ("unknown --dtype", &["--method", "sma", "--dtype", "f8"]),
        ("unknown --method", &["--method", "median"]),
        (
            "unknown --accumulator",
            &["--method", "sma", "--accumulator", "f16"],
        ),
        ("--threads 0", &["--method", "sma", "--threads", "0"]),
        (
            "bad --shard-size",
            &["--method", "sma", "--shard-size", "lots"],
        ),
        ("--shard-size 0", &["--method", "sma", "--shard-size", "0"]),
    ];
    let mut failures = Vec::new();
    for (label, args) in cases {
        let r = env.merge(args, &out, &inputs);
        if r.code != 2 || r.stderr.trim().is_empty() {
            failures.push(format!(
                "[{label}] want exit 2 and a message\n{}",
                r.describe()
            ));
        }
        if !list_dir(&parent).is_empty() {
            failures.push(format!(
                "[{label}] left {:?} in the output parent",
                list_dir(&parent)
            ));
        }
    }
    // No checkpoints at all.
    let r = env.pmad(["merge", "--method", "sma", "--out", s(&out).as_str()]);
    if r.code != 2 {
        failures.push(format!("[no checkpoints] want exit 2\n{}", r.describe()));
    }
    assert_no_failures(&failures);
}

// ---------------------------------------------------------- 8. rank-0 and empty tensors

#[test]
fn scalar_and_empty_tensors_survive_merging() {
    let env = TestEnv::new();
    let inputs = env.make_series("ckpts", "f32", 3, &[]);
    let mut failures = Vec::new();
    let cases: [(&str, &[&str], &str); 3] = [
        ("source", &["--method", "wma"], "F32"),
        (
            "bf16 sharded",
            &["--method", "wma", "--dtype", "bf16", "--shard-size", "1KB"],
            "BF16",
        ),
        (
            "f16 sharded tiny",
            &["--method", "wma", "--dtype", "f16", "--shard-size", "1B"],
            "F16",
        ),
    ];
    for (i, (label, args, dtype)) in cases.iter().enumerate() {
        let out = env.join(format!("out-{i}"));
        let r = env.merge(args, &out, &inputs);
        if r.code != 0 {
            failures.push(format!("[{label}] merge failed\n{}", r.describe()));
            continue;
        }
        let got = load_tensors(&out);
        let elem = if *dtype == "F32" { 4 } else { 2 };
        match got.get("scale") {
            Some(t) if t.shape.is_empty() && t.dtype == *dtype && t.data.len() == elem => {}
            other => failures.push(format!(
                "[{label}] scale: {other:?}, want {dtype} [] {elem} bytes"
            )),
        }
        match got.get("empty") {
            Some(t) if t.shape == [0, 5] && t.dtype == *dtype && t.data.is_empty() => {}
            other => failures.push(format!(
                "[{label}] empty: {other:?}, want {dtype} [0, 5] 0 bytes"
            )),
        }
        let dt = dtype.to_lowercase();
        let oracle_dtype = if *label == "source" {
            "source"
        } else {
            dt.as_str()
        };
        let o = env.oracle(&["--method", "wma", "--dtype", oracle_dtype], &out, &inputs);
        if o.code != 0 {
            failures.push(format!("[{label}] oracle\n{}", o.describe()));
        }
    }
    // The merged output inspects cleanly, scalar and empty tensor included.
    let j = env.pmad([
        Path::new("inspect"),
        Path::new("--json"),
        &env.join("out-0"),
    ]);
    let v: serde_json::Value = serde_json::from_str(&j.stdout).unwrap_or_default();
    let rows = v["tensors"].as_array().cloned().unwrap_or_default();
    let row = |n: &str| rows.iter().find(|r| r["name"] == n).cloned();
    if j.code != 0
        || row("scale").map(|r| r["shape"] == serde_json::json!([])) != Some(true)
        || row("empty").map(|r| r["bytes"] == 0) != Some(true)
    {
        failures.push(format!("inspect of the merged output\n{}", j.describe()));
    }
    assert_no_failures(&failures);
}

/// `--exclude`/`--include` on safetensors: excluded float tensors are copied byte for byte from
/// the newest input; the others are averaged exactly as without patterns.
#[test]
fn select_patterns_copy_excluded_tensors_from_the_newest() {
    let env = TestEnv::new();
    let a = env.make("a/checkpoint-100", "f32", 1, 100, &[]);
    let b = env.make("b/checkpoint-200", "f32", 2, 200, &[]);
    let out = env.join("out");
    let r = env.merge(
        &[
            "--method",
            "sma",
            "--exclude",
            "norm",
            "--exclude",
            "^model\\.embed",
        ],
        &out,
        &[a.clone(), b.clone()],
    );
    assert_eq!(r.code, 0, "{}", r.describe());
    let got = load_tensors(&out);
    let newest = load_tensors(&b);
    for name in ["model.norm.weight", "model.embed_tokens.weight"] {
        assert_eq!(
            got[name].data, newest[name].data,
            "{name} is not the newest's"
        );
    }
    let q = "model.layers.0.self_attn.q_proj.weight";
    assert_ne!(got[q].data, newest[q].data, "{q} was not averaged");
    // It is what a merge without patterns writes (checked against the oracle elsewhere).
    let plain = env.join("plain");
    env.merge(&["--method", "sma"], &plain, &[a.clone(), b.clone()])
        .expect_ok();
    assert_eq!(got[q].data, load_tensors(&plain)[q].data);
    // --include replaces the default: only q_proj is averaged.
    let only = env.join("only");
    env.merge(
        &["--method", "sma", "--include", "q_proj"],
        &only,
        &[a, b.clone()],
    )
    .expect_ok();
    let o = load_tensors(&only);
    assert_eq!(o[q].data, got[q].data);
    let up = "model.layers.0.mlp.up_proj.weight";
    assert_eq!(o[up].data, newest[up].data);
}
