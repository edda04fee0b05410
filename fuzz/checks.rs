//! Invariant checks shared by the fuzz targets (`fuzz/fuzz_targets/*.rs`) and the stable-Rust
//! corpus replay (`tests/fuzz_corpus.rs`), written once and included by both with `#[path]`.
//!
//! Every check panics on a violation: a panic is a finding. Entry points:
//! - [`check_header_input`]: one input of the `header` target.
//! - [`check_index_input`]: one input of the `index` target.
//!
//! The reference `safetensors` crate is the authority (see docs/formats.md). pmad may
//! refuse more than the reference in exactly two documented ways ([`documented_exception`]):
//! a header that does not start with `{` and a header that names a tensor twice. Any other
//! file the reference accepts and pmad refuses is a finding.
#![allow(dead_code)]

use pmad::format::safetensors::header::{
    build_header, byte_size, check_plain_name, parse_header, parse_index, Header, HeaderError,
};
use safetensors::{Dtype, SafeTensors};
use serde::de::{Deserializer, IgnoredAny, MapAccess, Visitor};
use serde::Deserialize;
use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::path::{Component, Path};

/// Largest data section the JSON-only mode appends (keeps one execution cheap).
const SYNTH_MAX_DATA: u64 = 1 << 16;

// ---------------------------------------------------------------------------------------------
// header target
// ---------------------------------------------------------------------------------------------

/// All header checks for one fuzz input, read four ways:
/// 1. as a whole file (`parse_header(data, data.len())`), against the reference crate;
/// 2. as 8 bytes choosing a file length, then a prefix of a file of that length;
/// 3. as the JSON header text alone, framed into a file with a matching length field and a
///    zero data section as long as the largest `data_offsets` end (so mutations of the JSON
///    reach the validation rules without having to keep the length field in step);
/// 4. as choices for [`gen_header_json`], which writes a mostly well-formed header with the
///    variations the format allows or forbids, framed the same way; and as choices for a
///    tensor list given to `build_header` ([`check_build_header`]).
pub fn check_header_input(data: &[u8]) {
    check_whole_file(data);
    check_prefix(data);
    check_whole_file(&frame_json(data));
    check_whole_file(&frame_json(&gen_header_json(data)));
    check_build_header(data);
}

/// A whole file: pmad against the reference, the daemon's read protocol against the
/// one-call parse, and `build_header` round trips.
pub fn check_whole_file(data: &[u8]) {
    let len = data.len() as u64;
    let ours = parse_header(data, len);
    if let Err(HeaderError::NeedMore(n)) = &ours {
        panic!("whole file of {len} bytes given, yet parse_header asks for {n}");
    }
    check_open_protocol(data, &ours);

    if reference_would_overflow(data) {
        // Not a file either reader may accept; the reference itself is not asked (below).
        assert!(
            ours.is_err(),
            "accepted a file whose data section ends past u64::MAX"
        );
        return;
    }
    let reference = SafeTensors::deserialize(data);
    match (&ours, &reference) {
        (Ok(h), Ok(_)) => {
            check_agrees_with_reference(h, data);
            check_round_trip(h, data);
        }
        (Ok(h), Err(e)) => {
            panic!("pmad accepted a file the reference rejects ({e:?}); pmad read {h:?}")
        }
        (Err(ours), Ok(_)) => {
            assert!(
                documented_exception(data).is_some(),
                "the reference accepts a file pmad rejects, outside the documented exceptions; \
                 pmad: {ours:?}"
            );
        }
        (Err(_), Err(_)) => {}
    }
}

/// The way `format::safetensors::open_fd` reads a file: `parse_header` over a growing prefix
/// as `NeedMore` asks. It must converge in at most two requests and reach exactly the verdict
/// of one `parse_header` call over the whole file (which [`check_whole_file`] holds to the
/// reference reader's).
fn check_open_protocol(data: &[u8], whole: &Result<Header, HeaderError>) {
    let len = data.len() as u64;
    let mut have = data.len().min(8);
    let mut asks = 0;
    let verdict = loop {
        match parse_header(&data[..have], len) {
            Ok(h) => break Ok(h),
            Err(HeaderError::NeedMore(n)) => {
                assert!(
                    n > have && n <= data.len(),
                    "NeedMore({n}) with {have} of {len} bytes given"
                );
                asks += 1;
                assert!(asks <= 2, "parse_header asked for more bytes {asks} times");
                have = n;
            }
            Err(e) => break Err(e),
        }
    };
    assert_eq!(
        &verdict, whole,
        "reading a growing prefix disagrees with one parse_header call over the whole file"
    );
}

/// An accepted file reads the same through pmad and through the reference crate.
fn check_agrees_with_reference(h: &Header, data: &[u8]) {
    let (n, meta) = SafeTensors::read_metadata(data).expect("reference read_metadata");
    assert_eq!(h.data_start, 8 + n, "data section start");

    type Row = (String, Dtype, Vec<usize>, (usize, usize));
    let mut theirs: Vec<Row> = meta
        .tensors()
        .into_iter()
        .map(|(name, i)| (name, i.dtype, i.shape.clone(), i.data_offsets))
        .collect();
    theirs.sort_by(|a, b| a.0.cmp(&b.0));
    let mut mine: Vec<Row> = h
        .tensors
        .iter()
        .map(|t| (t.name.clone(), t.dtype, t.shape.clone(), (t.begin, t.end)))
        .collect();
    mine.sort_by(|a, b| a.0.cmp(&b.0));
    assert_eq!(
        mine, theirs,
        "tensor names, dtypes, shapes or offsets differ"
    );

    let their_meta: Option<BTreeMap<String, String>> = meta
        .metadata()
        .as_ref()
        .map(|m| m.iter().map(|(k, v)| (k.clone(), v.clone())).collect());
    assert_eq!(h.metadata, their_meta, "__metadata__ differs");

    // Tensors come back in offset order, contiguous from 0 to the end of the file.
    let mut pos = 0;
    for t in &h.tensors {
        assert_eq!(
            t.begin, pos,
            "tensor {} does not start where the last ended",
            t.name
        );
        assert_eq!(
            Some(t.end - t.begin),
            byte_size(t.dtype, &t.shape),
            "size of {}",
            t.name
        );
        pos = t.end;
    }
    assert_eq!(
        h.data_start + pos,
        data.len(),
        "header does not describe the whole file"
    );

    // The reference's views point at the same bytes.
    let st = SafeTensors::deserialize(data).expect("reference deserialize");
    assert_eq!(st.len(), h.tensors.len());
    for t in &h.tensors {
        let v = st
            .tensor(&t.name)
            .expect("tensor missing from the reference's view");
        assert_eq!(v.dtype(), t.dtype);
        assert_eq!(v.shape(), &t.shape[..]);
        let abs = h.data_start + t.begin..h.data_start + t.end;
        assert_eq!(v.data(), &data[abs], "data of {}", t.name);
    }
}

/// `build_header` of an accepted file's tensors is accepted by pmad and by the reference,
/// describes the same tensors at the same offsets, follows the writer rules, and is a fixed
/// point (building again from what it parses to gives the same bytes).
fn check_round_trip(h: &Header, data: &[u8]) {
    let spec: Vec<(String, Dtype, Vec<usize>)> = h
        .tensors
        .iter()
        .map(|t| (t.name.clone(), t.dtype, t.shape.clone()))
        .collect();
    let meta = h.metadata.clone().unwrap_or_default();
    let (prefix, data_len) = build_header(&meta, &spec)
        .unwrap_or_else(|e| panic!("build_header refused an accepted file's tensors: {e}"));
    assert_eq!(
        h.data_start + data_len,
        data.len(),
        "rebuilt data section length"
    );
    assert_eq!(
        prefix.get(8),
        Some(&b'{'),
        "rebuilt header must start with '{{'"
    );
    assert_eq!(
        prefix.len() % 8,
        0,
        "rebuilt header must be padded to a multiple of 8"
    );

    let mut file = prefix.clone();
    file.extend_from_slice(&data[h.data_start..]);
    let h2 = parse_header(&file, file.len() as u64)
        .unwrap_or_else(|e| panic!("pmad rejects the header build_header wrote: {e:?}"));
    SafeTensors::deserialize(&file)
        .unwrap_or_else(|e| panic!("the reference rejects the header build_header wrote: {e:?}"));
    assert_eq!(h2.tensors, h.tensors, "round trip changed the tensors");
    let want_meta = (!meta.is_empty()).then_some(meta);
    assert_eq!(h2.metadata, want_meta, "round trip changed __metadata__");

    let spec2: Vec<(String, Dtype, Vec<usize>)> = h2
        .tensors
        .iter()
        .map(|t| (t.name.clone(), t.dtype, t.shape.clone()))
        .collect();
    let (prefix2, _) = build_header(&h2.metadata.clone().unwrap_or_default(), &spec2)
        .expect("build_header of a round-tripped header");
    assert_eq!(prefix2, prefix, "build_header is not a fixed point");
}

/// Prefix mode: the first 8 bytes choose `file_len`, the rest is the start of that file.
pub fn check_prefix(input: &[u8]) {
    let Some((sel, prefix)) = input.split_first_chunk::<8>() else {
        return;
    };
    let sel = u64::from_le_bytes(*sel);
    let have = prefix.len() as u64;
    let file_len = match sel & 3 {
        0 => have + (sel >> 2) % 1024, // the whole file or a little more
        1 => sel >> 2,                 // anything
        2 => u64::MAX - (sel >> 2) % 256,
        _ => (sel >> 2) % 1024, // often shorter than the prefix: a caller error
    };
    let r = parse_header(prefix, file_len);
    if have > file_len {
        return; // the prefix is longer than the file: only "does not panic" applies
    }
    let field = prefix
        .first_chunk::<8>()
        .map(|b| u64::from_le_bytes(*b))
        .filter(|_| file_len >= 8);
    match &r {
        Err(HeaderError::NeedMore(n)) => {
            let n = *n as u64;
            assert!(n > have, "NeedMore({n}) but {have} bytes were given");
            assert!(
                n <= file_len,
                "NeedMore({n}) past the end of a {file_len}-byte file"
            );
            assert!(
                n == 8 || Some(n - 8) == field,
                "NeedMore({n}) is neither the length field nor the header"
            );
        }
        Ok(h) => {
            assert!(
                h.data_start <= prefix.len(),
                "accepted without the whole header"
            );
            let end = h.tensors.last().map_or(0, |t| t.end);
            assert_eq!(
                h.data_start as u128 + end as u128,
                file_len as u128,
                "accepted a header that does not describe the file length"
            );
        }
        Err(_) => {}
    }
    // Without the whole file only the first 8 + N bytes may matter: bytes past the header
    // (the data section) must not change the verdict.
    if let Some(n) = field {
        if have < file_len && n <= have - 8 {
            let header_only = &prefix[..8 + n as usize];
            assert_eq!(
                parse_header(header_only, file_len),
                r,
                "bytes after the header changed the verdict"
            );
        }
    }
}

/// safetensors 0.8 adds `last end + 8 + N` unchecked once the offsets validate
/// (`read_metadata`, tensor.rs:420), which panics with overflow checks on (as in this fuzz build
/// and in `cargo test`) when a tensor ends within `8 + N` of `usize::MAX`; in release builds it
/// wraps and the file is refused anyway. True when the reference would reach that sum with
/// such an end, so that the reference is not asked (a bug there is not a pmad finding).
fn reference_would_overflow(data: &[u8]) -> bool {
    let Some(n) = data.first_chunk::<8>().map(|b| u64::from_le_bytes(*b)) else {
        return false;
    };
    let Some(text) = usize::try_from(n)
        .ok()
        .and_then(|n| data.get(8..8usize.checked_add(n)?))
    else {
        return false;
    };
    let Ok(serde_json::Value::Object(m)) = serde_json::from_slice(text) else {
        return false;
    };
    m.iter().any(|(k, v)| {
        let offs = v.get("data_offsets").or_else(|| v.get(2));
        let end = offs.and_then(|o| o.get(1)).and_then(|e| e.as_u64());
        k != "__metadata__" && end.is_some_and(|e| e.checked_add(8 + n).is_none())
    })
}

/// `build_header` over a tensor list made from fuzz choices (names made unique, any known
/// dtype, shapes from [`DIMS`]): it returns an error when a size or the total overflows, and
/// otherwise writes a header that pmad reads back as exactly that list, laid out contiguously.
pub fn check_build_header(bytes: &[u8]) {
    let mut c = Choices(bytes);
    let mut spec = Vec::new();
    for i in 0..c.below(12) {
        let Some(dtype) = pmad::format::safetensors::header::parse_dtype(c.pick(DTYPES)) else {
            continue;
        };
        let shape: Vec<usize> = (0..c.below(4)).map(|_| DIMS[c.below(DIMS.len())]).collect();
        spec.push((format!("t{i}"), dtype, shape));
    }
    let mut meta = BTreeMap::new();
    if c.one_in(2) {
        meta.insert("format".to_string(), "pt".to_string());
    }
    let total = spec.iter().try_fold(0usize, |acc, (_, d, s)| {
        byte_size(*d, s).and_then(|b| acc.checked_add(b))
    });
    let built = build_header(&meta, &spec);
    let (prefix, data_len) = match (built, total) {
        (Ok(b), Some(total)) => {
            assert_eq!(b.1, total, "build_header data length");
            b
        }
        (Ok(b), None) => panic!("build_header accepted sizes that overflow: {:?}", b.1),
        (Err(_), None) => return,
        (Err(e), Some(_)) => panic!("build_header refused a valid tensor list: {e}"),
    };
    let Some(file_len) = (prefix.len() as u64).checked_add(data_len as u64) else {
        // The header describes more than u64::MAX bytes: no file length can match it.
        let r = parse_header(&prefix, u64::MAX);
        assert!(
            r.is_err(),
            "accepted a header describing more than u64::MAX bytes"
        );
        return;
    };
    let h = parse_header(&prefix, file_len)
        .unwrap_or_else(|e| panic!("pmad refuses the header build_header wrote: {e:?}"));
    let got: Vec<_> = h
        .tensors
        .iter()
        .map(|t| (t.name.clone(), t.dtype, t.shape.clone()))
        .collect();
    assert_eq!(got, spec, "build_header's tensors read back differently");
}

/// The bytes as a header's JSON text, framed into a file: length field, the text, then as
/// many zero bytes as the largest `data_offsets` end found in it (0 if it is not JSON).
pub fn frame_json(json: &[u8]) -> Vec<u8> {
    let mut data_len = 0u64;
    if let Ok(serde_json::Value::Object(m)) = serde_json::from_slice(json) {
        for (k, v) in &m {
            if k == "__metadata__" {
                continue;
            }
            let offs = v.get("data_offsets").or_else(|| v.get(2));
            if let Some(end) = offs.and_then(|o| o.get(1)).and_then(|e| e.as_u64()) {
                data_len = data_len.max(end);
            }
        }
    }
    let data_len = if data_len > SYNTH_MAX_DATA {
        0
    } else {
        data_len
    };
    let mut f = Vec::with_capacity(8 + json.len() + data_len as usize);
    f.extend_from_slice(&(json.len() as u64).to_le_bytes());
    f.extend_from_slice(json);
    f.resize(f.len() + data_len as usize, 0);
    f
}

/// Reads fuzz bytes as a stream of choices; zeros once they run out.
struct Choices<'a>(&'a [u8]);

impl Choices<'_> {
    fn byte(&mut self) -> u8 {
        match self.0.split_first() {
            Some((b, rest)) => {
                self.0 = rest;
                *b
            }
            None => 0,
        }
    }
    /// A value below `n` (n > 0).
    fn below(&mut self, n: usize) -> usize {
        self.byte() as usize % n
    }
    /// True about once in `n` times.
    fn one_in(&mut self, n: usize) -> bool {
        self.below(n) == 0
    }
    fn pick<'s>(&mut self, from: &[&'s str]) -> &'s str {
        from[self.below(from.len())]
    }
}

const DTYPES: &[&str] = &[
    "F32",
    "F16",
    "BF16",
    "F64",
    "I64",
    "I32",
    "I16",
    "I8",
    "U8",
    "U16",
    "U32",
    "U64",
    "BOOL",
    "C64",
    "F4",
    "F6_E2M3",
    "F6_E3M2",
    "F8_E4M3",
    "F8_E5M2",
    "F8_E8M0",
    "F8_E4M3FNUZ",
    "F8_E5M2FNUZ",
    "f32",
    "Q4",
    "",
];
const NAMES: &[&str] = &[
    "a",
    "b",
    "w.0",
    "\u{e9}",
    "\\u00e9",
    "__metadat\\u0061__",
    "__metadata__\\u0000",
    "",
    "a",
];
const DIMS: &[usize] = &[0, 1, 2, 3, 4, 7, 8, 1 << 32, (1 << 61) - 1, usize::MAX];
const SPACE: &[&str] = &["", "", "", " ", "\n", "\t", "\r", "  "];

/// A header text written from fuzz choices: mostly what a writer would produce (contiguous
/// offsets, right sizes), with the variations the format allows or forbids mixed in: entry
/// and key order, array-form entries, `__metadata__` null or non-string, extra or repeated
/// keys, repeated names, perturbed offsets, leading and trailing whitespace.
pub fn gen_header_json(bytes: &[u8]) -> Vec<u8> {
    let mut c = Choices(bytes);
    let mut j = String::new();
    j.push_str(c.pick(SPACE));
    j.push('{');
    let mut entries: Vec<String> = Vec::new();
    let mut pos = 0usize;
    for _ in 0..c.below(10) {
        let name = c.pick(NAMES);
        let dtype = c.pick(DTYPES);
        let shape: Vec<usize> = (0..c.below(4)).map(|_| DIMS[c.below(DIMS.len())]).collect();
        let size = pmad::format::safetensors::header::parse_dtype(dtype)
            .and_then(|d| byte_size(d, &shape))
            .unwrap_or(c.below(9));
        let (mut b, mut e) = (pos, pos.saturating_add(size));
        match c.below(14) {
            0 => b = b.wrapping_add(1),
            1 => e = e.wrapping_sub(1),
            2 => (b, e) = (e, b),
            3 => (b, e) = (usize::MAX - c.below(4096), usize::MAX),
            _ => {}
        }
        pos = e;
        let shape = format!("{shape:?}").replace(' ', "");
        let mut fields = vec![
            format!("\"dtype\":\"{dtype}\""),
            format!("\"shape\":{shape}"),
            format!("\"data_offsets\":[{b},{e}]"),
        ];
        let body = if c.one_in(6) {
            format!("[\"{dtype}\",{shape},[{b},{e}]]")
        } else {
            if c.one_in(8) {
                fields.push(
                    c.pick(&["\"x\":1", "\"dtype\":\"U8\"", "\"shape\":[]"])
                        .into(),
                );
            }
            if c.one_in(4) {
                fields.rotate_left(1 + c.below(2));
            }
            format!("{{{}}}", fields.join(","))
        };
        entries.push(format!("\"{name}\":{}{body}", c.pick(SPACE)));
    }
    if !c.one_in(3) {
        let meta = c.pick(&[
            "{\"format\":\"pt\"}",
            "{}",
            "null",
            "{\"a\":1}",
            "{\"a\":\"b\",\"a\":\"c\"}",
            "[]",
        ]);
        let at = c.below(entries.len() + 1);
        entries.insert(at, format!("\"__metadata__\":{meta}"));
        if c.one_in(10) {
            entries.push(format!("\"__metadata__\":{meta}"));
        }
    }
    j.push_str(&entries.join(","));
    j.push('}');
    j.push_str(c.pick(SPACE));
    j.into_bytes()
}

/// The header JSON text of a file the reference accepted.
fn header_text(data: &[u8]) -> &[u8] {
    let n = u64::from_le_bytes(data[..8].try_into().unwrap()) as usize;
    &data[8..8 + n]
}

/// Why pmad may refuse a file the reference accepts, if one of the documented reasons applies.
pub fn documented_exception(data: &[u8]) -> Option<&'static str> {
    let text = header_text(data);
    if !text.starts_with(b"{") {
        return Some("header does not start with '{'");
    }
    let keys = serde_json::from_slice::<TopKeys>(text).ok()?.0;
    let mut seen = BTreeSet::new();
    if keys
        .iter()
        .filter(|k| *k != "__metadata__")
        .any(|k| !seen.insert(k))
    {
        return Some("a tensor name appears twice");
    }
    None
}

/// The top-level keys of a JSON object in document order, duplicates kept.
struct TopKeys(Vec<String>);

impl<'de> Deserialize<'de> for TopKeys {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = TopKeys;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<M: MapAccess<'de>>(self, mut m: M) -> Result<TopKeys, M::Error> {
                let mut keys = Vec::new();
                while let Some(k) = m.next_key::<String>()? {
                    m.next_value::<IgnoredAny>()?;
                    keys.push(k);
                }
                Ok(TopKeys(keys))
            }
        }
        d.deserialize_map(V)
    }
}

// ---------------------------------------------------------------------------------------------
// index target
// ---------------------------------------------------------------------------------------------

/// A shard name pmad may open: one plain file name inside the checkpoint directory. Written
/// independently of `check_plain_name`, from the rule in docs/formats.md.
pub fn is_plain_name(s: &str) -> bool {
    !s.is_empty() && s != "." && s != ".." && !s.contains(['/', '\\', '\0'])
}

/// All index checks for one fuzz input.
pub fn check_index_input(data: &[u8]) {
    let r = parse_index(data);
    if let Ok(idx) = &r {
        assert!(!idx.weight_map.is_empty(), "accepted an empty weight_map");
        for (tensor, file) in &idx.weight_map {
            assert!(
                check_plain_name(file).is_ok() && is_plain_name(file),
                "accepted shard {file:?} for tensor {tensor:?}"
            );
            let mut parts = Path::new(file).components();
            assert!(
                matches!(parts.next(), Some(Component::Normal(p)) if p == file.as_str())
                    && parts.next().is_none(),
                "shard {file:?} is not one normal path component"
            );
            let dir = Path::new("/ckpt/step-1");
            assert_eq!(
                dir.join(file).parent(),
                Some(dir),
                "shard {file:?} leaves the dir"
            );
        }
        let shards = idx.shards();
        let want: Vec<String> = idx
            .weight_map
            .values()
            .cloned()
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect();
        assert_eq!(
            shards, want,
            "shards() is not the sorted set of weight_map values"
        );
    }
    if std::str::from_utf8(data).is_ok() {
        assert_eq!(
            r.is_ok(),
            index_model_accepts(data),
            "parse_index disagrees with the model of docs/formats.md: {r:?}"
        );
    } else if r.is_ok() {
        // serde_json's `from_slice` skips ignored values (`metadata`, unknown keys) without
        // checking their UTF-8, so pmad accepts such an index where a strict JSON reader (and
        // Python's json, which HF uses) would not. Harmless: every string pmad keeps is valid.
        // The model must accept the text with the bad bytes replaced.
        assert!(
            index_model_accepts(String::from_utf8_lossy(data).as_bytes()),
            "parse_index accepted non-UTF-8 input the model rejects: {r:?}"
        );
    }

    // check_plain_name against the independent rule, on every string the input holds.
    if let Ok(s) = std::str::from_utf8(data) {
        check_name_rule(s);
    }
    if let Ok(v) = serde_json::from_slice::<serde_json::Value>(data) {
        visit_strings(&v, &mut check_name_rule);
    }
}

fn check_name_rule(s: &str) {
    assert_eq!(
        check_plain_name(s).is_ok(),
        is_plain_name(s),
        "check_plain_name({s:?}) disagrees with the plain-name rule"
    );
}

fn visit_strings(v: &serde_json::Value, f: &mut impl FnMut(&str)) {
    match v {
        serde_json::Value::String(s) => f(s),
        serde_json::Value::Array(a) => a.iter().for_each(|x| visit_strings(x, f)),
        serde_json::Value::Object(m) => m.iter().for_each(|(k, x)| {
            f(k);
            visit_strings(x, f)
        }),
        _ => {}
    }
}

/// When an index must be accepted: JSON whose `weight_map` is a non-empty map of strings to
/// plain shard names; other keys are ignored. A later duplicate key in a map replaces an
/// earlier one, except that `weight_map` itself twice is an error (serde's duplicate field).
/// serde also reads a struct from a JSON array of its fields, so `[{..weight_map..}]` counts.
fn index_model_accepts(data: &[u8]) -> bool {
    let Ok(v) = serde_json::from_slice::<serde_json::Value>(data) else {
        return false;
    };
    let wm = match &v {
        serde_json::Value::Object(m) => {
            let Ok(keys) = serde_json::from_slice::<TopKeys>(data) else {
                return false;
            };
            if keys.0.iter().filter(|k| *k == "weight_map").count() != 1 {
                return false;
            }
            &m["weight_map"]
        }
        serde_json::Value::Array(a) if a.len() == 1 => &a[0],
        _ => return false,
    };
    let Some(wm) = wm.as_object() else {
        return false;
    };
    !wm.is_empty() && wm.values().all(|f| f.as_str().is_some_and(is_plain_name))
}

/// `dcp_item`: the zip archive of one DCP item (`pmad::format::dcp::archive`). Whatever the
/// bytes: no panic; an accepted archive's entries lie inside the input, have unique names and
/// no more than `MAX_ENTRIES` of them; recording each entry's true CRC32 with `patch_crc`
/// never panics, and the patched archive is read again without a panic, with every entry
/// still inside the input.
pub fn check_dcp_item(data: &[u8]) {
    use pmad::format::dcp::archive::{crc32, entries, patch_crc, MAX_ENTRIES};
    let Ok(es) = entries(data) else { return };
    assert!(es.len() <= MAX_ENTRIES);
    for (i, e) in es.iter().enumerate() {
        assert!(
            e.data.start <= e.data.end && e.data.end <= data.len(),
            "{e:?}"
        );
        assert!(
            es[..i].iter().all(|o| o.name != e.name),
            "repeated {}",
            e.name
        );
    }
    let mut patched = data.to_vec();
    for e in &es {
        let crc = crc32(&data[e.data.clone()]);
        patch_crc(&mut patched, e, crc);
    }
    assert_eq!(patched.len(), data.len());
    if let Ok(again) = entries(&patched) {
        for e in &again {
            assert!(e.data.end <= patched.len(), "{e:?}");
        }
    }
}

/// `dcp_pickle`: the non-executing pickle machine (`pmad::format::dcp::pickle`) and the
/// decoders of `.metadata` and `data.pkl` (`pmad::format::dcp::meta`) on its result. Whatever
/// the bytes: no panic, an accepted pickle's value respects the machine's limits, and decoded
/// chunks lie inside their tensor.
pub fn check_dcp_pickle(data: &[u8]) {
    use pmad::format::dcp::pickle::{run, Value, MAX_BYTES, MAX_DEPTH, MAX_NODES};
    let Ok(v) = run(data) else { return };
    // Walk it without recursion: values, depth and string bytes within the limits (which
    // grow with the input's length).
    let (max_nodes, max_bytes) = (MAX_NODES.max(data.len()), MAX_BYTES.max(data.len() * 4));
    let mut todo = vec![(&v, 1usize)];
    let (mut n, mut bytes) = (0usize, 0usize);
    while let Some((x, d)) = todo.pop() {
        n += 1;
        assert!(n <= max_nodes, "more than MAX_NODES values accepted");
        assert!(d <= MAX_DEPTH, "depth {d} accepted");
        bytes += match x {
            Value::Str(s) => s.len(),
            Value::Bytes(b) => b.len(),
            _ => 0,
        };
        assert!(bytes <= max_bytes, "more than MAX_BYTES accepted");
        match x {
            Value::List(i) | Value::Tuple(i) | Value::Set(i) => {
                todo.extend(i.iter().map(|y| (y, d + 1)))
            }
            Value::Dict(p) => {
                for (k, y) in p {
                    todo.push((k, d + 1));
                    todo.push((y, d + 1));
                }
            }
            Value::Object { class, args, state } => {
                todo.push((class, d + 1));
                todo.push((args, d + 1));
                if let Some(s) = state {
                    todo.push((s, d + 1));
                }
            }
            Value::PersId(p) => todo.push((p, d + 1)),
            _ => {}
        }
    }
    // The decoders of what the pickles say never panic on any value, and what they accept
    // is consistent.
    // The decoders read the machine's values in place (`pickle::parse`), as pmad does.
    use pmad::format::dcp::{meta, pickle::parse};
    let Ok(parsed) = parse(data) else {
        panic!("run accepted what parse refused")
    };
    if let Ok(m) = meta::metadata(parsed.root()) {
        for k in &m.keys {
            if let Some(t) = &k.tensor {
                for c in &t.chunks {
                    assert_eq!(c.offsets.len(), t.size.len());
                    for d in 0..t.size.len() {
                        assert!(
                            c.offsets[d] + c.sizes[d] <= t.size[d],
                            "{c:?} of {:?}",
                            t.size
                        );
                    }
                }
            }
        }
    }
    if let Ok(t) = meta::item_tensor(parsed.root()) {
        let _ = meta::dense(&t.size, &t.stride, t.numel);
    }
}
