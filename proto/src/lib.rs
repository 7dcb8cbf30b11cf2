//! The `lfm.v1` wire API of lfmd.
//!
//! This crate will own `proto/lfm/v1/lfm.proto` and the tonic/prost code
//! generated from it; nothing else in the workspace runs codegen. The daemon's
//! gRPC service arrives with the daemon issue; until then the crate is empty.
