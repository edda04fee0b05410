//! `pmad merge --partition I/N` and `pmad merge --commit`: one merge split between processes
//! (the batch form of running one pmad per node). The committed output must hold the bytes a
//! single process writes, appear only whole, and never mix parts of different merges.

use crate::harness::{list_dir, load_tensors, read_json, TestEnv};
use std::path::{Path, PathBuf};

const EMA: [&str; 4] = ["--method", "ema", "--alpha", "0.3"];

fn merge_args<'a>(extra: &[&'a str]) -> Vec<&'a str> {
    let mut a: Vec<&str> = EMA.to_vec();
    a.extend(["--shard-size", "3KB"]);
    a.extend(extra);
    a
}

/// Every file of two outputs, byte for byte, except `merge.json` (times, paths).
fn assert_same_files(a: &Path, b: &Path) {
    let names = list_dir(a);
    assert_eq!(names, list_dir(b), "{} vs {}", a.display(), b.display());
    for n in names.iter().filter(|n| *n != "merge.json") {
        assert!(
            std::fs::read(a.join(n)).unwrap() == std::fs::read(b.join(n)).unwrap(),
            "{n} differs between {} and {}",
            a.display(),
            b.display()
        );
    }
}

fn part(env: &TestEnv, p: &str, extra: &[&str], out: &Path, inputs: &[PathBuf]) {
    let mut args = merge_args(extra);
    args.extend(["--partition", p]);
    let r = env.merge(&args, out, inputs);
    r.expect_ok();
    assert!(
        r.stdout.contains(&format!("wrote part {p}")),
        "{}",
        r.stdout
    );
}

fn commit(env: &TestEnv, extra: &[&str], out: &Path, inputs: &[PathBuf]) -> crate::harness::Run {
    let mut args = merge_args(extra);
    args.push("--commit");
    env.merge(&args, out, inputs)
}

#[test]
fn parts_by_shard_publish_the_single_process_bytes_once_all_are_written() {
    let env = TestEnv::new();
    let inputs = env.make_series("run", "bf16", 4, &[]);
    let single = env.join("single");
    env.merge(&merge_args(&[]), &single, &inputs).expect_ok();
    let shards = list_dir(&single)
        .iter()
        .filter(|n| n.ends_with(".safetensors"))
        .count();
    assert!(
        shards >= 3,
        "the fixture should make several shards: {shards}"
    );

    let out = env.join("merged/step-400");
    // Parts arrive in any order; until all are there nothing is published.
    part(&env, "2/3", &["--partition-by", "shard"], &out, &inputs);
    part(&env, "0/3", &["--partition-by", "shard"], &out, &inputs);
    let r = commit(&env, &[], &out, &inputs);
    assert_ne!(r.code, 0, "{}", r.describe());
    assert!(
        r.stderr.contains("1/3"),
        "names the missing part: {}",
        r.stderr
    );
    assert!(!out.exists(), "nothing partial is published");
    // Writing a part twice is harmless (an Indexed Job pod that ran again).
    part(&env, "0/3", &["--partition-by", "shard"], &out, &inputs);
    part(&env, "1/3", &["--partition-by", "shard"], &out, &inputs);
    let r = commit(&env, &[], &out, &inputs);
    r.expect_ok();
    assert!(
        r.stdout.contains("committed the parts of plan"),
        "{}",
        r.stdout
    );
    assert_same_files(&out, &single);
    assert_eq!(
        list_dir(&env.join("merged")),
        ["step-400"],
        "staging removed"
    );
    let rec = read_json(&out.join("merge.json"));
    assert_eq!(rec["partition"]["count"], 3);
    assert_eq!(rec["partition"]["by"], "shard");
    let listed: usize = rec["partition"]["parts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["files"].as_array().unwrap().len())
        .sum();
    assert_eq!(listed, shards, "every shard file is recorded once");
    assert_eq!(
        rec["weights"],
        read_json(&single.join("merge.json"))["weights"]
    );
    // Committing again is harmless and changes nothing.
    let before = std::fs::read(out.join("merge.json")).unwrap();
    commit(&env, &[], &out, &inputs).expect_ok();
    assert_eq!(std::fs::read(out.join("merge.json")).unwrap(), before);
}

#[test]
fn parts_by_tensor_hold_the_single_process_values() {
    let env = TestEnv::new();
    let inputs = env.make_series("run", "f32", 3, &[]);
    // One big shard: by shard, one instance would do everything, so auto splits by tensor.
    let big = ["--shard-size", "5GB"];
    let mut single_args: Vec<&str> = EMA.to_vec();
    single_args.extend(big);
    let single = env.join("single");
    env.merge(&single_args, &single, &inputs).expect_ok();
    let out = env.join("merged");
    for p in ["0/2", "1/2"] {
        let mut a: Vec<&str> = EMA.to_vec();
        a.extend(big);
        a.extend(["--partition", p]);
        env.merge(&a, &out, &inputs).expect_ok();
    }
    let mut a: Vec<&str> = EMA.to_vec();
    a.extend(big);
    a.push("--commit");
    env.merge(&a, &out, &inputs).expect_ok();
    let rec = read_json(&out.join("merge.json"));
    assert_eq!(rec["partition"]["by"], "tensor");
    assert!(out.join("model.safetensors.index.json").exists());
    let got = load_tensors(&out);
    let want = load_tensors(&single);
    assert_eq!(
        got.keys().collect::<Vec<_>>(),
        want.keys().collect::<Vec<_>>()
    );
    for (name, t) in &want {
        let g = &got[name];
        assert_eq!(
            (&g.dtype, &g.shape, &g.data),
            (&t.dtype, &t.shape, &t.data),
            "{name}"
        );
    }
    // And the independent float64 oracle agrees.
    let o = env.oracle(&EMA, &out, &inputs);
    o.expect_ok();
}

#[test]
fn parts_of_different_merges_are_never_mixed() {
    let env = TestEnv::new();
    let inputs = env.make_series("run", "bf16", 3, &[]);
    let out = env.join("merged");
    // Instance 0 and 1 disagree on the output dtype: their plans differ.
    part(&env, "0/2", &[], &out, &inputs);
    part(&env, "1/2", &["--dtype", "f32"], &out, &inputs);
    let r = commit(&env, &[], &out, &inputs);
    assert_ne!(r.code, 0);
    assert!(r.stderr.contains("1/2"), "{}", r.stderr);
    assert!(!out.exists());
    // A commit with options no part was written with finds no parts, and says whose exist.
    let r = commit(&env, &["--dtype", "f16"], &out, &inputs);
    assert_ne!(r.code, 0);
    assert!(r.stderr.contains("other merges"), "{}", r.stderr);
    // Other inputs are another merge too.
    let r = commit(&env, &[], &out, &inputs[1..]);
    assert_ne!(r.code, 0);
    assert!(!out.exists());
    // The matching part completes the first merge.
    part(&env, "1/2", &[], &out, &inputs);
    commit(&env, &[], &out, &inputs).expect_ok();
    env.oracle(&EMA, &out, &inputs).expect_ok();
}

#[test]
fn the_partition_section_resolves_from_the_launcher_and_the_daemon_says_what_it_cannot_do() {
    let env = TestEnv::new();
    let watch = env.mkdir("run");
    let cfg = env.join("pmad.toml");
    let text = format!(
        "[watch]\ndir = {:?}\n[[recipe]]\nname = \"sma\"\nmethod = \"sma\"\nout_dir = {:?}\n\
         [partition]\n",
        watch,
        env.join("out")
    );
    std::fs::write(&cfg, text).unwrap();
    let check = |vars: &[(&str, &str)]| {
        let mut cmd = crate::harness::pmad_cmd(env.path());
        cmd.arg("check-config").arg(&cfg);
        for k in [
            "SLURM_PROCID",
            "SLURM_NTASKS",
            "PMAD_PARTITION_INDEX",
            "PMAD_PARTITION_COUNT",
        ] {
            cmd.env_remove(k);
        }
        cmd.envs(vars.iter().copied());
        crate::harness::run(&mut cmd)
    };
    let r = check(&[("SLURM_PROCID", "1"), ("SLURM_NTASKS", "2")]);
    r.expect_ok();
    assert!(
        r.stdout.contains("index          = 1 (from SLURM_PROCID)"),
        "{}",
        r.stdout
    );
    let r = check(&[("RANK", "1"), ("WORLD_SIZE", "2")]);
    assert_ne!(r.code, 0);
    assert!(r.stderr.contains("partition.index"), "{}", r.stderr);
    let mut cmd = crate::harness::pmad_cmd(env.path());
    cmd.args(["run", "--config"])
        .arg(&cfg)
        .env("PMAD_PARTITION_INDEX", "0")
        .env("PMAD_PARTITION_COUNT", "2");
    let r = crate::harness::run(&mut cmd);
    assert_ne!(r.code, 0);
    assert!(r.stderr.contains("pmad merge --partition"), "{}", r.stderr);
    assert!(!env.join("out").exists());
}

/// Injected I/O failures (`PMAD_FAULT=op:N`) at every step of writing a part and of the
/// commit: a failed step publishes nothing (or, past the rename, the whole output), and
/// running the same command again finishes the job with the single-process bytes.
#[test]
fn a_failed_part_or_commit_is_finished_by_running_it_again() {
    let env = TestEnv::new();
    let inputs = env.make_series("run", "bf16", 3, &[]);
    let single = env.join("single");
    env.merge(&merge_args(&[]), &single, &inputs).expect_ok();
    let run_with = |fault: Option<&str>, extra: &[&str], out: &Path| {
        let mut cmd = crate::harness::pmad_cmd(env.path());
        cmd.arg("merge")
            .args(merge_args(extra))
            .arg("--out")
            .arg(out);
        cmd.args(&inputs);
        if let Some(f) = fault {
            cmd.env("PMAD_FAULT", f);
        }
        crate::harness::run(&mut cmd)
    };
    let mut failed = 0;
    let mut case = 0;
    for op in ["create", "write", "fsync", "rename", "mkdir"] {
        for n in 1..=5 {
            case += 1;
            let out = env.join(format!("merged/case-{case}"));
            let fault = format!("{op}:{n}");
            // A fault while writing part 0: nothing of it counts until it is written again.
            let r = run_with(Some(&fault), &["--partition", "0/2"], &out);
            if r.code != 0 {
                failed += 1;
                assert!(r.stderr.contains("os error 5"), "{fault}: {}", r.describe());
            }
            run_with(None, &["--partition", "0/2"], &out).expect_ok();
            run_with(None, &["--partition", "1/2"], &out).expect_ok();
            // A fault during the commit: nothing or everything is published.
            let r = run_with(Some(&fault), &["--commit"], &out);
            if r.code != 0 {
                failed += 1;
                if out.exists() {
                    assert_same_files(&out, &single);
                }
            }
            run_with(None, &["--commit"], &out).expect_ok();
            assert_same_files(&out, &single);
        }
    }
    assert!(failed >= 20, "only {failed} injected faults hit a step");
    assert_eq!(
        list_dir(&env.join("merged")).len(),
        case,
        "no staging left: {:?}",
        list_dir(&env.join("merged"))
    );
}
