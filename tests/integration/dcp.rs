//! PyTorch DCP checkpoints (tests/fixtures/dcp, written by real torch): `pmad merge` and
//! `pmad run` publish DCP outputs that an independent reader (`tests/py/dcp_check.py`: Python's
//! unpickler with inert classes, `zipfile` with its CRC32 checks, numpy) finds within 1 ulp
//! (bf16) or 1e-6 (f32) of the float64 averages torch computed, with every other item copied
//! byte for byte from the newest input; `pmad inspect` lists keys and chunks; and hostile
//! variants (truncated file, wrong CRC, unknown opcode or class, missing or per-rank
//! metadata, mixed runs) are refused naming the file.

use crate::harness::{
    copy_tree, outputs, py_script, repo_root, s, Config, Daemon, Recipe, Run, TestEnv,
};
use crate::inspect::expect_inspect_invalid;
use pmad::format::dcp::archive;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// The fixture sets written by torch itself (`step-N/`, DCP at the top).
const SETS: [&str; 2] = ["torchtitan", "fsdp2-2rank"];
/// Every fixture set, including those written by Megatron-LM's and OLMo-core's own
/// checkpointers.
const ALL_SETS: [&str; 4] = ["torchtitan", "fsdp2-2rank", "megatron-2rank", "olmo-core"];

fn fixture(set: &str) -> PathBuf {
    repo_root().join("tests/fixtures/dcp").join(set)
}

/// A fixture checkpoint directory, named as its framework names it.
fn step_dir(set: &str, step: u64) -> PathBuf {
    fixture(set).join(match set {
        "megatron-2rank" => format!("iter_{step:07}"),
        "olmo-core" => format!("step{step}"),
        _ => format!("step-{step}"),
    })
}

/// Where the DCP files of a checkpoint of `set` are (OLMo-core: `model_and_optim/`).
fn dcp_root(set: &str, dir: &Path) -> PathBuf {
    if set == "olmo-core" {
        dir.join("model_and_optim")
    } else {
        dir.to_path_buf()
    }
}

/// `dcp_check.py check OUT EXPECTED NEWEST`.
fn check(env: &TestEnv, out: &Path, expected: &Path, newest: &Path) -> Run {
    py_script(
        "dcp_check.py",
        env.path(),
        [Path::new("check"), out, expected, newest],
    )
}

fn copy_dir(src: &Path, dst: &Path) {
    std::fs::create_dir_all(dst).unwrap();
    for e in std::fs::read_dir(src).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), dst.join(e.file_name())).unwrap();
    }
}

#[test]
fn merge_matches_the_averages_torch_computed() {
    let env = TestEnv::new();
    let mut failures = Vec::new();
    for set in ALL_SETS {
        for (method, k, step) in [
            ("sma", 2, 200),
            ("sma", 2, 300),
            ("sma", 3, 300),
            ("wma", 2, 300),
            ("wma", 3, 300),
            ("ema", 2, 200),
            ("ema", 3, 300),
        ] {
            let inputs: Vec<PathBuf> = (0..k)
                .rev()
                .map(|i| step_dir(set, step - 100 * i))
                .collect();
            let out = env.join(format!("{set}-{method}-k{k}-{step}"));
            let mut opts = vec!["--method", method];
            if method == "ema" {
                opts.extend(["--alpha", "0.5"]);
            }
            let r = env.merge(&opts, &out, &inputs);
            if r.code != 0 {
                failures.push(format!(
                    "{set} {method} k{k}: merge failed\n{}",
                    r.describe()
                ));
                continue;
            }
            // The input's files, named as in the input, plus merge.json.
            let mut names: Vec<String> = std::fs::read_dir(&out)
                .unwrap()
                .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect();
            names.sort();
            let mut want: Vec<String> = std::fs::read_dir(step_dir(set, step))
                .unwrap()
                .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect();
            want.push("merge.json".into());
            want.sort();
            if names != want {
                failures.push(format!(
                    "{set} {method} k{k}: files {names:?}, want {want:?}"
                ));
            }
            let expected = fixture(set)
                .join("expected")
                .join(format!("{method}-k{k}-step{step}.safetensors"));
            let c = check(
                &env,
                &dcp_root(set, &out),
                &expected,
                &dcp_root(set, &step_dir(set, step)),
            );
            if c.code != 0 {
                failures.push(format!("{set} {method} k{k} step {step}\n{}", c.describe()));
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}

#[test]
fn select_patterns_choose_what_is_averaged() {
    let env = TestEnv::new();
    let set = "torchtitan";
    let inputs = [step_dir(set, 200), step_dir(set, 300)];
    let expected = fixture(set).join("expected/sma-k2-step300.safetensors");
    // Excluded keys are copied from the newest checkpoint, the rest still averaged.
    let out = env.join("excluded");
    let r = env.merge(
        &[
            "--method",
            "sma",
            "--exclude",
            "norm",
            "--exclude",
            "^output\\.",
        ],
        &out,
        &inputs,
    );
    assert_eq!(r.code, 0, "{}", r.describe());
    let c = py_script(
        "dcp_check.py",
        env.path(),
        [
            "check".to_string(),
            s(&out),
            s(&expected),
            s(&inputs[1]),
            "norm.weight,output.weight".to_string(),
        ],
    );
    assert_eq!(c.code, 0, "{}", c.describe());
    // A bad pattern is a usage error naming the option.
    let r = env.merge(
        &["--method", "sma", "--include", "("],
        &env.join("bad"),
        &inputs,
    );
    assert_eq!(r.code, 2, "{}", r.describe());
    assert!(r.stderr.contains("--include[0]"), "{}", r.describe());
}

#[test]
fn inspect_lists_keys_chunks_and_what_is_averaged() {
    let env = TestEnv::new();
    let r = env.pmad([
        Path::new("inspect"),
        &step_dir("fsdp2-2rank", 300),
        Path::new("--json"),
    ]);
    assert_eq!(r.code, 0, "{}", r.describe());
    let v: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
    assert_eq!(v["format"], "dcp");
    let names: Vec<&str> = v["tensors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["name"].as_str().unwrap())
        .collect();
    assert_eq!(
        names,
        [
            "model.embed.weight@0,0",
            "model.embed.weight@5,0",
            "model.head.weight@0,0",
            "model.head.weight@4,0",
            "model.layers.0.mlp.weight@0,0",
            "model.layers.0.mlp.weight@4,0",
            "model.layers.0.norm.weight",
        ]
    );
    let head = &v["tensors"][3];
    assert_eq!(head["dtype"], "BF16");
    assert_eq!(head["shape"], serde_json::json!([3, 6]));
    assert_eq!(head["file"], "__1_0.distcp");
    let keys = v["keys"].as_array().unwrap();
    let key = |k: &str| keys.iter().find(|x| x["key"] == k).unwrap().clone();
    assert_eq!(key("model.head.weight")["chunks"], 2);
    assert_eq!(key("model.head.weight")["action"], "averaged");
    assert_eq!(key("model.head.weight")["shape"], serde_json::json!([7, 6]));
    assert_eq!(key("optim.head.weight.exp_avg")["action"], "copied");
    assert_eq!(key("train.rng.state")["kind"], "bytes");
    // The table says the same for people, and shows a transposed tensor's strides.
    let t = env.pmad([Path::new("inspect"), &step_dir("torchtitan", 300)]);
    assert_eq!(t.code, 0, "{}", t.describe());
    assert!(
        t.stdout.contains("keys: 6 averaged, 25 copied"),
        "{}",
        t.stdout
    );
    assert!(
        t.stdout.lines().any(
            |l| l.starts_with("layers.0.attention.wo.weight ") && l.ends_with("strides (1, 8)")
        ),
        "{}",
        t.stdout
    );
}

/// The (file, start, length) of item `fqn` of a fixture step, from torch's own item list.
fn item(set: &str, step: u64, fqn: &str) -> (String, usize, usize) {
    let list: serde_json::Value = serde_json::from_slice(
        &std::fs::read(fixture(set).join(format!("items-step-{step}.json"))).unwrap(),
    )
    .unwrap();
    let it = list
        .as_array()
        .unwrap()
        .iter()
        .find(|i| i["fqn"] == fqn)
        .unwrap();
    (
        it["file"].as_str().unwrap().to_string(),
        it["offset"].as_u64().unwrap() as usize,
        it["length"].as_u64().unwrap() as usize,
    )
}

/// Rewrite bytes of `file` with `f`.
fn edit(file: &Path, f: impl FnOnce(&mut Vec<u8>)) {
    let mut b = std::fs::read(file).unwrap();
    f(&mut b);
    std::fs::write(file, b).unwrap();
}

fn replace_once(b: &mut [u8], from: &[u8], to: &[u8]) {
    assert_eq!(from.len(), to.len());
    let at = b
        .windows(from.len())
        .position(|w| w == from)
        .unwrap_or_else(|| panic!("{:?} not found", String::from_utf8_lossy(from)));
    b[at..at + to.len()].copy_from_slice(to);
}

#[test]
fn hostile_dcp_inputs_are_refused_naming_the_file() {
    let env = TestEnv::new();
    let set = "torchtitan";
    let older = step_dir(set, 200);
    let (file, at, len) = item(set, 300, "layers.0.attention.wq.weight");
    type Mutate = Box<dyn Fn(&Path)>;
    let cases: Vec<(&str, Mutate, &str, &str)> = vec![
        (
            "truncated data file",
            Box::new(|d: &Path| {
                edit(&d.join("__0_0.distcp"), |b| b.truncate(b.len() / 2));
            }),
            "__0_0.distcp",
            "past the file's end",
        ),
        (
            "wrong CRC of data.pkl",
            Box::new(move |d: &Path| {
                edit(&d.join(&file), |b| {
                    let entries = archive::entries(&b[at..at + len]).unwrap();
                    let pkl = entries
                        .iter()
                        .find(|e| e.name.ends_with("data.pkl"))
                        .unwrap();
                    b[at + pkl.central_header + 16] ^= 0xff;
                });
            }),
            "__0_0.distcp",
            "fails its CRC32 check",
        ),
        (
            "unknown opcode in .metadata",
            Box::new(|d: &Path| {
                // Byte 11 is the first opcode after PROTO and FRAME.
                edit(&d.join(".metadata"), |b| b[11] = 0xff);
            }),
            ".metadata",
            "pickle byte 11",
        ),
        (
            "unexpected class in .metadata",
            Box::new(|d: &Path| {
                edit(&d.join(".metadata"), |b| {
                    replace_once(b, b"TensorStorageMetadata", b"TensorStorageMetadatX")
                });
            }),
            ".metadata",
            "expected TensorStorageMetadata or BytesStorageMetadata",
        ),
        (
            "a subclass rebuild function in data.pkl",
            Box::new(|d: &Path| {
                let (file, at, len) = item("torchtitan", 300, "norm.weight");
                edit(&d.join(&file), |b| {
                    let item = &mut b[at..at + len];
                    let entries = archive::entries(item).unwrap();
                    let pkl = entries
                        .iter()
                        .find(|e| e.name.ends_with("data.pkl"))
                        .unwrap();
                    let r = pkl.data.clone();
                    replace_once(
                        &mut item[r.clone()],
                        b"_rebuild_tensor_v2",
                        b"_rebuild_tensor_v9",
                    );
                    // A consistent archive: only the class is wrong.
                    let crc = archive::crc32(&item[r]);
                    archive::patch_crc(item, pkl, crc);
                });
            }),
            "__0_0.distcp",
            "torch._utils._rebuild_tensor_v9",
        ),
        (
            "no .metadata",
            Box::new(|d: &Path| std::fs::remove_file(d.join(".metadata")).unwrap()),
            ".metadata",
            "not written yet",
        ),
        (
            "per-rank metadata",
            Box::new(|d: &Path| {
                std::fs::rename(d.join(".metadata"), d.join("__0.metadata")).unwrap()
            }),
            "__0.metadata",
            "per-rank",
        ),
    ];
    let mut failures = Vec::new();
    for (label, mutate, file_named, needle) in &cases {
        let bad = env.join(format!("bad-{}/step-300", label.replace(' ', "-")));
        copy_dir(&step_dir(set, 300), &bad);
        mutate(&bad);
        let out = env.join(format!("out-{}", label.replace(' ', "-")));
        let r = env.merge(&["--method", "sma"], &out, &[older.clone(), bad.clone()]);
        let named = bad.join(file_named);
        if r.code == 0 || !r.stderr.contains(&s(&named)) || !r.stderr.contains(needle) {
            failures.push(format!(
                "[{label}] want a failure naming {} and {needle:?}\n{}",
                named.display(),
                r.describe()
            ));
        }
        if out.exists() {
            failures.push(format!("[{label}] an output was published"));
        }
        failures.extend(expect_inspect_invalid(&env, label, &bad, needle));
    }
    // Checkpoints of different runs (other keys, other chunking) are not averaged together.
    let out = env.join("out-mixed");
    let r = env.merge(
        &["--method", "sma"],
        &out,
        &[step_dir("torchtitan", 200), step_dir("fsdp2-2rank", 300)],
    );
    if r.code == 0 || !r.stderr.contains("fsdp2-2rank") || !r.stderr.contains("is missing") {
        failures.push(format!("[mixed runs] want a mismatch\n{}", r.describe()));
    }
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}

/// The daemon tests' config: watching `watch` with `layout`, poll and settle 100 ms, no HTTP
/// server, JSON log; each test adds its recipes.
fn daemon_config(watch: &Path, layout: &str) -> Config {
    Config::new(watch)
        .watch("layout", layout)
        .poll("100ms")
        .settle("100ms")
        .no_server()
        .json_log("")
}

/// A DCP save as torch does it: the data files first, `.metadata` last.
fn save_like_torch(src: &Path, dst: &Path) {
    let tmp = dst.with_extension("partial");
    std::fs::create_dir_all(dst).unwrap();
    for e in std::fs::read_dir(src).unwrap() {
        let e = e.unwrap();
        if e.file_name() != ".metadata" {
            std::fs::copy(e.path(), dst.join(e.file_name())).unwrap();
        }
    }
    std::fs::copy(src.join(".metadata"), &tmp).unwrap();
    std::fs::rename(&tmp, dst.join(".metadata")).unwrap();
}

#[test]
fn daemon_publishes_dcp_averages_as_checkpoints_arrive() {
    const T: Duration = Duration::from_secs(60);
    for set in SETS {
        let env = TestEnv::new();
        let watch = env.mkdir("ckpt");
        let out = env.join("out");
        let cfg = daemon_config(&watch, "torchtitan")
            .recipe(Recipe::sma("sma3", 3).all_outputs(&out))
            .recipe(Recipe::ema("ema", 0.5).all_outputs(&out))
            .write(&env.join("pmad.toml"));
        let mut d = Daemon::start(env.path(), &cfg, "pmad");
        for step in [100u64, 200, 300] {
            save_like_torch(&step_dir(set, step), &watch.join(format!("step-{step}")));
            d.expect("acceptance", T, |e| {
                e.event() == "checkpoint.accepted" && e.u("step") == Some(step)
            });
        }
        d.expect("sma3 at 300", T, |e| {
            e.event() == "merge.emitted"
                && e.s("recipe") == Some("sma3")
                && e.s("steps").is_some_and(|s| s.ends_with("300"))
        });
        d.expect("ema at 300", T, |e| {
            e.event() == "merge.emitted"
                && e.s("recipe") == Some("ema")
                && e.s("steps").is_some_and(|s| s.ends_with("300"))
        });
        let newest = step_dir(set, 300);
        for (recipe, expected) in [("sma3", "sma-k3-step300"), ("ema", "ema-k3-step300")] {
            let dir = out.join(recipe);
            let o = outputs(&dir);
            let path = o
                .get(&300)
                .unwrap_or_else(|| panic!("{set} {recipe}: no step-300 in {o:?}\n{}", d.dump(40)));
            let expected = fixture(set)
                .join("expected")
                .join(format!("{expected}.safetensors"));
            let c = check(&env, path, &expected, &newest);
            assert_eq!(c.code, 0, "{set} {recipe}\n{}", c.describe());
        }
        assert_eq!(d.terminate(T), Some(0), "{}", d.dump(30));
    }
}

/// An OLMo-core-style checkpoint made from a torchtitan fixture step: `stepN/` holding the
/// DCP files in `model_and_optim/`, trainer state in `train/rank0.pt` and `.metadata.json`
/// written last.
fn olmo_core_step(src: &Path, dst: &Path, step: u64) {
    let dcp = dst.join("model_and_optim");
    std::fs::create_dir_all(&dcp).unwrap();
    std::fs::create_dir_all(dst.join("train")).unwrap();
    for e in std::fs::read_dir(src).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), dcp.join(e.file_name())).unwrap();
    }
    std::fs::write(dst.join("train/rank0.pt"), format!("trainer state {step}")).unwrap();
    std::fs::write(dst.join(".metadata.json"), br#"{"version": "1"}"#).unwrap();
}

#[test]
fn olmo_core_layout_keeps_its_subdirectories() {
    const T: Duration = Duration::from_secs(60);
    let env = TestEnv::new();
    let set = "torchtitan";
    let run = env.mkdir("run");
    let mut inputs = Vec::new();
    for step in [100u64, 200, 300] {
        let d = run.join(format!("step{step}"));
        olmo_core_step(&step_dir(set, step), &d, step);
        inputs.push(d);
    }
    let expected = fixture(set).join("expected/sma-k3-step300.safetensors");
    let newest = step_dir(set, 300);
    // pmad merge: the same tree, the DCP part averaged, the rest from the newest.
    let out = env.join("merged");
    env.merge(&["--method", "sma"], &out, &inputs).expect_ok();
    let c = check(&env, &out.join("model_and_optim"), &expected, &newest);
    assert_eq!(c.code, 0, "{}", c.describe());
    assert_eq!(
        std::fs::read_to_string(out.join("train/rank0.pt")).unwrap(),
        "trainer state 300"
    );
    assert!(out.join(".metadata.json").is_file() && out.join("merge.json").is_file());
    // The daemon with layout = "olmo-core": outputs named stepN like the trainer's.
    let watch = env.mkdir("watch");
    let outs = env.join("outs");
    let cfg = daemon_config(&watch, "olmo-core")
        .recipe(Recipe::sma("sma3", 3).all_outputs(&outs))
        .write(&env.join("pmad.toml"));
    let mut d = Daemon::start(env.path(), &cfg, "pmad");
    for (i, step) in [100u64, 200, 300].iter().enumerate() {
        // Written under a temp name and renamed, as OLMo-core does.
        let tmp = watch.join(format!("step{step}-tmp"));
        copy_tree(&inputs[i], &tmp);
        std::fs::rename(&tmp, watch.join(format!("step{step}"))).unwrap();
        d.expect("acceptance", T, |e| {
            e.event() == "checkpoint.accepted" && e.u("step") == Some(*step)
        });
    }
    d.expect("sma3 at 300", T, |e| {
        e.event() == "merge.emitted" && e.s("steps").is_some_and(|s| s.ends_with("300"))
    });
    let published = outs.join("sma3/step300");
    let c = check(&env, &published.join("model_and_optim"), &expected, &newest);
    assert_eq!(c.code, 0, "{}", c.describe());
    assert_eq!(
        std::fs::read_to_string(outs.join("sma3/LATEST"))
            .unwrap()
            .trim(),
        "step300"
    );
    assert_eq!(d.terminate(T), Some(0), "{}", d.dump(30));
}

/// The daemon on DCP checkpoints through a SIGKILL and a restart from `state.dir`, with the
/// trainer rotating old checkpoints away right after each save (torchtitan's
/// `keep_latest_k`): the output after the restart is the plain average of the window, checked
/// by the independent reader against its own float64 average of the inputs. With
/// `state.save_interval = "0s"` the sums of 100..300 were saved before the kill and the
/// restart resumes from them.
#[test]
fn daemon_resumes_dcp_averages_after_a_kill_while_checkpoints_rotate() {
    kill_while_checkpoints_rotate(true);
}

/// The same with the default `state.save_interval`: the kill comes before the sums of
/// 100..300 were saved, and step 100 is deleted while pmad is down. The restart reads 200 and
/// 300 again, logs 100 as lost (from the journal), and the window 200..400 is still exact.
#[test]
fn a_kill_before_the_sums_are_saved_reads_again_and_reports_what_rotated_away() {
    kill_while_checkpoints_rotate(false);
}

fn kill_while_checkpoints_rotate(save_every_checkpoint: bool) {
    const T: Duration = Duration::from_secs(60);
    let env = TestEnv::new();
    let set = "torchtitan";
    let watch = env.mkdir("ckpt");
    let out = env.join("out");
    let mut cfg = daemon_config(&watch, "torchtitan")
        .state("dir", env.join("state").as_path())
        .recipe(Recipe::sma("sma3", 3).all_outputs(&out));
    if save_every_checkpoint {
        cfg = cfg.state("save_interval", "0s");
    }
    let cfg = cfg.write(&env.join("pmad.toml"));
    let mut d = Daemon::builder(&cfg).tag("run0").start();
    // Steps 100..300, then a step 400 holding step 100's values.
    let source = |step: u64| step_dir(set, if step == 400 { 100 } else { step });
    let save = |step: u64| {
        save_like_torch(&source(step), &watch.join(format!("step-{step}")));
        // keep_latest_k = 3: the oldest goes as soon as a new one is saved.
        let old = watch.join(format!("step-{}", step.saturating_sub(300)));
        if step > 300 && old.exists() {
            std::fs::remove_dir_all(&old).unwrap();
        }
    };
    for step in [100u64, 200, 300] {
        save(step);
        d.expect("acceptance", T, |e| {
            e.event() == "checkpoint.accepted" && e.u("step") == Some(step)
        });
    }
    d.expect("sma3 at 300", T, |e| {
        e.event() == "merge.emitted" && e.s("steps").is_some_and(|s| s.ends_with("300"))
    });
    if save_every_checkpoint {
        d.restart("run1");
        d.expect("restored", T, |e| {
            e.event() == "state.restored" && e.b("restored") == Some(true)
        });
        save(400);
    } else {
        // The journal lists 100..300 once the arrival of 300 is handled.
        let journal = env.join("state/journal.json");
        let t0 = std::time::Instant::now();
        while !std::fs::read_to_string(&journal).is_ok_and(|j| j.contains("step-300")) {
            assert!(
                t0.elapsed() < T,
                "no journal naming step-300\n{}",
                d.dump(30)
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        d.kill9();
        save(400);
        d = d.spec().clone().tag("run1").start();
        d.expect("step 100 reported lost", T, |e| {
            e.event() == "checkpoint.lost" && e.u("step") == Some(100)
        });
    }
    d.expect("sma3 at 400", T, |e| {
        e.event() == "merge.emitted" && e.s("steps").is_some_and(|s| s.ends_with("400"))
    });
    // 300's output was published before the kill: not published again.
    assert!(
        !d.log()
            .iter()
            .any(|e| e.event() == "merge.emitted"
                && e.s("steps").is_some_and(|s| s.ends_with("300"))),
        "step 300 published again after the restart\n{}",
        d.dump(40)
    );
    assert!(!watch.join("step-100").exists(), "rotated away");
    let published = outputs(&out.join("sma3"));
    let expected_keys = fixture(set).join("expected/sma-k3-step300.safetensors");
    let c = py_script(
        "dcp_check.py",
        env.path(),
        [
            Path::new("sma"),
            &published[&400],
            &expected_keys,
            &source(200),
            &source(300),
            &source(400),
        ],
    );
    assert_eq!(c.code, 0, "{}\n{}", c.describe(), d.dump(40));
    assert_eq!(d.terminate(T), Some(0), "{}", d.dump(30));
}

/// Megatron-LM's torch_dist as its training loop leaves it (`iter_0000N00/`, the tracker
/// written after each save), watched with `layout = "megatron"`: outputs are `iter_<N:07>/`
/// with the tracker beside `LATEST`, so `--load <out_dir>` finds the newest; the weights and
/// the fp32 master copy `optimizer.state.fp32_param.*` are both averaged. An input saved with
/// Megatron's `integrity.json` gives an output whose own manifest matches its files.
#[test]
fn megatron_torch_dist_outputs_load_like_megatron_checkpoints() {
    const T: Duration = Duration::from_secs(60);
    let env = TestEnv::new();
    let set = "megatron-2rank";
    let watch = env.mkdir("save");
    let out = env.join("merged");
    let cfg = daemon_config(&watch, "megatron")
        .recipe(Recipe::sma("sma3", 3).all_outputs(&out))
        .write(&env.join("pmad.toml"));
    let mut d = Daemon::start(env.path(), &cfg, "pmad");
    for step in [100u64, 200, 300] {
        let dst = watch.join(format!("iter_{step:07}"));
        copy_tree(&step_dir(set, step), &dst);
        // Megatron's integrity manifest, as megatron.core writes it with save_integrity.
        let files: Vec<String> = std::fs::read_dir(&dst)
            .unwrap()
            .map(|e| e.unwrap().path().display().to_string())
            .collect();
        let code = "import hashlib, json, os, sys\n\
                    d = os.path.dirname(sys.argv[1])\n\
                    m = {os.path.basename(p): hashlib.sha256(open(p, 'rb').read()).hexdigest() for p in sorted(sys.argv[1:])}\n\
                    json.dump({'algorithm': 'sha256', 'files': m}, open(os.path.join(d, 'integrity.json'), 'w'), indent=2)\n";
        env.python(code, &files).expect_ok();
        std::fs::write(
            watch.join("latest_checkpointed_iteration.txt"),
            step.to_string(),
        )
        .unwrap();
        d.expect("acceptance", T, |e| {
            e.event() == "checkpoint.accepted" && e.u("step") == Some(step)
        });
    }
    d.expect("sma3 at 300", T, |e| {
        e.event() == "merge.emitted" && e.s("steps").is_some_and(|s| s.ends_with("300"))
    });
    let dir = out.join("sma3");
    let published = dir.join("iter_0000300");
    assert_eq!(
        std::fs::read_to_string(dir.join("latest_checkpointed_iteration.txt")).unwrap(),
        "300"
    );
    assert_eq!(
        std::fs::read_to_string(dir.join("LATEST")).unwrap().trim(),
        "iter_0000300"
    );
    let expected = fixture(set).join("expected/sma-k3-step300.safetensors");
    let c = check(&env, &published, &expected, &step_dir(set, 300));
    assert_eq!(c.code, 0, "{}", c.describe());
    // integrity.json names every file but itself (and pmad's merge.json), with its digest.
    let verify = "import hashlib, json, os, sys\n\
                  d = sys.argv[1]\n\
                  m = json.load(open(os.path.join(d, 'integrity.json')))\n\
                  assert m['algorithm'] == 'sha256', m\n\
                  names = sorted(n for n in os.listdir(d) if n not in ('integrity.json', 'merge.json'))\n\
                  assert sorted(m['files']) == names, (sorted(m['files']), names)\n\
                  for n, h in m['files'].items():\n\
                  \x20   assert hashlib.sha256(open(os.path.join(d, n), 'rb').read()).hexdigest() == h, n\n\
                  print(len(names))\n";
    let v = env.python(verify, [&published]);
    assert_eq!(v.code, 0, "{}", v.describe());
    assert_eq!(v.stdout.trim(), "7", "{}", v.describe());
    assert_eq!(d.terminate(T), Some(0), "{}", d.dump(30));
}
