//! Errors from reading or writing GGUF: each names what was wrong, where
//! (key, tensor, byte offset) and, where it helps, what to do.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum GgufError {
    #[error("cannot {action} {path}: {source}")]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("not a GGUF file: the first bytes are {found:02x?}, expected \"GGUF\" (47 47 55 46)")]
    BadMagic { found: Vec<u8> },
    #[error("unsupported GGUF version {version} at offset 4: lfmd reads versions 2 and 3{hint}")]
    UnsupportedVersion { version: u32, hint: &'static str },
    #[error(
        "file ends early at offset {offset}: {what} needs {needed} bytes but {available} remain (truncated download?)"
    )]
    Truncated {
        what: String,
        offset: u64,
        needed: u64,
        available: u64,
    },
    #[error("header at offset {offset}: {reason}")]
    Header { offset: u64, reason: String },
    #[error("metadata key {key:?} at offset {offset}: {reason}")]
    Metadata {
        key: String,
        offset: u64,
        reason: String,
    },
    #[error("tensor {name:?} (tensor info at offset {offset}): {reason}")]
    Tensor {
        name: String,
        offset: u64,
        reason: String,
    },
    #[error("writing GGUF: {0}")]
    Write(String),
}

impl GgufError {
    pub(crate) fn io(
        action: &'static str,
        path: impl Into<PathBuf>,
        source: std::io::Error,
    ) -> Self {
        GgufError::Io {
            action,
            path: path.into(),
            source,
        }
    }
}
