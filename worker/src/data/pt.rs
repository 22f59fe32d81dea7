//! Reads a `torch.save` of one tensor (the zip format PyTorch has written since 1.6), as the
//! DanceGRPO and MindSpeed-MM preprocessing scripts leave them.
//!
//! Why not libtorch: checked on the golden files, tch's `Tensor::load` (`torch::load`, a
//! TorchScript archive reader) fails with "PytorchStreamReader failed locating file
//! constants.pkl", and `Tensor::loadz_multi` (`_load_parameters`) with "Expected GenericDict
//! but got Tensor"; libtorch's `pickle_load` would need a C++ shim of our own. No well-kept crate reads torch pickles without pulling a whole framework (candle,
//! burn), and `serde-pickle` has no persistent ids. The subset needed for one tensor is small:
//! `_rebuild_tensor_v2(storage, offset, size, stride, ...)` with the storage a persistent id
//! pointing at `data/<key>` in the zip. Reading only the pickle and the zip directory also
//! lets `dataset inspect` check a file without loading its data.

use std::fs::File;
use std::io::{BufReader, Read};
use std::path::{Path, PathBuf};

use tch::{Kind, Tensor};

/// What can be wrong with a `.pt` file.
#[derive(Debug, thiserror::Error)]
pub enum PtError {
    /// The file could not be opened or read.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// Not a readable zip (truncated, or the legacy non-zip format).
    #[error("{path}: not a torch.save zip archive (truncated or legacy format?): {message}")]
    Zip {
        /// The file.
        path: PathBuf,
        /// The zip reader's complaint.
        message: String,
    },
    /// The pickle inside is malformed or holds something other than one tensor.
    #[error("{path}: {message}")]
    Pickle {
        /// The file.
        path: PathBuf,
        /// What is wrong.
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
    /// Zip entry holding the storage bytes.
    storage_entry: String,
}

/// Reads the tensor's description and checks that its storage entry is present and large
/// enough, without reading the data.
pub fn read_info(path: &Path) -> Result<PtTensorInfo, PtError> {
    let mut zip = open_zip(path)?;
    let info = parse_info(path, &mut zip)?;
    let entry = zip.by_name(&info.storage_entry).map_err(|e| zip_err(path, e))?;
    let need = info.storage_numel as u64 * info.kind.elt_size_in_bytes() as u64;
    if entry.size() < need {
        return Err(pickle_err(
            path,
            format!("storage {} holds {} bytes, needs {need}", info.storage_entry, entry.size()),
        ));
    }
    Ok(info)
}

/// Loads the tensor (contiguous, on the CPU).
pub fn load(path: &Path) -> Result<Tensor, PtError> {
    let mut zip = open_zip(path)?;
    let info = parse_info(path, &mut zip)?;
    let mut entry = zip.by_name(&info.storage_entry).map_err(|e| zip_err(path, e))?;
    let need = info.storage_numel as usize * info.kind.elt_size_in_bytes();
    let mut bytes = Vec::with_capacity(need);
    entry.read_to_end(&mut bytes).map_err(|e| zip_err(path, zip::result::ZipError::Io(e)))?;
    if bytes.len() < need {
        return Err(pickle_err(
            path,
            format!("storage {} holds {} bytes, needs {need}", info.storage_entry, bytes.len()),
        ));
    }
    let storage = Tensor::f_from_data_size(&bytes[..need], &[info.storage_numel], info.kind)
        .map_err(|e| pickle_err(path, e.to_string()))?;
    storage
        .f_as_strided(&info.shape, &info.stride, Some(info.offset))
        .and_then(|t| t.f_contiguous())
        .map_err(|e| pickle_err(path, e.to_string()))
}

fn open_zip(path: &Path) -> Result<zip::ZipArchive<BufReader<File>>, PtError> {
    let f = File::open(path).map_err(|source| PtError::Io { path: path.to_owned(), source })?;
    zip::ZipArchive::new(BufReader::new(f)).map_err(|e| zip_err(path, e))
}

fn zip_err(path: &Path, e: zip::result::ZipError) -> PtError {
    PtError::Zip { path: path.to_owned(), message: e.to_string() }
}

fn pickle_err(path: &Path, message: String) -> PtError {
    PtError::Pickle { path: path.to_owned(), message }
}

fn parse_info(
    path: &Path,
    zip: &mut zip::ZipArchive<BufReader<File>>,
) -> Result<PtTensorInfo, PtError> {
    // The archive's folder is named after the file at save time; find it by its data.pkl.
    let pkl_name = zip
        .file_names()
        .find(|n| n.ends_with("data.pkl") && n.matches('/').count() == 1)
        .map(str::to_owned)
        .ok_or_else(|| pickle_err(path, "no <archive>/data.pkl entry".into()))?;
    let prefix = pkl_name.trim_end_matches("data.pkl").to_owned();
    if let Ok(mut bo) = zip.by_name(&format!("{prefix}byteorder")) {
        let mut s = String::new();
        let _ = bo.read_to_string(&mut s);
        if s.trim() != "little" {
            return Err(pickle_err(path, format!("byte order {s:?} is not supported")));
        }
    }
    let mut pkl = Vec::new();
    zip.by_name(&pkl_name)
        .and_then(|mut e| e.read_to_end(&mut pkl).map_err(zip::result::ZipError::Io))
        .map_err(|e| zip_err(path, e))?;
    let value = Unpickler::new(&pkl).run().map_err(|m| pickle_err(path, m))?;
    let t = match value {
        Value::Tensor(t) => t,
        other => {
            return Err(pickle_err(
                path,
                format!("expected one tensor at the root, found {}", other.kind_name()),
            ));
        }
    };
    Ok(PtTensorInfo {
        kind: t.kind,
        shape: t.shape,
        stride: t.stride,
        offset: t.offset,
        storage_numel: t.storage_numel,
        storage_entry: format!("{prefix}data/{}", t.key),
    })
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

/// The pickle values a tensor file uses.
#[derive(Debug, Clone)]
enum Value {
    Mark,
    None,
    Bool,
    Int(i64),
    Float,
    Str(String),
    Tuple(Vec<Value>),
    List(Vec<Value>),
    Dict(Vec<(Value, Value)>),
    Global(String, String),
    Storage {
        kind: Kind,
        key: String,
        numel: i64,
    },
    Tensor(TensorRef),
    /// A call we do not interpret (its result is never needed for a bare tensor).
    Opaque,
}

impl Value {
    fn kind_name(&self) -> &'static str {
        match self {
            Value::Mark => "mark",
            Value::None => "None",
            Value::Bool => "bool",
            Value::Int(_) => "int",
            Value::Float => "float",
            Value::Str(_) => "str",
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

struct Unpickler<'a> {
    data: &'a [u8],
    pos: usize,
    stack: Vec<Value>,
    memo: std::collections::HashMap<u32, Value>,
}

type R<T> = Result<T, String>;

impl<'a> Unpickler<'a> {
    fn new(data: &'a [u8]) -> Self {
        Self { data, pos: 0, stack: Vec::new(), memo: Default::default() }
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

    fn run(mut self) -> R<Value> {
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
                0x88 | 0x89 => self.stack.push(Value::Bool),
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
                    if n > 8 {
                        return Err("LONG1 wider than 64 bits".into());
                    }
                    let mut buf =
                        if b.last().is_some_and(|&x| x & 0x80 != 0) { [0xff; 8] } else { [0; 8] };
                    buf[..n].copy_from_slice(b);
                    self.stack.push(Value::Int(i64::from_le_bytes(buf)))
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
                    self.stack.push(persistent_load(pid)?)
                }
                b'R' => {
                    let args = self.pop()?;
                    let f = self.pop()?;
                    self.stack.push(reduce(f, args)?)
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
        ] if tag == "storage" => {
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
        ("collections", "OrderedDict") => Ok(Value::Dict(vec![])),
        _ => Ok(Value::Opaque),
    }
}
