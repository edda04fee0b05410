//! Decoding what the pickles of a DCP checkpoint say, reading the values of
//! [`super::pickle::parse`] in place ([`Ref`]: nothing is copied into a tree, so a `.metadata`
//! of a million items costs its machine's arena, not ~10 KB per item): the checkpoint's
//! `.metadata` ([`Metadata`]) and each tensor item's `data.pkl` ([`ItemTensor`]). The decoders
//! read fixed paths (an object's fields, a tuple's items), so a value that refers to itself
//! cannot make them loop.
//!
//! Classes are matched by name and fields, never by module path, because the paths drift:
//! torch's `_StorageInfo` lives in `torch.distributed.checkpoint.filesystem`, OLMo-core pickles
//! its own `olmo_core.distributed.checkpoint.filesystem._StorageInfo`, Megatron's root class is
//! `MCoreMetadata`, and Python 3.13 moved `PosixPath` to `pathlib._local`. Fields that pmad does
//! not need (planner data, storage meta, requires_grad, ...) are not read, so a new field in a
//! later torch is harmless. Every error says what was expected and what was found.

use super::pickle::{Items, Ref, View};
use safetensors::Dtype;

/// What `.metadata` says about the checkpoint.
#[derive(Debug, Clone, PartialEq)]
pub struct Metadata {
    /// Every key of the state dict, in the pickle's order.
    pub keys: Vec<Key>,
    /// Where each item is stored, in the pickle's order.
    pub items: Vec<Stored>,
}

/// One key of the saved state dict.
#[derive(Debug, Clone, PartialEq)]
pub struct Key {
    /// Its flattened name (`layers.0.attention.wq.weight`, `optimizer.state.<p>.exp_avg`).
    pub fqn: String,
    /// A tensor, or `None` for a non-tensor object saved as bytes.
    pub tensor: Option<TensorMeta>,
}

/// A tensor's global description.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorMeta {
    /// Its element type as torch names it (`float32`, `bfloat16`, ...).
    pub torch_dtype: String,
    /// The same as a safetensors dtype, when pmad knows it.
    pub dtype: Option<Dtype>,
    /// `torch.strided` (dense), or another layout (sparse), which pmad does not average.
    pub strided: bool,
    /// The global shape.
    pub size: Vec<u64>,
    /// Where each saved chunk sits in the global tensor.
    pub chunks: Vec<Chunk>,
}

/// One chunk of a tensor: its place in the global tensor.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Chunk {
    /// Its first index along each dimension.
    pub offsets: Vec<u64>,
    /// Its extent along each dimension.
    pub sizes: Vec<u64>,
}

/// Where one item (a tensor chunk or a bytes object) is stored.
#[derive(Debug, Clone, PartialEq)]
pub struct Stored {
    /// The key it belongs to.
    pub fqn: String,
    /// The chunk's offsets for a tensor item; `None` for a bytes item.
    pub offset: Option<Vec<u64>>,
    /// The data file, relative to the checkpoint directory.
    pub file: String,
    /// Byte offset in that file.
    pub at: u64,
    /// Length in bytes.
    pub len: u64,
    /// Names of the transforms applied to the item (compression); empty for plain items.
    pub transforms: Vec<String>,
}

/// The tensor a `data.pkl` rebuilds: which storage, its dtype and element count, and the view.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ItemTensor {
    /// The storage's key (`"0"`: the archive entry `data/0`).
    pub key: String,
    /// Storage dtype as torch names it.
    pub torch_dtype: String,
    /// Elements in the storage.
    pub numel: u64,
    /// First element of the view in the storage.
    pub storage_offset: u64,
    /// The view's shape.
    pub size: Vec<u64>,
    /// The view's strides, in elements.
    pub stride: Vec<u64>,
}

/// The safetensors dtype of a torch dtype name (`float32`, `torch.float32`), when it has one.
pub fn dtype_of(torch_name: &str) -> Option<Dtype> {
    let n = torch_name.strip_prefix("torch.").unwrap_or(torch_name);
    Some(match n {
        "float64" | "double" => Dtype::F64,
        "float32" | "float" => Dtype::F32,
        "float16" | "half" => Dtype::F16,
        "bfloat16" => Dtype::BF16,
        "float8_e4m3fn" => Dtype::F8_E4M3,
        "float8_e5m2" => Dtype::F8_E5M2,
        "int64" | "long" => Dtype::I64,
        "int32" | "int" => Dtype::I32,
        "int16" | "short" => Dtype::I16,
        "int8" => Dtype::I8,
        "uint8" => Dtype::U8,
        "bool" => Dtype::BOOL,
        _ => return None,
    })
}

/// The dtype name of a legacy typed storage class (`FloatStorage` -> `float32`).
fn storage_dtype(class: &str) -> Option<&'static str> {
    Some(match class {
        "DoubleStorage" => "float64",
        "FloatStorage" => "float32",
        "HalfStorage" => "float16",
        "BFloat16Storage" => "bfloat16",
        "Float8_e4m3fnStorage" => "float8_e4m3fn",
        "Float8_e5m2Storage" => "float8_e5m2",
        "LongStorage" => "int64",
        "IntStorage" => "int32",
        "ShortStorage" => "int16",
        "CharStorage" => "int8",
        "ByteStorage" => "uint8",
        "BoolStorage" => "bool",
        _ => return None,
    })
}

/// Bytes per element of a torch dtype name, when known.
pub fn elem_size(torch_name: &str) -> Option<u64> {
    let n = torch_name.strip_prefix("torch.").unwrap_or(torch_name);
    Some(match n {
        "float64" | "double" | "int64" | "long" | "complex64" | "uint64" => 8,
        "float32" | "float" | "int32" | "int" | "uint32" => 4,
        "float16" | "half" | "bfloat16" | "int16" | "short" | "uint16" => 2,
        "float8_e4m3fn" | "float8_e5m2" | "float8_e4m3fnuz" | "float8_e5m2fnuz" | "int8"
        | "uint8" | "bool" => 1,
        "complex128" => 16,
        _ => return None,
    })
}

type R<T> = std::result::Result<T, String>;

/// A value of a parsed pickle, read in place (see [`super::pickle::parse`]).
pub type V<'p, 'a> = Ref<'p, 'a>;

fn describe(v: V<'_, '_>) -> String {
    match v.view() {
        View::None => "None".into(),
        View::Bool(b) => format!("{b}"),
        View::Int(i) => format!("{i}"),
        View::Float(f) => format!("{f}"),
        View::Str(s) => format!("{s:?}"),
        View::Bytes(b) => format!("{} bytes", b.len()),
        View::List(_) => "a list".into(),
        View::Tuple(_) => "a tuple".into(),
        View::Dict(_) => "a dict".into(),
        View::Set(_) => "a set".into(),
        View::Global { module, name } => format!("{module}.{name}"),
        View::Object { class, .. } => match class.view() {
            View::Global { module, name } => format!("a {module}.{name} object"),
            _ => "an object".into(),
        },
        View::PersId(_) => "a persistent id".into(),
    }
}

fn int(v: V<'_, '_>, what: &str) -> R<i64> {
    match v.view() {
        View::Int(i) => Ok(i),
        View::Bool(b) => Ok(b as i64),
        _ => Err(format!(
            "{what}: expected an integer, found {}",
            describe(v)
        )),
    }
}

fn uint(v: V<'_, '_>, what: &str) -> R<u64> {
    let i = int(v, what)?;
    u64::try_from(i).map_err(|_| format!("{what}: {i} is negative"))
}

fn string(v: V<'_, '_>, what: &str) -> R<String> {
    match v.view() {
        View::Str(s) => Ok(s.to_string()),
        _ => Err(format!("{what}: expected a string, found {}", describe(v))),
    }
}

/// The items of a tuple or list.
fn seq<'p, 'a>(v: V<'p, 'a>, what: &str) -> R<Items<'p, 'a>> {
    match v.view() {
        View::Tuple(x) | View::List(x) => Ok(x),
        _ => Err(format!(
            "{what}: expected a sequence, found {}",
            describe(v)
        )),
    }
}

/// A `torch.Size` (REDUCE of `torch.Size` with a tuple of ints), or a plain tuple/list of ints.
fn shape(v: V<'_, '_>, what: &str) -> R<Vec<u64>> {
    let items = match v.view() {
        View::Object { args, .. } => match seq(args, what)?.get(0) {
            Some(t) => seq(t, what)?,
            None => return Ok(Vec::new()),
        },
        _ => seq(v, what)?,
    };
    items.iter().map(|x| uint(x, what)).collect()
}

/// A field of an object: from its `BUILD` dict state.
fn field<'p, 'a>(obj: V<'p, 'a>, name: &str, class: &str) -> R<V<'p, 'a>> {
    obj.field(name)
        .ok_or_else(|| format!("{class} has no field {name:?}"))
}

/// A field that may be missing or `None`.
fn opt_field<'p, 'a>(obj: V<'p, 'a>, name: &str) -> Option<V<'p, 'a>> {
    obj.field(name).filter(|v| !matches!(v.view(), View::None))
}

/// Decode a checkpoint's `.metadata` pickle.
pub fn metadata(root: V<'_, '_>) -> R<Metadata> {
    let (Some(sd), Some(storage)) = (
        root.field("state_dict_metadata"),
        root.field("storage_data"),
    ) else {
        return Err(format!(
            "the root object ({}) is not a DCP Metadata: it lacks state_dict_metadata or \
             storage_data",
            describe(root)
        ));
    };
    let View::Dict(sd_items) = sd.view() else {
        return Err(format!(
            "state_dict_metadata: expected a dict, found {}",
            describe(sd)
        ));
    };
    let mut keys = Vec::with_capacity(sd_items.len());
    for (k, v) in sd_items.iter() {
        let fqn = string(k, "state_dict_metadata key")?;
        let tensor = match v.class_name() {
            Some("BytesStorageMetadata") => None,
            Some("TensorStorageMetadata") => {
                Some(tensor_meta(v).map_err(|e| format!("state_dict_metadata[{fqn:?}]: {e}"))?)
            }
            _ => {
                return Err(format!(
                    "state_dict_metadata[{fqn:?}]: expected TensorStorageMetadata or \
                     BytesStorageMetadata, found {}",
                    describe(v)
                ))
            }
        };
        keys.push(Key { fqn, tensor });
    }
    let View::Dict(storage_items) = storage.view() else {
        return Err(format!(
            "storage_data: expected a dict, found {}",
            describe(storage)
        ));
    };
    let mut items = Vec::with_capacity(storage_items.len());
    for (k, v) in storage_items.iter() {
        items.push(stored(k, v).map_err(|e| format!("storage_data: {e}"))?);
    }
    Ok(Metadata { keys, items })
}

fn tensor_meta(v: V<'_, '_>) -> R<TensorMeta> {
    let c = "TensorStorageMetadata";
    let props = field(v, "properties", c)?;
    // TensorProperties pickles its state as a tuple (dtype, layout, requires_grad,
    // memory_format, pin_memory[, strides]) through __getstate__; a dataclass without it
    // would give a dict.
    let (dtype_v, layout_v) = match props.view() {
        View::Object { state: Some(s), .. } => match s.view() {
            View::Tuple(t) if t.len() >= 2 => match (t.get(0), t.get(1)) {
                (Some(d), l) => (d, l),
                _ => return Err("properties: an empty TensorProperties state".into()),
            },
            View::Dict(_) => (
                field(props, "dtype", "TensorProperties")?,
                props.field("layout"),
            ),
            _ => {
                return Err(format!(
                    "properties: unexpected TensorProperties state {}",
                    describe(s)
                ))
            }
        },
        _ => {
            return Err(format!(
                "properties: expected TensorProperties, found {}",
                describe(props)
            ))
        }
    };
    let torch_dtype = match dtype_v.view() {
        View::Global {
            module: "torch",
            name,
        } => name.to_string(),
        _ => {
            return Err(format!(
                "properties.dtype: expected torch.<dtype>, found {}",
                describe(dtype_v)
            ))
        }
    };
    let strided = match layout_v.map(|l| l.view()) {
        None | Some(View::None) => true,
        // torch.serialization._get_layout("torch.strided")
        Some(View::Object { args, .. }) => matches!(
            seq(args, "layout")?.get(0).map(|a| a.view()),
            Some(View::Str(s)) if s == "torch.strided"
        ),
        Some(View::Global { name, .. }) => name == "strided",
        Some(_) => false,
    };
    let size = shape(field(v, "size", c)?, "size")?;
    let chunks_v = seq(field(v, "chunks", c)?, "chunks")?;
    let mut chunks = Vec::with_capacity(chunks_v.len());
    for ch in chunks_v.iter() {
        let cc = "ChunkStorageMetadata";
        let offsets = shape(field(ch, "offsets", cc)?, "chunk offsets")?;
        let sizes = shape(field(ch, "sizes", cc)?, "chunk sizes")?;
        if offsets.len() != size.len() || sizes.len() != size.len() {
            return Err(format!(
                "a chunk at {offsets:?} of size {sizes:?} does not match the tensor's {} dimensions",
                size.len()
            ));
        }
        for d in 0..size.len() {
            if offsets[d].checked_add(sizes[d]).is_none_or(|e| e > size[d]) {
                return Err(format!(
                    "the chunk at {offsets:?} of size {sizes:?} lies outside the tensor's shape {size:?}"
                ));
            }
        }
        chunks.push(Chunk { offsets, sizes });
    }
    Ok(TensorMeta {
        dtype: dtype_of(&torch_dtype),
        torch_dtype,
        strided,
        size,
        chunks,
    })
}

fn stored(k: V<'_, '_>, v: V<'_, '_>) -> R<Stored> {
    if k.field("fqn").is_none() {
        return Err(format!("a key is {}, not a MetadataIndex", describe(k)));
    }
    let fqn = string(field(k, "fqn", "MetadataIndex")?, "MetadataIndex.fqn")?;
    let offset = opt_field(k, "offset")
        .map(|o| shape(o, "MetadataIndex.offset"))
        .transpose()?;
    let ctx = |e: String| format!("{fqn:?}: {e}");
    let c = "_StorageInfo";
    if v.field("relative_path").is_none() {
        return Err(ctx(format!(
            "expected a _StorageInfo, found {}",
            describe(v)
        )));
    }
    let file = string(field(v, "relative_path", c).map_err(ctx)?, "relative_path").map_err(ctx)?;
    let at = uint(field(v, "offset", c).map_err(ctx)?, "offset").map_err(ctx)?;
    let len = uint(field(v, "length", c).map_err(ctx)?, "length").map_err(ctx)?;
    let transforms = match opt_field(v, "transform_descriptors") {
        None => Vec::new(),
        Some(t) => seq(t, "transform_descriptors")
            .map_err(ctx)?
            .iter()
            .map(|x| match x.view() {
                View::Str(s) => s.to_string(),
                _ => describe(x),
            })
            .collect(),
    };
    Ok(Stored {
        fqn,
        offset,
        file,
        at,
        len,
        transforms,
    })
}

/// Decode an item's `data.pkl`: a plain tensor rebuilt by `torch._utils._rebuild_tensor_v2`
/// (typed storage) or `_rebuild_tensor_v3` (untyped storage plus dtype). Anything else —
/// a quantized, sparse or subclass tensor, a parameter, a non-tensor object — is refused
/// with the rebuild function's name.
pub fn item_tensor(root: V<'_, '_>) -> R<ItemTensor> {
    let View::Object { class, args, .. } = root.view() else {
        return Err(format!(
            "the item's data.pkl holds {}, not a tensor",
            describe(root)
        ));
    };
    let func = match class.view() {
        View::Global { module, name } => format!("{module}.{name}"),
        _ => describe(class),
    };
    let v3 = match func.as_str() {
        "torch._utils._rebuild_tensor_v2" => false,
        "torch._utils._rebuild_tensor_v3" => true,
        _ => {
            return Err(format!(
                "the item is rebuilt by {func}, not a plain dense tensor \
                 (quantized, sparse and subclass tensors are not averaged)"
            ))
        }
    };
    let a = seq(args, "rebuild arguments")?;
    let arg = |i: usize| {
        a.get(i)
            .ok_or_else(|| format!("{func} has {} arguments", a.len()))
    };
    if a.len() < 4 {
        return Err(format!(
            "{func} has {} arguments, expected at least 4",
            a.len()
        ));
    }
    let View::PersId(pid) = arg(0)?.view() else {
        return Err(format!(
            "the storage argument is {}, not a persistent id",
            describe(arg(0)?)
        ));
    };
    // ('storage', <storage class>, key, location, numel)
    let p = seq(pid, "storage id")?;
    let part = |i: usize| p.get(i).ok_or("the storage's persistent id is too short");
    if p.len() != 5 || !matches!(part(0)?.view(), View::Str(s) if s == "storage") {
        return Err(
            "the storage's persistent id is not ('storage', class, key, location, numel)".into(),
        );
    }
    let class_name = match part(1)?.view() {
        View::Global { name, .. } => name,
        _ => return Err(format!("storage class: {}", describe(part(1)?))),
    };
    let key = string(part(2)?, "storage key")?;
    let numel_raw = uint(part(4)?, "storage size")?;
    let (torch_dtype, numel) = if v3 {
        let dt = match a.get(6).map(|d| (d, d.view())) {
            Some((
                _,
                View::Global {
                    module: "torch",
                    name,
                },
            )) => name.to_string(),
            o => {
                return Err(format!(
                    "_rebuild_tensor_v3's dtype argument is {}",
                    o.map(|(d, _)| describe(d))
                        .unwrap_or_else(|| "missing".into())
                ))
            }
        };
        // An untyped storage counts bytes.
        let es = elem_size(&dt).ok_or_else(|| format!("unknown dtype torch.{dt}"))?;
        if class_name != "UntypedStorage" || numel_raw % es != 0 {
            return Err(format!(
                "storage {class_name} of {numel_raw} bytes does not hold whole {dt} elements"
            ));
        }
        (dt, numel_raw / es)
    } else {
        let dt = storage_dtype(class_name)
            .ok_or_else(|| format!("unknown storage class {class_name}"))?;
        (dt.to_string(), numel_raw)
    };
    Ok(ItemTensor {
        key,
        torch_dtype,
        numel,
        storage_offset: uint(arg(1)?, "storage offset")?,
        size: shape(arg(2)?, "size")?,
        stride: shape(arg(3)?, "stride")?,
    })
}

/// Whether a view of `size` with `stride` over a storage of `numel` elements starting at
/// element 0 covers every element of the storage exactly once (a permutation of a
/// row-major layout: contiguous, transposed, ...). Only such views are averaged element by
/// element in storage order.
pub fn dense(size: &[u64], stride: &[u64], numel: u64) -> bool {
    if size.len() != stride.len() {
        return false;
    }
    let n: Option<u64> = size.iter().try_fold(1u64, |a, &s| a.checked_mul(s));
    if n != Some(numel) {
        return false;
    }
    if numel <= 1 {
        return true;
    }
    let mut dims: Vec<(u64, u64)> = size
        .iter()
        .zip(stride)
        .filter(|(s, _)| **s != 1)
        .map(|(s, t)| (*t, *s))
        .collect();
    dims.sort_unstable();
    let mut expect = 1u64;
    for (t, s) in dims {
        if t != expect {
            return false;
        }
        expect = match expect.checked_mul(s) {
            Some(e) => e,
            None => return false,
        };
    }
    expect == numel
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::dcp::{archive, pickle};
    use std::path::Path;

    fn fixture(rel: &str) -> Vec<u8> {
        std::fs::read(
            Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("tests/fixtures/dcp")
                .join(rel),
        )
        .unwrap()
    }

    #[test]
    fn decodes_the_fixtures_metadata() {
        let bytes = fixture("fsdp2-2rank/step-300/.metadata");
        let m = metadata(pickle::parse(&bytes).unwrap().root()).unwrap();
        let head = m
            .keys
            .iter()
            .find(|k| k.fqn == "model.head.weight")
            .unwrap();
        let t = head.tensor.as_ref().unwrap();
        assert_eq!(t.torch_dtype, "bfloat16");
        assert_eq!(t.dtype, Some(Dtype::BF16));
        assert!(t.strided);
        assert_eq!(t.size, vec![7, 6]);
        assert_eq!(
            t.chunks,
            vec![
                Chunk {
                    offsets: vec![0, 0],
                    sizes: vec![4, 6]
                },
                Chunk {
                    offsets: vec![4, 0],
                    sizes: vec![3, 6]
                }
            ]
        );
        let rng = m.keys.iter().find(|k| k.fqn == "train.rng.state").unwrap();
        assert!(rng.tensor.is_none());
        assert_eq!(m.items.len(), 17);
        let i = m
            .items
            .iter()
            .find(|i| i.fqn == "model.head.weight" && i.offset == Some(vec![4, 0]))
            .unwrap();
        assert_eq!(
            (i.file.as_str(), i.at, i.len),
            ("__1_0.distcp", 12176, 1577)
        );
        assert!(i.transforms.is_empty());
        assert!(m
            .items
            .iter()
            .any(|i| i.fqn == "train.rng.seed" && i.offset.is_none()));
    }

    #[test]
    fn decodes_item_tensors_with_their_strides() {
        let bytes = fixture("torchtitan/step-300/__0_0.distcp");
        let meta = fixture("torchtitan/step-300/.metadata");
        let m = metadata(pickle::parse(&meta).unwrap().root()).unwrap();
        let wo = m
            .items
            .iter()
            .find(|i| i.fqn == "layers.0.attention.wo.weight")
            .unwrap();
        let item = &bytes[wo.at as usize..(wo.at + wo.len) as usize];
        let entries = archive::entries(item).unwrap();
        let pkl = entries
            .iter()
            .find(|e| e.name.ends_with("/data.pkl"))
            .unwrap();
        let t = item_tensor(pickle::parse(&item[pkl.data.clone()]).unwrap().root()).unwrap();
        assert_eq!(
            t,
            ItemTensor {
                key: "0".into(),
                torch_dtype: "float32".into(),
                numel: 64,
                storage_offset: 0,
                size: vec![8, 8],
                stride: vec![1, 8],
            }
        );
        assert!(dense(&t.size, &t.stride, t.numel));
        // A bytes item's data.pkl is not a tensor.
        let step = m
            .items
            .iter()
            .find(|i| i.fqn == "train_state.step")
            .unwrap();
        let item = &bytes[step.at as usize..(step.at + step.len) as usize];
        let entries = archive::entries(item).unwrap();
        let pkl = entries
            .iter()
            .find(|e| e.name.ends_with("/data.pkl"))
            .unwrap();
        let e = item_tensor(pickle::parse(&item[pkl.data.clone()]).unwrap().root()).unwrap_err();
        assert!(e.contains("not a tensor"), "{e}");
    }

    #[test]
    fn dense_views_are_permutations_of_row_major() {
        assert!(dense(&[8, 8], &[8, 1], 64));
        assert!(dense(&[8, 8], &[1, 8], 64));
        assert!(dense(&[2, 3, 4], &[1, 2, 6], 24));
        assert!(dense(&[1, 5], &[99, 1], 5));
        assert!(dense(&[], &[], 1));
        assert!(!dense(&[8, 8], &[8, 1], 65)); // storage larger than the view
        assert!(!dense(&[8, 8], &[16, 1], 64)); // gaps
        assert!(!dense(&[8, 8], &[0, 1], 64)); // broadcast
        assert!(!dense(&[8, 8], &[8], 64));
    }

    #[test]
    fn refuses_other_rebuild_functions_by_name() {
        // pickle.dumps of a call of torch._utils._rebuild_qtensor with no arguments.
        let p = b"\x80\x02ctorch._utils\n_rebuild_qtensor\n)R.";
        let e = item_tensor(pickle::parse(p).unwrap().root()).unwrap_err();
        assert!(e.contains("torch._utils._rebuild_qtensor"), "{e}");
        assert!(e.contains("quantized"), "{e}");
    }
}
