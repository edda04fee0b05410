//! SIGTERM while an emission runs (test T6 of `docs/reliability.md`): with a short grace the
//! emission is aborted cleanly (no temp dir, `LATEST` intact); with a long one it finishes and
//! nothing new is started; both exit 0.

use super::{
    ckpt_name, config, emitted, emitted_step, link_ckpt, ms, scan_out, stage_ckpts, OutCache,
    Recipe, Spec, TMP_PREFIX,
};
use crate::harness::{list_dir, Daemon, Event, TestEnv};
use std::time::{Duration, Instant};

#[test]
fn sigterm_during_emission_is_clean() {
    let t_start = Instant::now();
    let env = TestEnv::new();
    // 32 MiB of bf16 in 256 KiB tensors: an SMA emission takes over a second in a debug
    // build, and pmad checks for cancellation between small groups of tensors.
    let spec = Spec {
        tensors: 128,
        rows: 256,
        cols: 512,
    };
    let steps = [100u64, 200, 300];
    let stage = env.mkdir("stage");
    stage_ckpts(&stage, &steps, spec);
    let recipes = [Recipe {
        name: "sma2",
        method: "sma",
        window: 2,
        alpha: 0.0,
    }];
    let mut problems = Vec::new();
    let mut report = Vec::new();

    // Both cases: checkpoints 100..300 present from the start, so one cycle accepts them one
    // after the other; sma2 publishes step-200, then step-300.
    let setup = |tag: &str, grace: &str| {
        let root = env.mkdir(tag);
        let watch = root.join("watch");
        for s in steps {
            link_ckpt(&stage.join(ckpt_name(s)), &watch.join(ckpt_name(s)));
        }
        let cfg = root.join("pmad.toml");
        config(&watch, &root.join("out"), None, &recipes, grace).write(&cfg);
        let d = Daemon::builder(&cfg).tag("run").start();
        (root, d)
    };
    let started = |step: u64| {
        move |evs: &[Event]| {
            evs.iter()
                .any(|e| e.event() == "merge.started" && e.u("step") == Some(step))
        }
    };

    // Case 1: grace 200ms, SIGTERM during the emission of step-300 (step-200 published).
    {
        let grace = Duration::from_millis(200);
        let (root, mut d) = setup("short", "200ms");
        let out = root.join("out/sma2");
        assert!(
            d.wait_until(Duration::from_secs(90), started(300)),
            "step-300's emission did not start\n{}",
            d.dump(25)
        );
        std::thread::sleep(Duration::from_millis(100));
        assert!(
            !emitted(&d.log(), "sma2", 300),
            "the emission finished within 100 ms: make the checkpoints bigger\n{}",
            d.dump(25)
        );
        let tmp_before = list_dir(&out)
            .iter()
            .filter(|n| n.starts_with(TMP_PREFIX))
            .count();
        let t = Instant::now();
        d.sigterm();
        let code = d.wait_exit(grace + Duration::from_secs(20));
        let took = t.elapsed();
        let evs = d.log();
        report.push(format!(
            "grace 200ms: exit {code:?} {} after SIGTERM (temp dirs at SIGTERM: {tmp_before})",
            ms(took)
        ));
        if code != Some(0) {
            problems.push(format!("grace 200ms: exit code {code:?}\n{}", d.dump(25)));
        }
        if took > grace + Duration::from_secs(3) {
            problems.push(format!(
                "grace 200ms: exit took {} after SIGTERM (grace + 3 s allowed)\n{}",
                ms(took),
                d.dump(25)
            ));
        }
        for ev in ["shutdown.started", "shutdown.completed"] {
            if !evs.iter().any(|e| e.event() == ev) {
                problems.push(format!("grace 200ms: no {ev}\n{}", d.dump(25)));
            }
        }
        let finished = emitted(&evs, "sma2", 300);
        let cancelled = evs.iter().any(|e| {
            e.event() == "merge.failed"
                && e.u("step") == Some(300)
                && e.s("reason") == Some("cancelled")
        });
        if !finished && !cancelled {
            problems.push(format!(
                "grace 200ms: step-300's emission neither finished nor was cancelled\n{}",
                d.dump(25)
            ));
        }
        let mut cache = OutCache::new();
        let scan = scan_out(&out, spec, &mut cache);
        problems.extend(scan.problems.iter().map(|p| format!("grace 200ms: {p}")));
        if !scan.temps.is_empty() {
            problems.push(format!("grace 200ms: temp entries left: {:?}", scan.temps));
        }
        let want: Vec<u64> = if finished { vec![200, 300] } else { vec![200] };
        let got: Vec<u64> = scan.steps.keys().copied().collect();
        if got != want {
            problems.push(format!("grace 200ms: outputs {got:?}, want {want:?}"));
        }
        let want_latest = format!("step-{}\n", want.last().unwrap());
        if scan.latest.as_deref() != Some(&want_latest) {
            problems.push(format!("grace 200ms: LATEST = {:?}", scan.latest));
        }
    }

    // Case 2: grace 60s, SIGTERM during the emission of step-200 while step-300 waits in the
    // same cycle: the emission finishes, nothing new is started, exit 0.
    {
        let (root, mut d) = setup("long", "60s");
        let out = root.join("out/sma2");
        assert!(
            d.wait_until(Duration::from_secs(90), started(200)),
            "step-200's emission did not start\n{}",
            d.dump(25)
        );
        std::thread::sleep(Duration::from_millis(100));
        assert!(
            !emitted(&d.log(), "sma2", 200),
            "the emission finished within 100 ms: make the checkpoints bigger\n{}",
            d.dump(25)
        );
        let t = Instant::now();
        d.sigterm();
        let code = d.wait_exit(Duration::from_secs(90));
        let took = t.elapsed();
        let evs = d.log();
        report.push(format!(
            "grace 60s: exit {code:?} {} after SIGTERM",
            ms(took)
        ));
        if code != Some(0) {
            problems.push(format!("grace 60s: exit code {code:?}\n{}", d.dump(25)));
        }
        let stop = evs.iter().position(|e| e.event() == "shutdown.started");
        let done = evs.iter().position(|e| e.event() == "shutdown.completed");
        let em = evs
            .iter()
            .position(|e| e.event() == "merge.emitted" && emitted_step(e) == Some(200));
        match (stop, em, done) {
            (Some(s), Some(m), Some(c)) if s < m && m < c => {
                let after: Vec<String> = evs[s + 1..]
                    .iter()
                    .filter(|e| {
                        e.event() == "checkpoint.accepted"
                            || e.event() == "merge.started"
                            || (e.event() == "window.updated" && e.u("step").is_some())
                    })
                    .map(Event::short)
                    .collect();
                if !after.is_empty() {
                    problems.push(format!(
                        "grace 60s: intake went on after SIGTERM (shutdown.started): \n{}\n{}",
                        after.join("\n"),
                        d.dump(25)
                    ));
                }
                {
                    let gap = evs[c].t.duration_since(evs[m].t).unwrap_or_default();
                    report.push(format!(
                        "grace 60s: shutdown.completed {} after step-200's merge.emitted",
                        ms(gap)
                    ));
                    if gap > Duration::from_secs(2) {
                        problems.push(format!(
                            "grace 60s: shutdown.completed came {} after the in-flight \
                             emission finished",
                            ms(gap)
                        ));
                    }
                }
            }
            _ => problems.push(format!(
                "grace 60s: want shutdown.started, then step-200's merge.emitted, then \
                 shutdown.completed\n{}",
                d.dump(25)
            )),
        }
        let mut cache = OutCache::new();
        let scan = scan_out(&out, spec, &mut cache);
        problems.extend(scan.problems.iter().map(|p| format!("grace 60s: {p}")));
        if !scan.temps.is_empty() {
            problems.push(format!("grace 60s: temp entries left: {:?}", scan.temps));
        }
        if !scan.steps.contains_key(&200) || scan.latest.is_none() {
            problems.push(format!(
                "grace 60s: outputs {:?}, LATEST {:?}: step-200 must be published",
                scan.steps.keys().collect::<Vec<_>>(),
                scan.latest
            ));
        }
    }
    let summary = format!(
        "T6 ({} MB per checkpoint): {}; total {}",
        spec.bytes() >> 20,
        report.join("; "),
        ms(t_start.elapsed())
    );
    if problems.is_empty() {
        eprintln!("{summary}");
    }
    assert!(
        problems.is_empty(),
        "{} problem(s):\n{}\n\n{summary}",
        problems.len(),
        problems.join("\n\n")
    );
}
