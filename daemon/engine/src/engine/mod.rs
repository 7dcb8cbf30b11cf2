//! The inference engine: a forward pass over weights read straight from the
//! GGUF mapping, for `lfm2` and `lfm2moe`, batching several independent
//! sequences (each with its own KV cache and conv state) in one call.
//!
//! The engine owns no threads but its compute pool's and the expert pager's
//! I/O thread, and never awaits: callers (the CLI, the scheduler thread)
//! drive it.

mod blocks;
mod forward;
mod ops;
pub mod paging;
mod scratch;
mod state;
mod weights;

pub use forward::{BatchItem, ForwardStats, LogitsWanted, weight_type};
pub use paging::{Budget, PagingMonitor, PagingOptions, PagingStats};
pub use state::{SeqState, StateError, StateSegment};
pub use weights::{EngineError, EngineOptions, Model, SUPPORTED_TYPES};
