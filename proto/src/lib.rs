//! The `lfm.v1` wire API of lfmd: the messages, the tonic client and server
//! generated from `lfm/v1/lfm.proto` (by `build.rs`, with protox: no `protoc`
//! needed), and the encoded descriptor set that server reflection serves.
//!
//! Nothing else in the workspace runs codegen; only the daemon's gRPC edge
//! and `lfmctl` use these types.

pub mod v1 {
    tonic::include_proto!("lfm.v1");

    /// The encoded `FileDescriptorSet` of `lfm/v1/lfm.proto` (for reflection).
    pub const FILE_DESCRIPTOR_SET: &[u8] =
        include_bytes!(concat!(env!("OUT_DIR"), "/lfm_descriptor.bin"));
}
