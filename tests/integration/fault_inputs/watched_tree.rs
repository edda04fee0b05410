//! pmad never modifies the training job's directory (promise 5 of `docs/reliability.md`):
//! with its out and state dirs inside the watched tree, through rotation and emissions, every
//! other path keeps its bytes, mode, inode, mtime and ctime, nothing is created, and pmad
//! holds no write-mode file descriptors or locks there.

use super::{
    expect_accepted, expect_emitted, fixtures, hostile_args, make_args, write_ckpt, write_config,
    Rec, FAST, POLL, WAIT,
};
use crate::harness::tree::{diff_snapshots, path_state, tree_snapshot};
use crate::harness::{copy_tree, list_dir, outputs, s, Daemon, TestEnv};
use std::collections::BTreeSet;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

/// Inode numbers of everything under `dir` (best effort: pmad is writing there).
fn inodes_under(dir: &Path) -> BTreeSet<u64> {
    use std::os::unix::fs::MetadataExt;
    let mut out = BTreeSet::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in rd.flatten() {
            if let Ok(m) = e.metadata() {
                out.insert(m.ino());
                if m.is_dir() {
                    stack.push(e.path());
                }
            }
        }
    }
    out
}

/// Fds of `pid` open for writing on paths under `watch` (outside `own`), and POSIX/flock
/// locks it holds.
fn write_fds_and_locks(pid: u32, watch: &Path, own: &Path) -> Vec<String> {
    let mut found = Vec::new();
    let (w, o) = (s(watch), s(own));
    if let Ok(rd) = std::fs::read_dir(format!("/proc/{pid}/fd")) {
        for e in rd.flatten() {
            let Ok(target) = std::fs::read_link(e.path()) else {
                continue;
            };
            let t = s(&target);
            if !t.starts_with(&w) || t.starts_with(&o) {
                continue;
            }
            let fd = e.file_name().to_string_lossy().into_owned();
            let info =
                std::fs::read_to_string(format!("/proc/{pid}/fdinfo/{fd}")).unwrap_or_default();
            let flags = info
                .lines()
                .find_map(|l| l.strip_prefix("flags:"))
                .and_then(|f| u32::from_str_radix(f.trim(), 8).ok())
                .unwrap_or(0);
            if flags & 3 != 0 {
                found.push(format!("fd {fd} open for writing (flags {flags:o}) on {t}"));
            }
        }
    }
    if let Ok(locks) = std::fs::read_to_string("/proc/locks") {
        // pmad may lock its own files (the state dir's `lock`): match locks by inode.
        let own_inodes = inodes_under(own);
        for l in locks.lines() {
            let f: Vec<&str> = l.split_whitespace().collect();
            if f.get(4) != Some(&pid.to_string().as_str()) {
                continue;
            }
            let ino = f
                .get(5)
                .and_then(|x| x.rsplit(':').next())
                .and_then(|x| x.parse::<u64>().ok());
            if !ino.is_some_and(|i| own_inodes.contains(&i)) {
                found.push(format!("lock held outside pmad's own dirs: {l}"));
            }
        }
    }
    found
}

#[test]
fn watched_tree_is_never_modified() {
    const SAVE_TOTAL_LIMIT: usize = 3;
    let recipes = [
        Rec {
            name: "sma3",
            method: "sma",
            window: 3,
        },
        Rec {
            name: "ema",
            method: "ema",
            window: 0,
        },
    ];
    let env = TestEnv::new();
    let watch = env.mkdir("watch");
    let src = env.join("src");
    let ck = |step: u64| src.join(format!("checkpoint-{step}"));
    let mut jobs: Vec<Vec<String>> = [100u64, 200, 300, 400, 500, 600]
        .iter()
        .map(|&st| make_args(&ck(st), "bf16", st / 100, st, &["--no-edge"]))
        .collect();
    jobs.push(make_args(&ck(250), "bf16", 25, 250, &["--no-edge"]));
    fixtures(&env, &jobs);
    fixtures(
        &env,
        &[hostile_args(
            "truncated",
            &env.join("hostile-250"),
            &ck(250),
        )],
    );

    // pmad's own directories live inside the watched tree.
    let own = env.mkdir("watch/pmad-own");
    let out_root = own.join("out");
    let state = own.join("state");
    // The tree before pmad starts: checkpoints, a rejected one, a trainer temp dir, logs, a
    // link, a file with a checkpoint-like name.
    copy_tree(&ck(100), &watch.join("checkpoint-100"));
    copy_tree(&ck(200), &watch.join("checkpoint-200"));
    copy_tree(&env.join("hostile-250"), &watch.join("checkpoint-250"));
    let tmp = env.mkdir("watch/tmp-checkpoint-999");
    let w = std::fs::read(ck(300).join("model.safetensors")).unwrap();
    std::fs::write(tmp.join("model.safetensors"), &w[..w.len() / 2]).unwrap();
    env.mkdir("watch/runs/Nov27");
    std::fs::write(
        watch.join("runs/Nov27/events.out.tfevents.1.host"),
        b"\x00\x01tf",
    )
    .unwrap();
    std::fs::write(watch.join("README.md"), b"# run\n").unwrap();
    std::fs::write(watch.join("checkpoint-777"), b"not a directory\n").unwrap();
    std::os::unix::fs::symlink("checkpoint-200", watch.join("last-checkpoint")).unwrap();
    std::fs::set_permissions(
        watch.join("README.md"),
        std::os::unix::fs::PermissionsExt::from_mode(0o640),
    )
    .unwrap();
    // Settle the tree's timestamps in the past so any touch shows.
    std::thread::sleep(Duration::from_millis(20));
    let mut model = tree_snapshot(&watch, &["pmad-own"]);

    let cfg = write_config(&env, &watch, &recipes, &out_root, Some(&state));
    let mut d = Daemon::start(env.path(), &cfg, "pmad");
    d.expect("daemon.started", WAIT, |e| e.event() == "daemon.started");
    let stop = Arc::new(AtomicBool::new(false));
    let sampler = {
        let (stop, watch, own, pid) = (stop.clone(), watch.clone(), own.clone(), d.pid());
        std::thread::spawn(move || {
            let mut seen = BTreeSet::new();
            let mut samples = 0;
            while !stop.load(Ordering::Relaxed) {
                seen.extend(write_fds_and_locks(pid, &watch, &own));
                samples += 1;
                std::thread::sleep(Duration::from_millis(5));
            }
            (samples, seen)
        })
    };
    let t0 = SystemTime::now();
    expect_accepted(&mut d, 200, t0);

    // The producer: each new checkpoint is written under a temp name (which pmad ignores),
    // recorded, renamed into place; then the oldest are removed (save_total_limit = 3).
    for step in [300u64, 400, 500, 600] {
        let staged = format!("tmp-checkpoint-{step}");
        let final_name = format!("checkpoint-{step}");
        write_ckpt(&ck(step), &watch.join(&staged), FAST);
        let snap = tree_snapshot(&watch.join(&staged), &[]);
        std::fs::rename(watch.join(&staged), watch.join(&final_name)).unwrap();
        for (rel, st) in snap {
            let key = if rel.is_empty() {
                final_name.clone()
            } else {
                format!("{final_name}/{rel}")
            };
            model.insert(key, st);
        }
        // The rename changed the directory's ctime (and nothing else).
        model.insert(
            final_name.clone(),
            path_state(&watch.join(&final_name)).unwrap(),
        );
        let mut present: Vec<u64> = list_dir(&watch)
            .iter()
            .filter(|n| watch.join(n).is_dir() && !watch.join(n).is_symlink())
            .filter_map(|n| n.strip_prefix("checkpoint-")?.parse().ok())
            .collect();
        present.sort();
        while present.len() > SAVE_TOTAL_LIMIT {
            let old = present.remove(0);
            let name = format!("checkpoint-{old}");
            std::fs::remove_dir_all(watch.join(&name)).unwrap();
            model.retain(|k, _| k != &name && !k.starts_with(&format!("{name}/")));
        }
        model.insert(String::new(), path_state(&watch).unwrap());
        let acc = expect_accepted(&mut d, step, t0);
        expect_emitted(&mut d, &out_root, "sma3", step, acc.t);
    }
    expect_emitted(&mut d, &out_root, "ema", 600, t0);
    std::thread::sleep(POLL * 5);
    let code = d.terminate(Duration::from_secs(10));
    stop.store(true, Ordering::Relaxed);
    let (samples, writes) = sampler.join().unwrap();
    let after = tree_snapshot(&watch, &["pmad-own"]);
    let mut fails = diff_snapshots(&model, &after);
    if code != Some(0) {
        fails.push(format!("shutdown code {code:?}"));
    }
    fails.extend(writes.iter().map(|w| format!("while running: {w}")));
    let published = outputs(&out_root.join("sma3")).len() + outputs(&out_root.join("ema")).len();
    if published < 5 || !state.is_dir() {
        fails.push(format!(
            "the run did too little to count: {published} outputs, state dir exists: {}",
            state.is_dir()
        ));
    }
    eprintln!(
        "watched tree: {} paths compared, {samples} fd/lock samples, {published} outputs",
        after.len()
    );
    assert!(
        fails.is_empty(),
        "the watched tree changed (pmad-own/ excluded):\n{}\n{}",
        fails.join("\n"),
        d.dump(40)
    );
}
