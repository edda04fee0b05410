//! `pmad demo` runs end to end: a simulated run, the real daemon, a summary in which the
//! merged models beat the latest checkpoint.

use crate::harness::TestEnv;

#[test]
fn demo_publishes_averages_that_beat_the_latest_checkpoint() {
    let env = TestEnv::new();
    let out = env.pmad([
        "demo",
        "--checkpoints",
        "14",
        "--save-steps",
        "5",
        "--every",
        "10ms",
        "--params",
        "131072",
    ]);
    let stdout = &out.stdout;
    assert!(out.code == 0, "demo failed\n{}", out.describe());
    let row = |name: &str| -> (usize, f64) {
        let line = stdout
            .lines()
            .find(|l| l.starts_with(name))
            .unwrap_or_else(|| panic!("no summary row {name:?} in\n{stdout}"));
        let f: Vec<&str> = line[name.len()..].split_whitespace().collect();
        (f[0].parse().unwrap(), f[2].parse().unwrap_or(f64::NAN))
    };
    let (_, latest) = row("latest checkpoint");
    let (n_sma, sma) = row("pmad sma8");
    let (n_ema, ema) = row("pmad ema0.2");
    assert!(n_sma >= 1 && n_ema >= 1, "no outputs\n{stdout}");
    assert!(
        sma < latest && ema < latest,
        "merged not better than latest\n{stdout}"
    );
    assert!(
        stdout.contains("merge.emitted") && stdout.contains("loss(merged)"),
        "{stdout}"
    );
}

/// `pmad demo --diverge`: the simulated run's learning rate jumps two thirds of the way
/// through and its loss explodes; the sentinel stops the averages at the onset and publishes
/// a rescue whose loss is finite and small, next to the diverged latest checkpoint's.
#[test]
fn demo_diverge_shows_the_rescue_next_to_the_diverged_checkpoint() {
    let env = TestEnv::new();
    let out = env.pmad([
        "demo",
        "--diverge",
        "--checkpoints",
        "18",
        "--save-steps",
        "10",
        "--every",
        "10ms",
        "--params",
        "131072",
    ]);
    let stdout = &out.stdout;
    assert!(out.code == 0, "demo failed\n{}", out.describe());
    assert!(stdout.contains("spike.detected"), "{stdout}");
    let row = |name: &str| -> (u64, f64) {
        let line = stdout
            .lines()
            .find(|l| l.starts_with(name))
            .unwrap_or_else(|| panic!("no row {name:?} in\n{stdout}"));
        let f: Vec<&str> = line[name.len()..].split_whitespace().collect();
        (f[0].parse().unwrap(), f[1].parse().unwrap_or(f64::NAN))
    };
    // 18 checkpoints of 10 steps (small: the tests run pmad's debug build): the LR jumps
    // after step 120; the SMA over 8 fills from 40 (warm-up ends) to 110.
    let (last, diverged) = row("latest checkpoint (diverged)");
    let (rescue_step, rescue) = row("pmad rescue (restart from here)");
    let (sma_step, _) = row("pmad sma8 (its last output)");
    assert_eq!(last, 180);
    assert!(
        diverged.is_nan() || diverged >= 1.0,
        "the run did not diverge\n{stdout}"
    );
    assert!(rescue.is_finite() && rescue < 0.1, "{stdout}");
    assert_eq!(
        rescue_step, 120,
        "the last checkpoint before the spike\n{stdout}"
    );
    assert!(
        sma_step <= 120,
        "an average absorbed a diverged checkpoint\n{stdout}"
    );
}
