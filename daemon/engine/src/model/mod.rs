//! What a model is, read from GGUF metadata: architecture, layer kinds,
//! shapes, and the tensor set the engine will expect to find.

mod desc;
mod experts;

pub use desc::{Arch, ExpectedTensor, GatingFunc, LayerDesc, LayerKind, ModelDesc, ModelError};
pub use experts::{ExpertIndex, ExpertSlices};
