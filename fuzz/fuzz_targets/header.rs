//! Fuzz target `header`: safetensors header validation (`pmad::format::safetensors::header::parse_header`) against
//! the reference crate. The checks live in `fuzz/checks.rs`, shared with `tests/fuzz_corpus.rs`.
#![no_main]

use libfuzzer_sys::fuzz_target;

#[path = "../checks.rs"]
mod checks;

fuzz_target!(|data: &[u8]| checks::check_header_input(data));
