//! An independent f64 reference forward pass, written plainly from the LFM2
//! architecture description (not from the engine's code), checked against
//! the engine on the small F32 presets. The engine keeps its KV cache in f16
//! like llama.cpp, so agreement is to ~1e-3 of the logit range, not exact.

// Index loops read closest to the math in a reference implementation.
#![allow(clippy::needless_range_loop)]

use lfm_engine::engine::{BatchItem, LogitsWanted, Model, SeqState};
use lfm_engine::gguf::GgmlType;
use lfm_engine::gguf::Gguf;
use lfm_engine::synth;
use std::sync::Arc;

struct Ref {
    g: Arc<Gguf>,
}

type M = Vec<Vec<f64>>; // [rows][cols]

impl Ref {
    fn meta_u(&self, k: &str) -> usize {
        let arch = self.g.architecture().unwrap();
        self.g
            .get(&format!("{arch}.{k}"))
            .unwrap()
            .as_i64()
            .unwrap() as usize
    }
    fn meta_f(&self, k: &str) -> f64 {
        let arch = self.g.architecture().unwrap();
        self.g
            .get(&format!("{arch}.{k}"))
            .unwrap()
            .as_f64()
            .unwrap()
    }
    fn has(&self, name: &str) -> bool {
        self.g.tensor(name).is_some()
    }
    /// A tensor as rows of `dims[0]` values (F32 only: this is the reference).
    fn t(&self, name: &str) -> M {
        let t = self.g.tensor(name).unwrap_or_else(|| panic!("{name}"));
        assert_eq!(t.ty, GgmlType::F32);
        let vals: Vec<f64> = self
            .g
            .tensor_data(t)
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()) as f64)
            .collect();
        vals.chunks(t.dims[0] as usize)
            .map(|r| r.to_vec())
            .collect()
    }
    fn v(&self, name: &str) -> Vec<f64> {
        self.t(name).concat()
    }
}

fn matvec(w: &[Vec<f64>], x: &[f64]) -> Vec<f64> {
    w.iter()
        .map(|r| r.iter().zip(x).map(|(a, b)| a * b).sum())
        .collect()
}

fn rmsnorm(x: &[f64], g: &[f64], eps: f64) -> Vec<f64> {
    let ms = x.iter().map(|v| v * v).sum::<f64>() / x.len() as f64;
    let s = 1.0 / (ms + eps).sqrt();
    x.iter().zip(g).map(|(v, w)| v * s * w).collect()
}

fn silu(x: f64) -> f64 {
    x / (1.0 + (-x).exp())
}

/// Logits for every position of `tokens`, from scratch.
fn reference_logits(r: &Ref, tokens: &[u32]) -> Vec<Vec<f64>> {
    let n_layer = r.meta_u("block_count");
    let e = r.meta_u("embedding_length");
    let n_head = r.meta_u("attention.head_count");
    let hd = e / n_head;
    let eps = r.meta_f("attention.layer_norm_rms_epsilon");
    let base = r.meta_f("rope.freq_base");
    let l_cache = r.meta_u("shortconv.l_cache");
    let moe = r.g.architecture() == Some("lfm2moe");
    let embd = r.t("token_embd.weight");
    let mut xs: Vec<Vec<f64>> = tokens.iter().map(|&t| embd[t as usize].clone()).collect();
    let n = xs.len();
    for il in 0..n_layer {
        let p = |s: &str| format!("blk.{il}.{s}");
        let hs: Vec<Vec<f64>> = xs
            .iter()
            .map(|x| rmsnorm(x, &r.v(&p("attn_norm.weight")), eps))
            .collect();
        let mixed: Vec<Vec<f64>> = if r.has(&p("shortconv.conv.weight")) {
            let conv = r.t(&p("shortconv.conv.weight")); // [e][l_cache]
            let inp = r.t(&p("shortconv.in_proj.weight"));
            let outp = r.t(&p("shortconv.out_proj.weight"));
            let bcx: Vec<Vec<f64>> = hs.iter().map(|h| matvec(&inp, h)).collect();
            let bx: Vec<Vec<f64>> = bcx
                .iter()
                .map(|v| (0..e).map(|c| v[c] * v[2 * e + c]).collect())
                .collect();
            (0..n)
                .map(|t| {
                    let y: Vec<f64> = (0..e)
                        .map(|c| {
                            // Causal conv: tap k sees input t - (l_cache - 1 - k); before 0 it is zero.
                            let conv_out: f64 = (0..l_cache)
                                .map(|k| {
                                    let src = t as isize - (l_cache as isize - 1 - k as isize);
                                    if src < 0 {
                                        0.0
                                    } else {
                                        bx[src as usize][c] * conv[c][k]
                                    }
                                })
                                .sum();
                            bcx[t][e + c] * conv_out
                        })
                        .collect();
                    matvec(&outp, &y)
                })
                .collect()
        } else {
            let wq = r.t(&p("attn_q.weight"));
            let wk = r.t(&p("attn_k.weight"));
            let wv = r.t(&p("attn_v.weight"));
            let wo = r.t(&p("attn_output.weight"));
            let qn = r.v(&p("attn_q_norm.weight"));
            let kn = r.v(&p("attn_k_norm.weight"));
            let n_kv = wk.len() / hd;
            let rope = |v: &mut [f64], pos: usize| {
                for i in 0..hd / 2 {
                    let theta = pos as f64 * base.powf(-2.0 * i as f64 / hd as f64);
                    let (s, c) = theta.sin_cos();
                    let (a, b) = (v[i], v[i + hd / 2]);
                    v[i] = a * c - b * s;
                    v[i + hd / 2] = a * s + b * c;
                }
            };
            let heads = |w: &M, norm: &[f64], h: &[f64], pos: usize| -> Vec<Vec<f64>> {
                matvec(w, h)
                    .chunks(hd)
                    .map(|c| {
                        let mut v = rmsnorm(c, norm, eps);
                        rope(&mut v, pos);
                        v
                    })
                    .collect()
            };
            let q: Vec<Vec<Vec<f64>>> = hs
                .iter()
                .enumerate()
                .map(|(t, h)| heads(&wq, &qn, h, t))
                .collect();
            let k: Vec<Vec<Vec<f64>>> = hs
                .iter()
                .enumerate()
                .map(|(t, h)| heads(&wk, &kn, h, t))
                .collect();
            let v: Vec<Vec<Vec<f64>>> = hs
                .iter()
                .map(|h| matvec(&wv, h).chunks(hd).map(|c| c.to_vec()).collect())
                .collect();
            (0..n)
                .map(|t| {
                    let mut out = Vec::with_capacity(e);
                    for head in 0..n_head {
                        let kvh = head / (n_head / n_kv);
                        let s: Vec<f64> = (0..=t)
                            .map(|j| {
                                q[t][head]
                                    .iter()
                                    .zip(&k[j][kvh])
                                    .map(|(a, b)| a * b)
                                    .sum::<f64>()
                                    / (hd as f64).sqrt()
                            })
                            .collect();
                        let mx = s.iter().cloned().fold(f64::MIN, f64::max);
                        let z: f64 = s.iter().map(|x| (x - mx).exp()).sum();
                        for dim in 0..hd {
                            out.push(
                                (0..=t)
                                    .map(|j| (s[j] - mx).exp() / z * v[j][kvh][dim])
                                    .sum(),
                            );
                        }
                    }
                    matvec(&wo, &out)
                })
                .collect()
        };
        for (x, m) in xs.iter_mut().zip(&mixed) {
            x.iter_mut().zip(m).for_each(|(a, b)| *a += b);
        }
        let ffn_in: Vec<Vec<f64>> = xs
            .iter()
            .map(|x| rmsnorm(x, &r.v(&p("ffn_norm.weight")), eps))
            .collect();
        let swiglu = |g: &M, u: &M, dn: &M, h: &[f64]| -> Vec<f64> {
            let a: Vec<f64> = matvec(g, h)
                .iter()
                .zip(matvec(u, h))
                .map(|(g, u)| silu(*g) * u)
                .collect();
            matvec(dn, &a)
        };
        let ffn: Vec<Vec<f64>> = if moe && r.has(&p("ffn_gate_inp.weight")) {
            let router = r.t(&p("ffn_gate_inp.weight"));
            let bias = r.v(&p("exp_probs_b.bias"));
            let (g, u, dn) = (
                r.t(&p("ffn_gate_exps.weight")),
                r.t(&p("ffn_up_exps.weight")),
                r.t(&p("ffn_down_exps.weight")),
            );
            let ne = router.len();
            let f = g.len() / ne;
            let k_used = r.meta_u("expert_used_count");
            ffn_in
                .iter()
                .map(|h| {
                    let probs: Vec<f64> = matvec(&router, h)
                        .iter()
                        .map(|&l| 1.0 / (1.0 + (-l).exp()))
                        .collect();
                    let mut idx: Vec<usize> = (0..ne).collect();
                    idx.sort_by(|&a, &b| {
                        (probs[b] + bias[b])
                            .partial_cmp(&(probs[a] + bias[a]))
                            .unwrap()
                    });
                    let sel = &idx[..k_used];
                    let total: f64 = sel.iter().map(|&i| probs[i]).sum();
                    let mut out = vec![0.0; e];
                    for &x in sel {
                        let y = swiglu(
                            &g[x * f..(x + 1) * f].to_vec(),
                            &u[x * f..(x + 1) * f].to_vec(),
                            &dn[x * e..(x + 1) * e].to_vec(),
                            h,
                        );
                        out.iter_mut()
                            .zip(y)
                            .for_each(|(o, v)| *o += probs[x] / total * v);
                    }
                    out
                })
                .collect()
        } else {
            let (g, u, dn) = (
                r.t(&p("ffn_gate.weight")),
                r.t(&p("ffn_up.weight")),
                r.t(&p("ffn_down.weight")),
            );
            ffn_in.iter().map(|h| swiglu(&g, &u, &dn, h)).collect()
        };
        for (x, m) in xs.iter_mut().zip(&ffn) {
            x.iter_mut().zip(m).for_each(|(a, b)| *a += b);
        }
    }
    let head = if r.has("output.weight") {
        r.t("output.weight")
    } else {
        embd
    };
    let norm = r.v("token_embd_norm.weight");
    xs.iter()
        .map(|x| matvec(&head, &rmsnorm(x, &norm, eps)))
        .collect()
}

fn check(preset: &str) {
    let mut bytes = Vec::new();
    synth::write_to(
        synth::find_preset(preset).unwrap(),
        GgmlType::F32,
        11,
        &mut bytes,
    )
    .unwrap();
    let g = Arc::new(Gguf::from_bytes(bytes).unwrap());
    let model = Model::from_gguf(g.clone()).unwrap();
    let tokens = [1u32, 6, 300, 45, 99, 120, 7, 3, 200, 201, 17];
    let mut st = SeqState::new(&model);
    let ours = model
        .forward(&mut [BatchItem {
            state: &mut st,
            tokens: &tokens,
            logits: LogitsWanted::All,
        }])
        .unwrap()
        .pop()
        .unwrap();
    let reference = reference_logits(&Ref { g }, &tokens);
    for (pos, (o, r)) in ours.chunks(model.n_vocab()).zip(&reference).enumerate() {
        let range =
            r.iter().cloned().fold(f64::MIN, f64::max) - r.iter().cloned().fold(f64::MAX, f64::min);
        let max_d = o
            .iter()
            .zip(r)
            .map(|(a, b)| (*a as f64 - b).abs())
            .fold(0.0, f64::max);
        assert!(
            max_d <= 1e-3 * range,
            "{preset} position {pos}: max |d| {max_d} vs range {range}"
        );
        let am = |v: &[f64]| {
            v.iter()
                .enumerate()
                .max_by(|a, b| a.1.partial_cmp(b.1).unwrap())
                .unwrap()
                .0
        };
        let ov: Vec<f64> = o.iter().map(|&v| v as f64).collect();
        assert_eq!(am(&ov), am(r), "{preset} position {pos}: argmax");
    }
}

#[test]
fn engine_matches_f64_reference_on_tiny_dense() {
    check("tiny-dense");
}

#[test]
fn engine_matches_f64_reference_on_tiny_moe() {
    check("tiny-moe");
}
