//! The `pmad` commands: the binary's edge. Each command parses its arguments (clap) into the
//! library's types, calls the library, and prints; errors become `anyhow` here and nowhere
//! else. Exit codes are decided in `main`.

pub mod check_config;
pub mod demo;
pub mod inspect;
pub mod merge;
pub mod run;
