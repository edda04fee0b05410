//! Which tensors are averaged: the format's own rule, then the user's `[select]` patterns.
//!
//! A tensor is averaged when it is floating-point and either its key matches an `include`
//! pattern, or `include` is empty and the format's rule selects it; and its key matches no
//! `exclude` pattern. Everything else is copied byte for byte from the newest checkpoint.
//! The format's rule: every tensor of a safetensors checkpoint; for DCP, every key except
//! training state ([`super::dcp::averaged_key`]). Patterns are regular expressions searched
//! anywhere in the key (anchor them with `^`/`$`); for a sharded DCP tensor the key is the
//! state-dict key, without the chunk suffix.

use regex::Regex;

/// The user's selection of averaged tensors.
#[derive(Debug, Clone, Default)]
pub struct Select {
    include: Vec<Regex>,
    exclude: Vec<Regex>,
}

impl Select {
    /// Compile the patterns; the error names the list (`include`/`exclude`) and index of the
    /// first bad one.
    pub fn new(include: &[String], exclude: &[String]) -> Result<Select, String> {
        let compile = |list: &str, pats: &[String]| -> Result<Vec<Regex>, String> {
            pats.iter()
                .enumerate()
                .map(|(i, p)| {
                    Regex::new(p)
                        .map_err(|e| format!("{list}[{i}]: {p:?} is not a regular expression: {e}"))
                })
                .collect()
        };
        Ok(Select {
            include: compile("include", include)?,
            exclude: compile("exclude", exclude)?,
        })
    }

    /// Whether the float tensor `key` is averaged, given the format's rule `default`.
    pub fn averages(&self, key: &str, default: bool) -> bool {
        let chosen = if self.include.is_empty() {
            default
        } else {
            self.include.iter().any(|r| r.is_match(key))
        };
        chosen && !self.exclude.iter().any(|r| r.is_match(key))
    }

    /// Whether no pattern is set (only the format's rule applies).
    pub fn is_default(&self) -> bool {
        self.include.is_empty() && self.exclude.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn include_replaces_the_rule_and_exclude_always_wins() {
        let s = |i: &[&str], e: &[&str]| {
            Select::new(
                &i.iter().map(|x| x.to_string()).collect::<Vec<_>>(),
                &e.iter().map(|x| x.to_string()).collect::<Vec<_>>(),
            )
            .unwrap()
        };
        let none = s(&[], &[]);
        assert!(none.is_default());
        assert!(none.averages("model.w", true) && !none.averages("optim.m", false));
        let inc = s(&["^optimizer\\.state\\.exp_avg\\."], &[]);
        assert!(inc.averages("optimizer.state.exp_avg.w", false));
        assert!(!inc.averages("model.w", true));
        let exc = s(&[], &["fp32_param", "norm"]);
        assert!(!exc.averages("optimizer.state.fp32_param.w", true));
        assert!(!exc.averages("layers.0.attention_norm.weight", true));
        assert!(exc.averages("layers.0.attention.wq.weight", true));
        let both = s(&["^model\\."], &["embed"]);
        assert!(both.averages("model.head", false) && !both.averages("model.embed", true));
        let e = Select::new(&[], &["ok".into(), "(".into()]).unwrap_err();
        assert!(e.starts_with("exclude[1]: \"(\""), "{e}");
    }
}
