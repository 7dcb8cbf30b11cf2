//! lfmd: an on-device LLM daemon for LiquidAI LFM2 and LFM2-MoE GGUF models.
//!
//! The library holds everything the `lfmd` binary does: the GGUF reader and
//! writer over a memory mapping, the model description, and the synthetic
//! model writer used for tests and benchmarks, the scheduler that batches
//! many requests over one model, and its edges: the gRPC service (`serve`,
//! `grpc`) and the D-Bus one (`dbus`), with their configuration, logging and
//! systemd integration (`config`, `log`, `systemd`).

pub mod authority;
pub mod bench;
pub mod chat;
pub mod config;
pub mod dbus;
pub mod engine;
pub mod gguf;
pub mod grpc;
pub mod inspect;
pub mod log;
pub mod model;
pub mod paths;
pub mod procstat;
pub mod rng;
pub mod sampler;
pub mod scheduler;
pub mod sequence;
pub mod serve;
pub mod stop;
pub mod synth;
pub mod systemd;
pub mod tokenizer;
