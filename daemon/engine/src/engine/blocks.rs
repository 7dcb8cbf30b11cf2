//! The model's blocks as types, each holding its weights and running over a
//! whole batch: the short convolution and attention mixers, the dense and
//! mixture-of-experts feed-forwards. `Model::forward_with_stats` strings
//! them together with the norms and residual adds.

use super::forward::{BatchItem, split_rows};
use super::ops::{rms_norm_inplace, rope_neox, sigmoid};
use super::state::LayerState;
use super::weights::{Model, Tensor};
use half::f16;
use lfm_kernels::act::act_fns;
use lfm_kernels::attn::{KvHead, attention_fns};
use std::ops::Range;

/// One forward call's batch: the items, the rows of the flattened batch
/// each one owns, and for each row its item and position.
pub(crate) struct Batch<'a, 'b> {
    pub items: &'a mut [BatchItem<'b>],
    pub spans: Vec<Range<usize>>,
    pub token_at: Vec<(usize, usize)>,
}

impl<'a, 'b> Batch<'a, 'b> {
    pub fn new(items: &'a mut [BatchItem<'b>]) -> Self {
        let mut spans = Vec::with_capacity(items.len());
        let mut n = 0;
        for it in items.iter() {
            spans.push(n..n + it.tokens.len());
            n += it.tokens.len();
        }
        let token_at = items
            .iter()
            .enumerate()
            .flat_map(|(i, it)| (0..it.tokens.len()).map(move |j| (i, it.state.pos + j)))
            .collect();
        Batch {
            items,
            spans,
            token_at,
        }
    }

    /// Rows of the flattened batch.
    pub fn rows(&self) -> usize {
        self.token_at.len()
    }
}

/// LFM2's gated short convolution: in-projection to B, C and x, the causal
/// depthwise conv of `B * x` over the last `l_cache` inputs, gated by C,
/// out-projection.
pub(crate) struct ShortConv {
    /// `[n_embd][l_cache]`: tap k of channel c at `conv[c * l + k]`.
    pub conv: Vec<f32>,
    pub in_proj: Tensor,
    pub out_proj: Tensor,
}

impl ShortConv {
    /// Layer `il`'s mixing of `h` (`[n][n_embd]`, normalized) into `out`,
    /// sliding each item's window.
    pub fn forward(
        &self,
        m: &Model,
        il: usize,
        batch: &mut Batch<'_, '_>,
        h: &[f32],
        out: &mut [f32],
    ) {
        let (n, e) = (batch.rows(), m.desc.n_embd);
        let mut bcx = m.scratch.zeroed(n * 3 * e);
        m.matmul(&self.in_proj, h, n, &mut bcx);
        let mut y = m.scratch.zeroed(n * e);
        self.convolve(m, batch, il, &bcx, &mut y);
        m.matmul(&self.out_proj, &y, n, out);
    }

    /// The short convolution of every item's tokens (`bcx`: `[n][3 * n_embd]`,
    /// the in-projection's B, C and x parts), into `y` (`[n][n_embd]`),
    /// sliding each item's window. One pool region for all items: a work
    /// unit is one item's tokens over a block of channels (channels are
    /// independent, so the arithmetic is the same however they are dealt).
    fn convolve(
        &self,
        m: &Model,
        batch: &mut Batch<'_, '_>,
        il: usize,
        bcx: &[f32],
        y: &mut [f32],
    ) {
        let taps = &self.conv[..];
        let (items, spans) = (&mut *batch.items, &batch.spans);
        const BLOCK: usize = 256;
        let (e, l) = (m.desc.n_embd, m.desc.conv_l_cache);
        let l1 = l - 1;
        // Unit outputs, `[token][channel in block]` per (item, block), laid
        // out item after item: an item's blocks fill its rows' share.
        let mut outs = m.scratch.zeroed(y.len());
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
        m.pool.for_each_mut(&mut units, 1, &|_, unit| {
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
}

/// Grouped-query attention with per-head RMS norms on queries and keys,
/// NEOX RoPE, over each sequence's f16 KV cache.
pub(crate) struct Attention {
    pub n_head_kv: usize,
    pub q: Tensor,
    pub k: Tensor,
    pub v: Tensor,
    pub o: Tensor,
    pub q_norm: Vec<f32>,
    pub k_norm: Vec<f32>,
}

impl Attention {
    /// Layer `il`'s mixing of `h` (`[n][n_embd]`, normalized) into `out`,
    /// appending each item's keys and values to its cache.
    pub fn forward(
        &self,
        m: &Model,
        il: usize,
        batch: &mut Batch<'_, '_>,
        h: &[f32],
        out: &mut [f32],
    ) {
        let d = &m.desc;
        let (n, e) = (batch.rows(), d.n_embd);
        let (hd, nkv) = (d.head_dim, self.n_head_kv);
        let kvd = nkv * hd;
        let mut qs = m.scratch.zeroed(n * e);
        let mut ks = m.scratch.zeroed(n * kvd);
        let mut vs = m.scratch.zeroed(n * kvd);
        m.matmuls(vec![
            (&self.q, h, n, &mut qs[..]),
            (&self.k, h, n, &mut ks[..]),
            (&self.v, h, n, &mut vs[..]),
        ]);
        rms_norm_inplace(&mut qs, &self.q_norm, d.norm_eps);
        rms_norm_inplace(&mut ks, &self.k_norm, d.norm_eps);
        // RoPE on the keys, and the call's rows into each sequence's cache
        // (complete up to this call's end before anything attends to it).
        for (it, span) in batch.items.iter_mut().zip(&batch.spans) {
            let pos0 = it.state.pos;
            let LayerState::Attention { k: kc, v: vc } = &mut it.state.layers[il] else {
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
        let mut att = m.scratch.zeroed(n * e);
        self.attend(m, batch, il, &qs, &mut att);
        m.matmul(&self.o, &att, n, out);
    }

    /// Attention of every row of the batch (queries `qs`, `[n][n_embd]`,
    /// before RoPE) over its own sequence's cache, into `att`. One pool
    /// region for all items: a work unit is one (row, KV head), covering the
    /// query heads that share it; it reads only the caches (complete up to
    /// this call's end) and writes its own part of `att`, so units run in
    /// any order on any thread with the same arithmetic.
    fn attend(&self, m: &Model, batch: &Batch<'_, '_>, il: usize, qs: &[f32], att: &mut [f32]) {
        let (items, token_at, nkv) = (&*batch.items, &batch.token_at[..], self.n_head_kv);
        let d = &m.desc;
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
        let fns = attention_fns(m.isa, hd);
        let softmax = act_fns(m.isa).softmax;
        m.pool.for_each_mut(att, width, &|i, out| {
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
}

/// One sequence's K and V caches of a layer, per KV head.
type KvCaches<'a> = (&'a [Vec<f16>], &'a [Vec<f16>]);

thread_local! {
    /// Per-thread room for one attention unit's queries and scores: grows
    /// to the longest context seen, then is reused (no allocation per token
    /// or head).
    static ATTEND_SCRATCH: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// A dense SwiGLU feed-forward.
pub(crate) struct DenseFfn {
    pub gate: Tensor,
    pub up: Tensor,
    pub down: Tensor,
}

impl DenseFfn {
    /// `down(silu(gate h) * up h)` for `n` rows of `h`, into `out`.
    pub fn forward(&self, m: &Model, h: &[f32], n: usize, out: &mut [f32]) {
        let f = self.gate.rows;
        let mut g = m.scratch.zeroed(n * f);
        let mut u = m.scratch.zeroed(n * f);
        m.matmuls(vec![
            (&self.gate, h, n, &mut g[..]),
            (&self.up, h, n, &mut u[..]),
        ]);
        m.swiglu(&mut g, &u);
        m.matmul(&self.down, &g, n, out);
    }
}

/// What the router chose: for each (token, slot), slot-major within a
/// token, the expert and its weight.
pub(crate) struct Routing {
    pub k: usize,
    pub chosen: Vec<(usize, f32)>,
}

/// A mixture of SwiGLU experts with LFM2's sigmoid router and selection
/// bias.
pub(crate) struct MoeFfn {
    pub router: Tensor,
    pub bias: Vec<f32>,
    /// Stacked experts: expert e's rows are `e * n_ff_exp ..` (gate, up)
    /// and `e * n_embd ..` (down).
    pub gate: Tensor,
    pub up: Tensor,
    pub down: Tensor,
}

impl MoeFfn {
    /// The router's choice for each of `n` tokens (`h`: their normalized
    /// rows): sigmoid scores, the bias added for selection only, top-k, the
    /// chosen scores normalized into weights. Fills `margins` (per token,
    /// the smallest gap between the last chosen and the best unchosen
    /// selection score) when given.
    pub fn route(
        &self,
        m: &Model,
        h: &[f32],
        n: usize,
        mut margins: Option<&mut [f32]>,
    ) -> Routing {
        let d = &m.desc;
        let (ne, k) = (d.n_expert, d.n_expert_used);
        let bias = &self.bias[..];
        let mut logits = m.scratch.zeroed(n * ne);
        m.matmul(&self.router, h, n, &mut logits);
        // Per token: the chosen experts (in selection order) and their weights.
        let mut chosen = vec![(0usize, 0.0f32); n * k];
        let (mut probs, mut order) = (vec![0.0f32; ne], vec![0usize; ne]);
        for t in 0..n {
            self.rank(&logits[t * ne..(t + 1) * ne], &mut probs, &mut order);
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
        Routing { k, chosen }
    }

    /// One token's router logits as sigmoid scores into `probs`, and the
    /// experts into `order`, best selection score (score + bias) first.
    fn rank(&self, logits: &[f32], probs: &mut [f32], order: &mut [usize]) {
        let bias = &self.bias[..];
        probs
            .iter_mut()
            .zip(logits)
            .for_each(|(p, &v)| *p = sigmoid(v));
        order.iter_mut().enumerate().for_each(|(i, o)| *o = i);
        order.sort_by(|&a, &b| (probs[b] + bias[b]).total_cmp(&(probs[a] + bias[a])));
    }

    /// The experts this layer would choose for `n` tokens (`h`: their
    /// normalized rows) with at least `min_gap` between an expert's
    /// selection score and the best unchosen one's for the same token: the
    /// union over tokens, surest first. Only steers prefetching.
    pub fn predict(&self, m: &Model, h: &[f32], n: usize, min_gap: f32) -> Vec<usize> {
        let d = &m.desc;
        let (ne, k) = (d.n_expert, d.n_expert_used);
        let bias = &self.bias[..];
        let mut logits = m.scratch.zeroed(n * ne);
        m.matmul(&self.router, h, n, &mut logits);
        let (mut probs, mut order) = (vec![0.0f32; ne], vec![0usize; ne]);
        // Per expert, its largest gap over the tokens (-1: not chosen).
        let mut gap = vec![-1.0f32; ne];
        for t in 0..n {
            self.rank(&logits[t * ne..(t + 1) * ne], &mut probs, &mut order);
            let score = |i: usize| probs[i] + bias[i];
            let floor = order.get(k).map_or(f32::NEG_INFINITY, |&i| score(i));
            for &i in &order[..k] {
                gap[i] = gap[i].max(score(i) - floor);
            }
        }
        let mut sure: Vec<usize> = (0..ne)
            .filter(|&i| gap[i] >= 0.0 && gap[i] >= min_gap)
            .collect();
        sure.sort_by(|&a, &b| gap[b].total_cmp(&gap[a]));
        sure
    }

    /// Mixture of experts over `n` tokens (`x`: the residual stream, for
    /// the pager's prediction of later layers; `h`: its normalized rows):
    /// routes them, then the weighted sum of each token's SwiGLU experts
    /// (summed in selection order, as llama.cpp does) into `out`. Returns
    /// how many distinct experts the tokens chose.
    #[allow(clippy::too_many_arguments)]
    pub fn forward(
        &self,
        m: &Model,
        il: usize,
        x: &[f32],
        h: &[f32],
        n: usize,
        out: &mut [f32],
        margins: Option<&mut [f32]>,
    ) -> usize {
        let d = &m.desc;
        let (e, ne, f) = (d.n_embd, d.n_expert, d.n_ff_exp);
        let Routing { k, chosen } = self.route(m, h, n, margins);
        let (gate, up, down) = (&self.gate, &self.up, &self.down);
        // Each chosen expert's tokens, as rows of flat buffers, experts in
        // router order (as the tokens' slots first name them: the pager
        // loads them in that order). The chosen experts' gate and up
        // products run in one parallel region, then their down products in
        // another; under paging, those being loaded run later, as their
        // loads end. The order changes no value: each expert's product is
        // its own, and the sums below go in slot order.
        let mut experts: Vec<(usize, Vec<(usize, usize)>)> = Vec::new();
        let mut at_of = vec![usize::MAX; ne];
        for (i, &(ex, _)) in chosen.iter().enumerate() {
            if at_of[ex] == usize::MAX {
                at_of[ex] = experts.len();
                experts.push((ex, Vec::new()));
            }
            experts[at_of[ex]].1.push((i / k, i % k));
        }
        let mut batch = vec![true; experts.len()];
        if let Some(p) = &m.pager {
            let uses: Vec<(usize, usize)> = experts.iter().map(|(ex, u)| (*ex, u.len())).collect();
            batch = p.route(il, &uses);
            for next in p.next_moe_layers(il) {
                if p.wants_prediction(next) {
                    p.predict(next, &m.predict_experts(next, x, n, p.predict_margin()));
                }
            }
        }
        let counts: Vec<usize> = experts.iter().map(|(_, u)| u.len()).collect();
        // The row of (token, slot) in the flat buffers.
        let mut row_of = vec![0usize; n * k];
        // Every row of these four is written before it is read (each (token,
        // slot) row is one expert's, and every expert runs): no clearing.
        let mut hx_all = m.scratch.overwritten(n * k * e);
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
            m.scratch.overwritten(n * k * f),
            m.scratch.overwritten(n * k * f),
        );
        let mut gs = split_rows(&mut g_all, &counts, f);
        let mut us = split_rows(&mut u_all, &counts, f);
        let mut dn_all = m.scratch.overwritten(n * k * e);
        let mut dns = split_rows(&mut dn_all, &counts, e);
        let swiglu = act_fns(m.isa).swiglu;
        let mut waiting: Vec<usize> = (0..experts.len()).filter(|&i| !batch[i]).collect();
        loop {
            let mut jobs = Vec::with_capacity(2 * experts.len());
            for (i, (((hx, (g_t, u_t, _)), g), u)) in hxs
                .iter()
                .zip(&slices)
                .zip(&mut gs)
                .zip(&mut us)
                .enumerate()
            {
                if batch[i] {
                    let rows = hx.len() / e;
                    jobs.push((g_t, &hx[..], rows, &mut g[..]));
                    jobs.push((u_t, &hx[..], rows, &mut u[..]));
                }
            }
            if !jobs.is_empty() {
                m.matmuls(jobs);
                // The batch's SwiGLU in one region, an expert per hand-out
                // (per element, so the same values as `swiglu`'s split).
                m.pool.for_each_mut(&mut gs, 1, &|i, g| {
                    if batch[i] {
                        swiglu(g[0], us[i])
                    }
                });
                let jobs = slices
                    .iter()
                    .zip(&gs)
                    .zip(&mut dns)
                    .zip(&batch)
                    .filter(|(_, b)| **b)
                    .map(|((((_, _, d_t), g), dn), _)| (d_t, &g[..], g.len() / f, &mut dn[..]))
                    .collect();
                m.matmuls(jobs);
            }
            let Some(p) = m.pager.as_ref().filter(|_| !waiting.is_empty()) else {
                break;
            };
            // The next batch: the experts whose loads have ended.
            let ids: Vec<usize> = waiting.iter().map(|&i| experts[i].0).collect();
            let ready = p.wait_ready(il, &ids);
            batch.iter_mut().for_each(|b| *b = false);
            for (&i, &r) in waiting.iter().zip(&ready) {
                batch[i] = r;
            }
            waiting.retain(|&i| !batch[i]);
        }
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
}
