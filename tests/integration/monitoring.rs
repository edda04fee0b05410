//! The monitoring files of `deploy/` against a real `pmad run`:
//!
//! - every metric the alerting rules (`deploy/prometheus/pmad-rules.yml`) and the Grafana
//!   dashboard (`deploy/grafana/pmad.json`) use exists in pmad's `/metrics` after an
//!   emission, and `promtool check metrics` finds nothing to report on that scrape;
//! - a real Prometheus (Debian package `prometheus`; `.ci/run` installs it) scrapes the daemon,
//!   loads the rules without evaluation errors, and its HTTP API returns `pmad_merges_total`
//!   and `pmad_last_emitted_step` as the daemon published them.
//!
//! Where `promtool` or `prometheus` is not on PATH, that part is skipped with the reason
//! printed.

use crate::harness::{repo_root, Config, Daemon, Event, Recipe, TestEnv};
use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const T: Duration = Duration::from_secs(60);

/// GET `path` with HTTP/1.0 (no chunked answers); returns (status code, body).
fn get(addr: &str, path: &str) -> Option<(u16, String)> {
    let mut s = TcpStream::connect(addr).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").ok()?;
    let mut resp = String::new();
    s.read_to_string(&mut resp).ok()?;
    let code = resp.split_whitespace().nth(1)?.parse().ok()?;
    let body = resp.split_once("\r\n\r\n").map(|x| x.1).unwrap_or("");
    Some((code, body.to_string()))
}

fn wait_for<R>(what: &str, limit: Duration, mut f: impl FnMut() -> Option<R>) -> R {
    let start = Instant::now();
    loop {
        if let Some(r) = f() {
            return r;
        }
        assert!(start.elapsed() < limit, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// `name` on PATH, if there.
fn on_path(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|p| {
        std::env::split_paths(&p)
            .map(|d| d.join(name))
            .find(|f| f.is_file())
    })
}

/// A daemon that has published once: its address and the `merge.emitted` event.
struct Emitted {
    d: Daemon,
    addr: String,
    emitted: Event,
}

/// `trainer_state.json` at `step`: the loss logged every 10 steps, steady, NaN at `step` when
/// `spike`.
fn trainer_state(step: u64, spike: bool) -> String {
    let entries: Vec<String> = (1..=step / 10)
        .map(|i| {
            let s = i * 10;
            let loss = if spike && s == step {
                "NaN".to_string()
            } else {
                format!(
                    "{}",
                    2.0 - s as f64 * 1e-4 + 0.01 * ((s * 7919) % 97) as f64 / 97.0
                )
            };
            format!("{{\"step\": {s}, \"learning_rate\": 0.003, \"loss\": {loss}}}")
        })
        .collect();
    format!(
        "{{\"global_step\": {step}, \"log_history\": [{}]}}",
        entries.join(", ")
    )
}

/// Write checkpoint `step` (a test fixture) with its `trainer_state.json`, complete before it
/// appears in the watched directory.
fn checkpoint(env: &TestEnv, step: u64, spike: bool) -> PathBuf {
    let name = format!("checkpoint-{step}");
    let dir = env.make(
        &format!("stage/{name}"),
        "bf16",
        step as u32,
        step as u32,
        &[],
    );
    std::fs::write(dir.join("trainer_state.json"), trainer_state(step, spike)).unwrap();
    let dest = env.join("ckpt").join(&name);
    std::fs::rename(&dir, &dest).unwrap();
    dest
}

/// `pmad run` with an SMA-2 and an EMA recipe and the spike sentinel: two good checkpoints
/// (the test fixtures) make both recipes publish, a truncated one is rejected, and one whose
/// loss is NaN is a spike, so every labelled family has a series.
fn run_through_an_emission(env: &TestEnv) -> Emitted {
    let watch = env.mkdir("ckpt");
    env.mkdir("stage");
    let cfg = Config::new(&watch)
        .poll("100ms")
        .settle("100ms")
        .recipe(Recipe::sma("sma2", 2).out_dir(&env.join("out/sma2")))
        .recipe(Recipe::ema("ema", 0.5).out_dir(&env.join("out/ema")))
        .raw("spike", "enabled = true")
        .set("spike", "window", 8usize)
        .set("spike", "k", 2usize)
        .set("spike", "out_dir", env.join("out/rescue"))
        .set("server", "listen", "127.0.0.1:0")
        .json_log("")
        .write(&env.join("pmad.toml"));
    let mut d = Daemon::start(env.path(), &cfg, "pmad");
    let started = d.expect("server.started", T, |e| e.event() == "server.started");
    let addr = started.s("listen").expect("listen address").to_string();
    let good = checkpoint(env, 100, false);
    checkpoint(env, 200, false);
    let emitted = d.expect("merge.emitted of sma2", T, |e| {
        e.event() == "merge.emitted" && e.s("recipe") == Some("sma2")
    });
    d.expect("merge.emitted of ema at step 200", T, |e| {
        e.event() == "merge.emitted"
            && e.s("recipe") == Some("ema")
            && e.s("out").is_some_and(|o| o.ends_with("step-200"))
    });
    env.hostile("truncated", "ckpt/checkpoint-300", &good);
    d.expect("checkpoint.rejected", T, |e| {
        e.event() == "checkpoint.rejected"
    });
    checkpoint(env, 400, true);
    d.expect("spike.detected", T, |e| e.event() == "spike.detected");
    Emitted { d, addr, emitted }
}

/// The step of the output a `merge.emitted` event names (`.../step-N`).
fn emitted_step(e: &Event) -> u64 {
    let out = e.s("out").expect("merge.emitted out");
    out.rsplit_once("step-")
        .and_then(|(_, n)| n.parse().ok())
        .unwrap_or_else(|| panic!("no step in {out}"))
}

/// Metric names a scrape has samples for, and those only declared by `# TYPE` (a labelled
/// family nothing has incremented yet), with the sample names their type implies.
fn scrape_names(text: &str) -> (BTreeSet<String>, BTreeSet<String>) {
    let mut samples = BTreeSet::new();
    let mut declared = BTreeSet::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let mut it = rest.split_whitespace();
            let (name, kind) = (it.next().unwrap_or(""), it.next().unwrap_or(""));
            let suffixes: &[&str] = match kind {
                "counter" => &["_total"],
                "histogram" => &["_bucket", "_sum", "_count"],
                "info" => &["_info"],
                _ => &[""],
            };
            declared.extend(suffixes.iter().map(|s| format!("{name}{s}")));
        } else if !line.starts_with('#') && !line.trim().is_empty() {
            let end = line.find(['{', ' ']).unwrap_or(line.len());
            samples.insert(line[..end].to_string());
        }
    }
    let declared = declared.difference(&samples).cloned().collect();
    (samples, declared)
}

/// Metric names a PromQL expression selects: identifiers that are not functions, keywords,
/// label names (inside `{}` and `by (...)`-style lists), strings, ranges or numbers.
fn promql_metrics(expr: &str) -> BTreeSet<String> {
    const KEYWORDS: [&str; 13] = [
        "and",
        "or",
        "unless",
        "offset",
        "bool",
        "inf",
        "nan",
        "by",
        "without",
        "on",
        "ignoring",
        "group_left",
        "group_right",
    ];
    const LISTS: [&str; 6] = [
        "by",
        "without",
        "on",
        "ignoring",
        "group_left",
        "group_right",
    ];
    let c: Vec<char> = expr.chars().collect();
    let mut names = BTreeSet::new();
    let mut i = 0;
    let skip_to = |i: usize, close: char| {
        let mut j = i;
        while j < c.len() && c[j] != close {
            if c[j] == '"' {
                j += 1;
                while j < c.len() && c[j] != '"' {
                    j += if c[j] == '\\' { 2 } else { 1 };
                }
            }
            j += 1;
        }
        j + 1
    };
    while i < c.len() {
        let ch = c[i];
        if ch == '{' {
            i = skip_to(i + 1, '}');
        } else if ch == '[' {
            i = skip_to(i + 1, ']');
        } else if ch == '"' || ch == '\'' {
            i += 1;
            while i < c.len() && c[i] != ch {
                i += if c[i] == '\\' { 2 } else { 1 };
            }
            i += 1;
        } else if ch.is_ascii_digit() || ch == '.' || ch == '$' {
            // A number, a duration or a dashboard variable.
            i += 1;
            while i < c.len() && (c[i].is_ascii_alphanumeric() || c[i] == '.' || c[i] == '_') {
                i += 1;
            }
        } else if ch.is_ascii_alphabetic() || ch == '_' || ch == ':' {
            let start = i;
            while i < c.len() && (c[i].is_ascii_alphanumeric() || c[i] == '_' || c[i] == ':') {
                i += 1;
            }
            let word: String = c[start..i].iter().collect();
            let mut j = i;
            while j < c.len() && c[j].is_whitespace() {
                j += 1;
            }
            // A call: `f(`, or an aggregation with its grouping first (`sum by (x) (`).
            let next: String = c[j..]
                .iter()
                .take_while(|ch| ch.is_ascii_alphanumeric() || **ch == '_')
                .collect();
            let call = (j < c.len() && c[j] == '(') || next == "by" || next == "without";
            if call && LISTS.contains(&word.as_str()) {
                i = skip_to(j + 1, ')');
            } else if !call && !KEYWORDS.contains(&word.as_str()) {
                names.insert(word);
            }
        } else {
            i += 1;
        }
    }
    names
}

/// The `expr:` of every rule in a Prometheus rule file (inline or a `|` block).
fn rule_exprs(yaml: &str) -> Vec<String> {
    let lines: Vec<&str> = yaml.lines().collect();
    let mut out = Vec::new();
    for (n, line) in lines.iter().enumerate() {
        let Some(rest) = line.trim_start().strip_prefix("expr:") else {
            continue;
        };
        let indent = line.len() - line.trim_start().len();
        let rest = rest.trim();
        if rest.starts_with('|') || rest.starts_with('>') {
            let block: Vec<&str> = lines[n + 1..]
                .iter()
                .take_while(|l| l.trim().is_empty() || l.len() - l.trim_start().len() > indent)
                .map(|l| l.trim())
                .collect();
            out.push(block.join("\n"));
        } else {
            out.push(rest.trim_matches(['\'', '"']).to_string());
        }
    }
    out
}

/// Every query of a Grafana dashboard: panel targets (rows included) and template variables
/// (`label_values(selector, label)` counts its selector).
fn dashboard_exprs(dash: &serde_json::Value) -> Vec<String> {
    fn panels(v: &serde_json::Value, out: &mut Vec<String>) {
        for p in v.as_array().into_iter().flatten() {
            for t in p["targets"].as_array().into_iter().flatten() {
                if let Some(e) = t["expr"].as_str() {
                    out.push(e.to_string());
                }
            }
            panels(&p["panels"], out);
        }
    }
    let mut out = Vec::new();
    panels(&dash["panels"], &mut out);
    for v in dash["templating"]["list"].as_array().into_iter().flatten() {
        let q = v["query"]["query"].as_str().or(v["query"].as_str());
        if v["type"] == "query" {
            let q = q.expect("a query variable has a query");
            let inner = q
                .strip_prefix("label_values(")
                .and_then(|r| r.rsplit_once(','))
                .map(|(sel, _)| sel.to_string())
                .unwrap_or_else(|| q.to_string());
            out.push(inner);
        }
    }
    out
}

#[test]
fn the_metric_extractor_finds_names_not_labels_functions_or_variables() {
    let got = promql_metrics(
        r#"sum by (le, recipe) (rate(a_bucket{job="pmad", x=~"$v"}[$__rate_interval]))
           - on (instance, job) group_right b offset 30m > 1e9 and c:rec unless time() - d"#,
    );
    let want: BTreeSet<String> = ["a_bucket", "b", "c:rec", "d"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    assert_eq!(got, want);
}

/// The rules and the dashboard use only metrics pmad exports (`up` is Prometheus' own, and
/// checked in the Prometheus test), and `promtool check metrics` is clean on the scrape.
#[test]
fn rules_and_dashboard_use_only_metrics_a_real_scrape_has() {
    let env = TestEnv::new();
    let e = run_through_an_emission(&env);
    let (code, scrape) = get(&e.addr, "/metrics").expect("scrape /metrics");
    assert_eq!(code, 200, "{scrape}");
    let (samples, declared) = scrape_names(&scrape);

    let rules_file = repo_root().join("deploy/prometheus/pmad-rules.yml");
    let rules = std::fs::read_to_string(&rules_file).expect("read the rules");
    let exprs = rule_exprs(&rules);
    assert_eq!(
        exprs.len(),
        rules.matches("- alert:").count(),
        "one expr per alert in {}",
        rules_file.display()
    );
    let dash_file = repo_root().join("deploy/grafana/pmad.json");
    let dash: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&dash_file).expect("read the dashboard"))
            .expect("dashboard JSON");
    let queries = dashboard_exprs(&dash);
    assert!(
        queries.len() >= 20,
        "only {} dashboard queries",
        queries.len()
    );

    let mut failures = Vec::new();
    let mut used = BTreeSet::new();
    for (file, list) in [(&rules_file, &exprs), (&dash_file, &queries)] {
        for q in list.iter() {
            let names = promql_metrics(q);
            if names.is_empty() {
                failures.push(format!("{}: no metric in {q}", file.display()));
            }
            for n in names {
                if n != "up" && !samples.contains(&n) && !declared.contains(&n) {
                    failures.push(format!(
                        "{}: {n} is not in /metrics (in {q})",
                        file.display()
                    ));
                }
                used.insert(n);
            }
        }
    }
    let only_declared: Vec<_> = used.intersection(&declared).collect();
    eprintln!(
        "{} metrics used by {} rules and {} dashboard queries; with no series yet (family \
         declared, nothing counted in this run): {only_declared:?}",
        used.len(),
        exprs.len(),
        queries.len()
    );
    crate::harness::assert_no_failures(&failures);
    // Every metric pmad exports (but the internal scan counter and the build info) is shown
    // or alerted on somewhere.
    let unused: Vec<_> = samples
        .union(&declared)
        .filter(|n| !used.contains(*n) && !n.ends_with("_created"))
        .filter(|n| !["pmad_scans_total", "process_start_time_seconds"].contains(&n.as_str()))
        .collect();
    eprintln!("exported but not used by the rules or the dashboard: {unused:?}");

    match on_path("promtool") {
        None => eprintln!(
            "SKIP promtool check metrics: promtool is not on PATH (apt-get install prometheus)"
        ),
        Some(promtool) => {
            let mut child = Command::new(promtool)
                .args(["check", "metrics"])
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .expect("start promtool");
            let classic = openmetrics_to_classic(&scrape);
            child
                .stdin
                .take()
                .unwrap()
                .write_all(classic.as_bytes())
                .unwrap();
            let out = child.wait_with_output().expect("promtool");
            let text = format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
            assert!(
                out.status.success() && text.trim().is_empty(),
                "promtool check metrics on pmad's /metrics ({}):\n{text}\n-- as linted:\n{classic}",
                out.status
            );
        }
    }
    drop(e.d);
}

/// pmad's OpenMetrics exposition in the classic text format, which is all `promtool check
/// metrics` (2.42) parses: a counter family is named without `_total` in OpenMetrics
/// (`# TYPE pmad_scans counter`, sample `pmad_scans_total`) and with it in the classic format;
/// `# UNIT` and `# EOF` exist only in OpenMetrics. Samples are unchanged, so promtool lints
/// the names and types Prometheus stores.
fn openmetrics_to_classic(text: &str) -> String {
    let counters: BTreeSet<&str> = text
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE ")?.strip_suffix(" counter"))
        .collect();
    let mut out = String::new();
    for line in text.lines() {
        if line.starts_with("# UNIT ") || line == "# EOF" {
            continue;
        }
        let meta = ["# HELP ", "# TYPE "]
            .into_iter()
            .find_map(|p| Some((p, line.strip_prefix(p)?)));
        match meta {
            Some((p, rest)) => {
                let (name, tail) = rest.split_once(' ').unwrap_or((rest, ""));
                let suffix = if counters.contains(name) {
                    "_total"
                } else {
                    ""
                };
                out.push_str(&format!("{p}{name}{suffix} {tail}\n"));
            }
            None => {
                out.push_str(line);
                out.push('\n');
            }
        }
    }
    out
}

/// A Prometheus child process, killed on drop.
struct Prometheus {
    child: Child,
    addr: String,
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("bind a free port")
        .port()
}

/// `/api/v1/query?query=q`: the result vector (panics on an API error).
fn query(prom: &str, q: &str) -> Vec<serde_json::Value> {
    let enc: String = q
        .bytes()
        .map(|b| match b {
            b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'_' | b'-' | b'.' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect();
    let (code, body) = get(prom, &format!("/api/v1/query?query={enc}")).expect("query Prometheus");
    assert_eq!(code, 200, "{q}: {body}");
    let v: serde_json::Value = serde_json::from_str(&body).expect("API JSON");
    assert_eq!(v["status"], "success", "{q}: {body}");
    v["data"]["result"].as_array().cloned().unwrap_or_default()
}

/// The value of the one series of `q` whose labels include `labels`, once Prometheus has it.
fn value_of(prom: &str, q: &str, labels: &[(&str, &str)]) -> f64 {
    wait_for(&format!("{q} {labels:?} in Prometheus"), T, || {
        query(prom, q)
            .into_iter()
            .find(|s| labels.iter().all(|(k, v)| s["metric"][k] == *v))
            .and_then(|s| s["value"][1].as_str()?.parse().ok())
    })
}

#[test]
fn a_real_prometheus_scrapes_pmad_and_evaluates_the_rules() {
    let Some(prometheus) = on_path("prometheus") else {
        eprintln!(
            "SKIP: prometheus is not on PATH (Debian package `prometheus`; .ci/run installs it)"
        );
        return;
    };
    let started = Instant::now();
    let env = TestEnv::new();
    let mut e = run_through_an_emission(&env);
    let rules = repo_root().join("deploy/prometheus/pmad-rules.yml");
    let config = env.join("prometheus.yml");
    std::fs::write(
        &config,
        format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n\
             rule_files: [\"{}\"]\n\
             scrape_configs:\n  - job_name: pmad\n    static_configs:\n      - targets: [\"{}\"]\n",
            rules.display(),
            e.addr
        ),
    )
    .unwrap();
    let addr = format!("127.0.0.1:{}", free_port());
    let log = std::fs::File::create(env.join("prometheus.log")).unwrap();
    let prom = Prometheus {
        child: Command::new(prometheus)
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                env.join("tsdb").display()
            ))
            .arg(format!("--web.listen-address={addr}"))
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("start prometheus"),
        addr,
    };
    let log_tail = || std::fs::read_to_string(env.join("prometheus.log")).unwrap_or_default();
    let deadline = Instant::now() + T;
    while get(&prom.addr, "/-/ready").map(|r| r.0) != Some(200) {
        assert!(
            Instant::now() < deadline,
            "prometheus not ready within {T:?}:\n{}",
            log_tail()
        );
        std::thread::sleep(Duration::from_millis(100));
    }

    // What the daemon published: one ok emission per recipe, sma2's output at step 200.
    let step = emitted_step(&e.emitted);
    assert_eq!(step, 200);
    let up = value_of(&prom.addr, "up", &[("job", "pmad")]);
    assert_eq!(up, 1.0, "{}", log_tail());
    assert_eq!(value_of(&prom.addr, "pmad_build_info", &[]), 1.0);
    assert_eq!(value_of(&prom.addr, "pmad_ready", &[]), 1.0);
    let merges = value_of(
        &prom.addr,
        "pmad_merges_total",
        &[("recipe", "sma2"), ("result", "ok")],
    );
    assert_eq!(merges, 1.0);
    let last = value_of(&prom.addr, "pmad_last_emitted_step", &[("recipe", "sma2")]);
    assert_eq!(last, step as f64);
    let ema = value_of(&prom.addr, "pmad_last_emitted_step", &[("recipe", "ema")]);
    assert_eq!(ema, 200.0);
    // The daemon agrees with itself: /status names the same step.
    let (_, status) = get(&e.addr, "/status").expect("/status");
    let status: serde_json::Value = serde_json::from_str(&status).unwrap();
    let sma2 = status["recipes"]
        .as_array()
        .and_then(|r| r.iter().find(|r| r["name"] == "sma2"))
        .unwrap_or_else(|| panic!("no sma2 in /status: {status}"));
    assert_eq!(sma2["last_emitted_step"], step);

    // Every rule loaded and evaluates without error; the rejection alerts.
    let rules = wait_for("every rule evaluated", T, || {
        let (_, body) = get(&prom.addr, "/api/v1/rules")?;
        let v: serde_json::Value = serde_json::from_str(&body).ok()?;
        let rules: Vec<serde_json::Value> = v["data"]["groups"]
            .as_array()?
            .iter()
            .flat_map(|g| g["rules"].as_array().cloned().unwrap_or_default())
            .collect();
        let evaluated = !rules.is_empty()
            && rules.iter().all(|r| {
                r["lastEvaluation"]
                    .as_str()
                    .is_some_and(|t| !t.starts_with("0001"))
            });
        evaluated.then_some(rules)
    });
    for r in &rules {
        assert_eq!(
            r["health"], "ok",
            "rule {} failed: {}",
            r["name"], r["lastError"]
        );
    }
    // The rejection and the spike alert (neither has a `for`); the rest stay quiet.
    let want: BTreeSet<String> = ["PmadCheckpointsRejected", "PmadLossSpike"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    let deadline = Instant::now() + T;
    let names = loop {
        let names: BTreeSet<String> = query(&prom.addr, "ALERTS{alertstate=\"firing\"}")
            .iter()
            .filter_map(|a| Some(a["metric"]["alertname"].as_str()?.to_string()))
            .collect();
        if names == want || Instant::now() > deadline {
            break names;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    assert_eq!(names, want, "firing alerts");
    eprintln!(
        "{} rules evaluated, alerts: {names:?}; {:.1} s",
        rules.len(),
        started.elapsed().as_secs_f64()
    );
    assert_eq!(e.d.terminate(T), Some(0));
}
