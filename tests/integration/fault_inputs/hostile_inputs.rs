//! Hostile inputs among good checkpoints in one watched directory (test T4 of
//! `docs/reliability.md`): every corrupt kind of `fixtures.py hostile`, dtype/shape/name
//! mismatches, NaN/Inf, unfinished markers, and rejected checkpoints that are fixed later.
//! Each corrupt checkpoint is rejected exactly once, naming the file or tensor; nothing of it
//! is published; fixed ones are accepted; the result is reported kind by kind.

use super::{
    err_lines, expect_accepted, expect_emitted, fixtures, hostile_args, latest, lines_for,
    make_args, merge_steps, pt_meta, reserialize, run_oracle, write_ckpt, write_config,
    write_in_place, OracleCheck, FAST, POLL, SETTLE, SMA2, WAIT,
};
use crate::harness::{copy_tree, list_dir, outputs, Daemon, TestEnv};
use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::time::{Duration, Instant, SystemTime};

/// How a hostile checkpoint of the table is made.
#[derive(Debug, Clone, Copy)]
enum Make {
    /// `fixtures.py hostile --kind K` from a good checkpoint of the same step.
    Fixture(&'static str),
    /// `fixtures.py make` with other options (another dtype, NaN/Inf).
    Variant(&'static str, &'static [&'static str]),
    /// A good checkpoint whose weights are re-serialised with a schema change.
    Schema(SchemaEdit),
    /// A good checkpoint whose `trainer_state.json` is replaced by these bytes.
    Marker(&'static [u8]),
}

#[derive(Debug, Clone, Copy)]
enum SchemaEdit {
    /// `model.norm.weight` [24] -> [12].
    Shape,
    /// `mask` removed.
    MissingTensor,
    /// `extra.weight` added.
    ExtraTensor,
}

/// How a rejected checkpoint is repaired in phase C.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Fix {
    None,
    /// Marker replaced by the good trainer_state.json (written in place).
    Marker,
    /// model.safetensors replaced by the good one (temp file + rename, like a copy tool).
    Weights,
    /// The index rewritten in place from the shards' actual contents.
    Index,
}

struct Kind {
    name: &'static str,
    step: u64,
    make: Make,
    /// Acceptable `reason` values (empty: must not be rejected at all).
    reasons: &'static [&'static str],
    /// The `error` must contain one of these (the file or tensor).
    names: &'static [&'static str],
    fix: Fix,
}

const SINGLE: &[&str] = &["model.safetensors"];
const INDEXED: &[&str] = &[
    "model.safetensors.index.json",
    "model-00002-of-00002.safetensors",
];
const TENSORS: &[&str] = &[
    "model.embed_tokens.weight",
    "model.layers.0.self_attn.q_proj.weight",
    "model.layers.0.mlp.up_proj.weight",
    "model.norm.weight",
    "tensor scale",
    "tensor empty",
    "position_ids",
    "tensor mask",
];

fn kinds() -> Vec<Kind> {
    use Make::*;
    let k = |name, step, make, reasons, names, fix| Kind {
        name,
        step,
        make,
        reasons,
        names,
        fix,
    };
    let inv: &'static [&'static str] = &["invalid"];
    vec![
        k(
            "truncated",
            300,
            Fixture("truncated"),
            &["incomplete", "invalid"],
            SINGLE,
            Fix::None,
        ),
        k(
            "corrupt-header",
            310,
            Fixture("corrupt-header"),
            inv,
            SINGLE,
            Fix::None,
        ),
        k(
            "header-too-large",
            320,
            Fixture("header-too-large"),
            inv,
            SINGLE,
            Fix::None,
        ),
        k("overlap", 330, Fixture("overlap"), inv, SINGLE, Fix::None),
        k("gap", 340, Fixture("gap"), inv, SINGLE, Fix::None),
        k("bad-size", 350, Fixture("bad-size"), inv, SINGLE, Fix::None),
        k("not-utf8", 360, Fixture("not-utf8"), inv, SINGLE, Fix::None),
        k(
            "duplicate-name",
            370,
            Fixture("duplicate-name"),
            inv,
            SINGLE,
            Fix::None,
        ),
        k(
            "index-missing-shard",
            380,
            Fixture("index-missing-shard"),
            &["incomplete", "invalid", "io"],
            &["model-00002-of-00002.safetensors"],
            Fix::None,
        ),
        k(
            "index-dotdot",
            390,
            Fixture("index-dotdot"),
            inv,
            INDEXED,
            Fix::None,
        ),
        k(
            "index-absolute",
            400,
            Fixture("index-absolute"),
            inv,
            INDEXED,
            Fix::None,
        ),
        k(
            "index-symlink-out",
            410,
            Fixture("index-symlink-out"),
            inv,
            INDEXED,
            Fix::None,
        ),
        k(
            "index-disagree",
            420,
            Fixture("index-disagree"),
            inv,
            INDEXED,
            Fix::None,
        ),
        k(
            "dtype-f32",
            430,
            Variant("f32", &[]),
            &["mismatch"],
            TENSORS,
            Fix::None,
        ),
        k(
            "nan",
            440,
            Variant("bf16", &["--nonfinite", "nan"]),
            &["non_finite"],
            &["model.layers.0.self_attn.q_proj.weight"],
            Fix::None,
        ),
        k(
            "inf",
            450,
            Variant("bf16", &["--nonfinite", "inf"]),
            &["non_finite"],
            &["model.layers.0.self_attn.q_proj.weight"],
            Fix::None,
        ),
        k(
            "shape",
            460,
            Schema(SchemaEdit::Shape),
            &["mismatch"],
            &["model.norm.weight"],
            Fix::None,
        ),
        k(
            "missing-tensor",
            470,
            Schema(SchemaEdit::MissingTensor),
            &["mismatch"],
            &["mask"],
            Fix::None,
        ),
        k(
            "extra-tensor",
            480,
            Schema(SchemaEdit::ExtraTensor),
            &["mismatch"],
            &["extra.weight"],
            Fix::None,
        ),
        k("marker-empty", 600, Marker(b""), &[], &[], Fix::Marker),
        k(
            "marker-garbage",
            610,
            Marker(b"{not json"),
            &[],
            &[],
            Fix::Marker,
        ),
        k(
            "truncated-then-fixed",
            620,
            Fixture("truncated"),
            &["incomplete", "invalid"],
            SINGLE,
            Fix::Weights,
        ),
        k(
            "index-absolute-then-fixed",
            630,
            Fixture("index-absolute"),
            inv,
            INDEXED,
            Fix::Index,
        ),
    ]
}

/// Rewrite `<dir>/model.safetensors.index.json` in place from the shards' headers.
fn repair_index(dir: &Path) {
    let mut weight_map = serde_json::Map::new();
    let mut total = 0u64;
    let mut shards: Vec<String> = list_dir(dir)
        .into_iter()
        .filter(|n| n.starts_with("model-") && n.ends_with(".safetensors"))
        .collect();
    shards.sort();
    let mut entries = BTreeMap::new();
    for sh in &shards {
        let bytes = std::fs::read(dir.join(sh)).expect("read shard");
        let st = safetensors::SafeTensors::deserialize(&bytes).expect("shard");
        for (n, v) in st.tensors() {
            total += v.data().len() as u64;
            entries.insert(n, sh.clone());
        }
    }
    for (n, sh) in entries {
        weight_map.insert(n, serde_json::Value::String(sh));
    }
    let v = serde_json::json!({"metadata": {"total_size": total}, "weight_map": weight_map});
    let text = serde_json::to_vec_pretty(&v).unwrap();
    write_in_place(&dir.join("model.safetensors.index.json"), &text, FAST);
}

#[test]
fn hostile_inputs_rejected_once_and_daemon_keeps_going() {
    let env = TestEnv::new();
    let watch = env.mkdir("watch");
    let out_root = env.mkdir("out");
    let good = env.join("good");
    let stage = env.mkdir("stage");
    let pristine = env.mkdir("pristine");
    let kinds = kinds();
    let g = |step: u64| good.join(format!("checkpoint-{step}"));
    let st = |step: u64| stage.join(format!("checkpoint-{step}"));

    // Good checkpoints (also the sources of the hostile ones, same step) and variants.
    let mut jobs = Vec::new();
    let mut good_steps: Vec<u64> = vec![100, 200, 700];
    good_steps.extend(kinds.iter().map(|k| k.step));
    for &step in &good_steps {
        jobs.push(make_args(&g(step), "bf16", step / 10, step, &["--no-edge"]));
    }
    for k in &kinds {
        if let Make::Variant(dtype, extra) = k.make {
            let mut e = vec!["--no-edge"];
            e.extend_from_slice(extra);
            jobs.push(make_args(&st(k.step), dtype, k.step / 10, k.step, &e));
        }
    }
    fixtures(&env, &jobs);
    let hostile: Vec<Vec<String>> = kinds
        .iter()
        .filter_map(|k| match k.make {
            Make::Fixture(kind) => Some(hostile_args(kind, &st(k.step), &g(k.step))),
            _ => None,
        })
        .collect();
    fixtures(&env, &hostile);
    for k in &kinds {
        match k.make {
            Make::Schema(edit) => {
                copy_tree(&g(k.step), &st(k.step));
                reserialize(
                    &st(k.step).join("model.safetensors"),
                    |ts| match edit {
                        SchemaEdit::Shape => {
                            let t = ts.iter_mut().find(|t| t.0 == "model.norm.weight").unwrap();
                            t.2 = vec![12];
                            t.3.truncate(24);
                        }
                        SchemaEdit::MissingTensor => ts.retain(|t| t.0 != "mask"),
                        SchemaEdit::ExtraTensor => ts.push((
                            "extra.weight".into(),
                            safetensors::Dtype::BF16,
                            vec![4],
                            vec![0; 8],
                        )),
                    },
                    pt_meta(),
                );
            }
            Make::Marker(bytes) => {
                copy_tree(&g(k.step), &st(k.step));
                std::fs::write(st(k.step).join("trainer_state.json"), bytes).unwrap();
            }
            _ => {}
        }
    }

    let cfg = write_config(&env, &watch, &[SMA2], &out_root, None);
    let out = out_root.join("sma2");
    let mut d = Daemon::start(env.path(), &cfg, "pmad");
    d.expect("daemon.started", WAIT, |e| e.event() == "daemon.started");

    // Phase A: the window is set by good checkpoints.
    let t_a = SystemTime::now();
    write_ckpt(&g(100), &watch.join("checkpoint-100"), FAST);
    write_ckpt(&g(200), &watch.join("checkpoint-200"), FAST);
    expect_emitted(&mut d, &out_root, "sma2", 200, t_a);

    // Phase B: every hostile checkpoint appears (renamed in whole, marker and all).
    let t_b = SystemTime::now();
    for k in &kinds {
        std::fs::rename(st(k.step), watch.join(format!("checkpoint-{}", k.step)))
            .expect("move hostile checkpoint into the watch dir");
    }
    let rejecting: Vec<&Kind> = kinds.iter().filter(|k| !k.reasons.is_empty()).collect();
    let deadline = Instant::now() + WAIT;
    loop {
        let log = d.log();
        let missing: Vec<&str> = rejecting
            .iter()
            .filter(|k| lines_for(&log, "checkpoint.rejected", k.step).is_empty())
            .map(|k| k.name)
            .collect();
        if missing.is_empty() {
            break;
        }
        assert!(d.alive(), "pmad died: {}\n{}", d.status_text(), d.dump(40));
        assert!(
            Instant::now() < deadline,
            "no checkpoint.rejected within {WAIT:?} for: {missing:?}\n{}",
            d.dump(60)
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    // At least 12 more scans: a rejection must not be logged again, a bad marker must not
    // turn into a rejection or an acceptance.
    std::thread::sleep(POLL * 12 + SETTLE);
    assert!(d.alive(), "pmad died: {}\n{}", d.status_text(), d.dump(40));
    let log_b = d.log();

    // Phase C: repair the fixable ones.
    let t_c = SystemTime::now();
    for k in &kinds {
        let dir = watch.join(format!("checkpoint-{}", k.step));
        match k.fix {
            Fix::None => {}
            Fix::Marker => {
                let b = std::fs::read(g(k.step).join("trainer_state.json")).unwrap();
                write_in_place(&dir.join("trainer_state.json"), &b, FAST);
            }
            Fix::Weights => {
                let tmp = dir.join("model.safetensors.partial");
                std::fs::copy(g(k.step).join("model.safetensors"), &tmp).unwrap();
                std::fs::rename(&tmp, dir.join("model.safetensors")).unwrap();
            }
            Fix::Index => repair_index(&dir),
        }
        if k.fix != Fix::None {
            copy_tree(&dir, &pristine.join(format!("checkpoint-{}", k.step)));
        }
    }
    for k in kinds.iter().filter(|k| k.fix != Fix::None) {
        expect_accepted(&mut d, k.step, t_c);
    }

    // Phase D: a good checkpoint after all of it is published.
    let t_d = SystemTime::now();
    write_ckpt(&g(700), &watch.join("checkpoint-700"), FAST);
    expect_emitted(&mut d, &out_root, "sma2", 700, t_d);
    std::thread::sleep(POLL * 12);
    let alive_at_end = d.alive();
    let code = d.terminate(Duration::from_secs(10));
    let log = d.log();

    // Verdicts, kind by kind.
    let mut steps_in_outputs = BTreeSet::new();
    for dir in outputs(&out).values() {
        steps_in_outputs.extend(merge_steps(dir));
    }
    let mut report = Vec::new();
    let mut failed_kinds = Vec::new();
    for k in &kinds {
        let mut why = Vec::new();
        let rej = lines_for(&log, "checkpoint.rejected", k.step);
        let acc = lines_for(&log, "checkpoint.accepted", k.step);
        let acc_b = lines_for(&log_b, "checkpoint.accepted", k.step);
        if k.reasons.is_empty() {
            if !rej.is_empty() {
                why.push(format!(
                    "an unfinished marker is \"not yet\", but got {} checkpoint.rejected: {}",
                    rej.len(),
                    rej[0].line()
                ));
            }
        } else {
            if rej.len() != 1 {
                why.push(format!(
                    "{} checkpoint.rejected lines, expected exactly 1{}",
                    rej.len(),
                    rej.iter()
                        .map(|e| format!("\n      {}", e.line()))
                        .collect::<String>()
                ));
            }
            if let Some(r) = rej.first() {
                let reason = r.s("reason").unwrap_or("");
                if !k.reasons.contains(&reason) {
                    why.push(format!(
                        "reason {reason:?}, expected one of {:?}",
                        k.reasons
                    ));
                }
                let err = r.s("error").unwrap_or("");
                if !k.names.iter().any(|n| err.contains(n)) {
                    why.push(format!("error {err:?} names none of {:?}", k.names));
                }
            }
        }
        if !acc_b.is_empty() {
            why.push(format!("accepted before it was fixed: {}", acc_b[0].line()));
        }
        match k.fix {
            Fix::None => {
                if !acc.is_empty() {
                    why.push(format!("accepted: {}", acc[0].line()));
                }
                if steps_in_outputs.contains(&k.step) {
                    why.push("an output's merge.json lists its step".into());
                }
            }
            _ => match acc.as_slice() {
                [a] if a.t >= t_c => {}
                [] => why.push("not accepted after it was fixed".into()),
                many => why.push(format!(
                    "{} checkpoint.accepted lines, expected 1 after the fix",
                    many.len()
                )),
            },
        }
        let verdict = if why.is_empty() { "ok" } else { "FAIL" };
        report.push(format!(
            "  {:<26} step {:<4} rejected x{} reason {:<12} accepted x{}  {verdict}",
            k.name,
            k.step,
            rej.len(),
            rej.first().and_then(|r| r.s("reason")).unwrap_or("-"),
            acc.len()
        ));
        if !why.is_empty() {
            failed_kinds.push(format!(
                "{} (step {}):\n    {}",
                k.name,
                k.step,
                why.join("\n    ")
            ));
        }
    }
    eprintln!("hostile inputs, kind by kind:\n{}", report.join("\n"));

    let mut fails = failed_kinds;
    if !alive_at_end || code != Some(0) {
        fails.push(format!(
            "daemon: alive at end {alive_at_end}, shutdown {code:?}"
        ));
    }
    let errs = err_lines(&log);
    if !errs.is_empty() {
        fails.push(format!("ERROR lines in the log:\n{}", errs.join("\n")));
    }
    let bad = d.non_json_lines();
    if !bad.is_empty() {
        fails.push(format!("stdout lines that are not JSON events: {bad:?}"));
    }
    if latest(&out).as_deref() != Some("step-700") {
        fails.push(format!("LATEST is {:?}, expected step-700", latest(&out)));
    }
    // Every output is right, with the fixed checkpoints' final contents.
    let src_of = |step: u64| {
        let p = pristine.join(format!("checkpoint-{step}"));
        if p.exists() {
            p
        } else {
            g(step)
        }
    };
    let checks: Vec<OracleCheck> = outputs(&out)
        .into_iter()
        .map(|(step, dir)| OracleCheck {
            label: format!("sma2 step-{step}"),
            rec: SMA2,
            inputs: merge_steps(&dir).iter().map(|x| src_of(*x)).collect(),
            out: dir,
        })
        .collect();
    fails.extend(run_oracle(&env, &checks));
    assert!(
        fails.is_empty(),
        "hostile inputs ({} kinds, phase B started at {t_b:?}):\n{}\n\nper kind:\n{}\n{}",
        kinds.len(),
        fails.join("\n"),
        report.join("\n"),
        d.dump(80)
    );
}
