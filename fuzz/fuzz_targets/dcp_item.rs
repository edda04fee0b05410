//! Fuzz target `dcp_item`: the zip archive of one DCP item
//! (`pmad::format::dcp::archive`). The checks live in `fuzz/checks.rs`, shared with
//! `tests/fuzz_corpus.rs`.
#![no_main]

use libfuzzer_sys::fuzz_target;

#[path = "../checks.rs"]
mod checks;

fuzz_target!(|data: &[u8]| checks::check_dcp_item(data));
