//! `pmad check-config`: it prints the resolved settings of the example config, and refuses a
//! config with a bad key or value with exit code 2 and a message naming the key (with its
//! table and recipe index) and the file.

use crate::harness::{repo_root, s, Config, Recipe, TestEnv};
use std::path::Path;

#[test]
fn every_sample_config_is_valid() {
    let env = TestEnv::new();
    let mut n = 0;
    for e in std::fs::read_dir(repo_root().join("config")).unwrap() {
        let p = e.unwrap().path();
        if p.extension().is_some_and(|x| x == "toml") {
            let r = env.pmad([std::ffi::OsStr::new("check-config"), p.as_os_str()]);
            assert_eq!(r.code, 0, "{}\n{}", p.display(), r.describe());
            n += 1;
        }
    }
    assert!(n >= 5, "only {n} sample configs");
    let tt = env.pmad([
        std::ffi::OsStr::new("check-config"),
        repo_root().join("config/dcp.toml").as_os_str(),
    ]);
    assert!(
        tt.stdout.contains("include        = \"^model\\\\.\""),
        "{}",
        tt.stdout
    );
}

#[test]
fn check_config_prints_resolved_settings() {
    let env = TestEnv::new();
    let example = repo_root().join("config/pmad.toml");
    let r = env.pmad([std::ffi::OsStr::new("check-config"), example.as_os_str()]);
    r.expect_ok();
    for want in [
        "[watch]",
        "/ckpt",
        "poll_interval",
        "10s",
        "settle",
        "5s",
        "[phase]",
        "[state]",
        "sma10",
        "ema",
        "/ckpt-merged/sma10",
    ] {
        assert!(
            r.stdout.contains(want),
            "check-config output lacks {want:?}\n{}",
            r.describe()
        );
    }
}

/// A valid config that the cases below break one edit at a time.
fn good_config() -> String {
    Config::new(Path::new("/ckpt"))
        .poll("1s")
        .recipe(Recipe::sma("sma3", 3).out_dir(Path::new("/merged/sma3")))
        .recipe(Recipe::ema("ema", 0.3).out_dir(Path::new("/merged/ema")))
        .text()
}

#[test]
fn check_config_rejects_bad_keys_and_values() {
    let env = TestEnv::new();
    let good_text = good_config();
    let good = env.join("good.toml");
    std::fs::write(&good, &good_text).unwrap();
    env.pmad([std::ffi::OsStr::new("check-config"), good.as_os_str()])
        .expect_ok();
    // (edit, text the error must contain)
    let cases: [(&str, &str, &[&str]); 7] = [
        ("window = 3", "window = 0", &["recipe[0].window"]),
        ("window = 3", "window = 3\nwindoww = 4", &["windoww"]),
        (
            "poll_interval = \"1s\"",
            "poll_interval = \"fast\"",
            &["watch.poll_interval", "fast"],
        ),
        ("alpha = 0.3", "alpha = 1.5", &["recipe[1].alpha", "1.5"]),
        ("alpha = 0.3", "", &["recipe[1].alpha"]),
        (
            "method = \"sma\"",
            "method = \"median\"",
            &["recipe[0].method", "median"],
        ),
        ("[watch]", "[watch]\nbogus = true", &["bogus"]),
    ];
    let mut failures = Vec::new();
    for (i, (from, to, wants)) in cases.iter().enumerate() {
        let text = good_text.replacen(from, to, 1);
        assert_ne!(text, good_text, "case {i}: edit did not apply");
        let p = env.join(format!("bad{i}.toml"));
        std::fs::write(&p, &text).unwrap();
        let r = env.pmad([std::ffi::OsStr::new("check-config"), p.as_os_str()]);
        let all = format!("{}{}", r.stdout, r.stderr);
        if r.code != 2 || wants.iter().any(|w| !all.contains(w)) || !all.contains(&s(&p)) {
            failures.push(format!(
                "case {i} ({to:?}): expected exit 2 and a message naming {wants:?} and the file\n{}",
                r.describe()
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}
