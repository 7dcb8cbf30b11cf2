//! A streaming GGUF writer: the header and tensor-info table go out first,
//! then each tensor's data in table order, in as many chunks as the caller
//! likes, so a multi-gigabyte model never has to be held in memory.

use super::error::GgufError;
use super::types::GgmlType;
use super::value::{Array, Value};
use super::{DEFAULT_ALIGNMENT, MAGIC};
use std::io::Write;

/// A tensor to be written: name, ggml-order dimensions, type.
#[derive(Clone, Debug, PartialEq)]
pub struct TensorSpec {
    pub name: String,
    pub dims: Vec<u64>,
    pub ty: GgmlType,
}

impl TensorSpec {
    pub fn new(name: impl Into<String>, dims: &[u64], ty: GgmlType) -> Self {
        TensorSpec {
            name: name.into(),
            dims: dims.to_vec(),
            ty,
        }
    }

    pub fn n_elements(&self) -> u64 {
        self.dims.iter().product()
    }

    /// Bytes of data, or `None` when the shape does not fit the type's blocks.
    pub fn size(&self) -> Option<u64> {
        if self
            .dims
            .first()
            .is_none_or(|d| d % self.ty.block_size() != 0)
        {
            return None;
        }
        self.ty.bytes_for(self.n_elements())
    }
}

/// Writes one GGUF file (version 3) to `W`.
pub struct GgufWriter<W: Write> {
    out: W,
    specs: Vec<TensorSpec>,
    sizes: Vec<u64>,
    alignment: u64,
    /// Bytes written so far.
    pos: u64,
    /// Index of the tensor whose data is being written.
    current: usize,
    /// Bytes of the current tensor written so far.
    current_written: u64,
}

impl<W: Write> GgufWriter<W> {
    /// Writes the header, the metadata and the tensor-info table. The tensors'
    /// data must then follow, in the order of `tensors`.
    pub fn new(
        out: W,
        metadata: &[(String, Value)],
        tensors: Vec<TensorSpec>,
    ) -> Result<Self, GgufError> {
        let alignment = match metadata.iter().find(|(k, _)| k == "general.alignment") {
            None => DEFAULT_ALIGNMENT,
            Some((_, Value::U32(a))) if a.is_power_of_two() => u64::from(*a),
            Some((_, v)) => {
                return Err(GgufError::Write(format!(
                    "general.alignment must be a u32 power of two, not {v}"
                )));
            }
        };
        let mut sizes = Vec::with_capacity(tensors.len());
        for t in &tensors {
            let size = t.size().ok_or_else(|| {
                GgufError::Write(format!(
                    "tensor {:?}: shape {:?} does not fit {} blocks of {}",
                    t.name,
                    t.dims,
                    t.ty,
                    t.ty.block_size()
                ))
            })?;
            if t.dims.is_empty() || t.dims.len() > super::MAX_DIMS || t.dims.contains(&0) {
                return Err(GgufError::Write(format!(
                    "tensor {:?}: shape {:?} must have 1 to {} non-zero dimensions",
                    t.name,
                    t.dims,
                    super::MAX_DIMS
                )));
            }
            sizes.push(size);
        }
        let mut w = GgufWriter {
            out,
            specs: tensors,
            sizes,
            alignment,
            pos: 0,
            current: 0,
            current_written: 0,
        };
        let mut head = Vec::new();
        head.extend_from_slice(&MAGIC.to_le_bytes());
        head.extend_from_slice(&3u32.to_le_bytes());
        head.extend_from_slice(&(w.specs.len() as u64).to_le_bytes());
        head.extend_from_slice(&(metadata.len() as u64).to_le_bytes());
        for (k, v) in metadata {
            put_string(&mut head, k);
            head.extend_from_slice(&(v.value_type() as u32).to_le_bytes());
            put_value(&mut head, v);
        }
        let mut offset = 0u64;
        for (t, &size) in w.specs.iter().zip(&w.sizes) {
            put_string(&mut head, &t.name);
            head.extend_from_slice(&(t.dims.len() as u32).to_le_bytes());
            for d in &t.dims {
                head.extend_from_slice(&d.to_le_bytes());
            }
            head.extend_from_slice(&t.ty.id().to_le_bytes());
            head.extend_from_slice(&offset.to_le_bytes());
            offset = (offset + size).div_ceil(alignment) * alignment;
        }
        w.emit(&head)?;
        w.pad()?;
        Ok(w)
    }

    fn emit(&mut self, bytes: &[u8]) -> Result<(), GgufError> {
        self.out
            .write_all(bytes)
            .map_err(|e| GgufError::Write(format!("at byte {}: {e}", self.pos)))?;
        self.pos += bytes.len() as u64;
        Ok(())
    }

    fn pad(&mut self) -> Result<(), GgufError> {
        let target = self.pos.div_ceil(self.alignment) * self.alignment;
        let zeros = vec![0u8; (target - self.pos) as usize];
        self.emit(&zeros)
    }

    /// The tensor whose data comes next, if any.
    pub fn next_tensor(&self) -> Option<&TensorSpec> {
        self.specs.get(self.current)
    }

    /// Appends data for the current tensor. A tensor may arrive in several
    /// chunks; a chunk never spans two tensors.
    pub fn write_data(&mut self, chunk: &[u8]) -> Result<(), GgufError> {
        let Some(spec) = self.specs.get(self.current) else {
            return Err(GgufError::Write(format!(
                "{} bytes of data after the last tensor",
                chunk.len()
            )));
        };
        let left = self.sizes[self.current] - self.current_written;
        if chunk.len() as u64 > left {
            return Err(GgufError::Write(format!(
                "tensor {:?}: chunk of {} bytes but only {left} remain of its {}",
                spec.name,
                chunk.len(),
                self.sizes[self.current]
            )));
        }
        self.emit(chunk)?;
        self.current_written += chunk.len() as u64;
        if self.current_written == self.sizes[self.current] {
            self.pad()?;
            self.current += 1;
            self.current_written = 0;
        }
        Ok(())
    }

    /// Bytes written so far (the file size once all data is in).
    pub fn bytes_written(&self) -> u64 {
        self.pos
    }

    /// Checks that every tensor was written completely and flushes.
    pub fn finish(mut self) -> Result<W, GgufError> {
        if let Some(spec) = self.specs.get(self.current) {
            return Err(GgufError::Write(format!(
                "tensor {:?} is missing {} of its {} bytes",
                spec.name,
                self.sizes[self.current] - self.current_written,
                self.sizes[self.current]
            )));
        }
        self.out
            .flush()
            .map_err(|e| GgufError::Write(format!("flush: {e}")))?;
        Ok(self.out)
    }
}

fn put_string(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u64).to_le_bytes());
    out.extend_from_slice(s.as_bytes());
}

fn put_value(out: &mut Vec<u8>, v: &Value) {
    match v {
        Value::U8(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::I8(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::U16(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::I16(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::U32(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::I32(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::F32(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::U64(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::I64(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::F64(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::Bool(x) => out.push(u8::from(*x)),
        Value::String(s) => put_string(out, s),
        Value::Array(a) => put_array(out, a),
    }
}

fn put_array(out: &mut Vec<u8>, a: &Array) {
    out.extend_from_slice(&(a.elem_type() as u32).to_le_bytes());
    out.extend_from_slice(&(a.len() as u64).to_le_bytes());
    macro_rules! each {
        ($v:expr) => {
            for x in $v {
                out.extend_from_slice(&x.to_le_bytes());
            }
        };
    }
    match a {
        Array::U8(v) => out.extend_from_slice(v),
        Array::I8(v) => each!(v),
        Array::U16(v) => each!(v),
        Array::I16(v) => each!(v),
        Array::U32(v) => each!(v),
        Array::I32(v) => each!(v),
        Array::F32(v) => each!(v),
        Array::U64(v) => each!(v),
        Array::I64(v) => each!(v),
        Array::F64(v) => each!(v),
        Array::Bool(v) => out.extend(v.iter().map(|&b| u8::from(b))),
        Array::String(v) => v.iter().for_each(|s| put_string(out, s)),
        Array::Array(v) => v.iter().for_each(|inner| put_array(out, inner)),
    }
}
