//! Producers that race the scanner (test T4 of `docs/reliability.md`): checkpoints written in
//! place slowly, one with its marker first and pauses longer than `settle`, must never be
//! accepted before they are complete; directories created and removed under the scan (some
//! the moment pmad maps a file of theirs) must not cause warnings, errors or bad outputs.

use super::{
    ckpt_files, err_lines, expect_accepted, expect_emitted, fixtures, latest, lines_for, make_args,
    merge_steps, run_oracle, write_ckpt, write_config, write_in_place, OracleCheck, Pace, FAST,
    POLL, SETTLE, SMA2, WAIT,
};
use crate::harness::tree::maps_contain;
use crate::harness::{ms_since, outputs, Daemon, TestEnv};
use std::io::Write;
use std::path::Path;
use std::time::{Duration, Instant, SystemTime};

#[test]
fn slow_in_place_writer_is_never_accepted_early() {
    let env = TestEnv::new();
    let watch = env.mkdir("watch");
    let out_root = env.mkdir("out");
    let src = env.join("src");
    let ck = |step: u64| src.join(format!("checkpoint-{step}"));
    let jobs: Vec<Vec<String>> = [100u64, 200, 300]
        .iter()
        .map(|&st| make_args(&ck(st), "bf16", st / 100, st, &["--no-edge"]))
        .collect();
    fixtures(&env, &jobs);
    let cfg = write_config(&env, &watch, &[SMA2], &out_root, None);
    let mut d = Daemon::start(env.path(), &cfg, "pmad");
    d.expect("daemon.started", WAIT, |e| e.event() == "daemon.started");
    let t0 = SystemTime::now();
    write_ckpt(&ck(100), &watch.join("checkpoint-100"), FAST);
    expect_accepted(&mut d, 100, t0);

    // A (step 200): HF order, marker last, weights in 12 pieces 100 ms apart (~1.3 s).
    // B (step 300): a valid marker and every other file FIRST (like a checkpoint rewritten in
    // place, whose old trainer_state.json is still there), then the weights in 4 pieces with
    // pauses longer than settle: the directory looks finished and quiet while the weights
    // file is still short. Only its length can tell.
    let a = {
        let (src, dst) = (ck(200), watch.join("checkpoint-200"));
        std::thread::spawn(move || {
            let size = std::fs::metadata(src.join("model.safetensors"))
                .unwrap()
                .len() as usize;
            write_ckpt(
                &src,
                &dst,
                Pace {
                    chunk: size.div_ceil(12),
                    pause: Duration::from_millis(100),
                },
            )
        })
    };
    let b = {
        let (src, dst) = (ck(300), watch.join("checkpoint-300"));
        std::thread::spawn(move || {
            let start = SystemTime::now();
            std::fs::create_dir_all(&dst).unwrap();
            let mut names = ckpt_files(&src);
            names.retain(|n| n != "model.safetensors");
            names.sort_by_key(|n| n != "trainer_state.json");
            for n in names {
                let bytes = std::fs::read(src.join(&n)).unwrap();
                write_in_place(&dst.join(&n), &bytes, FAST);
            }
            let w = std::fs::read(src.join("model.safetensors")).unwrap();
            let chunk = w.len().div_ceil(4);
            let mut f = std::fs::File::create(dst.join("model.safetensors")).unwrap();
            for (k, c) in w.chunks(chunk).enumerate() {
                if k > 0 {
                    std::thread::sleep(SETTLE * 2 + POLL);
                }
                f.write_all(c).unwrap();
            }
            drop(f);
            (start, SystemTime::now())
        })
    };
    let (a_start, a_end) = a.join().expect("writer A");
    let (b_start, b_end) = b.join().expect("writer B");
    let acc_a = expect_accepted(&mut d, 200, a_start);
    let acc_b = expect_accepted(&mut d, 300, b_start);
    std::thread::sleep(POLL * 5);
    let alive = d.alive();
    let code = d.terminate(Duration::from_secs(10));
    let log = d.log();

    let mut fails = Vec::new();
    for (name, step, end, acc) in [("A", 200, a_end, &acc_a), ("B", 300, b_end, &acc_b)] {
        if acc.t < end {
            fails.push(format!(
                "writer {name}: step {step} accepted {} ms BEFORE the writer finished: {}",
                ms_since(end, acc.t),
                acc.line()
            ));
        }
        let n = lines_for(&log, "checkpoint.accepted", step).len();
        if n != 1 {
            fails.push(format!(
                "writer {name}: {n} checkpoint.accepted lines for step {step}"
            ));
        }
    }
    let rej_a = lines_for(&log, "checkpoint.rejected", 200);
    if !rej_a.is_empty() {
        fails.push(format!(
            "writer A (marker last) was rejected while being written: {}",
            rej_a[0].line()
        ));
    }
    let rej_b = lines_for(&log, "checkpoint.rejected", 300);
    for r in &rej_b {
        if r.s("reason") != Some("incomplete") {
            fails.push(format!(
                "writer B: rejection that is not \"incomplete\": {}",
                r.line()
            ));
        }
    }
    eprintln!(
        "slow writer: A accepted {} ms after it finished; B accepted {} ms after it finished \
         ({} \"incomplete\" rejection(s) while it paused with its marker present)",
        ms_since(acc_a.t, a_end),
        ms_since(acc_b.t, b_end),
        rej_b.len()
    );
    if !alive || code != Some(0) {
        fails.push(format!("daemon: alive {alive}, shutdown {code:?}"));
    }
    fails.extend(err_lines(&log));
    let out = out_root.join("sma2");
    let checks: Vec<OracleCheck> = outputs(&out)
        .into_iter()
        .map(|(st, dir)| OracleCheck {
            label: format!("sma2 step-{st}"),
            rec: SMA2,
            inputs: merge_steps(&dir).iter().map(|x| ck(*x)).collect(),
            out: dir,
        })
        .collect();
    // 200 and 300 land in either order; the newest output averages both.
    match latest(&out) {
        Some(l) if l == "step-300" && merge_steps(&out.join(&l)) == [200, 300] => {}
        other => fails.push(format!(
            "LATEST {other:?} is not step-300 over steps [200, 300]"
        )),
    }
    fails.extend(run_oracle(&env, &checks));
    assert!(
        fails.is_empty(),
        "slow writer:\n{}\n{}",
        fails.join("\n"),
        d.dump(50)
    );
}

#[test]
fn vanishing_dirs_mid_scan_are_not_errors() {
    let env = TestEnv::new();
    let watch = env.mkdir("watch");
    let out_root = env.mkdir("out");
    let src = env.join("src");
    let ck = |name: &str| src.join(name);
    fixtures(
        &env,
        &[
            make_args(&ck("checkpoint-100"), "bf16", 1, 100, &["--no-edge"]),
            make_args(&ck("checkpoint-200"), "bf16", 2, 200, &["--no-edge"]),
            make_args(&ck("checkpoint-150"), "bf16", 15, 150, &["--no-edge"]),
            // Same tensors, two shards: more files to open, so more room for a race.
            make_args(
                &ck("sharded-150"),
                "bf16",
                15,
                150,
                &["--no-edge", "--sharded", "2"],
            ),
        ],
    );
    let cfg = write_config(&env, &watch, &[SMA2], &out_root, None);
    let mut d = Daemon::start(env.path(), &cfg, "pmad");
    d.expect("daemon.started", WAIT, |e| e.event() == "daemon.started");
    let t0 = SystemTime::now();
    write_ckpt(&ck("checkpoint-100"), &watch.join("checkpoint-100"), FAST);
    expect_accepted(&mut d, 100, t0);

    // ~3 s of churn: checkpoint-101, -102, ... each created and removed with rm -rf:
    // (0) before it can settle, (1) around the time pmad may open it, (2) the moment pmad
    // maps one of its files. (Fresh names: a name deleted and re-created between two scans
    // is a rewrite, not a vanished directory; rotation_and_rewrite covers that.)
    let pid = d.pid();
    let (single, sharded) = (ck("checkpoint-150"), ck("sharded-150"));
    let churn_end = Instant::now() + Duration::from_secs(3);
    let mut rounds = [0u32; 3];
    let mut hit_mapped = 0;
    let mut i = 0u64;
    while Instant::now() < churn_end {
        let mode = (i % 3) as usize;
        let from = if i % 2 == 0 { &single } else { &sharded };
        let name = format!("checkpoint-{}", 101 + i);
        let churn = watch.join(&name);
        write_ckpt(from, &churn, FAST);
        match mode {
            0 => std::thread::sleep(Duration::from_millis(i * 37 % 150)),
            1 => std::thread::sleep(SETTLE + Duration::from_millis(i * 53 % 200)),
            _ => {
                let needle = format!("/{name}/");
                let until = Instant::now() + Duration::from_millis(800);
                while Instant::now() < until && !maps_contain(pid, &needle) {
                    std::thread::sleep(Duration::from_micros(300));
                }
                if maps_contain(pid, &needle) {
                    hit_mapped += 1;
                }
            }
        }
        std::fs::remove_dir_all(&churn).expect("rm -rf the churn dir");
        rounds[mode] += 1;
        i += 1;
    }
    let churned = |st: u64| (101..101 + i).contains(&st);
    assert!(
        d.alive(),
        "pmad died during the churn: {}\n{}",
        d.status_text(),
        d.dump(40)
    );
    let t1 = SystemTime::now();
    write_ckpt(&ck("checkpoint-200"), &watch.join("checkpoint-200"), FAST);
    expect_emitted(&mut d, &out_root, "sma2", 200, t1);
    std::thread::sleep(POLL * 3);
    let alive = d.alive();
    let code = d.terminate(Duration::from_secs(10));
    let log = d.log();
    let count = |ev: &str| {
        log.iter()
            .filter(|e| e.event() == ev && e.step().is_some_and(churned))
            .count()
    };
    eprintln!(
        "vanishing dirs: {i} rounds (quick {}, around settle {}, at mapping {} of which {} \
         caught mapped); discovered {}, accepted {}, source.vanished {}",
        rounds[0],
        rounds[1],
        rounds[2],
        hit_mapped,
        count("checkpoint.discovered"),
        count("checkpoint.accepted"),
        count("source.vanished")
    );
    let mut fails = Vec::new();
    if !alive || code != Some(0) {
        fails.push(format!("daemon: alive {alive}, shutdown {code:?}"));
    }
    for e in &log {
        let noisy = matches!(e.level(), "WARN" | "ERROR");
        if noisy && e.step().is_some_and(churned) {
            fails.push(format!(
                "warning/error for a directory that was deleted: {}",
                e.line()
            ));
        } else if e.level() == "ERROR" {
            fails.push(format!("ERROR line: {}", e.line()));
        }
    }
    for st in (101..101 + i).filter(|st| lines_for(&log, "source.vanished", *st).len() > 1) {
        fails.push(format!(
            "source.vanished logged more than once for step {st}"
        ));
    }
    for (st, dir) in outputs(&out_root.join("sma2")) {
        for aux in ["config.json", "tokenizer_config.json"] {
            if !dir.join(aux).is_file() {
                fails.push(format!(
                    "output step-{st} was published without {aux} (its newest input \
                     checkpoint-{st} was deleted after it was accepted; aux files are read from \
                     the directory at emission time, not pinned)"
                ));
            }
        }
    }
    // Whatever pmad took from the churn dirs, every output is right (all of them hold the
    // tensors of checkpoint-150, in one file or two shards).
    let out = out_root.join("sma2");
    let checks: Vec<OracleCheck> = outputs(&out)
        .into_iter()
        .map(|(st, dir)| OracleCheck {
            label: format!("sma2 step-{st}"),
            rec: SMA2,
            inputs: merge_steps(&dir)
                .iter()
                .map(|x| {
                    if churned(*x) {
                        single.clone()
                    } else {
                        ck(&format!("checkpoint-{x}"))
                    }
                })
                .collect(),
            out: dir,
        })
        .collect();
    // Missing aux files are reported above; the oracle's "not a copy" lines for them would
    // only repeat it. Everything else it finds counts.
    for f in run_oracle(&env, &checks) {
        let repeats = |l: &str| {
            l.strip_prefix("oracle: MISMATCH ")
                .and_then(|r| r.split_once(": not a copy of "))
                .is_some_and(|(p, _)| !Path::new(p).exists())
        };
        let mism: Vec<&str> = f
            .lines()
            .filter(|l| l.starts_with("oracle: MISMATCH"))
            .collect();
        if mism.is_empty() || !mism.iter().all(|l| repeats(l)) {
            fails.push(f);
        }
    }
    assert!(
        fails.is_empty(),
        "vanishing dirs:\n{}\n{}",
        fails.join("\n"),
        d.dump(60)
    );
}
