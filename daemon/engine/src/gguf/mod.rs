//! GGUF: the file format of llama.cpp models, read zero-copy from a memory
//! mapping and written as a stream.
//!
//! The reader validates everything it will later rely on before any tensor
//! byte is touched: header, counts against the file size, every string and
//! array length, every tensor's shape, type and extent. After `Gguf::open`
//! succeeds, slicing a tensor's bytes cannot go out of bounds.

mod error;
mod reader;
mod residency;
/// The system's page size (the unit of residency and of expert paging).
pub use residency::page_size;
mod types;
mod value;
mod writer;

#[cfg(test)]
mod tests;

pub use error::GgufError;
pub use reader::{Gguf, GgufHeader, MetaEntry, TensorInfo, parse_header, parse_header_prefix};
pub use types::GgmlType;
pub use value::{Array, Value, ValueType};
pub use writer::{GgufWriter, TensorSpec};

/// `"GGUF"` read as a little-endian u32.
pub const MAGIC: u32 = 0x4655_4747;
/// Alignment of the tensor data when `general.alignment` is absent.
pub const DEFAULT_ALIGNMENT: u64 = 32;
/// ggml's limit on tensor dimensions.
pub const MAX_DIMS: usize = 4;
/// How deep arrays of arrays may nest before we call the file hostile.
pub const MAX_ARRAY_DEPTH: usize = 8;
