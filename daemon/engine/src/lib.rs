//! lfm-engine: everything that runs a model and nothing that serves one.
//!
//! The GGUF reader and writer over a memory mapping (`gguf`), the model
//! description (`model`), the tokenizer and chat templates (`tokenizer`,
//! `chat`), sampling and stop strings (`sampler`, `stop`), a generating
//! sequence (`sequence`), the forward pass with its expert paging and
//! scratch buffers (`engine`), the synthetic model writer used by tests and
//! benchmarks (`synth`), and the offline reports built on them (`inspect`,
//! `bench`). The daemon (`lfmd`: scheduler, configuration, gRPC and D-Bus
//! edges, systemd) depends on this crate; this crate depends on the kernels
//! (`lfm-kernels`) and on no async runtime, RPC or bus crate.

pub mod bench;
pub mod chat;
pub mod constraint;
pub mod engine;
pub mod gguf;
pub mod inspect;
pub mod log;
pub mod model;
pub mod procstat;
pub mod rng;
pub mod sampler;
pub mod sequence;
pub mod stop;
pub mod synth;
pub mod tokenizer;
pub mod tools;
