//! The architecture's invariants, checked (docs/architecture.md, "Layers"): which top-level
//! module may use which, that the daemon's parts never reach up into the composition root,
//! and that no two source files of the library use each other, directly or around a loop.
//!
//! The check reads the sources: every `crate::…` and `super::…` path (grouped `use` lists
//! included) is resolved to the longest module it names. Relative paths (`use child::…` in a
//! `mod.rs`) are a module using its own children and are not counted.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// Each top-level module of the library and the ones it may use besides itself, in layer
/// order: a module may only use modules listed before it.
const ALLOWED: &[(&str, &[&str])] = &[
    ("error", &[]),
    ("names", &[]),
    ("sys", &[]),
    ("fsio", &["error", "names"]),
    ("format", &["error", "sys"]),
    ("math", &["error", "names", "sys", "format"]),
    ("output", &["error", "names", "fsio", "format", "math"]),
    ("config", &["error", "names", "sys", "math", "output"]),
    ("obs", &["error", "sys", "config"]),
    (
        "daemon",
        &[
            "error", "names", "sys", "fsio", "format", "math", "output", "config", "obs",
        ],
    ),
];

/// Modules only one other module may use.
const PRIVATE_TO: &[(&str, &str)] = &[
    // The composition root of the daemon: its parts return decisions and never call back.
    ("daemon::cycle", "daemon"),
];

/// The library's source files (not the binary's `main.rs` and `cmd/`), by module path.
fn sources() -> BTreeMap<String, String> {
    fn walk(dir: &Path, prefix: &str, out: &mut BTreeMap<String, String>) {
        let mut entries: Vec<_> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        entries.sort();
        for p in entries {
            let name = p.file_stem().unwrap().to_str().unwrap().to_string();
            let join = |n: &str| {
                if prefix.is_empty() {
                    n.to_string()
                } else {
                    format!("{prefix}::{n}")
                }
            };
            if p.is_dir() {
                if prefix.is_empty() && name == "cmd" {
                    continue;
                }
                walk(&p, &join(&name), out);
            } else if p.extension().is_some_and(|e| e == "rs") {
                let module = match name.as_str() {
                    "mod" => prefix.to_string(),
                    "lib" if prefix.is_empty() => String::new(),
                    // The binary, and this checker (whose tests spell paths in strings).
                    "main" | "layers" if prefix.is_empty() => continue,
                    _ => join(&name),
                };
                out.insert(module, std::fs::read_to_string(&p).unwrap());
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(
        &Path::new(env!("CARGO_MANIFEST_DIR")).join("src"),
        "",
        &mut out,
    );
    out
}

/// The paths a source uses, each as a list of segments starting at the crate root.
fn paths_used(module: &str, text: &str) -> Vec<Vec<String>> {
    // `super` of `a::b` (a file b.rs, or a folder b/ with mod.rs) is `a`.
    let mut parent: Vec<String> = module.split("::").map(String::from).collect();
    if module.is_empty() {
        parent.clear();
    }
    parent.pop();
    let code: String = text
        .lines()
        .map(|l| l.split("//").next().unwrap_or(""))
        .collect::<Vec<_>>()
        .join("\n");
    let ident = |s: &str| -> usize {
        s.char_indices()
            .find(|(_, c)| !(c.is_ascii_alphanumeric() || *c == '_'))
            .map_or(s.len(), |(i, _)| i)
    };
    // Read `a::b::{c, d::e}` starting at `rest` into full paths under `base`.
    fn read(
        rest: &str,
        base: Vec<String>,
        out: &mut Vec<Vec<String>>,
        ident: &dyn Fn(&str) -> usize,
    ) {
        let mut path = base;
        let mut r = rest;
        loop {
            if let Some(inner) = r.strip_prefix('{') {
                // A group: split at top-level commas up to the matching brace.
                let mut depth = 0;
                let mut start = 0;
                for (i, c) in inner.char_indices() {
                    match c {
                        '{' => depth += 1,
                        '}' if depth == 0 => {
                            read(inner[start..i].trim_start(), path.clone(), out, ident);
                            return;
                        }
                        '}' => depth -= 1,
                        ',' if depth == 0 => {
                            read(inner[start..i].trim_start(), path.clone(), out, ident);
                            start = i + 1;
                        }
                        _ => {}
                    }
                }
                return;
            }
            let n = ident(r);
            if n == 0 {
                break;
            }
            path.push(r[..n].to_string());
            r = &r[n..];
            match r.strip_prefix("::") {
                Some(more) => r = more,
                None => break,
            }
        }
        out.push(path);
    }
    let mut out = Vec::new();
    for (key, base) in [("crate::", Vec::new()), ("super::", parent)] {
        let mut from = 0;
        while let Some(i) = code[from..].find(key) {
            let at = from + i;
            from = at + key.len();
            // Not the tail of a longer path (`pmad::crate::` does not exist, but `xsuper::`
            // might).
            let before = code[..at].chars().next_back();
            if before.is_some_and(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':') {
                continue;
            }
            read(&code[from..], base.clone(), &mut out, &ident);
        }
    }
    out
}

/// Every use of one library module by another: (user, used).
fn edges() -> BTreeSet<(String, String)> {
    let src = sources();
    let mut edges = BTreeSet::new();
    for (module, text) in &src {
        for path in paths_used(module, text) {
            // The longest prefix that is a module; the root's re-exports of `error` count
            // as `error`.
            let mut used = None;
            for n in (1..=path.len()).rev() {
                let m = path[..n].join("::");
                if src.contains_key(&m) {
                    used = Some(m);
                    break;
                }
            }
            let used = match used {
                Some(m) => m,
                None if matches!(path.first().map(String::as_str), Some("Error" | "Result")) => {
                    "error".into()
                }
                None => continue,
            };
            if used != *module && !module.starts_with(&format!("{used}::")) {
                edges.insert((module.clone(), used));
            }
        }
    }
    edges
}

fn top(m: &str) -> &str {
    m.split("::").next().unwrap_or(m)
}

#[test]
fn top_level_modules_use_only_the_layers_before_them() {
    let allowed: BTreeMap<&str, &[&str]> = ALLOWED.iter().copied().collect();
    let mut bad = Vec::new();
    for (user, used) in edges() {
        let (a, b) = (top(&user), top(&used));
        if a == b || user.is_empty() {
            continue;
        }
        match allowed.get(a) {
            Some(ok) if ok.contains(&b) => {}
            Some(_) => bad.push(format!("{user} uses {used}")),
            None => bad.push(format!("{user}: top-level module {a} is not in ALLOWED")),
        }
    }
    assert!(bad.is_empty(), "layer violations:\n{}", bad.join("\n"));
}

#[test]
fn private_modules_have_only_their_owner_as_user() {
    let mut bad = Vec::new();
    for (user, used) in edges() {
        for (private, owner) in PRIVATE_TO {
            if used == *private && user != *owner {
                bad.push(format!("{user} uses {used} (only {owner} may)"));
            }
        }
    }
    assert!(bad.is_empty(), "{}", bad.join("\n"));
}

#[test]
fn no_import_cycles_between_source_files() {
    let edges = edges();
    let mut graph: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
    for (a, b) in &edges {
        graph.entry(a.as_str()).or_default().push(b.as_str());
    }
    // Depth-first search for a back edge; report the cycle it closes.
    fn visit<'a>(
        n: &'a str,
        graph: &BTreeMap<&'a str, Vec<&'a str>>,
        stack: &mut Vec<&'a str>,
        done: &mut BTreeSet<&'a str>,
        cycles: &mut Vec<String>,
    ) {
        if done.contains(n) {
            return;
        }
        if let Some(i) = stack.iter().position(|x| *x == n) {
            let mut c: Vec<&str> = stack[i..].to_vec();
            c.push(n);
            cycles.push(c.join(" -> "));
            return;
        }
        stack.push(n);
        for m in graph.get(n).into_iter().flatten() {
            visit(m, graph, stack, done, cycles);
        }
        stack.pop();
        done.insert(n);
    }
    let mut cycles = Vec::new();
    let mut done = BTreeSet::new();
    for n in graph.keys() {
        visit(n, &graph, &mut Vec::new(), &mut done, &mut cycles);
    }
    assert!(cycles.is_empty(), "import cycles:\n{}", cycles.join("\n"));
}

#[test]
fn the_checker_sees_grouped_and_nested_paths() {
    let text = "use crate::math::{kinds::{Accumulator, FloatKind}, Method};\n\
                use super::window::{Source, Window};\n\
                // crate::obs is only mentioned in a comment\n\
                fn f() { crate::sys::page_size(); }";
    let got: BTreeSet<String> = paths_used("daemon::emit", text)
        .into_iter()
        .map(|p| p.join("::"))
        .collect();
    let want: BTreeSet<String> = [
        "math::kinds::Accumulator",
        "math::kinds::FloatKind",
        "math::Method",
        "daemon::window::Source",
        "daemon::window::Window",
        "sys::page_size",
    ]
    .into_iter()
    .map(String::from)
    .collect();
    assert_eq!(got, want);
    // And the real sources have uses to check.
    assert!(edges().len() > 50);
}
