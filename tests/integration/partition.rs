//! `pmad merge --partition I/N` and `pmad merge --commit`: one merge split between processes
//! (the batch form of running one pmad per node). The committed output must hold the bytes a
//! single process writes, appear only whole, and never mix parts of different merges.

use crate::harness::{list_dir, load_tensors, outputs, read_json, Config, Daemon, Recipe, TestEnv};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

const EMA: [&str; 4] = ["--method", "ema", "--alpha", "0.3"];

fn merge_args<'a>(extra: &[&'a str]) -> Vec<&'a str> {
    let mut a: Vec<&str> = EMA.to_vec();
    a.extend(["--shard-size", "3KB"]);
    a.extend(extra);
    a
}

/// Every file of two outputs, byte for byte, except `merge.json` (times, paths, the parts it
/// records) and marker mode's `COMMIT` and part markers.
fn assert_same_files(a: &Path, b: &Path) {
    let ls = |d: &Path| -> Vec<String> {
        list_dir(d)
            .into_iter()
            .filter(|n| n != "COMMIT" && !(n.starts_with("part-") && n.ends_with(".json")))
            .collect()
    };
    let names = ls(a);
    assert_eq!(names, ls(b), "{} vs {}", a.display(), b.display());
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
fn the_partition_section_resolves_from_the_launcher_and_the_commit_mode_per_out_dir() {
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
    // `auto` resolves per out_dir: rename on this (local) filesystem; marker when asked.
    let r = check(&[("PMAD_PARTITION_INDEX", "0"), ("PMAD_PARTITION_COUNT", "2")]);
    assert!(
        r.stdout.contains("commit         = auto (sma: rename)"),
        "{}",
        r.stdout
    );
    let text = std::fs::read_to_string(&cfg).unwrap() + "commit = \"marker\"\n";
    std::fs::write(&cfg, text).unwrap();
    let r = check(&[("PMAD_PARTITION_INDEX", "0"), ("PMAD_PARTITION_COUNT", "2")]);
    assert!(
        r.stdout.contains("commit         = marker (sma: marker)"),
        "{}",
        r.stdout
    );
}

/// Marker mode (object-store mounts: no atomic rename): three instances write their parts in
/// place under `step-N/` and the committer writes `COMMIT` last. Every committed output is
/// byte-identical to a single instance's, and nothing under the output directories is ever
/// renamed: the first rename there would fail (`PMAD_FAULT`), and none does.
#[test]
fn marker_mode_publishes_whole_outputs_without_a_single_rename() {
    const N: usize = 3;
    let env = TestEnv::new();
    let no_renames = format!("rename:1:{}", env.join("split/out").display());
    let mut pair = Pair::start_with(
        &env,
        N,
        "by = \"shard\"\ncommit = \"marker\"",
        Some(&no_renames),
    );
    for step in [100u32, 200, 300, 400] {
        pair.checkpoint(step);
        for d in std::iter::once(&mut pair.single).chain(pair.split.iter_mut()) {
            d.expect("window update", DT, |e| {
                e.event() == "window.updated" && e.u("step") == Some(step as u64)
            });
        }
    }
    pair.wait_published(400);
    let plan = pair.split[0].expect("plan", DT, |e| e.event() == "partition.plan");
    assert_eq!(plan.s("commit"), Some("marker"), "{}", plan.line());
    assert_eq!(pair.check_outputs(), 3 + 4);
    for r in RECIPES {
        for (s, dir) in outputs(&pair.out("split", r)) {
            assert!(dir.join("COMMIT").is_file(), "{r} step {s}");
            let markers = list_dir(&dir)
                .iter()
                .filter(|n| n.starts_with("part-"))
                .count();
            assert_eq!(markers, N, "{r} step {s}: every part's marker stays");
        }
    }
    pair.check_no_staging();
    for d in &mut pair.split {
        let failed = d
            .log()
            .iter()
            .filter(|e| e.event() == "merge.failed")
            .count();
        assert_eq!(failed, 0, "{}", d.dump(40));
    }
    pair.stop();
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

/// A single `pmad run` and `n` instances splitting the same recipes (`sma2` with small
/// shards, `ema`), each side watching its own copy of the same checkpoints.
struct Pair<'a> {
    env: &'a TestEnv,
    single: Daemon,
    split: Vec<Daemon>,
    watches: [PathBuf; 2],
    /// The instances commit in marker mode: outputs count once their `COMMIT` is there.
    marker: bool,
}

/// The published outputs of `dir`: every `step-N`, or in marker mode those with `COMMIT`.
fn committed(dir: &Path, marker: bool) -> std::collections::BTreeMap<u64, PathBuf> {
    outputs(dir)
        .into_iter()
        .filter(|(_, p)| !marker || p.join("COMMIT").is_file())
        .collect()
}

const RECIPES: [&str; 2] = ["sma2", "ema"];
const DT: Duration = Duration::from_secs(90);

impl<'a> Pair<'a> {
    /// Start both sides; `partition` is the body of the instances' `[partition]` table.
    fn start(env: &'a TestEnv, n: usize, partition: &str) -> Pair<'a> {
        Self::start_with(env, n, partition, None)
    }

    /// The same, the instances started with `PMAD_FAULT=fault`.
    fn start_with(env: &'a TestEnv, n: usize, partition: &str, fault: Option<&str>) -> Pair<'a> {
        let config = |name: &str, tag: &str, split: bool| {
            let watch = env.mkdir(format!("{name}/ckpt"));
            let c = Config::new(&watch)
                .poll("100ms")
                .settle("100ms")
                .state("dir", env.join(format!("{name}/state-{tag}")).as_path())
                .recipe(
                    Recipe::sma("sma2", 2)
                        .out_dir(&env.join(format!("{name}/out/sma2")))
                        .set("shard_size", "2KB")
                        .set("keep", 0usize),
                )
                .recipe(
                    Recipe::ema("ema", 0.3)
                        .out_dir(&env.join(format!("{name}/out/ema")))
                        .set("keep", 0usize),
                )
                .no_server()
                .json_log("");
            let mut text = c.text();
            if split {
                text.push_str(&format!("[partition]\n{partition}\n"));
            }
            let path = env.join(format!("{name}/pmad-{tag}.toml"));
            std::fs::write(&path, text).unwrap();
            (watch, path)
        };
        let (single_watch, single_cfg) = config("single", "0", false);
        let single = Daemon::start(env.path(), &single_cfg, "single");
        let mut split_watch = PathBuf::new();
        let split = (0..n)
            .map(|i| {
                let (watch, path) = config("split", &i.to_string(), true);
                split_watch = watch;
                Daemon::builder(&path)
                    .cwd(env.path())
                    .tag(&format!("split-{i}-0"))
                    .env("PMAD_PARTITION_INDEX", &i.to_string())
                    .env("PMAD_PARTITION_COUNT", &n.to_string())
                    .fault(fault)
                    .start()
            })
            .collect();
        Pair {
            env,
            single,
            split,
            watches: [single_watch, split_watch],
            marker: partition.contains("commit = \"marker\""),
        }
    }

    /// Write `checkpoint-<step>` (seed `step / 100`) into both watch dirs.
    fn checkpoint(&self, step: u32) {
        self.checkpoint_with(step, &[]);
    }

    /// The same with more `fixtures.py make` options.
    fn checkpoint_with(&self, step: u32, extra: &[&str]) {
        for watch in &self.watches {
            let rel = watch.strip_prefix(self.env.path()).unwrap();
            self.env.make(
                &format!("{}/checkpoint-{step}", rel.display()),
                "bf16",
                step / 100,
                step,
                extra,
            );
        }
    }

    fn out(&self, side: &str, recipe: &str) -> PathBuf {
        self.env.join(format!("{side}/out/{recipe}"))
    }

    /// Wait until both sides published `step` for every recipe.
    fn wait_published(&mut self, step: u32) {
        let deadline = Instant::now() + DT;
        let at = |p: PathBuf| {
            std::fs::read_to_string(p.join("LATEST"))
                .is_ok_and(|s| s.trim() == format!("step-{step}"))
        };
        while !RECIPES
            .iter()
            .all(|r| at(self.out("split", r)) && at(self.out("single", r)))
        {
            assert!(
                Instant::now() < deadline,
                "step {step} not published in time\n{}\n{}",
                self.split[0].dump(60),
                self.single.dump(20)
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Every step the instances published is byte-identical to the single instance's and
    /// records every part; returns how many outputs were compared.
    fn check_outputs(&self) -> usize {
        let mut n = 0;
        for r in RECIPES {
            let one = outputs(&self.out("single", r));
            for (s, dir) in committed(&self.out("split", r), self.marker) {
                let twin = one
                    .get(&s)
                    .unwrap_or_else(|| panic!("{r}: step {s} published by the instances only"));
                assert_same_files(&dir, twin);
                let rec = read_json(&dir.join("merge.json"));
                let parts = rec["partition"]["parts"].as_array().unwrap();
                assert_eq!(parts.len(), self.split.len(), "{r} step {s}: {rec}");
                n += 1;
            }
        }
        n
    }

    /// No staging directory left (waits a little: instance 0 sweeps after a commit).
    fn check_no_staging(&self) {
        let left = || -> Vec<String> {
            let mut v: Vec<String> = RECIPES
                .iter()
                .flat_map(|r| list_dir(&self.out("split", r).join(".pmad-staging")))
                .collect();
            if self.marker {
                // Uncommitted outputs are staging too.
                for r in RECIPES {
                    let out = self.out("split", r);
                    let all = outputs(&out);
                    let done = committed(&out, true);
                    v.extend(
                        all.keys()
                            .filter(|s| !done.contains_key(s))
                            .map(|s| format!("{r}/step-{s}")),
                    );
                }
            }
            v
        };
        for _ in 0..50 {
            if left().is_empty() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!("staging left: {:?}", left());
    }

    fn stop(mut self) {
        assert_eq!(self.single.terminate(DT), Some(0));
        for d in &mut self.split {
            assert_eq!(d.terminate(DT), Some(0));
        }
    }
}

fn signal(d: &Daemon, sig: rustix::process::Signal) {
    let pid = rustix::process::Pid::from_raw(d.pid() as i32).unwrap();
    rustix::process::kill_process(pid, sig).unwrap();
}

/// `pmad run` split between three instances (one watch dir, one out dir, each its own state
/// dir, the index and count from `PMAD_PARTITION_*`): every output is published once, whole,
/// byte-identical to a single instance's, with a `merge.json` naming every part; `LATEST`
/// agrees; no staging is left behind; only instance 0 publishes.
#[test]
fn daemon_instances_split_every_output_and_publish_it_once_whole() {
    const N: usize = 3;
    let env = TestEnv::new();
    let mut pair = Pair::start(&env, N, "by = \"shard\"");
    for step in [100u32, 200, 300, 400, 500] {
        pair.checkpoint(step);
        for d in std::iter::once(&mut pair.single).chain(pair.split.iter_mut()) {
            d.expect("window update", DT, |e| {
                e.event() == "window.updated" && e.u("step") == Some(step as u64)
            });
        }
    }
    pair.wait_published(500);
    let plan = pair.split[0].expect("plan", DT, |e| e.event() == "partition.plan");
    assert_eq!(plan.u("count"), Some(N as u64), "{}", plan.line());
    let sma = outputs(&pair.out("split", "sma2"));
    let files = list_dir(&sma[&500])
        .iter()
        .filter(|n| n.ends_with(".safetensors"))
        .count();
    assert!(files >= N, "every instance owns a shard: {files} files");
    assert_eq!(pair.check_outputs(), 4 + 5);
    for r in RECIPES {
        assert_eq!(
            std::fs::read_to_string(pair.out("single", r).join("LATEST")).unwrap(),
            std::fs::read_to_string(pair.out("split", r).join("LATEST")).unwrap()
        );
    }
    pair.check_no_staging();
    for (i, d) in pair.split.iter_mut().enumerate() {
        let log = d.log();
        let emitted = log.iter().filter(|e| e.event() == "merge.emitted").count();
        let parts = log
            .iter()
            .filter(|e| e.event() == "partition.part_written")
            .count();
        assert_eq!(emitted > 0, i == 0, "instance {i}\n{}", d.dump(40));
        assert!(parts > 0, "instance {i} wrote no part\n{}", d.dump(40));
    }
    pair.stop();
}

/// Four instances with seeded SIGKILLs of random instances at random moments (writing parts,
/// markers, the commit, `LATEST`), each restarted at once from its state dir, while a reader
/// polls `LATEST` and the published steps. Every published step is byte-identical to a single
/// instance's output for that step; a step is never visible partial; `LATEST` never moves
/// back; no staging is left. `PMAD_PARTITION_KILLS` (default 200) sets how many kills,
/// `PMAD_TEST_SEED` the seed.
#[test]
fn killed_instances_never_publish_a_partial_or_different_output() {
    killed_instances("", 200);
}

/// The same in marker mode (outputs written in place, `COMMIT` last; `LATEST` overwritten in
/// place): a reader that counts only committed steps never sees a partial or different one.
#[test]
fn killed_instances_in_marker_mode_never_publish_a_partial_or_different_output() {
    killed_instances("commit = \"marker\"", 100);
}

fn killed_instances(mode: &str, default_kills: u64) {
    use rand::{Rng, SeedableRng};
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    use std::sync::{Arc, Mutex};
    const N: usize = 4;
    let var = |k: &str, d: u64| -> u64 {
        std::env::var(k)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(d)
    };
    let kills_wanted = var("PMAD_PARTITION_KILLS", default_kills) as usize;
    let mut rng = rand::rngs::StdRng::seed_from_u64(var("PMAD_TEST_SEED", 12));
    let env = TestEnv::new();
    let mut pair = Pair::start(
        &env,
        N,
        &format!("by = \"shard\"\ntakeover_after = \"3s\"\npart_timeout = \"20s\"\n{mode}"),
    );
    let marker = pair.marker;
    // The reader: LATEST never moves back and names a complete output; every visible
    // step-N holds its merge.json (written last before the rename; in marker mode, before
    // COMMIT, and only committed steps count).
    let stop = Arc::new(AtomicBool::new(false));
    let problems = Arc::new(Mutex::new(Vec::<String>::new()));
    let reads = Arc::new(AtomicUsize::new(0));
    let reader = {
        let (stop, problems, reads) = (stop.clone(), problems.clone(), reads.clone());
        let dirs: Vec<PathBuf> = RECIPES.iter().map(|r| pair.out("split", r)).collect();
        std::thread::spawn(move || {
            let mut last = vec![0u64; dirs.len()];
            let problem = |p: String| problems.lock().unwrap().push(p);
            while !stop.load(Ordering::Relaxed) {
                for (i, d) in dirs.iter().enumerate() {
                    let whole = |p: &Path| {
                        p.join("merge.json").is_file() && (!marker || p.join("COMMIT").is_file())
                    };
                    // In marker mode LATEST is overwritten in place: skip a read mid-write.
                    let latest = std::fs::read_to_string(d.join("LATEST"))
                        .ok()
                        .filter(|s| s.ends_with('\n'));
                    if let Some(s) = latest {
                        let step: u64 = s.trim().trim_start_matches("step-").parse().unwrap();
                        if step < last[i] {
                            problem(format!(
                                "{}: LATEST from {} to {step}",
                                d.display(),
                                last[i]
                            ));
                        }
                        last[i] = step;
                        if !whole(&d.join(s.trim())) {
                            problem(format!("{}: LATEST names {s:?}, not whole", d.display()));
                        }
                    }
                    for (step, p) in committed(d, marker) {
                        if !p.join("merge.json").is_file() && p.exists() {
                            problem(format!("{}: step-{step} visible partial", d.display()));
                        }
                    }
                    reads.fetch_add(1, Ordering::Relaxed);
                }
                std::thread::sleep(Duration::from_millis(3));
            }
        })
    };
    let mut kills = 0;
    let mut restarts = [0usize; N];
    let mut step = 0u32;
    while kills < kills_wanted {
        step += 100;
        pair.checkpoint(step);
        // One to three kills at random moments after the checkpoint appeared.
        for _ in 0..rng.random_range(1..=3) {
            std::thread::sleep(Duration::from_millis(rng.random_range(0..500)));
            let i = rng.random_range(0..N);
            restarts[i] += 1;
            pair.split[i].restart(&format!("split-{i}-{}", restarts[i]));
            kills += 1;
        }
        pair.single.expect("window update", DT, |e| {
            e.event() == "window.updated" && e.u("step") == Some(step as u64)
        });
    }
    pair.wait_published(step);
    stop.store(true, Ordering::Relaxed);
    reader.join().unwrap();
    let problems = problems.lock().unwrap().clone();
    assert!(problems.is_empty(), "{problems:#?}");
    assert!(reads.load(Ordering::Relaxed) > 100, "the reader barely ran");
    let published = pair.check_outputs();
    // Most steps make it despite the kills (a step is abandoned when the instance that
    // wrote a part was killed and moved on before the others wrote theirs).
    let all = 2 * (step / 100) as usize - 1;
    assert!(
        published * 10 >= all * 8,
        "{published} of {all} outputs published"
    );
    pair.check_no_staging();
    eprintln!(
        "{kills} kills over {} steps; {published} of {all} outputs published, byte-identical",
        step / 100
    );
    pair.stop();
}

/// A stalled instance (SIGSTOP) is waited for and named (`partition.waiting`); once it
/// continues the output is committed. A committer stalled after writing its part is taken
/// over by another instance after `takeover_after`; when it continues it sees the output
/// published and does not publish it again.
#[test]
fn a_stalled_instance_is_waited_for_and_a_stalled_committer_is_taken_over() {
    use rustix::process::Signal;
    let env = TestEnv::new();
    let mut pair = Pair::start(
        &env,
        3,
        "by = \"shard\"\ntakeover_after = \"2s\"\npart_timeout = \"60s\"",
    );
    pair.checkpoint(100);
    pair.checkpoint(200);
    pair.wait_published(200);
    // Instance 2 stalls: instance 0 waits for it and says so.
    signal(&pair.split[2], Signal::STOP);
    pair.checkpoint(300);
    let w = pair.split[0].expect("waiting", DT, |e| {
        e.event() == "partition.waiting" && e.u("step") == Some(300)
    });
    assert_eq!(w.s("missing"), Some("2"), "{}", w.line());
    assert!(!pair.out("split", "ema").join("step-300").exists());
    signal(&pair.split[2], Signal::CONT);
    pair.wait_published(300);
    // Instances 1 and 2 stall; instance 0 waits for their NaN/Inf verdicts on checkpoint
    // 400. The test gives them (the fixtures are clean): instance 0 writes its part of 400,
    // waits for the others' parts, then stalls too.
    signal(&pair.split[1], Signal::STOP);
    signal(&pair.split[2], Signal::STOP);
    pair.checkpoint(400);
    let w = pair.split[0].expect("waiting for verdicts", DT, |e| {
        e.event() == "partition.waiting" && e.u("step") == Some(400)
    });
    assert_eq!(w.s("what"), Some("verdicts"), "{}", w.line());
    let verdicts = pair
        .out("split", "sma2")
        .join(".pmad-staging/verdicts-step-400");
    for k in [1, 2] {
        std::fs::write(verdicts.join(format!("part-{k}")), "ok\n").unwrap();
    }
    for r in RECIPES {
        pair.split[0].expect("part of 400", DT, |e| {
            e.event() == "partition.part_written"
                && e.u("step") == Some(400)
                && e.s("recipe") == Some(r)
        });
    }
    signal(&pair.split[0], Signal::STOP);
    signal(&pair.split[1], Signal::CONT);
    signal(&pair.split[2], Signal::CONT);
    // One of them takes over once its part is 2 s old.
    let deadline = Instant::now() + DT;
    let taken = |d: &Daemon| {
        d.log().iter().any(|e| {
            e.event() == "partition.committed"
                && e.s("by") == Some("takeover")
                && e.u("step") == Some(400)
        })
    };
    loop {
        let n = pair.split[1..].iter().filter(|d| taken(d)).count();
        if n >= 1 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no takeover\n{}",
            pair.split[1].dump(40)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    signal(&pair.split[0], Signal::CONT);
    pair.wait_published(400);
    pair.split[0].expect("seen published", DT, |e| {
        e.event() == "partition.committed" && e.s("by") == Some("other") && e.u("step") == Some(400)
    });
    let emitted_400 = pair.split[0]
        .log()
        .iter()
        .filter(|e| {
            e.event() == "merge.emitted" && e.s("steps").is_some_and(|s| s.ends_with("400"))
        })
        .count();
    assert_eq!(emitted_400, 0, "instance 0 published 400 again");
    assert_eq!(pair.check_outputs(), 3 + 4);
    pair.check_no_staging();
    pair.stop();
}

/// Injected I/O failures (`PMAD_FAULT`, EIO) in instance 0 at each step of writing its part
/// and of the commit — part files, the marker, the index and `merge.json`, the rename of the
/// staging directory, `LATEST` — one fault per restart of instance 0. A failed step publishes
/// nothing partial; the instances carry on and later outputs are published, every one
/// byte-identical to a single instance's.
#[test]
fn faults_in_the_committer_never_publish_a_partial_output() {
    let env = TestEnv::new();
    let mut pair = Pair::start(
        &env,
        3,
        "by = \"shard\"\ntakeover_after = \"2s\"\npart_timeout = \"10s\"",
    );
    let cases = [
        "create:1:.pmad-staging",
        "create:3:.pmad-staging",
        "create:6:.pmad-staging",
        "write:1:.pmad-staging",
        "write:4:.pmad-staging",
        "fsync:1:.pmad-staging",
        "fsync:4:.pmad-staging",
        "fsync:8:.pmad-staging",
        "rename:1:.pmad-staging",
        "rename:2:.pmad-staging",
        "rename:3:.pmad-staging",
        "create:1:LATEST",
        "rename:1:LATEST",
        "mkdir:1:.pmad-staging",
    ];
    let mut step = 100;
    pair.checkpoint(step);
    let mut failed = 0;
    for (k, fault) in cases.iter().enumerate() {
        let spec = pair.split[0].spec().clone();
        pair.split[0].kill9();
        pair.split[0] = spec.tag(&format!("fault-{k}")).fault(Some(fault)).start();
        for _ in 0..2 {
            step += 100;
            pair.checkpoint(step);
        }
        pair.wait_published(step);
        failed += pair.split[0]
            .log()
            .iter()
            .filter(|e| {
                e.event() == "merge.failed"
                    && e.s("error").is_some_and(|s| s.contains("os error 5"))
            })
            .count()
            .min(1);
    }
    assert!(
        failed >= cases.len() / 2,
        "only {failed} of {} faults were hit",
        cases.len()
    );
    let published = pair.check_outputs();
    let all = 2 * (step / 100) as usize - 1;
    assert!(
        published * 10 >= all * 7,
        "{published} of {all} outputs published"
    );
    pair.check_no_staging();
    eprintln!(
        "{failed} of {} faults hit; {published} of {all} outputs published",
        cases.len()
    );
    pair.stop();
}

/// Each instance scans only its own part for NaN/Inf and the instances share their verdicts:
/// a NaN in one instance's part is rejected by all of them, and their windows stay alike
/// (later outputs byte-identical to a single instance's, which rejects it too). Each instance
/// scans fewer bytes than the whole checkpoint.
#[test]
fn a_nan_in_one_part_is_rejected_by_every_instance() {
    const N: usize = 3;
    let env = TestEnv::new();
    let mut pair = Pair::start(&env, N, "by = \"shard\"");
    pair.checkpoint(100);
    pair.checkpoint(200);
    pair.wait_published(200);
    pair.checkpoint_with(300, &["--nonfinite", "nan"]);
    for d in std::iter::once(&mut pair.single).chain(pair.split.iter_mut()) {
        let e = d.expect("rejection", DT, |e| {
            e.event() == "checkpoint.rejected" && e.u("step") == Some(300)
        });
        assert_eq!(e.s("reason"), Some("non_finite"), "{}", e.line());
    }
    // The NaN's tensor is owned (for some recipe) by the instances that found it; the others
    // took their word. (Here the one-file `ema` output has a single owner: it owns every
    // tensor, so two instances find the NaN themselves.)
    let told = pair
        .split
        .iter()
        .filter(|d| {
            d.log().iter().any(|e| {
                e.event() == "checkpoint.rejected"
                    && e.s("error")
                        .is_some_and(|s| s.contains("found non-finite values in its part"))
            })
        })
        .count();
    assert!(told >= 1, "no instance took another's verdict");
    pair.checkpoint(400);
    pair.wait_published(400);
    assert_eq!(pair.check_outputs(), 2 + 3);
    for r in RECIPES {
        assert!(!pair.out("split", r).join("step-300").exists());
    }
    pair.check_no_staging();
    pair.stop();
}
