//! Parsing and validating safetensors headers and HF shard indexes, over plain bytes.
//!
//! This module owns the question "may this file be trusted?" and nothing else: no I/O, so it is
//! the fuzz target. A [`Header`] exists only if every reader check (docs/formats.md) passed:
//! length field <= 100,000,000 and inside the file; UTF-8 JSON object starting with `{`; no
//! duplicate names; known dtypes; offsets sorted, starting at 0, contiguous, each tensor's size
//! equal to element count x dtype size (checked arithmetic); last end + 8 + N == file length.
//! The reference `safetensors` crate is the authority on what is valid: the `header` fuzz
//! target (replayed in CI) runs both readers on every input and fails on any disagreement
//! outside the two documented stricter rules. pmad does not run the reference reader again
//! when it opens a file: this parser applies every one of its rules, and running both doubled
//! the CPU of opening a checkpoint of many small tensors (27% of `pmad merge`'s CPU on eight
//! MoE checkpoints of 9.4k tensors). Its messages name the tensor and absolute offset.

use safetensors::tensor::TensorInfo;
use safetensors::Dtype;
use serde::de::{DeserializeSeed, Deserializer, Error as _, MapAccess, Visitor};
use serde::Deserialize;
use std::borrow::Cow;
use std::collections::BTreeMap;
use std::fmt;

/// The reference implementation's cap on the header length field.
pub const MAX_HEADER: u64 = 100_000_000;

/// One tensor as declared in a header.
#[derive(Debug, Clone, PartialEq)]
pub struct HeaderTensor {
    /// Tensor name.
    pub name: String,
    /// Element type.
    pub dtype: Dtype,
    /// Shape (empty for a 0-rank scalar).
    pub shape: Vec<usize>,
    /// Byte range relative to the start of the data section, end exclusive.
    pub begin: usize,
    /// End of the byte range (exclusive).
    pub end: usize,
}

/// A validated safetensors header.
#[derive(Debug, Clone, PartialEq)]
pub struct Header {
    /// 8 + N: where the data section starts in the file.
    pub data_start: usize,
    /// Tensors in file (offset) order.
    pub tensors: Vec<HeaderTensor>,
    /// The `__metadata__` map, if present.
    pub metadata: Option<BTreeMap<String, String>>,
}

/// Why a header was refused. `NeedMore` means the bytes given end before the header does.
#[derive(Debug, Clone, PartialEq)]
pub enum HeaderError {
    /// The caller must supply the first `n` bytes of the file to finish parsing.
    NeedMore(usize),
    /// The file is shorter than its header says: truncated, or still being written.
    Truncated(String),
    /// The file is invalid; the text names the tensor and absolute offset where known.
    Invalid(String),
}

impl fmt::Display for HeaderError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HeaderError::NeedMore(n) => write!(f, "need the first {n} bytes"),
            HeaderError::Truncated(s) | HeaderError::Invalid(s) => f.write_str(s),
        }
    }
}

fn bad<T>(msg: impl Into<String>) -> Result<T, HeaderError> {
    Err(HeaderError::Invalid(msg.into()))
}

fn short<T>(msg: impl Into<String>) -> Result<T, HeaderError> {
    Err(HeaderError::Truncated(msg.into()))
}

/// The header's entries in document order, parsed in one pass over the JSON text: keys and
/// dtype names are borrowed from it (headers of MoE checkpoints hold tens of thousands of
/// entries, so nothing is parsed twice and nothing per entry is allocated that the
/// [`Header`] does not keep). A rule broken inside an entry stops the parse with its message
/// in `problem`; a JSON syntax error is still reported as one.
struct Entries<'p> {
    problem: &'p mut Option<String>,
}

/// What [`Entries`] collects: the tensors in document order and the `__metadata__` entry.
#[derive(Default)]
struct Parsed {
    tensors: Vec<HeaderTensor>,
    metadata: Option<BTreeMap<String, String>>,
}

/// A tensor entry. Unknown extra fields are ignored, as the reference reader does.
#[derive(Deserialize)]
struct RawTensor<'a> {
    #[serde(borrow)]
    dtype: Cow<'a, str>,
    shape: Vec<usize>,
    data_offsets: (usize, usize),
}

impl<'de> DeserializeSeed<'de> for Entries<'_> {
    type Value = Parsed;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Parsed, D::Error> {
        d.deserialize_map(self)
    }
}

impl<'de> Visitor<'de> for Entries<'_> {
    type Value = Parsed;
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a JSON object of tensors")
    }
    fn visit_map<M: MapAccess<'de>>(self, mut m: M) -> Result<Parsed, M::Error> {
        let mut out = Parsed::default();
        let mut seen_meta = false;
        let problem = self.problem;
        while let Some(k) = m.next_key::<Cow<'de, str>>()? {
            if k == "__metadata__" {
                if seen_meta {
                    *problem = Some("header has two __metadata__ entries".into());
                    return Err(M::Error::custom("duplicate __metadata__"));
                }
                seen_meta = true;
                // `null` means "no metadata" to the reference reader too. serde_json's own
                // error goes on, so a syntax error is still reported as one.
                out.metadata = m
                    .next_value::<Option<BTreeMap<String, String>>>()
                    .inspect_err(|_| {
                        *problem = Some("__metadata__ must map strings to strings".into())
                    })?;
                continue;
            }
            let t: RawTensor = m
                .next_value()
                .inspect_err(|e| *problem = Some(format!("tensor {k}: malformed entry: {e}")))?;
            let Some(dtype) = parse_dtype(&t.dtype) else {
                *problem = Some(format!("tensor {k}: unknown dtype {:?}", t.dtype));
                return Err(M::Error::custom("unknown dtype"));
            };
            out.tensors.push(HeaderTensor {
                name: k.into_owned(),
                dtype,
                shape: t.shape,
                begin: t.data_offsets.0,
                end: t.data_offsets.1,
            });
        }
        Ok(out)
    }
}

/// Parse a dtype name as written in headers; unknown names are refused by name.
pub fn parse_dtype(s: &str) -> Option<Dtype> {
    // The reference crate's own names, through its serde implementation (no allocation).
    Dtype::deserialize(serde::de::value::StrDeserializer::<serde::de::value::Error>::new(s)).ok()
}

/// The dtype's name as written in headers.
pub fn dtype_name(d: Dtype) -> String {
    match serde_json::to_value(d) {
        Ok(serde_json::Value::String(s)) => s,
        _ => format!("{d:?}"),
    }
}

/// Byte size of `count` elements of `dtype`, or `None` on overflow or a partial byte.
pub fn byte_size(dtype: Dtype, shape: &[usize]) -> Option<usize> {
    let count = shape.iter().try_fold(1usize, |a, d| a.checked_mul(*d))?;
    let bits = count.checked_mul(dtype.bitsize())?;
    (bits % 8 == 0).then_some(bits / 8)
}

/// Validate a safetensors header.
///
/// `prefix` is the beginning of the file (at least 8 bytes, and then at least 8 + N bytes, as
/// [`HeaderError::NeedMore`] asks) and `file_len` the file's full length.
pub fn parse_header(prefix: &[u8], file_len: u64) -> Result<Header, HeaderError> {
    if file_len < 8 {
        return short(format!(
            "file is {file_len} bytes, shorter than the 8-byte header length field"
        ));
    }
    if prefix.len() < 8 {
        return Err(HeaderError::NeedMore(8));
    }
    let mut nb = [0u8; 8];
    nb.copy_from_slice(&prefix[..8]);
    let n = u64::from_le_bytes(nb);
    if n > MAX_HEADER {
        return bad(format!(
            "header length field is {n} bytes, over the {MAX_HEADER}-byte limit (corrupt or not a safetensors file)"
        ));
    }
    let data_start = 8 + n;
    if data_start > file_len {
        return short(format!(
            "header length field says {n} bytes but the file is only {file_len} bytes (truncated)"
        ));
    }
    let data_start = data_start as usize;
    if prefix.len() < data_start {
        return Err(HeaderError::NeedMore(data_start));
    }
    let hb = &prefix[8..data_start];
    let text = match std::str::from_utf8(hb) {
        Ok(t) => t,
        Err(e) => {
            return bad(format!(
                "header is not valid UTF-8 (at file offset {})",
                8 + e.valid_up_to()
            ))
        }
    };
    if !text.starts_with('{') {
        return bad("header does not start with '{' (corrupt or not a safetensors file)");
    }
    let mut problem = None;
    let mut de = serde_json::Deserializer::from_str(text.trim_end_matches(' '));
    let parsed = Entries {
        problem: &mut problem,
    }
    .deserialize(&mut de)
    .and_then(|p| de.end().map(|()| p));
    let Parsed {
        mut tensors,
        metadata,
    } = match (parsed, problem) {
        (Ok(p), _) => p,
        // A rule broken inside well-formed JSON: the entry's own message.
        (Err(e), Some(p)) if !(e.is_syntax() || e.is_eof()) => return bad(p),
        (Err(e), _) => {
            return bad(format!(
                "header is not valid JSON: {e} (header starts at file offset 8)"
            ))
        }
    };
    // No name twice (a rule stricter than the reference reader's, which keeps the last).
    let mut names: Vec<&str> = tensors.iter().map(|t| t.name.as_str()).collect();
    names.sort_unstable();
    if let Some(w) = names.windows(2).find(|w| w[0] == w[1]) {
        return bad(format!("tensor {}: name appears twice in the header", w[0]));
    }
    drop(names);
    tensors.sort_by_key(|a| (a.begin, a.end));
    let mut pos = 0usize;
    for t in &tensors {
        let abs = (data_start as u64).saturating_add(t.begin as u64);
        if t.end < t.begin {
            return bad(format!(
                "tensor {}: data_offsets [{}, {}] end before they begin (file offset {abs})",
                t.name, t.begin, t.end
            ));
        }
        if t.begin < pos {
            return bad(format!(
                "tensor {}: data_offsets [{}, {}] overlap the previous tensor, which ends at {pos} (file offset {abs})",
                t.name, t.begin, t.end
            ));
        }
        if t.begin > pos {
            return bad(format!(
                "tensor {}: data_offsets [{}, {}] leave a gap after offset {pos} (file offset {abs})",
                t.name, t.begin, t.end
            ));
        }
        let Some(size) = byte_size(t.dtype, &t.shape) else {
            return bad(format!(
                "tensor {}: shape {:?} x {} overflows or is not a whole number of bytes",
                t.name,
                t.shape,
                dtype_name(t.dtype)
            ));
        };
        if t.end - t.begin != size {
            return bad(format!(
                "tensor {}: data_offsets [{}, {}] hold {} bytes but shape {:?} x {} needs {size} (file offset {abs})",
                t.name,
                t.begin,
                t.end,
                t.end - t.begin,
                t.shape,
                dtype_name(t.dtype)
            ));
        }
        pos = t.end;
    }
    // Offsets come from the file and may be near u64::MAX.
    let Some(expected) = (data_start as u64).checked_add(pos as u64) else {
        return bad(format!(
            "tensor data ends at offset {pos} after a {data_start}-byte header: past the largest possible file"
        ));
    };
    if expected != file_len {
        return if expected > file_len {
            short(format!(
                "file is {file_len} bytes but its header describes {expected} (truncated or still being written)"
            ))
        } else {
            bad(format!(
                "file is {file_len} bytes but its header describes only {expected} ({} trailing bytes)",
                file_len - expected
            ))
        };
    }
    Ok(Header {
        data_start,
        tensors,
        metadata,
    })
}

/// Build the header bytes for tensors laid out contiguously in the given order.
///
/// Follows the writer rules of docs/formats.md: starts with `{`, `__metadata__` first (keys sorted,
/// so output is byte-for-byte reproducible), JSON identical in form to the reference crate's
/// `Metadata` serialisation, padded with spaces to a multiple of 8.
/// Returns the full prefix (8-byte length + header) and the data section length.
pub fn build_header(
    metadata: &BTreeMap<String, String>,
    tensors: &[(String, Dtype, Vec<usize>)],
) -> Result<(Vec<u8>, usize), String> {
    let mut json = String::from("{");
    let mut first = true;
    if !metadata.is_empty() {
        json.push_str("\"__metadata__\":");
        json.push_str(&serde_json::to_string(metadata).map_err(|e| e.to_string())?);
        first = false;
    }
    let mut pos = 0usize;
    for (name, dtype, shape) in tensors {
        let size =
            byte_size(*dtype, shape).ok_or_else(|| format!("tensor {name}: size overflows"))?;
        let info = TensorInfo {
            dtype: *dtype,
            shape: shape.clone(),
            data_offsets: (pos, pos + size),
        };
        if !first {
            json.push(',');
        }
        first = false;
        json.push_str(&serde_json::to_string(name).map_err(|e| e.to_string())?);
        json.push(':');
        json.push_str(&serde_json::to_string(&info).map_err(|e| e.to_string())?);
        pos += size;
    }
    json.push('}');
    let mut header = json.into_bytes();
    while header.len() % 8 != 0 {
        header.push(b' ');
    }
    let mut out = Vec::with_capacity(8 + header.len());
    out.extend_from_slice(&(header.len() as u64).to_le_bytes());
    out.extend_from_slice(&header);
    Ok((out, pos))
}

/// A parsed `model.safetensors.index.json`.
#[derive(Debug, Clone, PartialEq)]
pub struct Index {
    /// Tensor name → shard file name (a plain name inside the checkpoint directory).
    pub weight_map: BTreeMap<String, String>,
}

impl Index {
    /// Shard file names in sorted order, each once.
    pub fn shards(&self) -> Vec<String> {
        let mut v: Vec<String> = self.weight_map.values().cloned().collect();
        v.sort();
        v.dedup();
        v
    }
}

/// Parse an HF index. Shard names must be plain file names (no separators, `.`/`..`, or
/// absolute paths); whether a name is a link leaving the directory is checked by the caller,
/// which has the filesystem.
pub fn parse_index(bytes: &[u8]) -> Result<Index, String> {
    #[derive(Deserialize)]
    struct RawIndex {
        weight_map: BTreeMap<String, String>,
    }
    let raw: RawIndex =
        serde_json::from_slice(bytes).map_err(|e| format!("index is not valid JSON: {e}"))?;
    if raw.weight_map.is_empty() {
        return Err("index has an empty weight_map".into());
    }
    for (tensor, file) in &raw.weight_map {
        check_plain_name(file).map_err(|why| format!("tensor {tensor}: shard {file:?} {why}"))?;
    }
    Ok(Index {
        weight_map: raw.weight_map,
    })
}

/// A shard name must name a file directly inside the checkpoint directory.
pub fn check_plain_name(name: &str) -> Result<(), &'static str> {
    if name.is_empty() {
        return Err("is empty");
    }
    if name.starts_with('/') || name.starts_with('\\') {
        return Err("is an absolute path; shards must be plain names inside the checkpoint");
    }
    if name == "." || name == ".." || name.split(['/', '\\']).any(|p| p == "..") {
        return Err("leaves the checkpoint directory (..)");
    }
    if name.contains(['/', '\\', '\0']) {
        return Err("is not a plain file name inside the checkpoint directory");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(tensors: &[(&str, Dtype, Vec<usize>)], fill: u8) -> Vec<u8> {
        let t: Vec<_> = tensors
            .iter()
            .map(|(n, d, s)| (n.to_string(), *d, s.clone()))
            .collect();
        let mut meta = BTreeMap::new();
        meta.insert("format".into(), "pt".into());
        let (mut b, len) = build_header(&meta, &t).unwrap();
        b.extend(std::iter::repeat_n(fill, len));
        b
    }

    fn with_header(json: &str, data: usize) -> Vec<u8> {
        let mut b = (json.len() as u64).to_le_bytes().to_vec();
        b.extend_from_slice(json.as_bytes());
        b.extend(std::iter::repeat_n(0u8, data));
        b
    }

    fn err(b: &[u8]) -> String {
        match parse_header(b, b.len() as u64) {
            Err(HeaderError::Invalid(s)) | Err(HeaderError::Truncated(s)) => s,
            other => panic!("expected invalid, got {other:?}"),
        }
    }

    #[test]
    fn built_headers_parse_with_us_and_the_reference() {
        let b = file(
            &[
                ("a", Dtype::F32, vec![2, 3]),
                ("s", Dtype::BF16, vec![]),
                ("e", Dtype::F16, vec![0, 4]),
                ("m", Dtype::BOOL, vec![3]),
            ],
            0,
        );
        let h = parse_header(&b, b.len() as u64).unwrap();
        assert_eq!(h.tensors.len(), 4);
        assert_eq!(h.data_start % 8, 0);
        assert_eq!(b[8], b'{');
        assert_eq!(h.metadata.unwrap()["format"], "pt");
        let st = safetensors::SafeTensors::deserialize(&b).unwrap();
        assert_eq!(st.tensor("a").unwrap().shape(), &[2, 3]);
    }

    #[test]
    fn need_more_asks_for_the_header() {
        let b = file(&[("a", Dtype::F32, vec![4])], 0);
        assert_eq!(
            parse_header(&b[..4], b.len() as u64),
            Err(HeaderError::NeedMore(8))
        );
        let h = parse_header(&b[..8], b.len() as u64);
        assert!(matches!(h, Err(HeaderError::NeedMore(n)) if n > 8));
    }

    #[test]
    fn each_defect_is_named() {
        let good = file(&[("a", Dtype::F32, vec![4]), ("b", Dtype::F32, vec![2])], 0);
        assert!(err(&good[..good.len() - 1]).contains("truncated"));
        let mut long = good.clone();
        long.push(0);
        assert!(err(&long).contains("trailing"));
        let mut huge = good.clone();
        huge[..8].copy_from_slice(&(MAX_HEADER + 1).to_le_bytes());
        assert!(err(&huge).contains("over the"));
        let mut past = good.clone();
        past[..8].copy_from_slice(&(good.len() as u64).to_le_bytes());
        assert!(err(&past).contains("only"));
        assert!(err(&with_header("{\"a\":", 0)).contains("not valid JSON"));
        assert!(err(&with_header("[]      ", 0)).contains("start with"));
        let overlap = r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}}"#;
        let e = err(&with_header(overlap, 12));
        assert!(e.contains("tensor b") && e.contains("overlap"), "{e}");
        let gap = r#"{"a":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}}"#;
        assert!(err(&with_header(gap, 8)).contains("gap"));
        let size = r#"{"a":{"dtype":"F32","shape":[3],"data_offsets":[0,8]}}"#;
        assert!(err(&with_header(size, 8)).contains("needs 12"));
        let dup = r#"{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}"#;
        assert!(err(&with_header(dup, 4)).contains("twice"));
        let dt = r#"{"a":{"dtype":"Q4","shape":[1],"data_offsets":[0,1]}}"#;
        assert!(err(&with_header(dt, 1)).contains("unknown dtype"));
        let ovf = r#"{"a":{"dtype":"F64","shape":[4294967296,4294967296],"data_offsets":[0,8]}}"#;
        assert!(err(&with_header(ovf, 8)).contains("overflows"));
        let meta = r#"{"__metadata__":{"a":1}}"#;
        assert!(err(&with_header(meta, 0)).contains("strings"));
        let mut utf = with_header("{\"\u{e9}\":1}", 0);
        utf[10] = 0xff;
        assert!(err(&utf).contains("UTF-8"));
        assert!(err(&[1, 2, 3]).contains("shorter"));
    }

    #[test]
    fn index_names_are_confined() {
        let ok = br#"{"metadata":{"total_size":8,"x":"y"},"weight_map":{"a":"model-00001-of-00002.safetensors"}}"#;
        assert_eq!(parse_index(ok).unwrap().shards().len(), 1);
        for hostile in [
            "../x.safetensors",
            "/etc/passwd",
            "sub/x",
            "..",
            "",
            "a\\..\\b",
        ] {
            let j = format!(
                r#"{{"weight_map":{{"a":{}}}}}"#,
                serde_json::to_string(hostile).unwrap()
            );
            assert!(parse_index(j.as_bytes()).is_err(), "{hostile}");
        }
        assert!(parse_index(b"{").is_err());
        assert!(parse_index(br#"{"weight_map":{}}"#).is_err());
    }
}
