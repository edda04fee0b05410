//! The loss-spike sentinel against the real `pmad run`: a producer whose `trainer_state.json`
//! shows the loss jumping (and one NaN) from step 610 and coming back at 790. Checked: the
//! spike is detected at its onset; no recipe absorbs a checkpoint from the onset until the
//! run is healthy again (an EMA cannot un-add one); a rescue — the SMA of the last `k` clean
//! checkpoints — is published with `rescue.json` and equals the float64 oracle's average;
//! checkpoints are absorbed again after `spike.recovered`.

use crate::harness::{Config, Daemon, Recipe, TestEnv};
use serde_json::Value;
use std::path::Path;
use std::time::Duration;

const T: Duration = Duration::from_secs(30);
const ONSET: u64 = 610;
const RECOVERED: u64 = 790;

/// The logged loss at `step`: slowly falling, with a deterministic jitter, and a spike from
/// ONSET to just before RECOVERED (one of its values is NaN, as Python writes it).
fn loss(step: u64) -> String {
    if (ONSET..RECOVERED).contains(&step) {
        return if step == 650 {
            "NaN".into()
        } else {
            "20.0".into()
        };
    }
    let jitter = ((step * 7919) % 97) as f64 / 97.0 - 0.5;
    format!("{}", 2.0 - step as f64 * 1e-4 + 0.02 * jitter)
}

/// `trainer_state.json` of the checkpoint at `step`: the whole log, every 10 steps.
fn trainer_state(step: u64) -> String {
    let entries: Vec<String> = (1..=step / 10)
        .map(|i| {
            let s = i * 10;
            format!(
                "{{\"step\": {s}, \"learning_rate\": 0.003, \"loss\": {}, \"epoch\": {}}}",
                loss(s),
                s as f64 / 1000.0
            )
        })
        .collect();
    format!(
        "{{\"global_step\": {step}, \"log_history\": [{}]}}",
        entries.join(", ")
    )
}

fn json(p: &Path) -> Value {
    serde_json::from_slice(&std::fs::read(p).unwrap()).unwrap()
}

#[test]
fn a_loss_spike_stops_absorption_and_publishes_a_rescue() {
    let env = TestEnv::new();
    let watch = env.mkdir("ckpt");
    let out = env.join("out");
    let cfg = Config::new(&watch)
        .poll("100ms")
        .settle("100ms")
        .recipe(
            Recipe::sma("sma3", 3)
                .set("keep", 0usize)
                .out_dir(&out.join("sma3")),
        )
        .recipe(
            Recipe::ema("ema", 0.5)
                .set("keep", 0usize)
                .out_dir(&out.join("ema")),
        )
        .raw("spike", "enabled = true")
        .set("spike", "window", 16usize)
        .set("spike", "k", 3usize)
        .set("spike", "out_dir", out.join("rescue"))
        .no_server()
        .json_log("")
        .write(&env.join("pmad.toml"));
    let mut d = Daemon::start(env.path(), &cfg, "pmad");
    let stage = env.mkdir("stage");
    for (i, step) in (100..=1000u64).step_by(100).enumerate() {
        let name = format!("checkpoint-{step}");
        let dir = env.make(
            &format!("stage/{name}"),
            "bf16",
            i as u32 + 1,
            step as u32,
            &[],
        );
        std::fs::write(dir.join("trainer_state.json"), trainer_state(step)).unwrap();
        std::fs::rename(&dir, watch.join(&name)).unwrap();
        // One checkpoint at a time, each decided before the next lands.
        d.expect("a decision", T, |e| {
            matches!(
                e.event(),
                "window.updated" | "checkpoint.skipped" | "checkpoint.rejected"
            ) && e.u("step") == Some(step)
        });
    }
    let _ = stage;
    let detected = d.expect("spike.detected", T, |e| e.event() == "spike.detected");
    assert_eq!(detected.u("step"), Some(ONSET), "{}", detected.line());
    assert_eq!(detected.s("series"), Some("loss"));
    assert_eq!(detected.u("at"), Some(700));
    let rescue = d.expect("rescue.emitted", T, |e| e.event() == "rescue.emitted");
    assert_eq!(rescue.s("steps"), Some("400..600"), "{}", rescue.line());
    assert_eq!(rescue.u("restart_from"), Some(600));
    let skipped = d.expect("700 skipped", T, |e| {
        e.event() == "checkpoint.skipped" && e.u("step") == Some(700)
    });
    assert!(
        skipped.s("reason").unwrap_or("").contains("spike"),
        "{}",
        skipped.line()
    );
    let recovered = d.expect("spike.recovered", T, |e| e.event() == "spike.recovered");
    assert_eq!(recovered.u("step"), Some(RECOVERED), "{}", recovered.line());
    for step in [800, 900, 1000] {
        d.expect("accepted again", T, |e| {
            e.event() == "checkpoint.accepted" && e.u("step") == Some(step)
        });
    }
    d.expect("the last EMA output", T, |e| {
        e.event() == "merge.emitted"
            && e.s("recipe") == Some("ema")
            && e.s("steps").is_some_and(|s| s.ends_with("1000"))
    });
    assert_eq!(d.terminate(T), Some(0), "{}", d.dump(40));

    // No output of any recipe holds the checkpoint written during the spike.
    for recipe in ["sma3", "ema"] {
        for e in std::fs::read_dir(out.join(recipe)).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                let steps = json(&p.join("merge.json"))["steps"].clone();
                assert!(
                    !steps.as_array().unwrap().contains(&Value::from(700)),
                    "{} holds step 700: {steps}",
                    p.display()
                );
            }
        }
    }
    let ema = json(&out.join("ema/step-1000/merge.json"));
    let absorbed: Vec<u64> = ema["steps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap())
        .collect();
    assert_eq!(absorbed, [100, 200, 300, 400, 500, 600, 800, 900, 1000]);

    // The rescue: rescue.json says what and why, and the weights are the SMA of 400..600.
    let dir = out.join("rescue/step-600");
    let r = json(&dir.join("rescue.json"));
    assert_eq!(r["onset_step"], ONSET);
    assert_eq!(r["restart_from"], 600);
    assert_eq!(r["series"], "loss");
    assert_eq!(r["steps"], serde_json::json!([400, 500, 600]));
    assert_eq!(r["detected_at_step"], 700);
    assert!(r["values"].as_array().is_some_and(|v| !v.is_empty()), "{r}");
    assert_eq!(
        std::fs::read_to_string(out.join("rescue/LATEST"))
            .unwrap()
            .trim(),
        "step-600"
    );
    let inputs: Vec<_> = [400, 500, 600]
        .iter()
        .map(|s| watch.join(format!("checkpoint-{s}")))
        .collect();
    let o = env.oracle(&["--method", "sma"], &dir, &inputs);
    assert_eq!(o.code, 0, "{}", o.describe());
}
