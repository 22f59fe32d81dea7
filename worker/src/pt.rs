//! The one reader of `torch.save` files: the zip archive PyTorch has written since 1.6 and the
//! legacy format before it, holding one tensor (DanceGRPO's and MindSpeed-MM's preprocessed
//! embeddings) or a state dict (`torch.save(model.state_dict())`, an `OrderedDict`, at the top
//! level or under a key such as HPSv2's `{'state_dict': ...}`; `open_clip_pytorch_model.bin`,
//! transformers' `pytorch_model.bin`).
//!
//! Why our own pickle VM: libtorch's C++ unpickler, the other candidate, turns every
//! `collections.OrderedDict` into `None` (it expects one only as a tensor's empty backward
//! hooks), so it cannot read a single real state dict; tch's `Tensor::load` wants a TorchScript
//! archive, and `_load_parameters` a plain dict. No well-kept crate reads torch pickles without
//! a whole framework (candle, burn), and `serde-pickle` has no persistent ids. The subset
//! `torch.save` uses is small: containers, `_rebuild_tensor_v2(storage, offset, size, stride,
//! ...)` and `_rebuild_parameter`, storages as persistent ids. It resolves globals to values
//! and never runs code, so a hostile file cannot execute anything. The file is memory-mapped:
//! reading a tensor copies its bytes once, from the page cache into the tensor, and
//! [`read_info`] checks a file without touching its data.

use std::collections::HashMap;
use std::fs::File;
use std::ops::Range;
use std::path::{Path, PathBuf};

use memmap2::Mmap;
use tch::{Kind, Tensor};

/// What can be wrong with a `torch.save` file.
#[derive(Debug, thiserror::Error)]
pub enum PtError {
    /// The file could not be opened or mapped.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// Neither a zip archive nor a legacy pickle, or a damaged one (a truncated download).
    #[error("{path}: not a readable torch.save file: {message}")]
    Format {
        /// The file.
        path: PathBuf,
        /// What was found instead.
        message: String,
    },
    /// The pickle is malformed, or holds something other than what was asked for.
    #[error("{path}: {message}")]
    Pickle {
        /// The file.
        path: PathBuf,
        /// What is wrong, naming the entry.
        message: String,
    },
}

/// A tensor's description from the pickle, before its data is read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PtTensorInfo {
    /// Element type.
    pub kind: Kind,
    /// Shape.
    pub shape: Vec<i64>,
    /// Strides, in elements.
    pub stride: Vec<i64>,
    /// Offset into the storage, in elements.
    pub offset: i64,
    /// Elements in the storage.
    pub storage_numel: i64,
}

/// Reads the description of the one tensor a file holds and checks that its storage is
/// present and large enough, without reading the data.
pub fn read_info(path: &Path) -> Result<PtTensorInfo, PtError> {
    let file = PtFile::open(path)?;
    let t = file.root_tensor()?;
    file.storage_bytes(&t)?;
    Ok(PtTensorInfo {
        kind: t.kind,
        shape: t.shape,
        stride: t.stride,
        offset: t.offset,
        storage_numel: t.storage_numel,
    })
}

/// Loads the one tensor a file holds (contiguous, on the CPU).
pub fn load(path: &Path) -> Result<Tensor, PtError> {
    let file = PtFile::open(path)?;
    let t = file.root_tensor()?;
    file.tensor("the root tensor", &t, &mut HashMap::new())
}

/// Reads a state dict, in the file's order, on the CPU in the file's dtypes: the root dict (or
/// `OrderedDict`), or the dict under `key` when the root holds one there. Every value must be a
/// tensor. Tensors that shared a storage in the file share it here too.
pub fn read_state_dict(path: &Path, key: Option<&str>) -> Result<Vec<(String, Tensor)>, PtError> {
    let file = PtFile::open(path)?;
    let entries = file.state_dict(key)?;
    let mut storages = HashMap::new();
    entries
        .into_iter()
        .map(|(name, t)| {
            let tensor = file.tensor(&format!("entry '{name}'"), &t, &mut storages)?;
            Ok((name, tensor))
        })
        .collect()
}

/// An opened file: its pickled root object and where each storage's bytes lie in the map.
struct PtFile {
    path: PathBuf,
    mmap: Mmap,
    root: Value,
    /// Storage key → its bytes in `mmap`.
    storages: HashMap<String, Range<usize>>,
}

/// The first pickle of a legacy file: this number as a LONG1.
const LEGACY_MAGIC: u128 = 0x1950a86a20f9469cfc6c;
/// The legacy format's version, its second pickle.
const LEGACY_PROTOCOL: i64 = 1001;

impl PtFile {
    fn open(path: &Path) -> Result<Self, PtError> {
        let io = |source| PtError::Io { path: path.to_owned(), source };
        let file = File::open(path).map_err(io)?;
        if file.metadata().map_err(io)?.len() == 0 {
            return Err(format_err(path, "the file is empty".into()));
        }
        // SAFETY: the map is read-only and private to this reader; a checkpoint is not
        // rewritten while it is being loaded (the same contract as safetensors' loaders).
        let mmap = unsafe { Mmap::map(&file) }.map_err(io)?;
        let (root, storages) = if mmap.starts_with(b"PK\x03\x04") {
            read_zip(path, &mmap)?
        } else if mmap.first() == Some(&0x80) {
            read_legacy(path, &mmap)?
        } else {
            let head: Vec<String> = mmap.iter().take(8).map(|b| format!("{b:02x}")).collect();
            return Err(format_err(
                path,
                format!(
                    "neither a zip archive nor a pickle; it starts with bytes {}",
                    head.join(" ")
                ),
            ));
        };
        Ok(Self { path: path.to_owned(), mmap, root, storages })
    }

    fn root_tensor(&self) -> Result<TensorRef, PtError> {
        match &self.root {
            Value::Tensor(t) => Ok(t.clone()),
            other => Err(self.pickle_err(format!(
                "expected one tensor at the root, found a {}",
                other.kind_name()
            ))),
        }
    }

    fn state_dict(&self, key: Option<&str>) -> Result<Vec<(String, TensorRef)>, PtError> {
        let Value::Dict(root) = &self.root else {
            return Err(
                self.pickle_err(format!("root object is a {}, not a dict", self.root.kind_name()))
            );
        };
        let mut dict = root;
        if let Some(key) = key {
            let inner = root.iter().find(|(k, _)| matches!(k, Value::Str(s) if s == key));
            match inner {
                Some((_, Value::Dict(d))) => dict = d,
                Some((_, other)) => {
                    return Err(self.pickle_err(format!(
                        "entry '{key}' is a {}, not a dict",
                        other.kind_name()
                    )));
                }
                None => {}
            }
        }
        dict.iter()
            .map(|(k, v)| {
                let Value::Str(name) = k else {
                    return Err(
                        self.pickle_err(format!("a key of kind {} is not a string", k.kind_name()))
                    );
                };
                match v {
                    Value::Tensor(t) => Ok((name.clone(), t.clone())),
                    other => Err(self.pickle_err(format!(
                        "entry '{name}' is a {}, not a tensor",
                        other.kind_name()
                    ))),
                }
            })
            .collect()
    }

    /// The bytes of `t`'s storage, checked to hold all its elements.
    fn storage_bytes(&self, t: &TensorRef) -> Result<&[u8], PtError> {
        let range = self.storages.get(&t.key).ok_or_else(|| {
            self.pickle_err(format!("storage {} is missing from the file", t.key))
        })?;
        let need = t.storage_numel as usize * t.kind.elt_size_in_bytes();
        if range.len() < need {
            return Err(self.pickle_err(format!(
                "storage {} holds {} bytes, needs {need} ({} elements of {:?}; truncated?)",
                t.key,
                range.len(),
                t.storage_numel,
                t.kind
            )));
        }
        Ok(&self.mmap[range.start..range.start + need])
    }

    fn tensor(
        &self,
        what: &str,
        t: &TensorRef,
        storages: &mut HashMap<(String, Kind), Tensor>,
    ) -> Result<Tensor, PtError> {
        let err = |e: tch::TchError| self.pickle_err(format!("{what}: {e}"));
        let storage = match storages.get(&(t.key.clone(), t.kind)) {
            Some(s) => s.shallow_clone(),
            None => {
                let bytes = self.storage_bytes(t)?;
                let s = Tensor::f_from_data_size(bytes, &[t.storage_numel], t.kind).map_err(err)?;
                storages.insert((t.key.clone(), t.kind), s.shallow_clone());
                s
            }
        };
        storage
            .f_as_strided(&t.shape, &t.stride, Some(t.offset))
            .and_then(|v| v.f_contiguous())
            .map_err(err)
    }

    fn pickle_err(&self, message: String) -> PtError {
        PtError::Pickle { path: self.path.clone(), message }
    }
}

fn format_err(path: &Path, message: String) -> PtError {
    PtError::Format { path: path.to_owned(), message }
}

/// The zip format: `<archive>/data.pkl` holds the object, `<archive>/data/<key>` each storage,
/// stored uncompressed (torch aligns them to 64 bytes so they can be mapped).
fn read_zip(path: &Path, mmap: &[u8]) -> Result<(Value, HashMap<String, Range<usize>>), PtError> {
    let zip_err = |e: zip::result::ZipError| {
        format_err(path, format!("a zip archive that cannot be read (truncated?): {e}"))
    };
    let mut zip = zip::ZipArchive::new(std::io::Cursor::new(mmap)).map_err(zip_err)?;
    // The archive's folder is named after the file at save time; find it by its data.pkl.
    let pkl_name = zip
        .file_names()
        .find(|n| n.ends_with("/data.pkl") && n.matches('/').count() == 1)
        .map(str::to_owned)
        .ok_or_else(|| format_err(path, "a zip archive without <archive>/data.pkl".into()))?;
    let prefix = pkl_name.trim_end_matches("data.pkl").to_owned();
    let data_prefix = format!("{prefix}data/");
    let mut pkl = None;
    let mut byteorder = None;
    let mut storages = HashMap::new();
    for i in 0..zip.len() {
        let entry = zip.by_index_raw(i).map_err(zip_err)?;
        let name = entry.name().to_owned();
        let is_data = name.starts_with(&data_prefix);
        if !(is_data || name == pkl_name || name == format!("{prefix}byteorder")) {
            continue;
        }
        if entry.compression() != zip::CompressionMethod::Stored {
            return Err(format_err(path, format!("entry {name} is compressed")));
        }
        let start = entry.data_start() as usize;
        let range = start..start.saturating_add(entry.size() as usize);
        if range.end > mmap.len() {
            return Err(format_err(path, format!("entry {name} runs past the end (truncated?)")));
        }
        if is_data {
            storages.insert(name[data_prefix.len()..].to_owned(), range);
        } else if name == pkl_name {
            pkl = Some(range);
        } else {
            byteorder = Some(range);
        }
    }
    if let Some(r) = byteorder {
        let order = String::from_utf8_lossy(&mmap[r]);
        if order.trim() != "little" {
            return Err(format_err(path, format!("byte order {order:?} is not supported")));
        }
    }
    let pkl = pkl.expect("data.pkl was found above");
    let mut u = Unpickler::new(&mmap[pkl]);
    let root =
        u.next_pickle().map_err(|m| PtError::Pickle { path: path.to_owned(), message: m })?;
    Ok((root, storages))
}

/// The legacy format (`_use_new_zipfile_serialization=False`, and torch before 1.6): five
/// pickles in a row (magic number, protocol version, system info, the object, the sorted
/// storage keys), then each storage as its element count (i64) and its bytes.
fn read_legacy(
    path: &Path,
    mmap: &[u8],
) -> Result<(Value, HashMap<String, Range<usize>>), PtError> {
    let bad = |m: String| PtError::Pickle { path: path.to_owned(), message: m };
    let mut u = Unpickler::new(mmap);
    match u.next_pickle().map_err(&bad)? {
        Value::Long(n) if n == LEGACY_MAGIC => {}
        other => {
            return Err(format_err(
                path,
                format!(
                    "a pickle that is not a torch.save file (it starts with a {}, not torch's \
                     magic number)",
                    other.kind_name()
                ),
            ));
        }
    }
    match u.next_pickle().map_err(&bad)? {
        Value::Int(LEGACY_PROTOCOL) => {}
        Value::Int(v) => return Err(format_err(path, format!("legacy protocol {v} is not 1001"))),
        other => return Err(bad(format!("legacy protocol is a {}", other.kind_name()))),
    }
    let sys_info = u.next_pickle().map_err(&bad)?;
    if let Value::Dict(d) = &sys_info {
        let little = d.iter().find(|(k, _)| matches!(k, Value::Str(s) if s == "little_endian"));
        if let Some((_, Value::Bool(false))) = little {
            return Err(format_err(path, "a big-endian file is not supported".into()));
        }
    }
    let root = u.next_pickle().map_err(&bad)?;
    let Value::List(keys) = u.next_pickle().map_err(&bad)? else {
        return Err(bad("the legacy storage key list is not a list".into()));
    };
    let mut pos = u.pos;
    let mut storages = HashMap::new();
    for key in keys {
        let Value::Str(key) = key else {
            return Err(bad("a legacy storage key is not a string".into()));
        };
        let (kind, numel) = *u
            .storages
            .get(&key)
            .ok_or_else(|| bad(format!("storage {key} is listed but no tensor uses it")))?;
        let truncated =
            || format_err(path, format!("storage {key} runs past the end (truncated?)"));
        let header = mmap.get(pos..pos + 8).ok_or_else(truncated)?;
        let count = i64::from_le_bytes(header.try_into().expect("8 bytes"));
        if count != numel {
            return Err(bad(format!(
                "storage {key} holds {count} elements, its pickle says {numel}"
            )));
        }
        let start = pos + 8;
        let end = start + numel as usize * kind.elt_size_in_bytes();
        if end > mmap.len() {
            return Err(truncated());
        }
        storages.insert(key, start..end);
        pos = end;
    }
    Ok((root, storages))
}

#[derive(Debug, Clone)]
struct TensorRef {
    kind: Kind,
    key: String,
    storage_numel: i64,
    offset: i64,
    shape: Vec<i64>,
    stride: Vec<i64>,
}

/// The pickle values `torch.save` files use.
#[derive(Debug, Clone)]
enum Value {
    Mark,
    None,
    Bool(bool),
    Int(i64),
    /// An integer wider than 64 bits (the legacy magic number).
    Long(u128),
    Float,
    Str(String),
    Bytes,
    Tuple(Vec<Value>),
    List(Vec<Value>),
    /// A dict or an `OrderedDict`, in insertion order.
    Dict(Vec<(Value, Value)>),
    Global(String, String),
    Storage {
        kind: Kind,
        key: String,
        numel: i64,
    },
    Tensor(TensorRef),
    /// An object we do not interpret (its value is never needed for tensors).
    Opaque,
}

impl Value {
    fn kind_name(&self) -> &'static str {
        match self {
            Value::Mark => "mark",
            Value::None => "None",
            Value::Bool(_) => "bool",
            Value::Int(_) | Value::Long(_) => "int",
            Value::Float => "float",
            Value::Str(_) => "str",
            Value::Bytes => "bytes",
            Value::Tuple(_) => "tuple",
            Value::List(_) => "list",
            Value::Dict(_) => "dict",
            Value::Global(..) => "global",
            Value::Storage { .. } => "storage",
            Value::Tensor(_) => "tensor",
            Value::Opaque => "object",
        }
    }

    fn as_ints(&self) -> Option<Vec<i64>> {
        match self {
            Value::Tuple(v) | Value::List(v) => {
                v.iter().map(|x| if let Value::Int(i) = x { Some(*i) } else { None }).collect()
            }
            _ => None,
        }
    }
}

fn storage_kind(name: &str) -> Option<Kind> {
    Some(match name {
        "FloatStorage" => Kind::Float,
        "DoubleStorage" => Kind::Double,
        "HalfStorage" => Kind::Half,
        "BFloat16Storage" => Kind::BFloat16,
        "LongStorage" => Kind::Int64,
        "IntStorage" => Kind::Int,
        "ShortStorage" => Kind::Int16,
        "CharStorage" => Kind::Int8,
        "ByteStorage" => Kind::Uint8,
        "BoolStorage" => Kind::Bool,
        _ => return None,
    })
}

/// A pickle machine over a byte slice that may hold several pickles in a row (the legacy
/// format). Memoised containers are snapshots: `torch.save` files never refer back to a dict
/// or list still being filled.
struct Unpickler<'a> {
    data: &'a [u8],
    pos: usize,
    stack: Vec<Value>,
    memo: HashMap<u32, Value>,
    /// Every storage met in a persistent id: key → (element type, elements).
    storages: HashMap<String, (Kind, i64)>,
}

type R<T> = Result<T, String>;

impl<'a> Unpickler<'a> {
    fn new(data: &'a [u8]) -> Self {
        Self { data, pos: 0, stack: Vec::new(), memo: HashMap::new(), storages: HashMap::new() }
    }

    fn take(&mut self, n: usize) -> R<&'a [u8]> {
        let end = self.pos.checked_add(n).filter(|&e| e <= self.data.len());
        let end = end.ok_or_else(|| format!("pickle truncated at byte {}", self.pos))?;
        let s = &self.data[self.pos..end];
        self.pos = end;
        Ok(s)
    }

    fn u8(&mut self) -> R<u8> {
        Ok(self.take(1)?[0])
    }

    fn u32(&mut self) -> R<u32> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into().expect("4 bytes")))
    }

    fn line(&mut self) -> R<String> {
        let rest = &self.data[self.pos..];
        let n = rest.iter().position(|&b| b == b'\n').ok_or("unterminated GLOBAL")?;
        let s = String::from_utf8_lossy(&rest[..n]).into_owned();
        self.pos += n + 1;
        Ok(s)
    }

    fn str(&mut self, n: usize) -> R<Value> {
        let b = self.take(n)?;
        Ok(Value::Str(String::from_utf8(b.to_vec()).map_err(|e| e.to_string())?))
    }

    fn pop(&mut self) -> R<Value> {
        self.stack.pop().ok_or_else(|| "pickle stack underflow".to_string())
    }

    fn pop_mark(&mut self) -> R<Vec<Value>> {
        let at = self.stack.iter().rposition(|v| matches!(v, Value::Mark)).ok_or("MARK missing")?;
        let items = self.stack.split_off(at + 1);
        self.stack.pop();
        Ok(items)
    }

    fn top_mut(&mut self) -> R<&mut Value> {
        self.stack.last_mut().ok_or_else(|| "pickle stack underflow".to_string())
    }

    /// Runs the pickle that starts at the current position, up to its STOP.
    fn next_pickle(&mut self) -> R<Value> {
        self.stack.clear();
        self.memo.clear();
        loop {
            let op = self.u8()?;
            match op {
                0x80 => {
                    self.u8()?; // PROTO
                }
                0x95 => {
                    self.take(8)?; // FRAME
                }
                b'.' => return self.pop(),
                b'(' => self.stack.push(Value::Mark),
                b'N' => self.stack.push(Value::None),
                0x88 | 0x89 => self.stack.push(Value::Bool(op == 0x88)),
                b'K' => {
                    let v = self.u8()?;
                    self.stack.push(Value::Int(v.into()))
                }
                b'M' => {
                    let b = self.take(2)?;
                    self.stack.push(Value::Int(u16::from_le_bytes([b[0], b[1]]).into()))
                }
                b'J' => {
                    let v = self.u32()? as i32;
                    self.stack.push(Value::Int(v.into()))
                }
                0x8a => {
                    let n = self.u8()? as usize;
                    let b = self.take(n)?;
                    let negative = b.last().is_some_and(|&x| x & 0x80 != 0);
                    if n > 8 && !negative && n <= 16 {
                        let mut buf = [0; 16];
                        buf[..n].copy_from_slice(b);
                        self.stack.push(Value::Long(u128::from_le_bytes(buf)))
                    } else if n > 8 {
                        return Err("an integer wider than 128 bits".into());
                    } else {
                        let mut buf = if negative { [0xff; 8] } else { [0; 8] };
                        buf[..n].copy_from_slice(b);
                        self.stack.push(Value::Int(i64::from_le_bytes(buf)))
                    }
                }
                b'G' => {
                    self.take(8)?;
                    self.stack.push(Value::Float)
                }
                b'X' => {
                    let n = self.u32()? as usize;
                    let v = self.str(n)?;
                    self.stack.push(v)
                }
                0x8c | b'U' => {
                    let n = self.u8()? as usize;
                    let v = self.str(n)?;
                    self.stack.push(v)
                }
                b'T' => {
                    let n = self.u32()? as usize;
                    let v = self.str(n)?;
                    self.stack.push(v)
                }
                b'B' | b'C' => {
                    let n = if op == b'B' { self.u32()? as usize } else { self.u8()? as usize };
                    self.take(n)?;
                    self.stack.push(Value::Bytes)
                }
                b'c' => {
                    let module = self.line()?;
                    let name = self.line()?;
                    self.stack.push(Value::Global(module, name))
                }
                0x93 => {
                    let name = self.pop()?;
                    let module = self.pop()?;
                    match (module, name) {
                        (Value::Str(m), Value::Str(n)) => self.stack.push(Value::Global(m, n)),
                        _ => return Err("STACK_GLOBAL needs two strings".into()),
                    }
                }
                b')' => self.stack.push(Value::Tuple(vec![])),
                b't' => {
                    let items = self.pop_mark()?;
                    self.stack.push(Value::Tuple(items))
                }
                0x85..=0x87 => {
                    let n = (op - 0x84) as usize;
                    if self.stack.len() < n {
                        return Err("pickle stack underflow".into());
                    }
                    let items = self.stack.split_off(self.stack.len() - n);
                    self.stack.push(Value::Tuple(items))
                }
                b']' => self.stack.push(Value::List(vec![])),
                b'}' => self.stack.push(Value::Dict(vec![])),
                b'a' => {
                    let v = self.pop()?;
                    if let Value::List(l) = self.top_mut()? {
                        l.push(v)
                    }
                }
                b'e' => {
                    let items = self.pop_mark()?;
                    if let Value::List(l) = self.top_mut()? {
                        l.extend(items)
                    }
                }
                b's' => {
                    let v = self.pop()?;
                    let k = self.pop()?;
                    if let Value::Dict(d) = self.top_mut()? {
                        d.push((k, v))
                    }
                }
                b'u' => {
                    let items = self.pop_mark()?;
                    if let Value::Dict(d) = self.top_mut()? {
                        let mut it = items.into_iter();
                        while let (Some(k), Some(v)) = (it.next(), it.next()) {
                            d.push((k, v));
                        }
                    }
                }
                b'q' => {
                    let i = self.u8()? as u32;
                    let top = self.top_mut()?.clone();
                    self.memo.insert(i, top);
                }
                b'r' => {
                    let i = self.u32()?;
                    let top = self.top_mut()?.clone();
                    self.memo.insert(i, top);
                }
                0x94 => {
                    let i = self.memo.len() as u32;
                    let top = self.top_mut()?.clone();
                    self.memo.insert(i, top);
                }
                b'h' | b'j' => {
                    let i = if op == b'h' { self.u8()? as u32 } else { self.u32()? };
                    let v = self.memo.get(&i).cloned().ok_or_else(|| format!("memo {i} unset"))?;
                    self.stack.push(v)
                }
                b'Q' => {
                    let pid = self.pop()?;
                    let storage = persistent_load(pid)?;
                    if let Value::Storage { kind, key, numel } = &storage {
                        self.storages.insert(key.clone(), (*kind, *numel));
                    }
                    self.stack.push(storage)
                }
                b'R' => {
                    let args = self.pop()?;
                    let f = self.pop()?;
                    self.stack.push(reduce(f, args)?)
                }
                0x81 => {
                    self.pop()?; // NEWOBJ: args, class; an object we keep opaque
                    self.pop()?;
                    self.stack.push(Value::Opaque)
                }
                b'b' => {
                    self.pop()?; // BUILD: state for an object we keep opaque
                }
                b'0' => {
                    self.pop()?;
                }
                other => {
                    return Err(format!(
                        "unsupported pickle opcode 0x{other:02x} at byte {}",
                        self.pos - 1
                    ));
                }
            }
        }
    }
}

/// A storage's persistent id: `('storage', <class>, key, location, numel)` in the zip format,
/// with a sixth item, the view metadata (`None` since torch 0.4), in the legacy one.
fn persistent_load(pid: Value) -> R<Value> {
    let Value::Tuple(items) = pid else {
        return Err("persistent id is not a tuple".into());
    };
    match items.as_slice() {
        [
            Value::Str(tag),
            Value::Global(_, class),
            Value::Str(key),
            _location,
            Value::Int(numel),
            view @ ..,
        ] if tag == "storage" => {
            if !matches!(view, [] | [Value::None]) {
                return Err(format!("storage {key} is a view of another (torch < 0.4)"));
            }
            let kind =
                storage_kind(class).ok_or_else(|| format!("unknown storage type {class}"))?;
            Ok(Value::Storage { kind, key: key.clone(), numel: *numel })
        }
        _ => Err("unsupported persistent id (expected a torch storage)".into()),
    }
}

fn reduce(f: Value, args: Value) -> R<Value> {
    let Value::Global(module, name) = &f else {
        return Ok(Value::Opaque);
    };
    match (module.as_str(), name.as_str()) {
        ("torch._utils", "_rebuild_tensor_v2") | ("torch._utils", "_rebuild_tensor") => {
            let Value::Tuple(a) = args else {
                return Err("_rebuild_tensor_v2 args are not a tuple".into());
            };
            let (Some(Value::Storage { kind, key, numel }), Some(Value::Int(offset))) =
                (a.first(), a.get(1))
            else {
                return Err(
                    "_rebuild_tensor_v2 expects (storage, offset, size, stride, ...)".into()
                );
            };
            let shape = a.get(2).and_then(Value::as_ints).ok_or("tensor size is not ints")?;
            let stride = a.get(3).and_then(Value::as_ints).ok_or("tensor stride is not ints")?;
            if shape.len() != stride.len() || shape.iter().any(|&s| s < 0) {
                return Err(format!("inconsistent tensor size {shape:?} / stride {stride:?}"));
            }
            // The last element touched must lie inside the storage.
            let extent: i64 = shape.iter().zip(&stride).map(|(s, st)| (s - 1).max(0) * st).sum();
            if shape.iter().all(|&s| s > 0) && offset + extent >= *numel {
                return Err(format!(
                    "tensor (offset {offset}, size {shape:?}, stride {stride:?}) overruns its \
                     storage of {numel} elements"
                ));
            }
            Ok(Value::Tensor(TensorRef {
                kind: *kind,
                key: key.clone(),
                storage_numel: *numel,
                offset: *offset,
                shape,
                stride,
            }))
        }
        // nn.Parameter (`state_dict(keep_vars=True)`, or a dict of parameters): its data.
        ("torch._utils", "_rebuild_parameter" | "_rebuild_parameter_with_state") => match args {
            Value::Tuple(a) if matches!(a.first(), Some(Value::Tensor(_))) => {
                Ok(a.into_iter().next().expect("checked"))
            }
            _ => Err("_rebuild_parameter expects (tensor, requires_grad, hooks)".into()),
        },
        // A state dict, and a tensor's (empty) backward hooks. Its items follow as SETITEMS,
        // and its `_metadata` attribute as BUILD, which leaves the dict as it is.
        ("collections", "OrderedDict") => Ok(Value::Dict(vec![])),
        _ => Ok(Value::Opaque),
    }
}
