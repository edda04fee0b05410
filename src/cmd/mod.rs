//! The `pmad` commands: the binary's edge. Each command parses its arguments (clap) into the
//! library's types, calls the library, and prints; errors become `anyhow` here and nowhere
//! else. Exit codes are decided in `main`.

pub mod check_config;
pub mod demo;
pub mod inspect;
pub mod merge;
pub mod run;

/// Write a command's report to stdout. A reader that went away (`pmad inspect ... | head`)
/// is not an error: the report was for it alone.
pub fn print_out(text: &str) -> anyhow::Result<()> {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    match out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        r => Ok(r?),
    }
}
