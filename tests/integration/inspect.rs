//! `pmad inspect` on good checkpoints (single file, sharded, bare file): its table and its
//! `--json` agree with the reference `safetensors` reader on every tensor, and it reports the
//! step. Also the check that it calls an input invalid, which the merge tests apply to every
//! input `pmad merge` refuses.

use crate::harness::{assert_no_failures, load_tensors, s, TestEnv, FIXTURE_TENSORS};
use std::path::Path;

/// `pmad inspect` (table and --json) must call `ckpt` invalid, naming `needle`.
pub fn expect_inspect_invalid(
    env: &TestEnv,
    label: &str,
    ckpt: &Path,
    needle: &str,
) -> Vec<String> {
    let mut f = Vec::new();
    let t = env.pmad([Path::new("inspect"), ckpt]);
    if t.code != 1 || !t.stdout.contains("verdict: INVALID") {
        f.push(format!(
            "[{label}] inspect: want exit 1 and 'verdict: INVALID'\n{}",
            t.describe()
        ));
    }
    let j = env.pmad([Path::new("inspect"), ckpt, Path::new("--json")]);
    match serde_json::from_str::<serde_json::Value>(&j.stdout) {
        Ok(v) => {
            if j.code != 1 || v["valid"] != false {
                f.push(format!(
                    "[{label}] inspect --json: want exit 1, valid=false\n{}",
                    j.describe()
                ));
            }
            if !v["error"].as_str().unwrap_or("").contains(needle) {
                f.push(format!(
                    "[{label}] inspect --json error does not name {needle:?}\n{}",
                    j.describe()
                ));
            }
        }
        Err(e) => f.push(format!(
            "[{label}] inspect --json: not JSON ({e})\n{}",
            j.describe()
        )),
    }
    f
}

/// `pmad inspect` table and JSON agree with the reference reader.
fn check_inspect(env: &TestEnv, ckpt: &Path, want_files: usize) -> Vec<String> {
    let label = s(ckpt);
    let want = load_tensors(ckpt);
    let mut f = Vec::new();
    let t = env.pmad([Path::new("inspect"), ckpt]);
    if t.code != 0 || !t.stdout.contains("verdict: valid") {
        f.push(format!(
            "[{label}] inspect: want exit 0 and 'verdict: valid'\n{}",
            t.describe()
        ));
    }
    for (name, w) in &want {
        let shape = format!("{:?}", w.shape).replace(' ', "");
        let row = t.stdout.lines().find(|l| {
            let toks: Vec<&str> = l.split_whitespace().collect();
            toks.first() == Some(&name.as_str())
                && toks.contains(&w.dtype.as_str())
                && l.replace(' ', "").contains(&shape)
                // Bytes last, before a "copied" note (tensors that are not averaged).
                && toks.iter().rev().find(|t| **t != "copied")
                    == Some(&w.data.len().to_string().as_str())
        });
        if row.is_none() {
            f.push(format!(
                "[{label}] inspect table has no row for {name} {} {shape} {} bytes\n{}",
                w.dtype,
                w.data.len(),
                t.describe()
            ));
        }
    }
    let j = env.pmad([Path::new("inspect"), Path::new("--json"), ckpt]);
    if j.code != 0 {
        f.push(format!(
            "[{label}] inspect --json: want exit 0\n{}",
            j.describe()
        ));
    }
    let v: serde_json::Value = match serde_json::from_str(&j.stdout) {
        Ok(v) => v,
        Err(e) => {
            f.push(format!(
                "[{label}] inspect --json is not JSON: {e}\n{}",
                j.describe()
            ));
            return f;
        }
    };
    if v["valid"] != true {
        f.push(format!("[{label}] valid = {}", v["valid"]));
    }
    let rows = v["tensors"].as_array().cloned().unwrap_or_default();
    let sum: u64 = rows.iter().map(|r| r["bytes"].as_u64().unwrap_or(0)).sum();
    let ref_sum: u64 = want.values().map(|t| t.data.len() as u64).sum();
    if v["total_bytes"].as_u64() != Some(sum) || sum != ref_sum {
        f.push(format!(
            "[{label}] total_bytes {} / sum of rows {sum} / reference {ref_sum}",
            v["total_bytes"]
        ));
    }
    if rows.len() != want.len() || v["total_tensors"].as_u64() != Some(want.len() as u64) {
        f.push(format!(
            "[{label}] {} rows, total_tensors {}, want {}",
            rows.len(),
            v["total_tensors"],
            want.len()
        ));
    }
    for r in &rows {
        let name = r["name"].as_str().unwrap_or("?");
        match want.get(name) {
            Some(w) => {
                let shape: Vec<usize> = r["shape"]
                    .as_array()
                    .map(|a| {
                        a.iter()
                            .map(|x| x.as_u64().unwrap_or(u64::MAX) as usize)
                            .collect()
                    })
                    .unwrap_or_default();
                if r["dtype"] != w.dtype.as_str()
                    || shape != w.shape
                    || r["bytes"].as_u64() != Some(w.data.len() as u64)
                    || r["file"] != w.file.as_str()
                {
                    f.push(format!("[{label}] JSON row {r} != reference {w:?}"));
                }
            }
            None => f.push(format!("[{label}] JSON lists unknown tensor {name}")),
        }
    }
    let files = v["files"].as_array().map(|a| a.len()).unwrap_or(0);
    if files != want_files {
        f.push(format!("[{label}] files {}, want {want_files}", v["files"]));
    }
    f
}

#[test]
fn inspect_good_checkpoints() {
    let env = TestEnv::new();
    let single = env.make("single/checkpoint-100", "bf16", 1, 100, &[]);
    let sharded = env.make("sharded/checkpoint-200", "f32", 2, 200, &["--sharded", "3"]);
    let file = env.make(
        "file/checkpoint-300.safetensors",
        "f16",
        3,
        300,
        &["--layout", "file"],
    );
    let mut failures = Vec::new();
    failures.extend(check_inspect(&env, &single, 1));
    failures.extend(check_inspect(&env, &sharded, 3));
    failures.extend(check_inspect(&env, &file, 1));
    for c in [&single, &sharded, &file] {
        let names: Vec<String> = load_tensors(c).into_keys().collect();
        let mut want: Vec<String> = FIXTURE_TENSORS.iter().map(|n| n.to_string()).collect();
        want.sort();
        if names != want {
            failures.push(format!("fixture {} has tensors {names:?}", s(c)));
        }
    }
    let j = env.pmad([Path::new("inspect"), Path::new("--json"), &sharded]);
    let v: serde_json::Value = serde_json::from_str(&j.stdout).expect("json");
    if v["step"] != 200 {
        failures.push(format!(
            "inspect --json step {} for checkpoint-200",
            v["step"]
        ));
    }
    assert_no_failures(&failures);
}

/// `pmad inspect CKPT | head`: a reader that goes away is not an error (no panic, exit 0).
#[test]
fn inspect_into_a_closed_pipe_exits_quietly() {
    let env = TestEnv::new();
    let ckpt = crate::harness::repo_root().join("tests/fixtures/dcp/megatron-2rank/iter_0000300");
    for json in ["", " --json"] {
        // `true` exits without reading: pmad's write finds the pipe closed.
        let script = format!(
            "set -o pipefail; {} inspect {}{json} | true",
            crate::harness::pmad_bin().display(),
            ckpt.display()
        );
        let r = crate::harness::run(
            std::process::Command::new("bash")
                .arg("-c")
                .arg(&script)
                .current_dir(env.path()),
        );
        assert_eq!(r.code, 0, "{}", r.describe());
        assert!(!r.stderr.contains("panicked"), "{}", r.describe());
    }
}
