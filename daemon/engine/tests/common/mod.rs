//! What the paging tests share (`paging.rs`, and `paging_faults.rs`, which
//! runs alone in its own binary).

use lfm_engine::engine::PagingStats;
use std::path::{Path, PathBuf};

/// Writes the tiny MoE model (Q4_0, seed 3) into `dir`, flushed to disk so
/// its pages are clean: pages the pager gives back leave the page cache (as
/// a model file's do in use) and a touch of them has to read the disk.
pub fn synth_tiny_moe(dir: &Path) -> PathBuf {
    let path = dir.join("tiny-moe.gguf");
    let p = lfm_engine::synth::find_preset("tiny-moe").unwrap();
    let q = lfm_engine::synth::SynthQuant::parse("q4_0").unwrap();
    lfm_engine::synth::write_model(p, q, 3, &path).unwrap();
    std::fs::File::open(&path).unwrap().sync_all().unwrap();
    path
}

/// Bytes of one expert (gate, up and down slabs; all are the same size).
pub fn expert_bytes(s: &PagingStats) -> u64 {
    s.expert_total_bytes / (s.experts.len() * s.experts[0].len()) as u64
}
