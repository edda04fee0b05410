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
