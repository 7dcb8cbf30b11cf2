//! [`Model`]: a validated model over its mapping. Matrices stay in the file
//! (a [`Tensor`] is a byte range plus shape); only tiny F32 vectors (norm
//! gains, conv kernels, expert biases) are copied out at load.

use super::blocks::{Attention, DenseFfn, MoeFfn, ShortConv};
use super::paging::{Pager, PagingOptions};
use super::scratch::Scratch;
use crate::gguf::{GgmlType, Gguf, GgufError};
use crate::model::{ExpertIndex, LayerKind, ModelDesc, ModelError};
use lfm_kernels::isa::{Isa, IsaError};
use lfm_kernels::matmul::Kernel;
use lfm_kernels::pool::ThreadPool;
use lfm_kernels::repack::Repacked;
use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error(transparent)]
    Gguf(#[from] GgufError),
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error(transparent)]
    Isa(#[from] IsaError),
    #[error(transparent)]
    Paging(#[from] super::paging::PagingError),
    #[error("token id {id} is outside the vocabulary (0..{n_vocab})")]
    BadToken { id: u32, n_vocab: usize },
    #[error("sequence would reach position {pos}, beyond the model's {limit}-token limit")]
    ContextFull { pos: usize, limit: usize },
    #[error(transparent)]
    Format(#[from] crate::constraint::FormatError),
}

/// Weight types the engine computes with.
pub const SUPPORTED_TYPES: &[GgmlType] = &[
    GgmlType::F32,
    GgmlType::F16,
    GgmlType::BF16,
    GgmlType::Q8_0,
    GgmlType::Q4_0,
    GgmlType::Q4_1,
    GgmlType::Q5_0,
    GgmlType::Q5_1,
    GgmlType::Q4K,
    GgmlType::Q5K,
    GgmlType::Q6K,
];

/// A matrix in the mapping: `rows` rows of `cols` elements, row-major, each
/// row `row_bytes` long, starting at byte `start` of the file.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Tensor {
    pub ty: GgmlType,
    pub start: usize,
    pub rows: usize,
    pub cols: usize,
    pub row_bytes: usize,
}

impl Tensor {
    /// Rows `first..first + n` of this matrix (an expert's slab of a stacked
    /// expert tensor is such a slice).
    pub fn rows(&self, first: usize, n: usize) -> Tensor {
        debug_assert!(first + n <= self.rows);
        Tensor {
            start: self.start + first * self.row_bytes,
            rows: n,
            ..*self
        }
    }

    pub fn bytes<'a>(&self, file: &'a [u8]) -> &'a [u8] {
        &file[self.start..self.start + self.byte_len()]
    }

    /// Its size in bytes.
    pub fn byte_len(&self) -> usize {
        self.rows * self.row_bytes
    }
}

/// A layer's token mixer.
pub(crate) enum Mixer {
    Conv(ShortConv),
    Attention(Attention),
}

/// A layer's feed-forward.
pub(crate) enum Ffn {
    Dense(DenseFfn),
    Moe(MoeFfn),
}

pub(crate) struct Layer {
    pub attn_norm: Vec<f32>,
    pub mixer: Mixer,
    pub ffn_norm: Vec<f32>,
    pub ffn: Ffn,
}

/// How to run a model: kernel path, compute threads, expert paging.
#[derive(Clone, Copy, Debug, Default)]
pub struct EngineOptions {
    /// `None`: `LFM_ISA` if set, else the best this CPU runs.
    pub isa: Option<Isa>,
    /// `None`: one per available core.
    pub threads: Option<usize>,
    pub paging: PagingOptions,
    /// Repack the fixed Q4_0, Q4_K and Q5_K matrices at load where this CPU
    /// has the kernels for them (`None`: unless `LFM_REPACK` is `0`, `off` or
    /// `false`). The logits are the same bits either way.
    pub repack: Option<bool>,
}

/// Whether to repack the fixed matrices at load ([`Model::repack_fixed`])
/// when the options leave it open: yes unless `LFM_REPACK` is `0`, `off` or
/// `false` (for comparing the file-order kernels).
fn repack_wanted() -> bool {
    !matches!(
        std::env::var("LFM_REPACK").as_deref().map(str::trim),
        Ok("0" | "off" | "false")
    )
}

/// A loaded model: the mapping, its description, and tensor handles.
pub struct Model {
    pub(crate) isa: Isa,
    pub(crate) pool: ThreadPool,
    pub(crate) gguf: Arc<Gguf>,
    pub desc: ModelDesc,
    pub(crate) tok_embd: Tensor,
    pub(crate) output_norm: Vec<f32>,
    pub(crate) output: Tensor,
    pub(crate) layers: Vec<Layer>,
    /// The expert cache (MoE models on a mapping).
    pub(crate) pager: Option<Pager>,
    /// Activation buffers reused across forward calls (f32 rows, and the
    /// quantized rows the products read).
    pub(crate) scratch: Scratch<f32>,
    pub(crate) act_scratch: Scratch<u8>,
    /// Fixed matrices repacked at load, by their start in the file
    /// ([`Model::repack_fixed`]), with the kernel that multiplies them.
    pub(crate) repacked: HashMap<usize, (Repacked, Kernel)>,
}

/// Scratch kept between forward calls, per element type: a 512-token step
/// of LFM2-8B-A1B peaks near 100 MB of f32 activations.
const SCRATCH_KEEP_BYTES: usize = 256 << 20;

impl Model {
    pub fn open(path: impl AsRef<Path>) -> Result<Self, EngineError> {
        Self::open_with(path, EngineOptions::default())
    }

    pub fn open_with(path: impl AsRef<Path>, opts: EngineOptions) -> Result<Self, EngineError> {
        Self::from_gguf_with(Arc::new(Gguf::open(path)?), opts)
    }

    pub fn from_gguf(gguf: Arc<Gguf>) -> Result<Self, EngineError> {
        Self::from_gguf_with(gguf, EngineOptions::default())
    }

    pub fn from_gguf_with(gguf: Arc<Gguf>, opts: EngineOptions) -> Result<Self, EngineError> {
        let isa = match opts.isa {
            Some(i) if i.available() => i,
            Some(i) => return Err(IsaError::Unsupported(i, Isa::detect().name().to_owned()).into()),
            None => Isa::from_env()?,
        };
        let threads = opts
            .threads
            .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
            .clamp(1, 256);
        let desc = ModelDesc::from_header(&gguf)?;
        desc.validate_tensors(&gguf)?;
        desc.check_types(&gguf, SUPPORTED_TYPES)?;
        let g = &*gguf;
        let mat = |name: &str| -> Tensor {
            let t = g.tensor(name).expect("validated");
            Tensor {
                ty: t.ty,
                start: g.file_range(t).start as usize,
                rows: (t.n_elements() / t.dims[0]) as usize,
                cols: t.dims[0] as usize,
                row_bytes: t.row_bytes() as usize,
            }
        };
        let vector = |name: &str| -> Vec<f32> {
            let t = mat(name);
            let mut v = vec![0.0; t.rows * t.cols];
            super::forward::dequantize_rows(&t, t.bytes(g.bytes()), &mut v);
            v
        };
        let mut layers = Vec::with_capacity(desc.n_layer);
        for (i, l) in desc.layers.iter().enumerate() {
            let b = |s: &str| format!("blk.{i}.{s}");
            let mixer = match l.kind {
                LayerKind::ShortConv => Mixer::Conv(ShortConv {
                    conv: vector(&b("shortconv.conv.weight")),
                    in_proj: mat(&b("shortconv.in_proj.weight")),
                    out_proj: mat(&b("shortconv.out_proj.weight")),
                }),
                LayerKind::Attention { n_head_kv } => Mixer::Attention(Attention {
                    n_head_kv: n_head_kv as usize,
                    q: mat(&b("attn_q.weight")),
                    k: mat(&b("attn_k.weight")),
                    v: mat(&b("attn_v.weight")),
                    o: mat(&b("attn_output.weight")),
                    q_norm: vector(&b("attn_q_norm.weight")),
                    k_norm: vector(&b("attn_k_norm.weight")),
                }),
            };
            let ffn = if l.moe {
                Ffn::Moe(MoeFfn {
                    router: mat(&b("ffn_gate_inp.weight")),
                    bias: vector(&b("exp_probs_b.bias")),
                    gate: mat(&b("ffn_gate_exps.weight")),
                    up: mat(&b("ffn_up_exps.weight")),
                    down: mat(&b("ffn_down_exps.weight")),
                })
            } else {
                Ffn::Dense(DenseFfn {
                    gate: mat(&b("ffn_gate.weight")),
                    up: mat(&b("ffn_up.weight")),
                    down: mat(&b("ffn_down.weight")),
                })
            };
            layers.push(Layer {
                attn_norm: vector(&b("attn_norm.weight")),
                mixer,
                ffn_norm: vector(&b("ffn_norm.weight")),
                ffn,
            });
        }
        let output = if desc.tied_output {
            "token_embd.weight"
        } else {
            "output.weight"
        };
        let pager = Pager::new(
            Arc::clone(&gguf),
            ExpertIndex::build(&gguf, &desc),
            desc.n_layer,
            desc.n_expert_used,
            opts.paging,
        )?;
        let mut model = Model {
            isa,
            pool: ThreadPool::new(threads),
            pager,
            tok_embd: mat("token_embd.weight"),
            output_norm: vector("token_embd_norm.weight"),
            output: mat(output),
            layers,
            desc,
            gguf,
            scratch: Scratch::new(SCRATCH_KEEP_BYTES),
            act_scratch: Scratch::new(SCRATCH_KEEP_BYTES / 4),
            repacked: HashMap::new(),
        };
        if opts.repack.unwrap_or_else(repack_wanted) {
            model.repack_fixed();
        }
        Ok(model)
    }

    /// Repacks the fixed Q4_0, Q4_K and Q5_K matrices (those every token
    /// reads) into the layouts `lfm_kernels::repack` describes, where this
    /// CPU has the kernels for such copies (AVX-512 VNNI; Q4_0: 1.6-1.9x
    /// the file-order kernels from 1 to 8 tokens from cache, 1.1-1.8x from
    /// DRAM at 2-8, level at 1), and gives the file's pages of them back:
    /// the copies take the memory the mapped rows took, and the file is not
    /// read for them again. The token embedding stays in the mapping (its rows are
    /// looked up there), repacked too when the output shares it. The pager
    /// learns how many fixed bytes left the mapping (`auto` budgets count
    /// host file pages, which these no longer are).
    fn repack_fixed(&mut self) {
        use lfm_kernels::dispatch::{repack, repacked_kernel};
        let isa = self.isa;
        let ty = |t: &Tensor| super::forward::weight_type(t.ty);
        let mut todo: Vec<(Tensor, Kernel)> = self
            .fixed_matrices()
            .into_iter()
            .filter_map(|t| repacked_kernel(isa, ty(&t)).map(|k| (t, k)))
            .collect();
        todo.sort_by_key(|(t, _)| t.start);
        todo.dedup_by_key(|(t, _)| t.start);
        let file = self.gguf.bytes();
        let mut packs: Vec<Option<Repacked>> = todo.iter().map(|_| None).collect();
        self.pool.for_each_mut(&mut packs, 1, &|i, slot| {
            let t = &todo[i].0;
            slot[0] = repack(ty(t), t.bytes(file), t.rows, t.cols, t.row_bytes);
        });
        let mut given_back = 0;
        for ((t, k), p) in todo.iter().zip(packs) {
            let Some(p) = p else { continue };
            if t.start != self.tok_embd.start {
                let range = t.start as u64..(t.start + t.byte_len()) as u64;
                // Best effort: pages left behind are only clean cache.
                let _ = self.gguf.evict(range);
                given_back += t.byte_len() as u64;
            }
            self.repacked.insert(t.start, (p, *k));
        }
        if let Some(p) = &self.pager {
            p.set_outside_bytes(given_back);
        }
    }

    /// The repacked copy of `w` and its kernel, if `w` is a whole repacked
    /// matrix.
    pub(crate) fn repacked_of(&self, w: &Tensor) -> Option<(&Repacked, Kernel)> {
        self.repacked
            .get(&w.start)
            .filter(|(r, _)| r.rows() == w.rows && r.row_bytes() == w.row_bytes)
            .map(|(r, k)| (r, *k))
    }

    /// The bytes a product of `w` reads: its repacked copy's, or the
    /// mapping's.
    pub(crate) fn matrix_bytes<'a>(&'a self, w: &Tensor) -> &'a [u8] {
        match self.repacked_of(w) {
            Some((r, _)) => r.bytes(),
            None => w.bytes(self.gguf.bytes()),
        }
    }

    /// How many fixed matrices were repacked at load, and their bytes.
    pub fn repacked_matrices(&self) -> (usize, usize) {
        (
            self.repacked.len(),
            self.repacked.values().map(|(r, _)| r.bytes().len()).sum(),
        )
    }

    pub fn gguf(&self) -> &Arc<Gguf> {
        &self.gguf
    }

    pub fn n_vocab(&self) -> usize {
        self.desc.n_vocab
    }

    /// The kernel path in use (e.g. `avx512+vnni`).
    pub fn isa_name(&self) -> String {
        self.isa.to_string()
    }

    /// The compute threads, for work the engine's caller spreads over them
    /// between forward calls (sampling a step's sequences).
    pub fn pool(&self) -> &ThreadPool {
        &self.pool
    }

    pub fn isa(&self) -> Isa {
        self.isa
    }

    /// The expert pager's figures (`None`: nothing is paged).
    pub fn paging_stats(&self) -> Option<super::paging::PagingStats> {
        self.pager.as_ref().map(Pager::stats)
    }

    /// The expert pager, when experts are paged.
    pub fn pager(&self) -> Option<&Pager> {
        self.pager.as_ref()
    }

    /// Compute threads in use.
    pub fn n_threads(&self) -> usize {
        self.pool.n_threads()
    }

    /// The matrices every token reads whatever its routing: mixers, dense
    /// FFNs, routers and the output. They are never paged out.
    fn fixed_matrices(&self) -> Vec<Tensor> {
        let mut m = vec![self.output];
        for l in &self.layers {
            match &l.mixer {
                Mixer::Conv(c) => m.extend([c.in_proj, c.out_proj]),
                Mixer::Attention(a) => m.extend([a.q, a.k, a.v, a.o]),
            }
            match &l.ffn {
                Ffn::Dense(f) => m.extend([f.gate, f.up, f.down]),
                Ffn::Moe(f) => m.push(f.router),
            }
        }
        m
    }

    /// For each weight type among the model's matrices (the stacked experts
    /// included), the kernel family its products of `tokens` rows run on
    /// (`lfm_kernels::dispatch::kernel_name`: on AVX-512 CPUs few-token
    /// products take the AVX2 kernels), sorted by type name; repacked fixed
    /// matrices are their own entry (`q4_0 fixed`, `... repacked`).
    pub fn kernel_families(&self, tokens: usize) -> Vec<(String, String)> {
        let mut all = self.fixed_matrices();
        for l in &self.layers {
            if let Ffn::Moe(f) = &l.ffn {
                all.extend([f.gate, f.up, f.down]);
            }
        }
        let mut out: Vec<(String, String)> = all
            .iter()
            .map(|t| {
                let ty = super::forward::weight_type(t.ty)
                    .name()
                    .to_ascii_lowercase();
                if self.repacked_of(t).is_some() {
                    (format!("{ty} fixed"), format!("{} repacked", self.isa))
                } else {
                    let name = lfm_kernels::dispatch::kernel_name(
                        self.isa,
                        super::forward::weight_type(t.ty),
                        tokens,
                    );
                    (ty, name)
                }
            })
            .collect();
        out.sort();
        out.dedup();
        out
    }

    /// Weight bytes one decoded token reads: the fixed matrices plus, in
    /// each MoE layer, the gate, up and down rows of its `n_expert_used`
    /// experts (the embedding row and the norm vectors left out). Decode
    /// cannot run faster than this many bytes at the rate the machine
    /// streams them ([`Model::read_rate`]).
    pub fn decode_weight_bytes(&self) -> u64 {
        let k = self.desc.n_expert_used;
        self.step_weight_bytes(&vec![k; self.layers.len()])
    }

    /// Weight bytes a forward step reads when MoE layer `il` runs
    /// `experts[il]` distinct experts (entries of dense layers ignored;
    /// [`ForwardStats::experts`](super::ForwardStats) gives what a step
    /// chose): the fixed matrices once, however many tokens share the step,
    /// plus each distinct expert's rows once.
    pub fn step_weight_bytes(&self, experts: &[usize]) -> u64 {
        let fixed: usize = self.fixed_matrices().iter().map(Tensor::byte_len).sum();
        let moe: usize = self
            .layers
            .iter()
            .zip(experts)
            .map(|(l, &used)| match &l.ffn {
                Ffn::Moe(f) => {
                    // Stacked experts: each holds 1 / n_expert of the rows.
                    used * (f.gate.byte_len() + f.up.byte_len() + f.down.byte_len())
                        / self.desc.n_expert
                }
                Ffn::Dense { .. } => 0,
            })
            .sum();
        (fixed + moe) as u64
    }

    /// The rate, in bytes per second, at which the compute threads read the
    /// fixed matrices (memory that stays mapped, far larger than a cache on
    /// a full-size model) with nothing else to do: the best of `passes`
    /// reads. The ceiling decode's products work under.
    pub fn read_rate(&self, passes: usize) -> f64 {
        let fixed = self.fixed_matrices();
        let parts: Vec<&[u8]> = fixed.iter().map(|t| self.matrix_bytes(t)).collect();
        let bytes: usize = fixed.iter().map(Tensor::byte_len).sum();
        (0..passes.max(1))
            .map(|_| {
                let t0 = std::time::Instant::now();
                std::hint::black_box(lfm_kernels::stream::read_all(&self.pool, &parts));
                bytes as f64 / t0.elapsed().as_secs_f64().max(1e-9)
            })
            .fold(0.0, f64::max)
    }
}
