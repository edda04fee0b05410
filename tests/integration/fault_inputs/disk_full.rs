//! A full disk under the out_dir (test T3 of `docs/reliability.md`): the out_dir is a small
//! tmpfs (root only; skipped with a printed reason otherwise) that a filler file fills after
//! the first emission. Emissions fail with one clear `merge.failed` (ENOSPC), the previous
//! output and `LATEST` stay intact, the daemon keeps going, and once space is freed the next
//! emission succeeds and matches the float64 oracle.

use super::{
    expect_accepted, expect_emitted, fixtures, latest, make_args, merge_steps, run_oracle, strays,
    write_ckpt, write_config, OracleCheck, FAST, SMA2, WAIT,
};
use crate::harness::{load_tensors, outputs, Daemon, TestEnv};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

/// A tmpfs mounted for the test; unmounted on drop (also when the test panics).
struct TmpfsMount {
    dir: PathBuf,
}

impl TmpfsMount {
    fn mount(dir: &Path, size: &str) -> Result<TmpfsMount, String> {
        if !rustix::process::geteuid().is_root() {
            return Err("not running as root (mount -t tmpfs needs it)".into());
        }
        let out = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir)
            .output()
            .map_err(|e| format!("cannot run mount: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "mount -t tmpfs failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        Ok(TmpfsMount {
            dir: dir.to_path_buf(),
        })
    }
}

impl Drop for TmpfsMount {
    fn drop(&mut self) {
        let ok = std::process::Command::new("umount")
            .arg(&self.dir)
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        if !ok {
            let _ = std::process::Command::new("umount")
                .arg("-l")
                .arg(&self.dir)
                .status();
        }
    }
}

/// Fill the filesystem of `path` with a file until ENOSPC; returns the bytes written.
fn fill(path: &Path) -> u64 {
    let mut f = std::fs::File::create(path).expect("create filler");
    let block = vec![0xa5u8; 4096];
    let mut n = 0u64;
    loop {
        match f.write(&block) {
            Ok(0) => panic!("filler: write returned 0"),
            Ok(k) => n += k as u64,
            Err(e) if e.raw_os_error() == Some(28) => return n,
            Err(e) => panic!("filler: unexpected error {e}"),
        }
    }
}

#[test]
fn disk_full_then_recovers() {
    let env = TestEnv::new();
    let watch = env.mkdir("watch");
    let out_root = env.mkdir("out");
    let src = env.join("src");
    // Declared before the daemon: dropped (unmounted) after it is killed.
    let _mount = match TmpfsMount::mount(&out_root, "1m") {
        Ok(m) => m,
        Err(why) => {
            eprintln!("SKIPPED disk_full_then_recovers: {why}");
            return;
        }
    };
    let jobs: Vec<Vec<String>> = (1..=5)
        .map(|i| {
            make_args(
                &src.join(format!("checkpoint-{}", 100 * i)),
                "bf16",
                i,
                100 * i,
                &["--no-edge"],
            )
        })
        .collect();
    fixtures(&env, &jobs);
    let ck = |step: u64| src.join(format!("checkpoint-{step}"));
    let cfg = write_config(&env, &watch, &[SMA2], &out_root, None);
    let out = out_root.join("sma2");
    let mut d = Daemon::start(env.path(), &cfg, "pmad");
    d.expect("daemon.started", WAIT, |e| e.event() == "daemon.started");

    // 1. Two checkpoints: the first output fits.
    let t0 = SystemTime::now();
    write_ckpt(&ck(100), &watch.join("checkpoint-100"), FAST);
    write_ckpt(&ck(200), &watch.join("checkpoint-200"), FAST);
    expect_emitted(&mut d, &out_root, "sma2", 200, t0);
    assert_eq!(latest(&out).as_deref(), Some("step-200"));

    // 2. Fill the tmpfs; the next emission must fail cleanly with ENOSPC.
    let filler = out_root.join("filler");
    let filled = fill(&filler);
    eprintln!("disk_full: filler took {filled} bytes");
    let t1 = SystemTime::now();
    write_ckpt(&ck(300), &watch.join("checkpoint-300"), FAST);
    let failed = d.expect("merge.failed for step 300", WAIT, |e| {
        e.event() == "merge.failed" && e.step() == Some(300) && e.t >= t1
    });
    eprintln!("disk_full: {}", failed.line());
    let mut fails = Vec::new();
    if failed.u("errno") != Some(28) {
        fails.push(format!(
            "merge.failed errno is not 28 (ENOSPC): {}",
            failed.line()
        ));
    }
    if failed.s("reason") != Some("no_space") {
        fails.push(format!(
            "merge.failed reason is not no_space: {}",
            failed.line()
        ));
    }
    if failed.s("recipe") != Some("sma2") || failed.s("error").is_none_or(|e| e.is_empty()) {
        fails.push(format!(
            "merge.failed without recipe/error: {}",
            failed.line()
        ));
    }
    let check_out_dir = |fails: &mut Vec<String>, when: &str, want_latest: &str| {
        let st = strays(&out);
        if !st.is_empty() {
            fails.push(format!("{when}: leftovers in {}: {st:?}", out.display()));
        }
        match latest(&out) {
            Some(l) if l == want_latest => {}
            other => fails.push(format!(
                "{when}: LATEST is {other:?}, expected {want_latest}"
            )),
        }
        let dir = out.join(want_latest);
        let mj = dir.join("merge.json");
        if !mj.is_file() || !dir.join("model.safetensors").is_file() {
            fails.push(format!(
                "{when}: {} is not a complete output",
                dir.display()
            ));
        } else {
            let t = load_tensors(&dir);
            if t.len() != 8 {
                fails.push(format!("{when}: {} has {} tensors", dir.display(), t.len()));
            }
        }
    };
    check_out_dir(&mut fails, "after ENOSPC", "step-200");
    let published: Vec<u64> = outputs(&out).keys().copied().collect();
    if published != [200] {
        fails.push(format!(
            "after ENOSPC: outputs {published:?}, expected [200] only"
        ));
    }
    assert!(
        d.alive(),
        "pmad died after ENOSPC: {}\n{}",
        d.status_text(),
        d.dump(30)
    );

    // 3. Still full: the daemon keeps processing (a later checkpoint is accepted, its
    //    emission fails the same way).
    let t2 = SystemTime::now();
    write_ckpt(&ck(400), &watch.join("checkpoint-400"), FAST);
    expect_accepted(&mut d, 400, t2);
    let again = d.expect("second merge.failed (step 400)", WAIT, |e| {
        e.event() == "merge.failed" && e.step() == Some(400)
    });
    if again.u("errno") != Some(28) {
        fails.push(format!("second merge.failed: {}", again.line()));
    }
    check_out_dir(&mut fails, "after the second ENOSPC", "step-200");

    // 4. Space freed: the next emission succeeds.
    std::fs::remove_file(&filler).expect("remove filler");
    let t3 = SystemTime::now();
    write_ckpt(&ck(500), &watch.join("checkpoint-500"), FAST);
    expect_emitted(&mut d, &out_root, "sma2", 500, t3);
    check_out_dir(&mut fails, "after space was freed", "step-500");
    let published: Vec<u64> = outputs(&out).keys().copied().collect();
    if published != [200, 500] {
        fails.push(format!("outputs {published:?}, expected [200, 500]"));
    }
    let code = d.terminate(Duration::from_secs(10));
    if code != Some(0) {
        fails.push(format!("shutdown: {} (code {code:?})", d.status_text()));
    }
    let log = d.log();
    let checks: Vec<OracleCheck> = outputs(&out)
        .into_iter()
        .map(|(st, dir)| OracleCheck {
            label: format!("sma2 step-{st}"),
            rec: SMA2,
            inputs: merge_steps(&dir).iter().map(|x| ck(*x)).collect(),
            out: dir,
        })
        .collect();
    for (c, want) in checks.iter().zip([vec![100, 200], vec![400, 500]]) {
        let got = merge_steps(&c.out);
        if got != want {
            fails.push(format!(
                "{}: merge.json steps {got:?}, expected {want:?}",
                c.label
            ));
        }
    }
    fails.extend(run_oracle(&env, &checks));
    let n_failed = log.iter().filter(|e| e.event() == "merge.failed").count();
    if n_failed != 2 {
        fails.push(format!(
            "{n_failed} merge.failed lines, expected 2 (steps 300, 400)"
        ));
    }
    assert!(
        fails.is_empty(),
        "disk full:\n{}\n{}",
        fails.join("\n"),
        d.dump(40)
    );
}
