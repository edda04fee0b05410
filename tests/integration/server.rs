//! The HTTP endpoints of `pmad run`, scraped from a real daemon.

use crate::harness::{Config, Daemon, Recipe, TestEnv};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::time::{Duration, Instant};

/// GET a path; returns (status code, body).
fn get(addr: &str, path: &str) -> (u16, String) {
    let mut s = TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut resp = String::new();
    s.read_to_string(&mut resp).unwrap();
    let code = resp
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = resp
        .split_once("\r\n\r\n")
        .map(|x| x.1)
        .unwrap_or("")
        .to_string();
    (code, body)
}

fn wait_for(what: &str, limit: Duration, mut f: impl FnMut() -> bool) {
    let start = Instant::now();
    while !f() {
        assert!(start.elapsed() < limit, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A running daemon and the address its HTTP server listens on.
struct Server {
    d: Daemon,
    addr: String,
}

fn start(env: &TestEnv, watch: &Path) -> Server {
    start_with(env, watch, "100ms")
}

fn start_with(env: &TestEnv, watch: &Path, poll: &str) -> Server {
    let cfg = Config::new(watch)
        .poll(poll)
        .settle("100ms")
        .recipe(Recipe::sma("sma2", 2).out_dir(&env.join("out/sma2")))
        .set("server", "listen", "127.0.0.1:0")
        .json_log("")
        .write(&env.join("pmad.toml"));
    let mut d = Daemon::start(env.path(), &cfg, "pmad");
    // The bound address is in the server.started event.
    let started = d.expect("server.started", Duration::from_secs(30), |e| {
        e.event() == "server.started"
    });
    let addr = started.s("listen").expect("listen address").to_string();
    Server { d, addr }
}

#[test]
fn endpoints_report_health_readiness_metrics_and_status() {
    let env = TestEnv::new();
    let watch = env.mkdir("ckpt");
    let mut d = start(&env, &watch);
    let (code, body) = get(&d.addr, "/healthz");
    assert_eq!(code, 200, "{body}");
    wait_for("readiness", Duration::from_secs(10), || {
        get(&d.addr, "/readyz").0 == 200
    });
    let (code, metrics) = get(&d.addr, "/metrics");
    assert_eq!(code, 200);
    for name in [
        "pmad_build_info",
        "pmad_checkpoints_discovered_total 0",
        "pmad_window_checkpoints 0",
        "pmad_ready 1",
        "process_resident_memory_bytes",
    ] {
        assert!(metrics.contains(name), "{name} missing:\n{metrics}");
    }
    // Two checkpoints arrive: the SMA over 2 publishes once.
    for (i, step) in [100, 200].iter().enumerate() {
        env.make(
            &format!("ckpt/checkpoint-{step}"),
            "bf16",
            i as u32,
            *step,
            &[],
        );
    }
    wait_for("an emission", Duration::from_secs(30), || {
        get(&d.addr, "/metrics")
            .1
            .contains("pmad_merges_total{recipe=\"sma2\",result=\"ok\"} 1")
    });
    let (_, metrics) = get(&d.addr, "/metrics");
    for name in [
        "pmad_checkpoints_discovered_total 2",
        "pmad_checkpoints_accepted_total 2",
        "pmad_window_checkpoints 2",
        "pmad_last_emitted_step{recipe=\"sma2\"} 200",
        "pmad_newest_checkpoint_step 200",
        "pmad_merge_duration_seconds_count{recipe=\"sma2\"} 1",
        "pmad_output_free_bytes{recipe=\"sma2\"}",
    ] {
        assert!(metrics.contains(name), "{name} missing:\n{metrics}");
    }
    // No step or path is ever a label.
    assert!(!metrics.contains("step=\"") && !metrics.contains("path=\""));
    let (code, status) = get(&d.addr, "/status");
    assert_eq!(code, 200);
    let v: serde_json::Value = serde_json::from_str(&status).unwrap();
    assert_eq!(v["window"], serde_json::json!([100, 200]));
    assert_eq!(v["recipes"][0]["name"], "sma2");
    assert_eq!(v["recipes"][0]["last_emitted_step"], 200);
    assert!(v["recipes"][0]["last_output"]
        .as_str()
        .unwrap()
        .ends_with("step-200"));

    // Readiness follows the output directory's writability.
    let out = env.join("out/sma2");
    let mut perm = std::fs::metadata(&out).unwrap().permissions();
    use std::os::unix::fs::PermissionsExt;
    perm.set_mode(0o500);
    std::fs::set_permissions(&out, perm.clone()).unwrap();
    let unwritable = get(&d.addr, "/readyz");
    perm.set_mode(0o755);
    std::fs::set_permissions(&out, perm).unwrap();
    // root bypasses permission bits; only check the not-ready answer where it applies.
    if !rustix::process::geteuid().is_root() {
        assert_eq!(unwritable.0, 503, "{}", unwritable.1);
    }
    assert_eq!(get(&d.addr, "/readyz").0, 200);

    // SIGTERM: clean exit, and the port is closed.
    assert_eq!(
        d.d.terminate(Duration::from_secs(20)),
        Some(0),
        "no clean exit after SIGTERM: {}",
        d.d.status_text()
    );
    assert!(TcpStream::connect(&d.addr).is_err());
}

fn scans(addr: &str) -> u64 {
    let (_, m) = get(addr, "/metrics");
    m.lines()
        .find_map(|l| l.strip_prefix("pmad_scans_total "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no pmad_scans_total in\n{m}"))
}

/// Regression: inotify reports reads as Access events, including pmad's own scans of the
/// tree; waking on them made every scan trigger the next (4% of a core while idle).
#[test]
fn an_idle_daemon_does_not_rescan_on_its_own_reads() {
    let env = TestEnv::new();
    let watch = env.mkdir("ckpt");
    for d in 0..20 {
        let dir = watch.join(format!("checkpoint-{d}"));
        std::fs::create_dir(&dir).unwrap();
        for f in 0..5 {
            std::fs::write(dir.join(format!("f{f}")), b"x").unwrap();
        }
    }
    let d = start_with(&env, &watch, "1h");
    wait_for("readiness", Duration::from_secs(10), || {
        get(&d.addr, "/readyz").0 == 200
    });
    let before = scans(&d.addr);
    std::thread::sleep(Duration::from_secs(2));
    let after = scans(&d.addr);
    assert!(
        after - before <= 1,
        "{} scans in 2 s of idling (poll_interval 1h)",
        after - before
    );
    // A real change still wakes it at once.
    std::fs::create_dir(watch.join("checkpoint-99")).unwrap();
    wait_for(
        "a scan after a new directory",
        Duration::from_secs(5),
        || scans(&d.addr) > after,
    );
}
