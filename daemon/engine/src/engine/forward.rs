//! The forward pass: the embedding, each layer's blocks (`blocks.rs`) with
//! their norms and residual adds, the logits. All tokens of all sequences in
//! a call share the matrix products (one pass over each weight matrix per
//! layer); the sequence-local parts (conv window, attention over the KV
//! cache) run for every sequence in one parallel region.

use super::blocks::Batch;
use super::ops::rms_norm;
use super::scratch::Buf;
use super::state::SeqState;
use super::weights::{EngineError, Ffn, Mixer, Model, Tensor};
use crate::gguf::GgmlType;
use lfm_kernels::act::act_fns;
use lfm_kernels::dispatch::{kernel, quantize_activations_on};
use lfm_kernels::scalar;
use lfm_kernels::types::WeightType;

/// Which logits a sequence wants back from a forward call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogitsWanted {
    None,
    /// The last token's (prefill then sample).
    Last,
    /// Every token's (teacher forcing).
    All,
}

/// What a forward call observed, for diagnostics and tests.
#[derive(Clone, Debug, Default)]
pub struct ForwardStats {
    /// Per token of the call (in batch order): the smallest gap, over all MoE
    /// layers, between the selection score of the last chosen expert and the
    /// best unchosen one. A gap near zero is a routing tie that rounding
    /// noise can flip.
    pub route_margin: Vec<f32>,
    /// Per layer: the distinct experts the call's tokens chose together
    /// (0 in dense layers), whose rows the step read once each.
    pub experts: Vec<usize>,
}

/// One sequence's share of a forward call.
pub struct BatchItem<'a> {
    pub state: &'a mut SeqState,
    pub tokens: &'a [u32],
    pub logits: LogitsWanted,
}

/// Expands whole rows of `t`'s type from `src` into `out`.
pub(crate) fn dequantize_rows(t: &Tensor, src: &[u8], out: &mut [f32]) {
    let ty = weight_type(t.ty);
    for (s, o) in src
        .chunks_exact(t.row_bytes)
        .zip(out.chunks_exact_mut(t.cols))
    {
        scalar::dequantize_row(ty, s, o);
    }
}

/// The kernels' name for a ggml type the engine supports (panics on others:
/// check `SUPPORTED_TYPES` first).
pub fn weight_type(ty: GgmlType) -> WeightType {
    match ty {
        GgmlType::F32 => WeightType::F32,
        GgmlType::F16 => WeightType::F16,
        GgmlType::BF16 => WeightType::BF16,
        GgmlType::Q4_0 => WeightType::Q4_0,
        GgmlType::Q4_1 => WeightType::Q4_1,
        GgmlType::Q5_0 => WeightType::Q5_0,
        GgmlType::Q5_1 => WeightType::Q5_1,
        GgmlType::Q8_0 => WeightType::Q8_0,
        GgmlType::Q4K => WeightType::Q4K,
        GgmlType::Q5K => WeightType::Q5K,
        GgmlType::Q6K => WeightType::Q6K,
        other => unreachable!("{other} is not in SUPPORTED_TYPES"),
    }
}

impl Model {
    /// `y[t][r] = W[r] . x[t]` for `n` activation rows, on the pool.
    ///
    /// Quantized weights meet activations quantized the way llama.cpp pairs
    /// them (Q8_0, Q8_1 or Q8_K blocks, integer block sums), so the results
    /// agree with it to rounding; float weights use f32 activations.
    pub(super) fn matmul(&self, w: &Tensor, x: &[f32], n: usize, y: &mut [f32]) {
        debug_assert_eq!(x.len(), n * w.cols);
        self.matmuls(vec![(w, x, n, y)]);
    }

    /// Several products in one parallel region (see `matmul_many`): each
    /// job is `(weights, activations, n, output)`. Activations shared by
    /// jobs of the same format are converted once.
    pub(super) fn matmuls(&self, jobs: Vec<(&Tensor, &[f32], usize, &mut [f32])>) {
        let file = self.gguf.bytes();
        let mut bufs: Vec<(
            *const f32,
            usize,
            lfm_kernels::types::ActType,
            Buf<'_, u8>,
            usize,
        )> = Vec::new();
        let mut which = Vec::with_capacity(jobs.len());
        for (w, x, _, _) in &jobs {
            let ty = weight_type(w.ty);
            let act = lfm_kernels::dispatch::act_type_for(ty);
            let key = (x.as_ptr(), x.len(), act);
            let at = match bufs.iter().position(|b| (b.0, b.1, b.2) == key) {
                Some(at) => at,
                None => {
                    let bytes = act.row_bytes(w.cols) * (x.len() / w.cols);
                    let mut buf = self.act_scratch.empty(bytes);
                    let row =
                        quantize_activations_on(&self.pool, self.isa, ty, x, w.cols, buf.vec_mut());
                    bufs.push((key.0, key.1, act, buf, row));
                    bufs.len() - 1
                }
            };
            which.push(at);
        }
        let mut mjobs: Vec<lfm_kernels::matmul::MatJob<'_>> = jobs
            .into_iter()
            .zip(&which)
            .map(|((w, _, n, y), &at)| {
                let (buf, row) = (&bufs[at].3, bufs[at].4);
                let (kernel, w_bytes) = match self.repacked_of(w) {
                    Some((r, k)) => (k, r.bytes()),
                    None => (kernel(self.isa, weight_type(w.ty), n), w.bytes(file)),
                };
                lfm_kernels::matmul::MatJob {
                    kernel,
                    w: w_bytes,
                    rows: w.rows,
                    cols: w.cols,
                    row_bytes: w.row_bytes,
                    acts: (0..n).map(|t| &buf[t * row..(t + 1) * row]).collect(),
                    y,
                }
            })
            .collect();
        lfm_kernels::matmul::matmul_many(&self.pool, &mut mjobs);
    }

    /// Runs the model over each item's tokens, appending them to its state,
    /// and returns for each item the logits it asked for, row-major
    /// `[rows][n_vocab]`. Nothing is changed if an error is returned.
    pub fn forward(&self, items: &mut [BatchItem<'_>]) -> Result<Vec<Vec<f32>>, EngineError> {
        self.forward_with_stats(items, None)
    }

    /// Whether `tokens` can run on `state`: ids inside the vocabulary, and
    /// room in the context. [`Model::forward`] fails the whole call on an
    /// item that fails this, so a caller batching independent sequences
    /// checks each first and fails only the one at fault.
    pub fn check(&self, state: &SeqState, tokens: &[u32]) -> Result<(), EngineError> {
        let (d, nv) = (&self.desc, self.desc.n_vocab);
        if let Some(&id) = tokens.iter().find(|&&t| t as usize >= nv) {
            return Err(EngineError::BadToken { id, n_vocab: nv });
        }
        let end = state.pos + tokens.len();
        if end > d.n_ctx_train {
            return Err(EngineError::ContextFull {
                pos: end,
                limit: d.n_ctx_train,
            });
        }
        Ok(())
    }

    /// [`Model::forward`], also filling `stats`.
    pub fn forward_with_stats(
        &self,
        items: &mut [BatchItem<'_>],
        mut stats: Option<&mut ForwardStats>,
    ) -> Result<Vec<Vec<f32>>, EngineError> {
        let d = &self.desc;
        let (e, nv) = (d.n_embd, d.n_vocab);
        for it in items.iter() {
            self.check(it.state, it.tokens)?;
        }
        let file = self.gguf.bytes();
        let mut batch = Batch::new(items);
        let n = batch.rows();
        if let Some(st) = stats.as_deref_mut() {
            st.route_margin = vec![f32::INFINITY; n];
            st.experts = vec![0; self.layers.len()];
        }
        if let Some(p) = &self.pager {
            p.begin_step();
        }
        let mut x = self.scratch.zeroed(n * e);
        for (row, &tok) in batch
            .items
            .iter()
            .flat_map(|it| it.tokens.iter())
            .enumerate()
        {
            let t = self.tok_embd.rows(tok as usize, 1);
            dequantize_rows(&t, t.bytes(file), &mut x[row * e..(row + 1) * e]);
        }

        let mut h = self.scratch.zeroed(n * e);
        let mut mix = self.scratch.zeroed(n * e);
        for (il, layer) in self.layers.iter().enumerate() {
            rms_norm(&x, &layer.attn_norm, d.norm_eps, &mut h);
            match &layer.mixer {
                Mixer::Conv(block) => block.forward(self, il, &mut batch, &h, &mut mix),
                Mixer::Attention(block) => block.forward(self, il, &mut batch, &h, &mut mix),
            }
            x.iter_mut().zip(mix.iter()).for_each(|(a, b)| *a += b);

            rms_norm(&x, &layer.ffn_norm, d.norm_eps, &mut h);
            match &layer.ffn {
                Ffn::Dense(block) => block.forward(self, &h, n, &mut mix),
                Ffn::Moe(block) => {
                    let margins = stats.as_deref_mut().map(|s| &mut s.route_margin[..]);
                    let used = block.forward(self, il, &x, &h, n, &mut mix, margins);
                    if let Some(st) = stats.as_deref_mut() {
                        st.experts[il] = used;
                    }
                }
            }
            x.iter_mut().zip(mix.iter()).for_each(|(a, b)| *a += b);
        }
        let (items, spans) = (batch.items, batch.spans);

        // Logits for the rows asked for, every item's in one product: the
        // output matrix (65,536 rows in LFM2) streams once a step, not once
        // per sequence. Each row's logits are the same bits however many
        // rows share the product (the kernels are batch-invariant).
        let rows: Vec<Vec<usize>> = items
            .iter()
            .zip(&spans)
            .map(|(it, span)| match it.logits {
                LogitsWanted::None => Vec::new(),
                LogitsWanted::Last => span.clone().last().into_iter().collect(),
                LogitsWanted::All => span.clone().collect(),
            })
            .collect();
        let total: usize = rows.iter().map(Vec::len).sum();
        let mut hn = vec![0.0f32; total * e];
        for (i, &r) in rows.iter().flatten().enumerate() {
            rms_norm(
                &x[r * e..(r + 1) * e],
                &self.output_norm,
                d.norm_eps,
                &mut hn[i * e..(i + 1) * e],
            );
        }
        let mut logits = vec![0.0f32; total * nv];
        if total > 0 {
            self.matmul(&self.output, &hn, total, &mut logits);
        }
        if rows.len() == 1 {
            return self.finish(items, vec![logits]);
        }
        let mut out = Vec::with_capacity(items.len());
        let mut at = 0;
        for r in &rows {
            out.push(logits[at * nv..(at + r.len()) * nv].to_vec());
            at += r.len();
        }
        self.finish(items, out)
    }

    /// Advances every item's position past the tokens it ran.
    fn finish(
        &self,
        items: &mut [BatchItem<'_>],
        out: Vec<Vec<f32>>,
    ) -> Result<Vec<Vec<f32>>, EngineError> {
        for it in items.iter_mut() {
            it.state.pos += it.tokens.len();
        }
        Ok(out)
    }

    /// `g = silu(g) * u`, elementwise, spread over the pool when large
    /// (one token's dense FFN, 7168 wide in LFM2-8B-A1B, already is).
    pub(super) fn swiglu(&self, g: &mut [f32], u: &[f32]) {
        const CHUNK: usize = 2048;
        let swiglu = act_fns(self.isa).swiglu;
        if g.len() < 2 * CHUNK {
            swiglu(g, u);
            return;
        }
        self.pool.for_each_mut(g, CHUNK, &|i, part| {
            swiglu(part, &u[i * CHUNK..]);
        });
    }

    /// The experts MoE layer `il` would choose for the residual stream `x`
    /// as it is now (some layers earlier), with at least `min_gap` of
    /// selection score to spare (`MoeFfn::predict`), surest first. Only
    /// steers prefetching.
    pub(super) fn predict_experts(
        &self,
        il: usize,
        x: &[f32],
        n: usize,
        min_gap: f32,
    ) -> Vec<usize> {
        let d = &self.desc;
        let layer = &self.layers[il];
        let Ffn::Moe(moe) = &layer.ffn else {
            return Vec::new();
        };
        let mut h = self.scratch.zeroed(n * d.n_embd);
        rms_norm(x, &layer.ffn_norm, d.norm_eps, &mut h);
        moe.predict(self, &h, n, min_gap)
    }
}

/// `buf` cut into consecutive runs of `counts[i] * width` elements.
pub(super) fn split_rows<'a>(
    buf: &'a mut [f32],
    counts: &[usize],
    width: usize,
) -> Vec<&'a mut [f32]> {
    let mut rest = buf;
    counts
        .iter()
        .map(|&c| {
            let (head, tail) = std::mem::take(&mut rest).split_at_mut(c * width);
            rest = tail;
            head
        })
        .collect()
}
