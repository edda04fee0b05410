//! Fuzz target `index`: HF index parsing (`pmad::format::safetensors::header::parse_index`) and shard-name
//! confinement. The checks live in `fuzz/checks.rs`, shared with `tests/fuzz_corpus.rs`.
#![no_main]

use libfuzzer_sys::fuzz_target;

#[path = "../checks.rs"]
mod checks;

fuzz_target!(|data: &[u8]| checks::check_index_input(data));
