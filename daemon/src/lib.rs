//! lfmd: an on-device LLM daemon for LiquidAI LFM2 and LFM2-MoE GGUF models.
//!
//! The service around the engine (`lfm-engine`, re-exported here under the
//! same module names): the scheduler that batches many requests over one
//! model, and its edges: the gRPC service (`serve`, `grpc`, `authority`),
//! the D-Bus one (`dbus`) and the HTTP one (`http`: OpenAI-compatible
//! routes, `/metrics`, `/health`), with their configuration, paths and systemd
//! integration (`config`, `paths`, `systemd`).

pub mod authority;
pub mod config;
pub mod dbus;
pub mod grpc;
pub mod http;
pub mod paths;
pub mod scheduler;
pub mod serve;
pub mod systemd;

pub use lfm_engine::{
    bench, chat, constraint, debug, engine, error, gguf, info, inspect, log, model, procstat, rng,
    sampler, sequence, stop, synth, tokenizer, tools, warn,
};
