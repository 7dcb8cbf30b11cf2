//! The GGUF reader: a bounds-checked parse of header, metadata and tensor
//! infos over a byte slice, and [`Gguf`], which holds the memory mapping the
//! slice comes from.

use super::error::GgufError;
use super::types::GgmlType;
use super::value::{Array, Value, ValueType};
use super::{DEFAULT_ALIGNMENT, MAGIC, MAX_ARRAY_DEPTH, MAX_DIMS};
use std::collections::HashMap;
use std::ops::{Deref, Range};
use std::path::{Path, PathBuf};

/// One tensor's description from the file's tensor-info table.
#[derive(Clone, Debug, PartialEq)]
pub struct TensorInfo {
    pub name: String,
    /// Dimensions in ggml order: `dims[0]` is the length of a row (the
    /// contiguous axis), so a PyTorch `[out, in]` weight appears as `[in, out]`.
    pub dims: Vec<u64>,
    pub ty: GgmlType,
    /// Offset of the data from the start of the data section.
    pub offset: u64,
    /// Bytes of tensor data.
    pub size: u64,
    /// Where this tensor's info record starts in the file (for messages).
    pub info_offset: u64,
}

impl TensorInfo {
    pub fn n_elements(&self) -> u64 {
        // Validated at parse time not to overflow.
        self.dims.iter().product()
    }

    /// Bytes of one row (`dims[0]` elements).
    pub fn row_bytes(&self) -> u64 {
        self.dims[0] / self.ty.block_size() * self.ty.type_size()
    }
}

/// A metadata entry with the file offset of its key (for messages).
#[derive(Clone, Debug, PartialEq)]
pub struct MetaEntry {
    pub key: String,
    pub value: Value,
    pub offset: u64,
}

/// Everything in a GGUF file but the tensor data.
#[derive(Clone, Debug)]
pub struct GgufHeader {
    pub version: u32,
    /// Metadata in file order.
    pub metadata: Vec<MetaEntry>,
    pub tensors: Vec<TensorInfo>,
    pub alignment: u64,
    /// Absolute file offset where tensor data begins.
    pub data_offset: u64,
    pub file_len: u64,
    meta_index: HashMap<String, usize>,
    tensor_index: HashMap<String, usize>,
}

impl GgufHeader {
    pub fn get(&self, key: &str) -> Option<&Value> {
        self.meta_index.get(key).map(|&i| &self.metadata[i].value)
    }

    pub fn entry(&self, key: &str) -> Option<&MetaEntry> {
        self.meta_index.get(key).map(|&i| &self.metadata[i])
    }

    pub fn tensor(&self, name: &str) -> Option<&TensorInfo> {
        self.tensor_index.get(name).map(|&i| &self.tensors[i])
    }

    /// The absolute byte range of a tensor's data in the file.
    pub fn file_range(&self, t: &TensorInfo) -> Range<u64> {
        let start = self.data_offset + t.offset;
        start..start + t.size
    }

    /// `general.architecture`, if present and a string.
    pub fn architecture(&self) -> Option<&str> {
        self.get("general.architecture").and_then(Value::as_str)
    }
}

/// Bytes behind a [`Gguf`]: a read-only mapping of the file, or an owned
/// buffer (tests, fuzzing, files too small to map).
enum Backing {
    Map(memmap2::Mmap),
    Owned(Vec<u8>),
}

/// A validated GGUF file held in memory (normally mapped, zero-copy).
///
/// Models must be replaced by rename, never rewritten in place: the mapping
/// keeps the old inode alive, but a file truncated under it would fault.
pub struct Gguf {
    backing: Backing,
    /// The open file behind a mapping (readahead and fadvise need it).
    pub(super) file: Option<std::fs::File>,
    header: GgufHeader,
    path: Option<PathBuf>,
}

impl Gguf {
    /// Maps and validates the file at `path`.
    pub fn open(path: impl AsRef<Path>) -> Result<Self, GgufError> {
        let path = path.as_ref();
        let file = std::fs::File::open(path).map_err(|e| GgufError::io("open", path, e))?;
        let meta = file
            .metadata()
            .map_err(|e| GgufError::io("stat", path, e))?;
        if !meta.is_file() {
            return Err(GgufError::io(
                "map",
                path,
                std::io::Error::new(std::io::ErrorKind::InvalidInput, "not a regular file"),
            ));
        }
        let backing = if meta.len() == 0 {
            Backing::Owned(Vec::new())
        } else {
            // SAFETY: the mapping is read-only (PROT_READ, MAP_SHARED: the
            // page cache's pages, shared with every reader of the file). Its
            // contents change only if someone writes the file in place, which
            // is documented as unsupported (replace it by rename: the mapping
            // keeps the old inode). Every access goes through bounds
            // validated against the mapped length, fixed at map time.
            let map =
                unsafe { memmap2::Mmap::map(&file) }.map_err(|e| GgufError::io("map", path, e))?;
            Backing::Map(map)
        };
        let header = parse_header(backing_bytes(&backing))?;
        Ok(Gguf {
            file: matches!(backing, Backing::Map(_)).then_some(file),
            backing,
            header,
            path: Some(path.to_owned()),
        })
    }

    /// Validates a GGUF image held in memory.
    pub fn from_bytes(bytes: Vec<u8>) -> Result<Self, GgufError> {
        let header = parse_header(&bytes)?;
        Ok(Gguf {
            file: None,
            backing: Backing::Owned(bytes),
            header,
            path: None,
        })
    }

    pub fn header(&self) -> &GgufHeader {
        &self.header
    }

    pub fn path(&self) -> Option<&Path> {
        self.path.as_deref()
    }

    /// The whole file.
    pub fn bytes(&self) -> &[u8] {
        backing_bytes(&self.backing)
    }

    /// The mapping, when the file is mapped (for madvise and residency).
    pub fn mmap(&self) -> Option<&memmap2::Mmap> {
        match &self.backing {
            Backing::Map(m) => Some(m),
            Backing::Owned(_) => None,
        }
    }

    /// A tensor's data. In bounds by construction: every extent was checked
    /// against the file length when the header was parsed.
    pub fn tensor_data(&self, t: &TensorInfo) -> &[u8] {
        let r = self.header.file_range(t);
        &self.bytes()[r.start as usize..r.end as usize]
    }
}

impl Deref for Gguf {
    type Target = GgufHeader;
    fn deref(&self) -> &GgufHeader {
        &self.header
    }
}

fn backing_bytes(b: &Backing) -> &[u8] {
    match b {
        Backing::Map(m) => m,
        Backing::Owned(v) => v,
    }
}

struct Cursor<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    fn remaining(&self) -> u64 {
        (self.buf.len() - self.pos) as u64
    }

    fn take(&mut self, n: u64, what: &dyn Fn() -> String) -> Result<&'a [u8], GgufError> {
        if n > self.remaining() {
            return Err(GgufError::Truncated {
                what: what(),
                offset: self.pos as u64,
                needed: n,
                available: self.remaining(),
            });
        }
        let s = &self.buf[self.pos..self.pos + n as usize];
        self.pos += n as usize;
        Ok(s)
    }

    fn array<const N: usize>(&mut self, what: &dyn Fn() -> String) -> Result<[u8; N], GgufError> {
        let s = self.take(N as u64, what)?;
        Ok(s.try_into().expect("take returned N bytes"))
    }

    fn u32(&mut self, what: &dyn Fn() -> String) -> Result<u32, GgufError> {
        Ok(u32::from_le_bytes(self.array(what)?))
    }

    fn u64(&mut self, what: &dyn Fn() -> String) -> Result<u64, GgufError> {
        Ok(u64::from_le_bytes(self.array(what)?))
    }

    /// A GGUF string: u64 length, then that many bytes of UTF-8.
    fn string(&mut self, what: &dyn Fn() -> String) -> Result<Result<String, String>, GgufError> {
        let at = self.pos;
        let len = self.u64(what)?;
        let bytes = self.take(len, what)?;
        Ok(String::from_utf8(bytes.to_vec()).map_err(|e| {
            format!(
                "string at offset {at} is not valid UTF-8 (bad byte at index {})",
                e.utf8_error().valid_up_to()
            )
        }))
    }
}

/// Parses and validates everything but the tensor data of a GGUF image.
pub fn parse_header(buf: &[u8]) -> Result<GgufHeader, GgufError> {
    parse_header_prefix(buf, buf.len() as u64)
}

/// Parses a header from the first bytes of a file of `file_len` bytes: the
/// tensor extents are checked against `file_len`, the data is never read.
pub fn parse_header_prefix(buf: &[u8], file_len: u64) -> Result<GgufHeader, GgufError> {
    let mut c = Cursor { buf, pos: 0 };
    let magic_bytes = buf.get(..4).unwrap_or(buf);
    if magic_bytes.len() < 4
        || u32::from_le_bytes(magic_bytes.try_into().unwrap_or([0; 4])) != MAGIC
    {
        return Err(GgufError::BadMagic {
            found: magic_bytes.to_vec(),
        });
    }
    c.pos = 4;
    let version = c.u32(&|| "the version".into())?;
    match version {
        2 | 3 => {}
        1 => {
            return Err(GgufError::UnsupportedVersion {
                version,
                hint: "; version 1 files predate 2023-10: convert the model again with current llama.cpp",
            });
        }
        v if v.swap_bytes() == 2 || v.swap_bytes() == 3 => {
            return Err(GgufError::UnsupportedVersion {
                version,
                hint: " (this looks like a big-endian file; lfmd reads little-endian GGUF only)",
            });
        }
        _ => return Err(GgufError::UnsupportedVersion { version, hint: "" }),
    }
    let n_tensors = c.u64(&|| "the tensor count".into())?;
    let n_kv = c.u64(&|| "the metadata count".into())?;

    // Smallest possible records: a key-value pair is an 8-byte key length,
    // a 4-byte type and a 1-byte value; a tensor info is an 8-byte name
    // length, 4-byte n_dims, one 8-byte dim, 4-byte type and 8-byte offset.
    let room = c.remaining();
    if n_kv > room / 13 {
        return Err(GgufError::Header {
            offset: 16,
            reason: format!("metadata count {n_kv} cannot fit in the {room} bytes that follow"),
        });
    }
    if n_tensors > room / 32 {
        return Err(GgufError::Header {
            offset: 8,
            reason: format!("tensor count {n_tensors} cannot fit in the {room} bytes that follow"),
        });
    }

    let mut metadata = Vec::with_capacity(n_kv as usize);
    let mut meta_index = HashMap::with_capacity(n_kv as usize);
    for i in 0..n_kv {
        let offset = c.pos as u64;
        let key = c
            .string(&|| format!("the key of metadata entry {i}"))?
            .map_err(|reason| GgufError::Header {
                offset,
                reason: format!("key of metadata entry {i}: {reason}"),
            })?;
        let kctx = |k: &str| {
            let k = k.to_owned();
            move || format!("the value of metadata key {k:?}")
        };
        let what = kctx(&key);
        let ty_at = c.pos as u64;
        let ty_id = c.u32(&what)?;
        let ty = ValueType::from_id(ty_id).ok_or_else(|| GgufError::Metadata {
            key: key.clone(),
            offset: ty_at,
            reason: format!("unknown value type {ty_id} (known: 0..=12)"),
        })?;
        let value = read_value(&mut c, ty, 0, &key, &what)?;
        if meta_index.insert(key.clone(), metadata.len()).is_some() {
            return Err(GgufError::Metadata {
                key,
                offset,
                reason: "key appears twice".into(),
            });
        }
        metadata.push(MetaEntry { key, value, offset });
    }

    let alignment = match meta_index.get("general.alignment").map(|&i| &metadata[i]) {
        None => DEFAULT_ALIGNMENT,
        Some(MetaEntry {
            value: Value::U32(a),
            ..
        }) if a.is_power_of_two() => u64::from(*a),
        Some(e) => {
            return Err(GgufError::Metadata {
                key: e.key.clone(),
                offset: e.offset,
                reason: format!(
                    "must be a u32 power of two, found {} {}",
                    e.value.value_type().name(),
                    e.value
                ),
            });
        }
    };

    let mut tensors = Vec::with_capacity(n_tensors as usize);
    let mut tensor_index = HashMap::with_capacity(n_tensors as usize);
    for i in 0..n_tensors {
        let info_offset = c.pos as u64;
        let name = c
            .string(&|| format!("the name of tensor info {i}"))?
            .map_err(|reason| GgufError::Header {
                offset: info_offset,
                reason: format!("name of tensor {i}: {reason}"),
            })?;
        let terr = |reason: String| GgufError::Tensor {
            name: name.clone(),
            offset: info_offset,
            reason,
        };
        let what = || format!("the info of tensor {name:?}");
        let n_dims = c.u32(&what)?;
        if n_dims == 0 || n_dims as usize > MAX_DIMS {
            return Err(terr(format!(
                "has {n_dims} dimensions; ggml tensors have 1 to {MAX_DIMS}"
            )));
        }
        let mut dims = Vec::with_capacity(n_dims as usize);
        for _ in 0..n_dims {
            dims.push(c.u64(&what)?);
        }
        let ty_id = c.u32(&what)?;
        let offset = c.u64(&what)?;
        if let Some(d) = dims.iter().position(|&d| d == 0) {
            return Err(terr(format!("dimension {d} of {dims:?} is zero")));
        }
        let n_elements = dims
            .iter()
            .try_fold(1u64, |acc, &d| acc.checked_mul(d))
            .filter(|&n| n <= i64::MAX as u64)
            .ok_or_else(|| {
                terr(format!(
                    "shape {dims:?} has more elements than fit in 63 bits"
                ))
            })?;
        let ty = match GgmlType::from_id(ty_id) {
            Some(t) => t,
            None => {
                return Err(terr(match GgmlType::removed_name(ty_id) {
                    Some(old) => format!(
                        "uses ggml type {old} (id {ty_id}), which ggml removed; requantize the model with current llama.cpp"
                    ),
                    None => {
                        format!("unknown ggml type id {ty_id}; this file may need a newer lfmd")
                    }
                }));
            }
        };
        if dims[0] % ty.block_size() != 0 {
            return Err(terr(format!(
                "row length {} is not a multiple of the {} block size {}",
                dims[0],
                ty,
                ty.block_size()
            )));
        }
        let size = ty
            .bytes_for(n_elements)
            .ok_or_else(|| terr(format!("byte size of {n_elements} {ty} elements overflows")))?;
        if offset % alignment != 0 {
            return Err(terr(format!(
                "data offset {offset} is not a multiple of the alignment {alignment}"
            )));
        }
        if tensor_index.insert(name.clone(), tensors.len()).is_some() {
            return Err(terr("tensor name appears twice".into()));
        }
        tensors.push(TensorInfo {
            name,
            dims,
            ty,
            offset,
            size,
            info_offset,
        });
    }

    let data_offset = (c.pos as u64).div_ceil(alignment) * alignment;
    for t in &tensors {
        let end = data_offset
            .checked_add(t.offset)
            .and_then(|s| s.checked_add(t.size));
        match end {
            Some(end) if end <= file_len => {}
            _ => {
                return Err(GgufError::Tensor {
                    name: t.name.clone(),
                    offset: t.info_offset,
                    reason: format!(
                        "data [{} + {}, {} bytes) extends past the end of the file ({} bytes); the file is truncated or corrupt",
                        data_offset, t.offset, t.size, file_len
                    ),
                });
            }
        }
    }

    Ok(GgufHeader {
        version,
        metadata,
        tensors,
        alignment,
        data_offset,
        file_len,
        meta_index,
        tensor_index,
    })
}

fn read_value(
    c: &mut Cursor<'_>,
    ty: ValueType,
    depth: usize,
    key: &str,
    what: &dyn Fn() -> String,
) -> Result<Value, GgufError> {
    let merr = |offset: usize, reason: String| GgufError::Metadata {
        key: key.to_owned(),
        offset: offset as u64,
        reason,
    };
    let at = c.pos;
    Ok(match ty {
        ValueType::U8 => Value::U8(u8::from_le_bytes(c.array(what)?)),
        ValueType::I8 => Value::I8(i8::from_le_bytes(c.array(what)?)),
        ValueType::U16 => Value::U16(u16::from_le_bytes(c.array(what)?)),
        ValueType::I16 => Value::I16(i16::from_le_bytes(c.array(what)?)),
        ValueType::U32 => Value::U32(u32::from_le_bytes(c.array(what)?)),
        ValueType::I32 => Value::I32(i32::from_le_bytes(c.array(what)?)),
        ValueType::F32 => Value::F32(f32::from_le_bytes(c.array(what)?)),
        ValueType::U64 => Value::U64(u64::from_le_bytes(c.array(what)?)),
        ValueType::I64 => Value::I64(i64::from_le_bytes(c.array(what)?)),
        ValueType::F64 => Value::F64(f64::from_le_bytes(c.array(what)?)),
        ValueType::Bool => match c.array::<1>(what)?[0] {
            0 => Value::Bool(false),
            1 => Value::Bool(true),
            b => return Err(merr(at, format!("bool byte is {b}, expected 0 or 1"))),
        },
        ValueType::String => Value::String(c.string(what)?.map_err(|r| merr(at, r))?),
        ValueType::Array => Value::Array(read_array(c, depth + 1, key, what)?),
    })
}

fn read_array(
    c: &mut Cursor<'_>,
    depth: usize,
    key: &str,
    what: &dyn Fn() -> String,
) -> Result<Array, GgufError> {
    let merr = |offset: usize, reason: String| GgufError::Metadata {
        key: key.to_owned(),
        offset: offset as u64,
        reason,
    };
    let at = c.pos;
    if depth > MAX_ARRAY_DEPTH {
        return Err(merr(
            at,
            format!("arrays nest deeper than {MAX_ARRAY_DEPTH} levels"),
        ));
    }
    let elem_id = c.u32(what)?;
    let elem = ValueType::from_id(elem_id)
        .ok_or_else(|| merr(at, format!("array of unknown value type {elem_id}")))?;
    let n = c.u64(what)?;
    if n > c.remaining() / elem.min_encoded_size() {
        return Err(merr(
            at,
            format!(
                "array of {n} {} elements cannot fit in the {} bytes that remain",
                elem.name(),
                c.remaining()
            ),
        ));
    }
    let n = n as usize;
    macro_rules! fixed {
        ($variant:ident, $t:ty) => {{
            let bytes = c.take((n * size_of::<$t>()) as u64, what)?;
            Array::$variant(
                bytes
                    .chunks_exact(size_of::<$t>())
                    .map(|b| <$t>::from_le_bytes(b.try_into().expect("chunk size")))
                    .collect(),
            )
        }};
    }
    Ok(match elem {
        ValueType::U8 => fixed!(U8, u8),
        ValueType::I8 => fixed!(I8, i8),
        ValueType::U16 => fixed!(U16, u16),
        ValueType::I16 => fixed!(I16, i16),
        ValueType::U32 => fixed!(U32, u32),
        ValueType::I32 => fixed!(I32, i32),
        ValueType::F32 => fixed!(F32, f32),
        ValueType::U64 => fixed!(U64, u64),
        ValueType::I64 => fixed!(I64, i64),
        ValueType::F64 => fixed!(F64, f64),
        ValueType::Bool => {
            let bytes = c.take(n as u64, what)?;
            let mut v = Vec::with_capacity(n);
            for (i, &b) in bytes.iter().enumerate() {
                match b {
                    0 => v.push(false),
                    1 => v.push(true),
                    _ => {
                        return Err(merr(
                            at + 12 + i,
                            format!("bool array element {i} is {b}, expected 0 or 1"),
                        ));
                    }
                }
            }
            Array::Bool(v)
        }
        ValueType::String => {
            let mut v = Vec::with_capacity(n);
            for _ in 0..n {
                let s_at = c.pos;
                v.push(c.string(what)?.map_err(|r| merr(s_at, r))?);
            }
            Array::String(v)
        }
        ValueType::Array => {
            let mut v = Vec::with_capacity(n);
            for _ in 0..n {
                v.push(read_array(c, depth + 1, key, what)?);
            }
            Array::Array(v)
        }
    })
}
