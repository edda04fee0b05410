//! Daemon features not covered by the end-to-end and fault tests: `on_emit` hooks (placeholders,
//! timeout), `keep` retention, `emit_interval`, text log format, an EMA resumed from
//! `state.dir` after the checkpoints it absorbed were rotated away (accumulators in RAM and
//! file-backed), a state save lost after an output was published, and a watch.dir that does
//! not exist yet when pmad starts.

use crate::harness::{outputs, s, Config, Daemon, Recipe, TestEnv};
use std::path::{Path, PathBuf};
use std::time::Duration;

const T: Duration = Duration::from_secs(30);

/// The config of these tests: poll and settle 100ms, one `sma2` recipe into `out/sma2`,
/// no server, JSON log. `recipe` may add to the recipe.
fn config(env: &TestEnv, watch: &Path, recipe: impl FnOnce(Recipe) -> Recipe) -> Config {
    Config::new(watch)
        .poll("100ms")
        .settle("100ms")
        .recipe(recipe(
            Recipe::sma("sma2", 2).out_dir(&env.join("out/sma2")),
        ))
        .no_server()
        .json_log("")
}

fn steps_published(out: &Path) -> Vec<u64> {
    outputs(out).into_keys().collect()
}

#[test]
fn on_emit_runs_with_placeholders_and_times_out() {
    let env = TestEnv::new();
    let watch = env.mkdir("ckpt");
    let record = env.join("hook.txt");
    let rec = record.display().to_string();
    let script = format!("echo \"$1 $2 $3\" >> {rec}; [ \"$2\" = 300 ] && sleep 30; exit 0");
    let hook: &[&str] = &["sh", "-c", &script, "hook", "{path}", "{step}", "{recipe}"];
    // The timeout must leave `sh` time to start and write its record line before the hook of
    // step 300 is killed: 500 ms was not always enough on a loaded machine.
    let cfg = config(&env, &watch, |r| {
        r.set("on_emit", hook)
            .set("on_emit_timeout", "2s")
            .set("keep", 2usize)
    })
    .write(&env.join("pmad.toml"));
    let mut d = Daemon::start(env.path(), &cfg, "pmad");
    for (i, step) in [100u32, 200, 300, 400].iter().enumerate() {
        env.make(
            &format!("ckpt/checkpoint-{step}"),
            "bf16",
            i as u32,
            *step,
            &[],
        );
        if *step >= 200 {
            d.expect("emission", T, |e| {
                e.event() == "merge.emitted"
                    && e.s("steps").is_some_and(|s| s.ends_with(&step.to_string()))
            });
        }
    }
    d.expect("hook outcome for 400", T, |e| {
        e.event() == "hook.finished" && e.u("step") == Some(400)
    });
    let timeout = d.expect("hook timeout for 300", T, |e| {
        e.event() == "hook.failed" && e.u("step") == Some(300)
    });
    assert_eq!(timeout.s("reason"), Some("timeout"), "{}", timeout.line());
    let lines = std::fs::read_to_string(&record).unwrap();
    let out = env.join("out/sma2");
    for step in [200, 300, 400] {
        let want = format!("{} {step} sma2", out.join(format!("step-{step}")).display());
        assert!(
            lines.lines().any(|l| l == want),
            "missing {want:?} in\n{lines}"
        );
    }
    // keep = 2: the oldest output was retired after the newer ones were published.
    assert_eq!(steps_published(&out), vec![300, 400]);
    assert_eq!(
        std::fs::read_to_string(out.join("LATEST")).unwrap().trim(),
        "step-400"
    );
    assert_eq!(d.terminate(T), Some(0), "{}", d.dump(30));
}

#[test]
fn emit_interval_limits_how_often_outputs_appear() {
    let env = TestEnv::new();
    let watch = env.mkdir("ckpt");
    let cfg = config(&env, &watch, |r| {
        r.set("emit_interval", "1h").set("keep", 0usize)
    })
    .write(&env.join("pmad.toml"));
    let mut d = Daemon::start(env.path(), &cfg, "pmad");
    for (i, step) in [100u32, 200, 300, 400].iter().enumerate() {
        env.make(
            &format!("ckpt/checkpoint-{step}"),
            "bf16",
            i as u32,
            *step,
            &[],
        );
        d.expect("acceptance", T, |e| {
            e.event() == "checkpoint.accepted" && e.u("step") == Some(*step as u64)
        });
    }
    d.expect("window update for 400", T, |e| {
        e.event() == "window.updated" && e.u("step") == Some(400)
    });
    std::thread::sleep(Duration::from_millis(500));
    let emitted = d
        .log()
        .iter()
        .filter(|e| e.event() == "merge.emitted")
        .count();
    assert_eq!(emitted, 1, "at most one output per hour\n{}", d.dump(30));
    assert_eq!(steps_published(&env.join("out/sma2")), vec![200]);
    assert_eq!(d.terminate(T), Some(0));
}

#[test]
fn text_log_is_one_readable_line_per_event() {
    let env = TestEnv::new();
    let watch = env.mkdir("ckpt");
    let cfg = config(&env, &watch, |r| r)
        .set("log", "format", "text")
        .write(&env.join("pmad.toml"));
    let mut d = Daemon::start(env.path(), &cfg, "pmad");
    for (i, step) in [100u32, 200].iter().enumerate() {
        env.make(
            &format!("ckpt/checkpoint-{step}"),
            "bf16",
            i as u32,
            *step,
            &[],
        );
    }
    let emitted = d.wait_for(T, |e| e.event() == "merge.emitted");
    assert_eq!(d.terminate(T), Some(0));
    let log = std::fs::read_to_string(&d.stdout).unwrap_or_default();
    let line = log
        .lines()
        .find(|l| l.contains(" merge.emitted "))
        .unwrap_or_else(|| panic!("no emission line in\n{log}"));
    // The harness reads the same line as an event with typed fields.
    let e = emitted.unwrap_or_else(|| panic!("the emission line is not a text event: {line}"));
    assert_eq!(e.line(), line);
    assert_eq!(
        (e.level(), e.s("recipe"), e.s("steps"), e.u("n")),
        ("INFO", Some("sma2"), Some("100..200"), Some(2)),
        "{line}"
    );
    // 2026-11-27T10:31:02Z INFO  merge.emitted recipe=sma2 steps=100..200 n=2 out=... size=... took=... rate=... lag=...
    let words: Vec<&str> = line.split_whitespace().collect();
    assert!(words[0].ends_with('Z') && words[0].len() == 20, "{line}");
    assert_eq!(words[1], "INFO");
    assert_eq!(words[2], "merge.emitted");
    for key in [
        "recipe=sma2",
        "steps=100..200",
        "n=2",
        "out=",
        "size=",
        "took=",
        "rate=",
        "lag=",
    ] {
        assert!(line.contains(key), "{key} missing: {line}");
    }
    assert!(
        !log.contains('\u{1b}'),
        "colour codes in a non-terminal log"
    );
}

/// Watch dir, out dir and config of an EMA-with-state setup named `name` (accumulators
/// file-backed when `memory_budget` is set far below their size).
fn ema_setup(
    env: &TestEnv,
    name: &str,
    memory_budget: Option<&str>,
) -> (PathBuf, PathBuf, PathBuf) {
    let watch = env.mkdir(format!("{name}/ckpt"));
    let out = env.join(format!("{name}/out"));
    let mut c = Config::new(&watch)
        .poll("100ms")
        .settle("100ms")
        .state("dir", env.join(format!("{name}/state")));
    if let Some(m) = memory_budget {
        c = c.state("memory_budget", m);
    }
    let cfg = c
        .recipe(Recipe::ema("ema", 0.3).out_dir(&out).set("keep", 0usize))
        .no_server()
        .json_log("")
        .write(&env.join(format!("{name}/pmad.toml")));
    (watch, out, cfg)
}

/// Write `checkpoint-<step>` into the watch dir of the setup `name` (values seeded by the step).
fn make_ckpt(env: &TestEnv, name: &str, step: u32) {
    env.make(
        &format!("{name}/ckpt/checkpoint-{step}"),
        "bf16",
        step,
        step,
        &[],
    );
}

/// Wait for the emission of the output whose steps end at `step`.
fn expect_emitted(d: &mut Daemon, step: u32) {
    d.expect("emission", T, |e| {
        e.event() == "merge.emitted" && e.s("steps").is_some_and(|s| s.ends_with(&step.to_string()))
    });
}

/// Run pmad (with state) over `steps`, SIGTERM, and return the EMA output of the last step.
fn ema_run(
    env: &TestEnv,
    name: &str,
    batches: &[&[u32]],
    rotate_between: bool,
    memory_budget: Option<&str>,
) -> Vec<u8> {
    let (watch, out, cfg) = ema_setup(env, name, memory_budget);
    let mut last = 0;
    for (b, batch) in batches.iter().enumerate() {
        if b > 0 && rotate_between {
            // save_total_limit: everything absorbed so far is deleted while pmad is down.
            for e in std::fs::read_dir(&watch).unwrap().flatten() {
                std::fs::remove_dir_all(e.path()).unwrap();
            }
        }
        let mut d = Daemon::builder(&cfg).tag(&format!("run{b}")).start();
        for &step in batch.iter() {
            make_ckpt(env, name, step);
            expect_emitted(&mut d, step);
            last = step;
        }
        if b > 0 {
            let r = d
                .log()
                .into_iter()
                .find(|e| e.event() == "state.restored")
                .expect("state.restored");
            // Everything absorbed so far was deleted: the state is restored, nothing to rebuild.
            assert_eq!(r.b("restored"), Some(true), "{}", r.line());
            assert_eq!(r.s("rebuilt"), Some("-"), "{}", r.line());
        }
        assert_eq!(d.terminate(T), Some(0), "{}", d.dump(30));
    }
    std::fs::read(out.join(format!("step-{last}/model.safetensors"))).unwrap()
}

/// With the accumulators in RAM and file-backed (`state.memory_budget` far below their size:
/// passes writing new generation files with page release, emission read from the file, saves
/// by fsync and a restore that maps the saved generation), the resumed EMA is bit-identical
/// to an uninterrupted in-RAM run.
#[test]
fn ema_resumes_bit_identically_after_its_checkpoints_were_rotated_away() {
    let env = TestEnv::new();
    let reference = ema_run(&env, "ref", &[&[100, 200, 300, 400, 500]], false, None);
    for (name, memory_budget, placement) in
        [("resumed", None, "ram"), ("file", Some("4KB"), "file")]
    {
        let resumed = ema_run(
            &env,
            name,
            &[&[100, 200, 300], &[400, 500]],
            true,
            memory_budget,
        );
        for run in ["run0", "run1"] {
            let log =
                std::fs::read_to_string(env.join(format!("{name}/{run}.stdout.log"))).unwrap();
            assert!(
                log.contains(&format!(r#""placement":"{placement}""#)),
                "{name}/{run}: the accumulators were not placed in {placement}:\n{log}"
            );
        }
        assert!(
            resumed == reference,
            "EMA after restart ({placement}) differs from an uninterrupted run"
        );
    }
}

/// The state is saved after an update's emissions at the earliest: a crash between publishing
/// step N and the next save restarts from the state before N (here the state dir is rolled
/// back to it). Step N is then processed again but its output, already published, is not
/// published again (promise 3 of `docs/reliability.md`), and the EMA still ends
/// bit-identical to an uninterrupted run.
#[test]
fn output_published_before_a_lost_state_save_is_not_published_again() {
    let env = TestEnv::new();
    let reference = ema_run(&env, "ref", &[&[100, 200, 300, 400, 500]], false, None);
    let name = "crash";
    let (_watch, out, cfg) = ema_setup(&env, name, None);
    let state = env.join(format!("{name}/state"));
    let make = |step: u32| make_ckpt(&env, name, step);
    let mut d = Daemon::builder(&cfg).tag("run0").start();
    for step in [100, 200, 300] {
        make(step);
        expect_emitted(&mut d, step);
    }
    assert_eq!(d.terminate(T), Some(0), "{}", d.dump(30));
    // The state as it was after step 300.
    let saved = env.mkdir(format!("{name}/state-after-300"));
    for e in std::fs::read_dir(&state).unwrap().flatten() {
        std::fs::copy(e.path(), saved.join(e.file_name())).unwrap();
    }
    d.restart("run1");
    make(400);
    expect_emitted(&mut d, 400);
    assert_eq!(d.terminate(T), Some(0), "{}", d.dump(30));
    let step400 = out.join("step-400/model.safetensors");
    let before = (
        crate::harness::tree::path_state(&step400).unwrap(),
        std::fs::read(&step400).unwrap(),
    );
    // Crash between publishing step-400 and saving the state: the save never happened.
    std::fs::remove_dir_all(&state).unwrap();
    std::fs::rename(&saved, &state).unwrap();
    d.restart("run2");
    let skipped = d.expect("merge.skipped", T, |e| e.event() == "merge.skipped");
    assert_eq!(
        skipped.v["step"],
        serde_json::json!(400),
        "{}",
        skipped.line()
    );
    make(500);
    expect_emitted(&mut d, 500);
    assert_eq!(d.terminate(T), Some(0), "{}", d.dump(30));
    let republished: Vec<String> = d
        .log()
        .into_iter()
        .filter(|e| e.event() == "merge.emitted")
        .filter_map(|e| e.s("out").map(str::to_string))
        .filter(|o| o.ends_with("step-400"))
        .collect();
    assert!(
        republished.is_empty(),
        "step-400 published again: {republished:?}"
    );
    let after = (
        crate::harness::tree::path_state(&step400).unwrap(),
        std::fs::read(&step400).unwrap(),
    );
    assert!(after == before, "step-400 changed on disk");
    let resumed = std::fs::read(out.join("step-500/model.safetensors")).unwrap();
    assert!(
        resumed == reference,
        "EMA after the lost save differs from an uninterrupted run"
    );
}

/// With the default `state.save_interval`, sums are not saved after every checkpoint: the
/// journal lists what was absorbed since the last save; deleting one of those checkpoints
/// saves them at once (`reason = deleted`). A SIGKILL after a later checkpoint restarts from
/// that save, reads the later one again without publishing its output again, and the EMA
/// stays bit-identical to an uninterrupted run; SIGTERM saves what is pending (`shutdown`).
#[test]
fn sums_wait_for_their_save_and_a_restart_reads_again_what_came_after() {
    let env = TestEnv::new();
    let reference = ema_run(&env, "ref", &[&[100, 200, 300, 400, 500]], false, None);
    let name = "lazy";
    let (watch, out, cfg) = ema_setup(&env, name, None);
    let state = env.join(format!("{name}/state"));
    let make = |step: u32| make_ckpt(&env, name, step);
    let sums_saved = |events: &[crate::harness::Event], reason: &str| {
        events.iter().any(|e| {
            e.event() == "state.saved"
                && e.b("accumulators") == Some(true)
                && e.s("reason") == Some(reason)
        })
    };
    let mut d = Daemon::builder(&cfg).tag("run0").start();
    for step in [100, 200, 300] {
        make(step);
        expect_emitted(&mut d, step);
    }
    let journal = state.join("journal.json");
    assert!(
        d.wait_until(T, |_| std::fs::read_to_string(&journal)
            .is_ok_and(|j| j.contains("checkpoint-300"))),
        "no journal naming checkpoint-300\n{}",
        d.dump(30)
    );
    assert!(
        !d.log()
            .iter()
            .any(|e| e.event() == "state.saved" && e.b("accumulators") == Some(true)),
        "sums saved before they were due\n{}",
        d.dump(30)
    );
    // The trainer rotates checkpoint-100 away: the sums are saved at once.
    std::fs::remove_dir_all(watch.join("checkpoint-100")).unwrap();
    assert!(
        d.wait_until(T, |events| sums_saved(events, "deleted")),
        "{}",
        d.dump(30)
    );
    assert!(!journal.exists(), "the journal outlived the save");
    make(400);
    expect_emitted(&mut d, 400);
    let step400 = out.join("step-400/model.safetensors");
    let before = std::fs::read(&step400).unwrap();
    d.kill9();
    d = d.spec().clone().tag("run1").start();
    let r = d.expect("state.restored", T, |e| e.event() == "state.restored");
    assert_eq!(r.b("restored"), Some(true), "{}", r.line());
    let skipped = d.expect("merge.skipped", T, |e| e.event() == "merge.skipped");
    assert_eq!(skipped.u("step"), Some(400), "{}", skipped.line());
    make(500);
    expect_emitted(&mut d, 500);
    assert_eq!(d.terminate(T), Some(0), "{}", d.dump(30));
    assert!(sums_saved(&d.log(), "shutdown"), "{}", d.dump(30));
    assert!(
        !d.log()
            .iter()
            .any(|e| e.event() == "merge.emitted"
                && e.s("out").is_some_and(|o| o.ends_with("step-400"))),
        "step-400 published again\n{}",
        d.dump(30)
    );
    assert!(
        std::fs::read(&step400).unwrap() == before,
        "step-400 changed"
    );
    let resumed = std::fs::read(out.join("step-500/model.safetensors")).unwrap();
    assert!(
        resumed == reference,
        "EMA after the restart differs from an uninterrupted run"
    );
}

#[test]
fn run_waits_for_a_missing_watch_dir() {
    // A sidecar starts before the trainer creates its output directory: pmad must say it is
    // waiting (naming the directory), keep running, and start work once it appears.
    let env = TestEnv::new();
    let missing = env.join("not-yet");
    let cfg = Config::new(&missing)
        .poll("200ms")
        .settle("100ms")
        .recipe(Recipe::sma("a", 2).out_dir(&env.join("out/a")))
        .no_server()
        .json_log("")
        .write(&env.join("c.toml"));
    let mut d = Daemon::start(env.path(), &cfg, "pmad");
    let w = d.expect("watch.waiting", Duration::from_secs(10), |e| {
        e.event() == "watch.waiting"
    });
    assert_eq!(w.s("dir"), Some(s(&missing).as_str()), "{}", w.line());
    assert!(!missing.exists(), "pmad created the watched directory");
    std::thread::sleep(Duration::from_millis(500));
    assert!(d.alive(), "pmad exited while waiting\n{}", d.dump(20));
    std::fs::create_dir(&missing).unwrap();
    for (i, step) in [100u32, 200].iter().enumerate() {
        env.make(
            &format!("not-yet/checkpoint-{step}"),
            "bf16",
            i as u32,
            *step,
            &[],
        );
    }
    d.expect("an emission", Duration::from_secs(20), |e| {
        e.event() == "merge.emitted"
    });
    assert_eq!(d.terminate(Duration::from_secs(20)), Some(0));
}

/// A `schedule` recipe in the daemon: its weights are computed at emission from the pinned
/// window, recorded in merge.json, and the output equals the float64 oracle's decay-emulating
/// average of exactly the steps it lists.
#[test]
fn schedule_recipe_publishes_decay_emulating_averages() {
    let env = TestEnv::new();
    let watch = env.mkdir("ckpt");
    let out = env.join("out/decay");
    let cfg = Config::new(&watch)
        .poll("100ms")
        .settle("100ms")
        .recipe(
            Recipe::new("decay", "schedule")
                .set("window", 3usize)
                .set("shape", "minus_sqrt")
                .set("final_lr_ratio", 0.1)
                .set("keep", 0usize)
                .out_dir(&out),
        )
        .no_server()
        .json_log("")
        .write(&env.join("pmad.toml"));
    let mut d = Daemon::start(env.path(), &cfg, "pmad");
    let mut ckpts = Vec::new();
    for (i, step) in [100u32, 200, 300, 400].iter().enumerate() {
        ckpts.push(env.make(
            &format!("ckpt/checkpoint-{step}"),
            "bf16",
            i as u32 + 1,
            *step,
            &[],
        ));
    }
    d.expect("the output of 400", T, |e| {
        e.event() == "merge.emitted" && e.s("steps") == Some("200..400")
    });
    assert_eq!(d.terminate(T), Some(0), "{}", d.dump(30));
    assert_eq!(steps_published(&out), vec![300, 400]);
    let o = env.oracle(
        &[
            "--method",
            "schedule",
            "--shape",
            "minus_sqrt",
            "--final-lr-ratio",
            "0.1",
        ],
        &out.join("step-400"),
        &ckpts[1..],
    );
    assert_eq!(o.code, 0, "{}", o.describe());
}

/// Started beside a run that already has ten checkpoints, pmad catches up in one pass and
/// publishes only the outputs `keep` retains (three here), not ten of which retention would
/// delete seven at once; it says so in one `watch.backlog` line. A recipe that keeps all
/// (`keep = 0`) still publishes every output.
#[test]
fn a_backlog_publishes_only_what_retention_keeps() {
    let env = TestEnv::new();
    let watch = env.mkdir("ckpt");
    for (i, step) in (100..=1000u32).step_by(100).enumerate() {
        env.make(
            &format!("ckpt/checkpoint-{step}"),
            "bf16",
            i as u32 + 1,
            step,
            &[],
        );
    }
    let all = env.join("out/all");
    let cfg = config(&env, &watch, |r| r.set("keep", 3usize))
        .recipe(Recipe::sma("all", 2).set("keep", 0usize).out_dir(&all))
        .write(&env.join("pmad.toml"));
    let mut d = Daemon::start(env.path(), &cfg, "pmad");
    let backlog = d.expect("the backlog line", T, |e| e.event() == "watch.backlog");
    assert_eq!(backlog.u("n"), Some(10), "{}", backlog.line());
    assert_eq!(
        backlog.s("not_published"),
        Some("sma2:6"),
        "{}",
        backlog.line()
    );
    d.expect("the last output", T, |e| {
        e.event() == "merge.emitted"
            && e.s("recipe") == Some("sma2")
            && e.s("steps") == Some("900..1000")
    });
    assert_eq!(d.terminate(T), Some(0), "{}", d.dump(30));
    let emitted: Vec<String> = d
        .log()
        .iter()
        .filter(|e| e.event() == "merge.emitted" && e.s("recipe") == Some("sma2"))
        .filter_map(|e| e.s("steps").map(String::from))
        .collect();
    assert_eq!(emitted, ["700..800", "800..900", "900..1000"]);
    assert_eq!(steps_published(&env.join("out/sma2")), vec![800, 900, 1000]);
    assert_eq!(
        steps_published(&all).len(),
        9,
        "keep = 0 publishes every output"
    );
}
