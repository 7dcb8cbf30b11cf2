//! The expert index: for every MoE layer and expert, where its gate, up and
//! down slices lie in the file. Experts are stacked on the slowest axis of
//! `ffn_{gate,up,down}_exps`, so each expert is one contiguous slab per tensor.

use super::ModelDesc;
use crate::gguf::GgufHeader;
use serde::Serialize;
use std::ops::Range;

/// One expert's three weight slices, as absolute byte ranges in the file.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ExpertSlices {
    pub layer: usize,
    pub expert: usize,
    pub gate: Range<u64>,
    pub up: Range<u64>,
    pub down: Range<u64>,
}

impl ExpertSlices {
    pub fn bytes(&self) -> u64 {
        (self.gate.end - self.gate.start)
            + (self.up.end - self.up.start)
            + (self.down.end - self.down.start)
    }
}

/// Expert slices indexed `[moe layer ordinal][expert]`.
#[derive(Clone, Debug, Default, Serialize)]
pub struct ExpertIndex {
    pub layers: Vec<Vec<ExpertSlices>>,
}

impl ExpertIndex {
    /// Builds the index. Call after `ModelDesc::validate_tensors`: a missing
    /// expert tensor simply leaves its layer out.
    pub fn build(h: &GgufHeader, desc: &ModelDesc) -> Self {
        let mut layers = Vec::new();
        for (il, l) in desc.layers.iter().enumerate() {
            if !l.moe {
                continue;
            }
            let slabs = |name: &str| -> Option<Vec<Range<u64>>> {
                let t = h.tensor(&format!("blk.{il}.{name}"))?;
                let range = h.file_range(t);
                let per = t.size / desc.n_expert as u64;
                Some(
                    (0..desc.n_expert as u64)
                        .map(|e| range.start + e * per..range.start + (e + 1) * per)
                        .collect(),
                )
            };
            let (Some(g), Some(u), Some(d)) = (
                slabs("ffn_gate_exps.weight"),
                slabs("ffn_up_exps.weight"),
                slabs("ffn_down_exps.weight"),
            ) else {
                continue;
            };
            layers.push(
                (0..desc.n_expert)
                    .map(|e| ExpertSlices {
                        layer: il,
                        expert: e,
                        gate: g[e].clone(),
                        up: u[e].clone(),
                        down: d[e].clone(),
                    })
                    .collect(),
            );
        }
        ExpertIndex { layers }
    }

    pub fn total_bytes(&self) -> u64 {
        self.layers.iter().flatten().map(ExpertSlices::bytes).sum()
    }
}
