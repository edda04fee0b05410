//! Fuzz target `dcp_pickle`: the non-executing pickle machine
//! (`pmad::format::dcp::pickle`) and the decoders of its values (`pmad::format::dcp::meta`). The checks live in `fuzz/checks.rs`, shared with
//! `tests/fuzz_corpus.rs`.
#![no_main]

use libfuzzer_sys::fuzz_target;

#[path = "../checks.rs"]
mod checks;

fuzz_target!(|data: &[u8]| checks::check_dcp_pickle(data));
