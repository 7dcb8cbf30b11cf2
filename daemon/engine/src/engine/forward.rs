//! The forward pass. All tokens of all sequences in a call share the matrix
//! products (one pass over each weight matrix per layer); the sequence-local
//! parts (conv window, attention over the KV cache) run per sequence.

use super::ops::{rms_norm, rms_norm_inplace, rope_neox, sigmoid};
use super::scratch::Buf;
use super::state::{LayerState, SeqState};
use super::weights::{EngineError, Ffn, Mixer, Model, Tensor};
use crate::gguf::GgmlType;
use half::f16;
use lfm_kernels::act::act_fns;
use lfm_kernels::attn::{KvHead, attention_fns};
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
    fn matmul(&self, w: &Tensor, x: &[f32], n: usize, y: &mut [f32]) {
        debug_assert_eq!(x.len(), n * w.cols);
        self.matmuls(vec![(w, x, n, y)]);
    }

    /// Several products in one parallel region (see `matmul_many`): each
    /// job is `(weights, activations, n, output)`. Activations shared by
    /// jobs of the same format are converted once.
    fn matmuls(&self, jobs: Vec<(&Tensor, &[f32], usize, &mut [f32])>) {
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
                lfm_kernels::matmul::MatJob {
                    kernel: kernel(self.isa, weight_type(w.ty), n),
                    w: w.bytes(file),
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
        // Row ranges of each item in the flattened batch.
        let mut spans = Vec::with_capacity(items.len());
        let mut n = 0;
        for it in items.iter() {
            spans.push(n..n + it.tokens.len());
            n += it.tokens.len();
        }

        if let Some(st) = stats.as_deref_mut() {
            st.route_margin = vec![f32::INFINITY; n];
            st.experts = vec![0; self.layers.len()];
        }
        if let Some(p) = &self.pager {
            p.begin_step();
        }
        let mut x = self.scratch.zeroed(n * e);
        for (row, &tok) in items.iter().flat_map(|it| it.tokens.iter()).enumerate() {
            let t = self.tok_embd.rows(tok as usize, 1);
            dequantize_rows(&t, t.bytes(file), &mut x[row * e..(row + 1) * e]);
        }

        // Each row of the batch: its item and its position in that sequence.
        let token_at: Vec<(usize, usize)> = items
            .iter()
            .enumerate()
            .flat_map(|(i, it)| (0..it.tokens.len()).map(move |j| (i, it.state.pos + j)))
            .collect();

        let mut h = self.scratch.zeroed(n * e);
        let mut mix = self.scratch.zeroed(n * e);
        for (il, layer) in self.layers.iter().enumerate() {
            rms_norm(&x, &layer.attn_norm, d.norm_eps, &mut h);
            match &layer.mixer {
                Mixer::Conv {
                    conv,
                    in_proj,
                    out_proj,
                } => {
                    let mut bcx = self.scratch.zeroed(n * 3 * e);
                    self.matmul(in_proj, &h, n, &mut bcx);
                    let mut y = self.scratch.zeroed(n * e);
                    self.short_conv(items, &spans, il, conv, &bcx, &mut y);
                    self.matmul(out_proj, &y, n, &mut mix);
                }
                Mixer::Attention {
                    n_head_kv,
                    q,
                    k,
                    v,
                    o,
                    q_norm,
                    k_norm,
                } => {
                    let (hd, nkv) = (d.head_dim, *n_head_kv);
                    let kvd = nkv * hd;
                    let mut qs = self.scratch.zeroed(n * e);
                    let mut ks = self.scratch.zeroed(n * kvd);
                    let mut vs = self.scratch.zeroed(n * kvd);
                    self.matmuls(vec![
                        (q, &h, n, &mut qs[..]),
                        (k, &h, n, &mut ks[..]),
                        (v, &h, n, &mut vs[..]),
                    ]);
                    rms_norm_inplace(&mut qs, q_norm, d.norm_eps);
                    rms_norm_inplace(&mut ks, k_norm, d.norm_eps);
                    // RoPE on the keys, and the call's rows into each
                    // sequence's cache (complete up to this call's end
                    // before anything attends to it).
                    for (it, span) in items.iter_mut().zip(&spans) {
                        let pos0 = it.state.pos;
                        let LayerState::Attention { k: kc, v: vc } = &mut it.state.layers[il]
                        else {
                            unreachable!("state layout follows the model");
                        };
                        for (i, t) in span.clone().enumerate() {
                            for head in ks[t * kvd..(t + 1) * kvd].chunks_exact_mut(hd) {
                                rope_neox(head, pos0 + i, d.rope_freq_base);
                            }
                            for (h, (kh, vh)) in kc.iter_mut().zip(vc.iter_mut()).enumerate() {
                                let at = t * kvd + h * hd..t * kvd + (h + 1) * hd;
                                kh.extend(ks[at.clone()].iter().map(|&x| f16::from_f32(x)));
                                vh.extend(vs[at].iter().map(|&x| f16::from_f32(x)));
                            }
                        }
                    }
                    let mut att = self.scratch.zeroed(n * e);
                    self.attend(items, &token_at, il, nkv, &qs, &mut att);
                    self.matmul(o, &att, n, &mut mix);
                }
            }
            x.iter_mut().zip(mix.iter()).for_each(|(a, b)| *a += b);

            rms_norm(&x, &layer.ffn_norm, d.norm_eps, &mut h);
            match &layer.ffn {
                Ffn::Dense { gate, up, down } => {
                    let f = gate.rows;
                    let mut g = self.scratch.zeroed(n * f);
                    let mut u = self.scratch.zeroed(n * f);
                    self.matmuls(vec![(gate, &h, n, &mut g[..]), (up, &h, n, &mut u[..])]);
                    self.swiglu(&mut g, &u);
                    self.matmul(down, &g, n, &mut mix);
                }
                Ffn::Moe {
                    router,
                    bias,
                    gate,
                    up,
                    down,
                } => {
                    let margins = stats.as_deref_mut().map(|s| &mut s.route_margin[..]);
                    let used = self.moe(
                        il, &x, router, bias, gate, up, down, &h, n, &mut mix, margins,
                    );
                    if let Some(st) = stats.as_deref_mut() {
                        st.experts[il] = used;
                    }
                }
            }
            x.iter_mut().zip(mix.iter()).for_each(|(a, b)| *a += b);
        }

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

    /// The short convolution of every item's tokens (`bcx`: `[n][3 * n_embd]`,
    /// the in-projection's B, C and x parts), into `y` (`[n][n_embd]`),
    /// sliding each item's window. One pool region for all items: a work
    /// unit is one item's tokens over a block of channels (channels are
    /// independent, so the arithmetic is the same however they are dealt).
    fn short_conv(
        &self,
        items: &mut [BatchItem<'_>],
        spans: &[std::ops::Range<usize>],
        il: usize,
        taps: &[f32],
        bcx: &[f32],
        y: &mut [f32],
    ) {
        const BLOCK: usize = 256;
        let (e, l) = (self.desc.n_embd, self.desc.conv_l_cache);
        let l1 = l - 1;
        // Unit outputs, `[token][channel in block]` per (item, block), laid
        // out item after item: an item's blocks fill its rows' share.
        let mut outs = self.scratch.zeroed(y.len());
        let mut units = Vec::with_capacity(items.len() * e.div_ceil(BLOCK));
        let mut out_rest = &mut outs[..];
        for (it, span) in items.iter_mut().zip(spans) {
            let LayerState::Conv { window } = &mut it.state.layers[il] else {
                unreachable!("state layout follows the model");
            };
            for (b, w) in window.chunks_mut(BLOCK * l1).enumerate() {
                let (o, rest) =
                    std::mem::take(&mut out_rest).split_at_mut(span.len() * w.len() / l1);
                out_rest = rest;
                units.push((span.clone(), b * BLOCK, w, o));
            }
        }
        self.pool.for_each_mut(&mut units, 1, &|_, unit| {
            let (span, c0, window, out) = &mut unit[0];
            let width = window.len() / l1;
            for (ti, t) in span.clone().enumerate() {
                let row = &bcx[t * 3 * e..(t + 1) * 3 * e];
                let (b, rest) = row.split_at(e);
                let (c, xin) = rest.split_at(e);
                for j in 0..width {
                    let ch = *c0 + j;
                    let bx = b[ch] * xin[ch];
                    let tap = &taps[ch * l..(ch + 1) * l];
                    // This channel's past inputs, oldest first.
                    let past = &mut window[j * l1..(j + 1) * l1];
                    let mut acc = 0.0f32;
                    for k in 0..l1 {
                        acc += past[k] * tap[k];
                    }
                    acc += bx * tap[l1];
                    out[ti * width + j] = c[ch] * acc;
                    past.copy_within(1.., 0);
                    past[l1 - 1] = bx;
                }
            }
        });
        for (span, c0, window, out) in &units {
            let width = window.len() / l1;
            for (ti, t) in span.clone().enumerate() {
                y[t * e + c0..t * e + c0 + width]
                    .copy_from_slice(&out[ti * width..(ti + 1) * width]);
            }
        }
    }

    /// Attention of every row of the batch (queries `qs`, `[n][n_embd]`,
    /// before RoPE) over its own sequence's cache, into `att`. One pool
    /// region for all items: a work unit is one (row, KV head), covering the
    /// query heads that share it; it reads only the caches (complete up to
    /// this call's end) and writes its own part of `att`, so units run in
    /// any order on any thread with the same arithmetic.
    fn attend(
        &self,
        items: &[BatchItem<'_>],
        token_at: &[(usize, usize)],
        il: usize,
        nkv: usize,
        qs: &[f32],
        att: &mut [f32],
    ) {
        let d = &self.desc;
        let (e, hd) = (d.n_embd, d.head_dim);
        let group = d.n_head / nkv;
        let width = group * hd;
        let scale = 1.0 / (hd as f32).sqrt();
        // Each item's (K, V) caches of this layer, per KV head.
        let caches: Vec<KvCaches<'_>> = items
            .iter()
            .map(|it| match &it.state.layers[il] {
                LayerState::Attention { k, v } => (&k[..], &v[..]),
                LayerState::Conv { .. } => unreachable!("state layout follows the model"),
            })
            .collect();
        let fns = attention_fns(self.isa, hd);
        let softmax = act_fns(self.isa).softmax;
        self.pool.for_each_mut(att, width, &|i, out| {
            let (t, kvh) = (i / nkv, i % nkv);
            let (item, pos) = token_at[t];
            let n_pos = pos + 1;
            let (kc, vc) = caches[item];
            let (k, v) = (&kc[kvh][..n_pos * hd], &vc[kvh][..n_pos * hd]);
            ATTEND_SCRATCH.with_borrow_mut(|s| {
                // This thread's buffer: the group's queries, then scores.
                s.clear();
                s.extend_from_slice(&qs[t * e + kvh * width..t * e + (kvh + 1) * width]);
                s.resize(width + group * n_pos, 0.0);
                let (q, p) = s.split_at_mut(width);
                for head in q.chunks_exact_mut(hd) {
                    rope_neox(head, pos, d.rope_freq_base);
                }
                (fns.scores)(q, KvHead::new(k, hd), scale, p);
                p.chunks_exact_mut(n_pos).for_each(softmax);
                (fns.mix)(p, KvHead::new(v, hd), out);
            });
        });
    }

    /// `g = silu(g) * u`, elementwise, spread over the pool when large
    /// (one token's dense FFN, 7168 wide in LFM2-8B-A1B, already is).
    fn swiglu(&self, g: &mut [f32], u: &[f32]) {
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

    /// Mixture of experts: sigmoid router, bias for selection only, top-k,
    /// normalized weights, weighted sum of SwiGLU experts (summed in
    /// selection order, as llama.cpp does). Returns how many distinct
    /// experts the tokens chose.
    #[allow(clippy::too_many_arguments)]
    fn moe(
        &self,
        il: usize,
        x: &[f32],
        router: &Tensor,
        bias: &[f32],
        gate: &Tensor,
        up: &Tensor,
        down: &Tensor,
        h: &[f32],
        n: usize,
        out: &mut [f32],
        mut margins: Option<&mut [f32]>,
    ) -> usize {
        let d = &self.desc;
        let (e, ne, k, f) = (d.n_embd, d.n_expert, d.n_expert_used, d.n_ff_exp);
        let mut logits = self.scratch.zeroed(n * ne);
        self.matmul(router, h, n, &mut logits);
        // Per token: the chosen experts (in selection order) and their weights.
        let mut chosen = vec![(0usize, 0.0f32); n * k];
        let (mut probs, mut order) = (vec![0.0f32; ne], vec![0usize; ne]);
        for t in 0..n {
            probs
                .iter_mut()
                .zip(&logits[t * ne..(t + 1) * ne])
                .for_each(|(p, &v)| *p = sigmoid(v));
            order.iter_mut().enumerate().for_each(|(i, o)| *o = i);
            order.sort_by(|&a, &b| (probs[b] + bias[b]).total_cmp(&(probs[a] + bias[a])));
            if let (Some(m), Some(&next)) = (margins.as_deref_mut(), order.get(k)) {
                let gap = (probs[order[k - 1]] + bias[order[k - 1]]) - (probs[next] + bias[next]);
                m[t] = m[t].min(gap);
            }
            let sum: f32 = order[..k]
                .iter()
                .map(|&i| probs[i])
                .sum::<f32>()
                .max(6.103_515_6e-5);
            for (slot, &i) in order[..k].iter().enumerate() {
                chosen[t * k + slot] = (i, probs[i] / sum);
            }
        }
        // Each chosen expert's tokens, as rows of flat buffers in expert
        // order. All chosen experts' gate and up products run in one
        // parallel region, then all their down products in another.
        let mut experts: Vec<(usize, Vec<(usize, usize)>)> = Vec::new();
        for ex in 0..ne {
            let users: Vec<(usize, usize)> = (0..n * k)
                .filter(|&i| chosen[i].0 == ex)
                .map(|i| (i / k, i % k))
                .collect();
            if !users.is_empty() {
                experts.push((ex, users));
            }
        }
        if let Some(p) = &self.pager {
            let uses: Vec<(usize, usize)> = experts.iter().map(|(ex, u)| (*ex, u.len())).collect();
            p.route(il, &uses);
            for next in p.next_moe_layers(il) {
                if p.wants_prediction(next) {
                    p.predict(next, &self.predict_experts(next, x, n));
                }
            }
        }
        let counts: Vec<usize> = experts.iter().map(|(_, u)| u.len()).collect();
        // The row of (token, slot) in the flat buffers.
        let mut row_of = vec![0usize; n * k];
        let mut hx_all = self.scratch.zeroed(n * k * e);
        for (r, (t, slot)) in experts
            .iter()
            .flat_map(|(_, u)| u.iter().copied())
            .enumerate()
        {
            row_of[t * k + slot] = r;
            hx_all[r * e..(r + 1) * e].copy_from_slice(&h[t * e..(t + 1) * e]);
        }
        let hxs = split_rows(&mut hx_all, &counts, e);
        let slices: Vec<(Tensor, Tensor, Tensor)> = experts
            .iter()
            .map(|&(ex, _)| {
                (
                    gate.rows(ex * f, f),
                    up.rows(ex * f, f),
                    down.rows(ex * e, e),
                )
            })
            .collect();
        let (mut g_all, mut u_all) = (
            self.scratch.zeroed(n * k * f),
            self.scratch.zeroed(n * k * f),
        );
        let mut gs = split_rows(&mut g_all, &counts, f);
        let mut us = split_rows(&mut u_all, &counts, f);
        let mut jobs = Vec::with_capacity(2 * experts.len());
        for (((hx, (g_t, u_t, _)), g), u) in hxs.iter().zip(&slices).zip(&mut gs).zip(&mut us) {
            let rows = hx.len() / e;
            jobs.push((g_t, &hx[..], rows, &mut g[..]));
            jobs.push((u_t, &hx[..], rows, &mut u[..]));
        }
        self.matmuls(jobs);
        // All experts' SwiGLU in one region, an expert per hand-out (per
        // element, so the same values as `swiglu`'s split).
        let swiglu = act_fns(self.isa).swiglu;
        self.pool
            .for_each_mut(&mut gs, 1, &|i, g| swiglu(g[0], us[i]));
        let mut dn_all = self.scratch.zeroed(n * k * e);
        let mut dns = split_rows(&mut dn_all, &counts, e);
        let jobs = slices
            .iter()
            .zip(&gs)
            .zip(&mut dns)
            .map(|(((_, _, d_t), g), dn)| (d_t, &g[..], g.len() / f, &mut dn[..]))
            .collect();
        self.matmuls(jobs);
        // Weighted and summed in slot order: the first slot's product, then
        // each later one's added (f32 products rounded before the sums,
        // the same arithmetic as summing per-slot copies).
        for t in 0..n {
            let o = &mut out[t * e..(t + 1) * e];
            for slot in 0..k {
                let w = chosen[t * k + slot].1;
                let r = row_of[t * k + slot];
                let dn = &dn_all[r * e..(r + 1) * e];
                if slot == 0 {
                    o.iter_mut().zip(dn).for_each(|(a, v)| *a = v * w);
                } else {
                    o.iter_mut().zip(dn).for_each(|(a, v)| *a += v * w);
                }
            }
        }
        experts.len()
    }

    /// The experts MoE layer `il` would choose for the residual stream `x`
    /// as it is now (some layers earlier): its norm and router applied to
    /// `x`, top-k per token, the union. Only steers prefetching.
    fn predict_experts(&self, il: usize, x: &[f32], n: usize) -> Vec<usize> {
        let d = &self.desc;
        let (e, ne, k) = (d.n_embd, d.n_expert, d.n_expert_used);
        let layer = &self.layers[il];
        let Ffn::Moe { router, bias, .. } = &layer.ffn else {
            return Vec::new();
        };
        let mut h = self.scratch.zeroed(n * e);
        rms_norm(x, &layer.ffn_norm, d.norm_eps, &mut h);
        let mut logits = self.scratch.zeroed(n * ne);
        self.matmul(router, &h, n, &mut logits);
        let mut chosen = vec![false; ne];
        for t in 0..n {
            let score: Vec<f32> = logits[t * ne..(t + 1) * ne]
                .iter()
                .zip(bias)
                .map(|(&v, &b)| sigmoid(v) + b)
                .collect();
            let mut order: Vec<usize> = (0..ne).collect();
            order.sort_by(|&a, &b| score[b].total_cmp(&score[a]));
            order[..k].iter().for_each(|&i| chosen[i] = true);
        }
        (0..ne).filter(|&i| chosen[i]).collect()
    }
}

/// One sequence's K and V caches of a layer, per KV head.
type KvCaches<'a> = (&'a [Vec<f16>], &'a [Vec<f16>]);

thread_local! {
    /// Per-thread room for one attention unit's queries and scores: grows
    /// to the longest context seen, then is reused (no allocation per token
    /// or head).
    static ATTEND_SCRATCH: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// `buf` cut into consecutive runs of `counts[i] * width` elements.
fn split_rows<'a>(buf: &'a mut [f32], counts: &[usize], width: usize) -> Vec<&'a mut [f32]> {
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
