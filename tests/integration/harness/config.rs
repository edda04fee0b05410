//! The one writer of `pmad run` configs: [`Config`] holds the `[watch]`, `[phase]`,
//! `[state]`, `[server]`, `[log]` and `[daemon]` tables and any number of `[[recipe]]`s
//! ([`Recipe`]); values are typed ([`TomlValue`]) and quoted properly; `raw` lines go into a
//! table verbatim for odd cases. Tables that were never set are left out.
//!
//! ```ignore
//! Config::new(&watch)
//!     .poll("100ms")
//!     .settle("200ms")
//!     .state("dir", &state)
//!     .recipe(Recipe::sma("sma2", 2).all_outputs(&out_root))
//!     .no_server()
//!     .json_log("info")
//!     .write(&env.join("pmad.toml"));
//! ```

use std::path::{Path, PathBuf};

/// A value that can be written into a TOML file.
pub trait TomlValue {
    /// The value as TOML text.
    fn toml(&self) -> String;
}

/// A TOML basic string (escaped).
fn quote(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\t' => out.push_str("\\t"),
            c if c.is_control() => out.push_str(&format!("\\u{:04X}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

impl TomlValue for &str {
    fn toml(&self) -> String {
        quote(self)
    }
}
impl TomlValue for String {
    fn toml(&self) -> String {
        quote(self)
    }
}
impl TomlValue for &Path {
    fn toml(&self) -> String {
        quote(&self.display().to_string())
    }
}
impl TomlValue for &PathBuf {
    fn toml(&self) -> String {
        self.as_path().toml()
    }
}
impl TomlValue for PathBuf {
    fn toml(&self) -> String {
        self.as_path().toml()
    }
}
impl TomlValue for bool {
    fn toml(&self) -> String {
        self.to_string()
    }
}
impl TomlValue for u64 {
    fn toml(&self) -> String {
        self.to_string()
    }
}
impl TomlValue for usize {
    fn toml(&self) -> String {
        self.to_string()
    }
}
impl TomlValue for i32 {
    fn toml(&self) -> String {
        self.to_string()
    }
}
impl TomlValue for f64 {
    /// `0.3`, `1.0` (always a float, never an integer).
    fn toml(&self) -> String {
        format!("{self:?}")
    }
}
impl TomlValue for &[&str] {
    fn toml(&self) -> String {
        let items: Vec<String> = self.iter().map(|s| quote(s)).collect();
        format!("[{}]", items.join(", "))
    }
}

/// The lines of one table, in the order they were set.
#[derive(Debug, Clone, Default)]
struct Table {
    lines: Vec<String>,
}

impl Table {
    /// Set `key = value`, replacing an earlier value of `key`.
    fn set(&mut self, key: &str, value: impl TomlValue) {
        let line = format!("{key} = {}", value.toml());
        let prefix = format!("{key} = ");
        match self.lines.iter_mut().find(|l| l.starts_with(&prefix)) {
            Some(l) => *l = line,
            None => self.lines.push(line),
        }
    }
}

/// One `[[recipe]]`.
#[derive(Debug, Clone)]
pub struct Recipe {
    name: String,
    table: Table,
}

impl Recipe {
    /// `name = name`, `method = method`.
    pub fn new(name: &str, method: &str) -> Recipe {
        let mut table = Table::default();
        table.set("name", name);
        table.set("method", method);
        Recipe {
            name: name.to_string(),
            table,
        }
    }

    /// A simple moving average over `window` checkpoints.
    pub fn sma(name: &str, window: usize) -> Recipe {
        Recipe::new(name, "sma").set("window", window)
    }

    /// An EMA with weight `alpha` for the newest checkpoint.
    pub fn ema(name: &str, alpha: f64) -> Recipe {
        Recipe::new(name, "ema").set("alpha", alpha)
    }

    /// `method` sized the way the daemon tests size recipes: `alpha` for EMA, `window` for
    /// the others.
    pub fn sized(name: &str, method: &str, window: usize, alpha: f64) -> Recipe {
        let r = Recipe::new(name, method);
        if method == "ema" {
            r.set("alpha", alpha)
        } else {
            r.set("window", window)
        }
    }

    /// Set `key = value` (replacing an earlier value).
    pub fn set(mut self, key: &str, value: impl TomlValue) -> Self {
        self.table.set(key, value);
        self
    }

    /// `out_dir = dir`.
    pub fn out_dir(self, dir: &Path) -> Self {
        self.set("out_dir", dir)
    }

    /// The daemon tests' usual publishing: after every accepted checkpoint
    /// (`emit_every = 1`), in the source dtype, keeping every output (`keep = 0`), into
    /// `<out_root>/<name>`.
    pub fn all_outputs(self, out_root: &Path) -> Self {
        let dir = out_root.join(&self.name);
        self.set("emit_every", 1usize)
            .out_dir(&dir)
            .set("dtype", "source")
            .set("keep", 0usize)
    }

    /// A line written verbatim into the table.
    pub fn raw(mut self, line: &str) -> Self {
        self.table.lines.push(line.to_string());
        self
    }
}

/// A whole `pmad run` config.
#[derive(Debug, Clone)]
pub struct Config {
    /// `(name, table)` of the plain tables, in file order.
    tables: Vec<(&'static str, Option<Table>)>,
    recipes: Vec<Recipe>,
}

impl Config {
    /// `[watch] dir = watch` and nothing else.
    pub fn new(watch: &Path) -> Config {
        let mut c = Config {
            tables: [
                "watch", "phase", "state", "server", "log", "daemon", "spike",
            ]
            .iter()
            .map(|n| (*n, None))
            .collect(),
            recipes: Vec::new(),
        };
        c.table("watch").set("dir", watch);
        c
    }

    fn table(&mut self, name: &str) -> &mut Table {
        let t = self
            .tables
            .iter_mut()
            .find(|(n, _)| *n == name)
            .unwrap_or_else(|| panic!("no table [{name}] in a pmad config"));
        t.1.get_or_insert_with(Table::default)
    }

    /// Set `key = value` in table `table` (watch, phase, state, server, log, daemon, spike),
    /// replacing an earlier value.
    pub fn set(mut self, table: &str, key: &str, value: impl TomlValue) -> Self {
        self.table(table).set(key, value);
        self
    }

    /// A line written verbatim into table `table` (which is created if it is not there yet).
    pub fn raw(mut self, table: &str, line: &str) -> Self {
        self.table(table).lines.push(line.to_string());
        self
    }

    /// `[watch] key = value`.
    pub fn watch(self, key: &str, value: impl TomlValue) -> Self {
        self.set("watch", key, value)
    }

    /// `[watch] poll_interval`.
    pub fn poll(self, interval: &str) -> Self {
        self.watch("poll_interval", interval)
    }

    /// `[watch] settle`.
    pub fn settle(self, settle: &str) -> Self {
        self.watch("settle", settle)
    }

    /// `[watch] layout = "hf"`, `mode = "auto"` (HF Trainer checkpoints, inotify with polling).
    pub fn hf_auto(self) -> Self {
        self.watch("layout", "hf").watch("mode", "auto")
    }

    /// `[phase] key = value`.
    pub fn phase(self, key: &str, value: impl TomlValue) -> Self {
        self.set("phase", key, value)
    }

    /// `[state] key = value`.
    pub fn state(self, key: &str, value: impl TomlValue) -> Self {
        self.set("state", key, value)
    }

    /// `[server] listen = ""`: no HTTP server.
    pub fn no_server(self) -> Self {
        self.set("server", "listen", "")
    }

    /// `[log] format = "json"`, and `level` unless it is empty.
    pub fn json_log(self, level: &str) -> Self {
        let c = self.set("log", "format", "json");
        if level.is_empty() {
            c
        } else {
            c.set("log", "level", level)
        }
    }

    /// `[daemon] shutdown_grace`.
    pub fn grace(self, grace: &str) -> Self {
        self.set("daemon", "shutdown_grace", grace)
    }

    /// Add a `[[recipe]]`.
    pub fn recipe(mut self, r: Recipe) -> Self {
        self.recipes.push(r);
        self
    }

    /// The TOML text: `[watch]`, `[phase]`, `[state]`, the recipes, `[server]`, `[log]`,
    /// `[daemon]` (tables never set are left out).
    pub fn text(&self) -> String {
        let mut out = String::new();
        let mut put = |header: &str, t: &Table| {
            out.push_str(header);
            out.push('\n');
            for l in &t.lines {
                out.push_str(l);
                out.push('\n');
            }
            out.push('\n');
        };
        let (head, tail) = self.tables.split_at(3);
        for (name, t) in head {
            if let Some(t) = t {
                put(&format!("[{name}]"), t);
            }
        }
        for r in &self.recipes {
            put("[[recipe]]", &r.table);
        }
        for (name, t) in tail {
            if let Some(t) = t {
                put(&format!("[{name}]"), t);
            }
        }
        out
    }

    /// Write the config to `path`; returns `path`.
    pub fn write(&self, path: &Path) -> PathBuf {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).expect("create config dir");
        }
        std::fs::write(path, self.text())
            .unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
        path.to_path_buf()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_builder_writes_every_table_in_order() {
        let cmd: &[&str] = &["sh", "-c", "echo \"$1\" >> /tmp/x"];
        let text = Config::new(Path::new("/ckpt"))
            .poll("1s")
            .poll("2s")
            .state("dir", PathBuf::from("/st"))
            .raw("state", "memory_budget = \"4KB\"")
            .recipe(Recipe::ema("ema", 1.0).set("on_emit", cmd).raw("keep = 3"))
            .recipe(Recipe::sized("w", "wma", 3, 0.5).all_outputs(Path::new("/out")))
            .no_server()
            .json_log("info")
            .grace("5s")
            .text();
        let want = r#"[watch]
dir = "/ckpt"
poll_interval = "2s"

[state]
dir = "/st"
memory_budget = "4KB"

[[recipe]]
name = "ema"
method = "ema"
alpha = 1.0
on_emit = ["sh", "-c", "echo \"$1\" >> /tmp/x"]
keep = 3

[[recipe]]
name = "w"
method = "wma"
window = 3
emit_every = 1
out_dir = "/out/w"
dtype = "source"
keep = 0

[server]
listen = ""

[log]
format = "json"
level = "info"

[daemon]
shutdown_grace = "5s"

"#;
        assert_eq!(text, want);
        let parsed: toml::Value = toml::from_str(&text).expect("valid TOML");
        assert_eq!(parsed["recipe"][0]["on_emit"][2].as_str(), Some(cmd[2]));
    }
}
