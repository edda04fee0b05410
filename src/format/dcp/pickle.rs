//! A pickle reader that never executes anything: the bytes are run on a small stack machine
//! whose only output is a [`Value`] tree. Classes are never looked up or called: `GLOBAL`
//! yields a [`Value::Global`] naming the class, `REDUCE`/`NEWOBJ` an [`Value::Object`] holding
//! the class and its arguments, `BUILD` records the state on it, and a persistent id (how
//! `torch.save` names a tensor's storage) becomes a [`Value::PersId`]. Interpreting those is
//! the caller's business, by class name and fields.
//!
//! Hand-written because no maintained crate does this: `serde-pickle` decodes into serde
//! types, so it cannot represent class instances or dict keys that are objects (DCP's
//! `.metadata` keys its dicts by `MetadataIndex` objects), and it does not read persistent
//! ids. The machine covers the opcodes of protocols 2-5 that Python's pickler writes for plain
//! data and objects (see [`run`]); any other opcode is refused by name and byte offset.
//!
//! Invariants, whatever the input: no panic, no recursion (the machine is iterative; only
//! dropping a value recurses, and values are at most [`MAX_DEPTH`] deep), at most
//! [`MAX_NODES`] values built in all (copies made by memo lookups count), and every length
//! read from the input is checked against the bytes left before anything is allocated.
//!
//! Memo semantics: Python's memo holds references, so a container memoized before its items
//! were added is seen whole by a later lookup. Here a memoized container that is still on the
//! stack is looked up on the stack (its current state), and one that left the stack was
//! written back to the memo when it left, which is what every pickle Python writes needs.

use std::collections::HashMap;

/// How many values one pickle may build, copies included.
pub const MAX_NODES: usize = 1 << 21;
/// How deeply values may nest.
pub const MAX_DEPTH: usize = 256;

/// A value of the pickle, as data.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    /// `None`.
    None,
    /// `True` / `False`.
    Bool(bool),
    /// An integer that fits in 64 bits.
    Int(i64),
    /// A float.
    Float(f64),
    /// A `str`.
    Str(String),
    /// `bytes` or `bytearray`.
    Bytes(Vec<u8>),
    /// A list.
    List(Vec<Value>),
    /// A tuple.
    Tuple(Vec<Value>),
    /// A dict, in insertion order (keys may be any value).
    Dict(Vec<(Value, Value)>),
    /// A set or frozenset.
    Set(Vec<Value>),
    /// A class or function named by the pickle (never looked up).
    Global {
        /// Its module (`torch.distributed.checkpoint.metadata`).
        module: String,
        /// Its qualified name (`MetadataIndex`).
        name: String,
    },
    /// The result of calling a class or function: `REDUCE` (`args`) or `NEWOBJ`, with the
    /// state `BUILD` gave it.
    Object {
        /// What was called (normally a [`Value::Global`]).
        class: Box<Value>,
        /// Its arguments (a tuple).
        args: Box<Value>,
        /// The state set by `BUILD`, if any (usually the instance's `__dict__`).
        state: Option<Box<Value>>,
    },
    /// A persistent id (`BINPERSID`): the pickler's reference to data kept outside the pickle.
    PersId(Box<Value>),
}

impl Value {
    /// The class's name when this is an object of a class named by a `Global`.
    pub fn class_name(&self) -> Option<&str> {
        match self {
            Value::Object { class, .. } => match class.as_ref() {
                Value::Global { name, .. } => Some(name),
                _ => None,
            },
            _ => None,
        }
    }

    /// A field of an object: from its `BUILD` state when that is a dict keyed by strings.
    pub fn field(&self, key: &str) -> Option<&Value> {
        let Value::Object { state: Some(s), .. } = self else {
            return None;
        };
        let entries = match s.as_ref() {
            Value::Dict(d) => d,
            // (dict, slots) state: the slots dict holds the fields of slotted classes.
            Value::Tuple(t) if t.len() == 2 => {
                for part in t {
                    if let Value::Dict(d) = part {
                        if let Some(v) = lookup(d, key) {
                            return Some(v);
                        }
                    }
                }
                return None;
            }
            _ => return None,
        };
        lookup(entries, key)
    }

    /// Values counted against [`MAX_NODES`] (itself and everything inside).
    fn nodes(&self, limit: usize) -> usize {
        let mut n = 0;
        let mut todo = vec![self];
        while let Some(v) = todo.pop() {
            n += 1;
            if n > limit {
                return n;
            }
            match v {
                Value::List(x) | Value::Tuple(x) | Value::Set(x) => todo.extend(x.iter()),
                Value::Dict(d) => {
                    for (k, v) in d {
                        todo.push(k);
                        todo.push(v);
                    }
                }
                Value::Object { class, args, state } => {
                    todo.push(class);
                    todo.push(args);
                    if let Some(s) = state {
                        todo.push(s);
                    }
                }
                Value::PersId(p) => todo.push(p),
                _ => {}
            }
        }
        n
    }
}

fn lookup<'a>(d: &'a [(Value, Value)], key: &str) -> Option<&'a Value> {
    d.iter().find_map(|(k, v)| match k {
        Value::Str(s) if s == key => Some(v),
        _ => None,
    })
}

/// Why a pickle was refused: what, and at which byte.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PickleError {
    /// Offset of the opcode (or the read) that failed.
    pub at: usize,
    /// What is wrong.
    pub what: String,
}

impl std::fmt::Display for PickleError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "pickle byte {}: {}", self.at, self.what)
    }
}

impl std::error::Error for PickleError {}

/// A stack slot: a value, and the memo key it was stored under while on the stack.
struct Slot {
    v: Value,
    memo: Option<u32>,
    depth: usize,
}

enum Item {
    Mark,
    Slot(Slot),
}

struct Machine<'a> {
    b: &'a [u8],
    pos: usize,
    op_at: usize,
    stack: Vec<Item>,
    memo: HashMap<u32, Value>,
    /// Memo keys of values still on the stack: key -> stack index.
    on_stack: HashMap<u32, usize>,
    nodes: usize,
}

/// Run the pickle in `bytes` and return the value it builds. Opcodes: `PROTO`, `FRAME`,
/// `STOP`, `MARK`, `POP`, `POP_MARK`, `DUP`; `NONE`, `NEWTRUE`, `NEWFALSE`, `BININT`,
/// `BININT1`, `BININT2`, `LONG1`, `LONG4` (to 64 bits), `BINFLOAT`; `SHORT_BINUNICODE`,
/// `BINUNICODE`, `BINUNICODE8`, `SHORT_BINBYTES`, `BINBYTES`, `BINBYTES8`, `BYTEARRAY8`;
/// `EMPTY_LIST`, `APPEND`, `APPENDS`, `LIST`, `EMPTY_TUPLE`, `TUPLE`, `TUPLE1`-`TUPLE3`,
/// `EMPTY_DICT`, `DICT`, `SETITEM`, `SETITEMS`, `EMPTY_SET`, `ADDITEMS`, `FROZENSET`;
/// `GLOBAL`, `STACK_GLOBAL`, `REDUCE`, `NEWOBJ`, `NEWOBJ_EX`, `BUILD`, `BINPERSID`;
/// `BINPUT`, `LONG_BINPUT`, `MEMOIZE`, `BINGET`, `LONG_BINGET`.
pub fn run(bytes: &[u8]) -> Result<Value, PickleError> {
    let mut m = Machine {
        b: bytes,
        pos: 0,
        op_at: 0,
        stack: Vec::new(),
        memo: HashMap::new(),
        on_stack: HashMap::new(),
        nodes: 0,
    };
    m.run()
}

impl<'a> Machine<'a> {
    fn err<T>(&self, what: impl Into<String>) -> Result<T, PickleError> {
        Err(PickleError {
            at: self.op_at,
            what: what.into(),
        })
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], PickleError> {
        let end = match self.pos.checked_add(n) {
            Some(e) if e <= self.b.len() => e,
            _ => {
                return self.err(format!(
                    "needs {n} more bytes, {} left",
                    self.b.len() - self.pos
                ))
            }
        };
        let s = &self.b[self.pos..end];
        self.pos = end;
        Ok(s)
    }

    fn u8(&mut self) -> Result<u8, PickleError> {
        Ok(self.take(1)?[0])
    }

    fn uint(&mut self, n: usize) -> Result<u64, PickleError> {
        let s = self.take(n)?;
        let mut v = [0u8; 8];
        v[..n].copy_from_slice(s);
        Ok(u64::from_le_bytes(v))
    }

    fn len(&mut self, n: usize) -> Result<usize, PickleError> {
        let v = self.uint(n)?;
        let left = self.b.len() - self.pos;
        match usize::try_from(v) {
            Ok(l) if l <= left => Ok(l),
            _ => self.err(format!("length {v} runs past the end ({left} bytes left)")),
        }
    }

    fn line(&mut self) -> Result<String, PickleError> {
        let rest = &self.b[self.pos..];
        let Some(n) = rest.iter().position(|&c| c == b'\n') else {
            return self.err("unterminated line");
        };
        let s = String::from_utf8(rest[..n].to_vec());
        self.pos += n + 1;
        s.or_else(|_| self.err("line is not UTF-8"))
    }

    fn count(&mut self, n: usize) -> Result<(), PickleError> {
        self.nodes = self.nodes.saturating_add(n);
        if self.nodes > MAX_NODES {
            return self.err(format!("more than {MAX_NODES} values"));
        }
        Ok(())
    }

    fn push(&mut self, v: Value, depth: usize) -> Result<(), PickleError> {
        self.count(1)?;
        if depth > MAX_DEPTH {
            return self.err(format!("values nest deeper than {MAX_DEPTH}"));
        }
        self.stack.push(Item::Slot(Slot {
            v,
            memo: None,
            depth,
        }));
        Ok(())
    }

    /// Pop a value; a memoized one is written back to the memo as it leaves the stack.
    fn pop(&mut self) -> Result<(Value, usize), PickleError> {
        match self.stack.pop() {
            Some(Item::Slot(s)) => {
                if let Some(id) = s.memo {
                    if self.on_stack.get(&id) == Some(&self.stack.len()) {
                        self.on_stack.remove(&id);
                    }
                    self.memo.insert(id, s.v.clone());
                }
                Ok((s.v, s.depth))
            }
            Some(Item::Mark) => self.err("a mark where a value was expected"),
            None => self.err("stack underflow"),
        }
    }

    fn top(&mut self) -> Result<&mut Slot, PickleError> {
        match self.stack.last_mut() {
            Some(Item::Slot(s)) => Ok(s),
            Some(Item::Mark) => Err(PickleError {
                at: self.op_at,
                what: "a mark where a value was expected".into(),
            }),
            None => Err(PickleError {
                at: self.op_at,
                what: "stack underflow".into(),
            }),
        }
    }

    /// Everything above the topmost mark, and the mark itself removed.
    fn pop_mark(&mut self) -> Result<(Vec<Value>, usize), PickleError> {
        let Some(i) = self.stack.iter().rposition(|x| matches!(x, Item::Mark)) else {
            return self.err("no mark on the stack");
        };
        let n = self.stack.len() - i - 1;
        let mut out = Vec::with_capacity(n);
        let mut depth = 0;
        for _ in 0..n {
            let (v, d) = self.pop()?;
            depth = depth.max(d);
            out.push(v);
        }
        out.reverse();
        self.stack.pop();
        Ok((out, depth))
    }

    fn memo_put(&mut self, id: u32) -> Result<(), PickleError> {
        if self.memo.len() >= MAX_NODES {
            return self.err("memo too large");
        }
        let at = self.stack.len().saturating_sub(1);
        let slot = self.top()?;
        slot.memo = Some(id);
        let v = slot.v.clone();
        // Python memoizes a container as it is created (empty): a copy costs one value. A
        // hostile pickle memoizing big values again and again pays for every copy.
        let n = v.nodes(MAX_NODES);
        self.count(n)?;
        self.memo.insert(id, v);
        self.on_stack.insert(id, at);
        Ok(())
    }

    fn memo_get(&mut self, id: u32) -> Result<(), PickleError> {
        // A memoized container still on the stack is looked up there: its current state.
        let on_stack = self
            .on_stack
            .get(&id)
            .and_then(|&i| match self.stack.get(i) {
                Some(Item::Slot(s)) if s.memo == Some(id) => Some((s.v.clone(), s.depth)),
                _ => None,
            });
        let (v, depth) = match on_stack {
            Some(x) => x,
            None => match self.memo.get(&id) {
                Some(v) => (v.clone(), 0),
                None => return self.err(format!("memo key {id} was never stored")),
            },
        };
        let n = v.nodes(MAX_NODES);
        self.count(n.saturating_sub(1))?;
        self.push(v, depth)
    }

    fn run(&mut self) -> Result<Value, PickleError> {
        loop {
            self.op_at = self.pos;
            let op = match self.b.get(self.pos) {
                Some(&o) => o,
                None => return self.err("ended without STOP"),
            };
            self.pos += 1;
            match op {
                0x80 => {
                    // PROTO
                    let p = self.u8()?;
                    if p > 5 {
                        return self.err(format!("protocol {p}"));
                    }
                }
                0x95 => {
                    // FRAME: a length hint only
                    self.uint(8)?;
                }
                b'.' => {
                    let (v, _) = self.pop()?;
                    return Ok(v);
                }
                b'(' => self.stack.push(Item::Mark),
                b'0' => {
                    self.pop()?;
                }
                b'1' => {
                    self.pop_mark()?;
                }
                b'2' => {
                    let s = self.top()?;
                    let (v, d) = (s.v.clone(), s.depth);
                    let n = v.nodes(MAX_NODES);
                    self.count(n.saturating_sub(1))?;
                    self.push(v, d)?;
                }
                b'N' => self.push(Value::None, 0)?,
                0x88 => self.push(Value::Bool(true), 0)?,
                0x89 => self.push(Value::Bool(false), 0)?,
                b'J' => {
                    let v = self.uint(4)? as u32 as i32;
                    self.push(Value::Int(v.into()), 0)?
                }
                b'K' => {
                    let v = self.u8()?;
                    self.push(Value::Int(v.into()), 0)?
                }
                b'M' => {
                    let v = self.uint(2)?;
                    self.push(Value::Int(v as i64), 0)?
                }
                0x8a | 0x8b => {
                    // LONG1 / LONG4: little-endian two's complement
                    let n = if op == 0x8a {
                        self.u8()? as usize
                    } else {
                        self.len(4)?
                    };
                    let s = self.take(n)?;
                    if n > 8 {
                        return self.err(format!("an integer of {n} bytes (over 64 bits)"));
                    }
                    let mut v = [0u8; 8];
                    v[..n].copy_from_slice(s);
                    if n > 0 && n < 8 && s[n - 1] & 0x80 != 0 {
                        v[n..].fill(0xff);
                    }
                    self.push(Value::Int(i64::from_le_bytes(v)), 0)?
                }
                b'G' => {
                    let s = self.take(8)?;
                    let mut v = [0u8; 8];
                    v.copy_from_slice(s);
                    self.push(Value::Float(f64::from_be_bytes(v)), 0)?
                }
                0x8c | b'X' | 0x8d => {
                    let n = match op {
                        0x8c => 1,
                        b'X' => 4,
                        _ => 8,
                    };
                    let l = self.len(n)?;
                    let s = self.take(l)?;
                    let Ok(t) = std::str::from_utf8(s) else {
                        return self.err("string is not UTF-8");
                    };
                    self.push(Value::Str(t.to_string()), 0)?
                }
                b'C' | b'B' | 0x8e | 0x96 => {
                    let n = match op {
                        b'C' => 1,
                        b'B' => 4,
                        _ => 8,
                    };
                    let l = self.len(n)?;
                    let s = self.take(l)?.to_vec();
                    self.push(Value::Bytes(s), 0)?
                }
                b']' => self.push(Value::List(Vec::new()), 0)?,
                b')' => self.push(Value::Tuple(Vec::new()), 0)?,
                b'}' => self.push(Value::Dict(Vec::new()), 0)?,
                0x8f => self.push(Value::Set(Vec::new()), 0)?,
                b'l' => {
                    let (v, d) = self.pop_mark()?;
                    self.push(Value::List(v), d + 1)?
                }
                b't' => {
                    let (v, d) = self.pop_mark()?;
                    self.push(Value::Tuple(v), d + 1)?
                }
                0x85..=0x87 => {
                    let n = (op - 0x84) as usize;
                    let mut v = Vec::with_capacity(n);
                    let mut d = 0;
                    for _ in 0..n {
                        let (x, xd) = self.pop()?;
                        d = d.max(xd);
                        v.push(x);
                    }
                    v.reverse();
                    self.push(Value::Tuple(v), d + 1)?
                }
                b'd' => {
                    let (v, d) = self.pop_mark()?;
                    let pairs = self.pairs(v)?;
                    self.push(Value::Dict(pairs), d + 1)?
                }
                0x91 => {
                    let (v, d) = self.pop_mark()?;
                    self.push(Value::Set(v), d + 1)?
                }
                b'a' => {
                    let (x, d) = self.pop()?;
                    self.extend(vec![x], d)?
                }
                b'e' => {
                    let (v, d) = self.pop_mark()?;
                    self.extend(v, d)?
                }
                0x90 => {
                    let (v, d) = self.pop_mark()?;
                    self.extend(v, d)?
                }
                b's' => {
                    let (val, dv) = self.pop()?;
                    let (key, dk) = self.pop()?;
                    self.set_items(vec![(key, val)], dv.max(dk))?
                }
                b'u' => {
                    let (v, d) = self.pop_mark()?;
                    let pairs = self.pairs(v)?;
                    self.set_items(pairs, d)?
                }
                b'c' => {
                    let module = self.line()?;
                    let name = self.line()?;
                    self.push(Value::Global { module, name }, 0)?
                }
                0x93 => {
                    let (name, _) = self.pop()?;
                    let (module, _) = self.pop()?;
                    match (module, name) {
                        (Value::Str(module), Value::Str(name)) => {
                            self.push(Value::Global { module, name }, 0)?
                        }
                        _ => return self.err("STACK_GLOBAL of values that are not strings"),
                    }
                }
                b'R' | 0x81 => {
                    let (args, da) = self.pop()?;
                    let (class, dc) = self.pop()?;
                    if !matches!(args, Value::Tuple(_)) {
                        return self.err("call arguments are not a tuple");
                    }
                    let o = Value::Object {
                        class: Box::new(class),
                        args: Box::new(args),
                        state: None,
                    };
                    self.push(o, da.max(dc) + 1)?
                }
                0x92 => {
                    // NEWOBJ_EX: class, args, kwargs; the kwargs are kept after the args.
                    let (kwargs, dw) = self.pop()?;
                    let (args, da) = self.pop()?;
                    let (class, dc) = self.pop()?;
                    let o = Value::Object {
                        class: Box::new(class),
                        args: Box::new(Value::Tuple(vec![args, kwargs])),
                        state: None,
                    };
                    self.push(o, da.max(dc).max(dw) + 2)?
                }
                b'b' => {
                    let (st, ds) = self.pop()?;
                    let s = self.top()?;
                    let depth = s.depth.max(ds + 1);
                    match &mut s.v {
                        Value::Object { state, .. } if state.is_none() => {
                            *state = Some(Box::new(st));
                            s.depth = depth;
                        }
                        _ => return self.err("BUILD on a value that is not a fresh object"),
                    }
                    if depth > MAX_DEPTH {
                        return self.err(format!("values nest deeper than {MAX_DEPTH}"));
                    }
                }
                b'Q' => {
                    let (pid, d) = self.pop()?;
                    self.push(Value::PersId(Box::new(pid)), d + 1)?
                }
                b'q' => {
                    let id = self.u8()? as u32;
                    self.memo_put(id)?
                }
                b'r' => {
                    let id = self.uint(4)? as u32;
                    self.memo_put(id)?
                }
                0x94 => {
                    let id = u32::try_from(self.memo.len()).unwrap_or(u32::MAX);
                    self.memo_put(id)?
                }
                b'h' => {
                    let id = self.u8()? as u32;
                    self.memo_get(id)?
                }
                b'j' => {
                    let id = self.uint(4)? as u32;
                    self.memo_get(id)?
                }
                _ => return self.err(format!("unsupported opcode 0x{op:02x}")),
            }
        }
    }

    fn pairs(&self, v: Vec<Value>) -> Result<Vec<(Value, Value)>, PickleError> {
        if v.len() % 2 != 0 {
            return self.err("a dict of an odd number of values");
        }
        let mut out = Vec::with_capacity(v.len() / 2);
        let mut it = v.into_iter();
        while let (Some(k), Some(v)) = (it.next(), it.next()) {
            out.push((k, v));
        }
        Ok(out)
    }

    fn extend(&mut self, items: Vec<Value>, d: usize) -> Result<(), PickleError> {
        let s = self.top()?;
        s.depth = s.depth.max(d + 1);
        let depth = s.depth;
        match &mut s.v {
            Value::List(l) | Value::Set(l) => l.extend(items),
            _ => return self.err("APPEND to a value that is not a list or set"),
        }
        if depth > MAX_DEPTH {
            return self.err(format!("values nest deeper than {MAX_DEPTH}"));
        }
        Ok(())
    }

    fn set_items(&mut self, items: Vec<(Value, Value)>, d: usize) -> Result<(), PickleError> {
        let s = self.top()?;
        s.depth = s.depth.max(d + 1);
        let depth = s.depth;
        match &mut s.v {
            Value::Dict(m) => m.extend(items),
            _ => return self.err("SETITEMS on a value that is not a dict"),
        }
        if depth > MAX_DEPTH {
            return self.err(format!("values nest deeper than {MAX_DEPTH}"));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    /// One item of the storage index: key, chunk offset, file, offset, length.
    type Item = (String, Option<Vec<i64>>, String, i64, i64);

    fn metadata(set: &str, step: u64) -> Vec<u8> {
        let p = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/dcp")
            .join(set)
            .join(format!("step-{step}/.metadata"));
        std::fs::read(p).unwrap()
    }

    /// The storage index read from `.metadata` agrees with what torch's own unpickler read:
    /// every item's key, chunk offset, file, offset and length.
    #[test]
    fn reads_torch_metadata_like_torch() {
        for set in ["torchtitan", "fsdp2-2rank"] {
            for step in [100, 200, 300] {
                let v = run(&metadata(set, step)).unwrap();
                assert_eq!(v.class_name(), Some("Metadata"));
                let Some(Value::Dict(storage)) = v.field("storage_data") else {
                    panic!("{set}: no storage_data: {v:?}");
                };
                let mut got: Vec<Item> = storage
                    .iter()
                    .map(|(k, s)| {
                        let fqn = match k.field("fqn") {
                            Some(Value::Str(s)) => s.clone(),
                            other => panic!("fqn {other:?}"),
                        };
                        let off = match k.field("offset") {
                            Some(Value::None) | None => None,
                            // torch.Size((..)) is REDUCE(torch.Size, ((..),))
                            Some(Value::Object { args, .. }) => match args.as_ref() {
                                Value::Tuple(a) => match a.first() {
                                    Some(Value::Tuple(xs)) => Some(
                                        xs.iter()
                                            .map(|x| match x {
                                                Value::Int(i) => *i,
                                                o => panic!("{o:?}"),
                                            })
                                            .collect(),
                                    ),
                                    o => panic!("{o:?}"),
                                },
                                o => panic!("{o:?}"),
                            },
                            o => panic!("offset {o:?}"),
                        };
                        let int = |f: &str| match s.field(f) {
                            Some(Value::Int(i)) => *i,
                            o => panic!("{f}: {o:?}"),
                        };
                        let file = match s.field("relative_path") {
                            Some(Value::Str(p)) => p.clone(),
                            o => panic!("{o:?}"),
                        };
                        (fqn, off, file, int("offset"), int("length"))
                    })
                    .collect();
                got.sort_by(|a, b| (&a.2, a.3).cmp(&(&b.2, b.3)));
                let list: serde_json::Value = serde_json::from_slice(
                    &std::fs::read(
                        Path::new(env!("CARGO_MANIFEST_DIR"))
                            .join("tests/fixtures/dcp")
                            .join(set)
                            .join(format!("items-step-{step}.json")),
                    )
                    .unwrap(),
                )
                .unwrap();
                let want: Vec<Item> = list
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|i| {
                        (
                            i["fqn"].as_str().unwrap().to_string(),
                            i["chunk_offset"]
                                .as_array()
                                .map(|a| a.iter().map(|x| x.as_i64().unwrap()).collect()),
                            i["file"].as_str().unwrap().to_string(),
                            i["offset"].as_i64().unwrap(),
                            i["length"].as_i64().unwrap(),
                        )
                    })
                    .collect();
                assert_eq!(got, want, "{set} step {step}");
            }
        }
    }

    #[test]
    fn small_pickles_of_every_kind() {
        // pickle.dumps({"a": [1, -2, 3.5, None, True], (1, 2): b"xy"}, protocol=2)
        let p = b"\x80\x02}q\x00(X\x01\x00\x00\x00aq\x01]q\x02(K\x01J\xfe\xff\xff\xffG@\x0c\x00\x00\x00\x00\x00\x00N\x88eK\x01K\x02\x86q\x03c_codecs\nencode\nq\x04X\x02\x00\x00\x00xyq\x05X\x06\x00\x00\x00latin1q\x06\x86q\x07Rq\x08u.";
        let v = run(p).unwrap();
        let Value::Dict(d) = v else { panic!() };
        assert_eq!(
            d[0],
            (
                Value::Str("a".into()),
                Value::List(vec![
                    Value::Int(1),
                    Value::Int(-2),
                    Value::Float(3.5),
                    Value::None,
                    Value::Bool(true)
                ])
            )
        );
        assert_eq!(d[1].0, Value::Tuple(vec![Value::Int(1), Value::Int(2)]));
        // Protocol 2 pickles bytes as a call to _codecs.encode: kept as data, never called.
        assert_eq!(d[1].1.class_name(), Some("encode"));
        // A pickle that would run os.system("ls") in Python is only data here.
        let v = run(b"\x80\x02cos\nsystem\nX\x02\x00\x00\x00lsq\x00\x85R.").unwrap();
        assert_eq!(v.class_name(), Some("system"));
        // LONG1: 2**40 and -2**40.
        assert_eq!(
            run(b"\x80\x02\x8a\x06\x00\x00\x00\x00\x00\x01.").unwrap(),
            Value::Int(1 << 40)
        );
        assert_eq!(
            run(b"\x80\x02\x8a\x06\x00\x00\x00\x00\x00\xff.").unwrap(),
            Value::Int(-(1 << 40))
        );
    }

    #[test]
    fn hostile_pickles_are_refused_by_offset() {
        let cases: &[(&[u8], &str)] = &[
            (b"", "ended without STOP"),
            (b"\x80\x02", "ended without STOP"),
            (b"\x80\x02.", "stack underflow"),
            (b"\x80\x02K", "needs 1 more bytes"),
            (b"\x80\x02X\xff\xff\xff\x7f", "runs past the end"),
            (b"\x80\x02h\x07.", "never stored"),
            (b"\x80\x02i__builtin__\nexec\n.", "unsupported opcode 0x69"),
            (b"\x80\x02(a.", "mark where a value"),
            (b"\x80\x02K\x01K\x02u.", "no mark"),
            (
                b"\x80\x02\x8a\x09\x00\x00\x00\x00\x00\x00\x00\x00\x01.",
                "over 64 bits",
            ),
            (b"\x80\x09.", "protocol 9"),
            (b"\x80\x02K\x01)b.", "not a fresh object"),
        ];
        for (p, want) in cases {
            let e = run(p).unwrap_err();
            assert!(e.to_string().contains(want), "{p:?}: {e}");
        }
        // Exponential growth through the memo is stopped by the value budget.
        let mut p = b"\x80\x02]q\x00".to_vec();
        for _ in 0..40 {
            p.extend_from_slice(b"h\x00h\x00\x86q\x00");
        }
        p.push(b'.');
        let e = run(&p).unwrap_err();
        assert!(e.what.contains("more than"), "{e}");
        // Deep nesting is refused, not a stack overflow.
        let mut p = b"\x80\x02]".to_vec();
        p.extend(std::iter::repeat_n(0x85, 10_000));
        p.push(b'.');
        let e = run(&p).unwrap_err();
        assert!(e.what.contains("deeper"), "{e}");
    }
}
