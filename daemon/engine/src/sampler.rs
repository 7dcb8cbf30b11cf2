//! Token sampling: penalties over a recent window, then top-k, top-p, min-p,
//! temperature and a seeded draw, in llama.cpp's default order. Temperature 0
//! is greedy. Defaults are Liquid AI's recommendation for LFM2 text models.

use crate::rng::Rng;
use std::collections::HashMap;

#[derive(Clone, Debug, PartialEq)]
pub struct SamplingParams {
    /// 0 = greedy.
    pub temperature: f32,
    /// 0 = off.
    pub top_k: usize,
    /// 1.0 = off.
    pub top_p: f32,
    /// 0.0 = off.
    pub min_p: f32,
    /// 1.0 = off. Divides positive logits and multiplies negative ones of
    /// tokens seen in the window.
    pub repeat_penalty: f32,
    pub presence_penalty: f32,
    pub frequency_penalty: f32,
    /// How many recent tokens the penalties look at.
    pub penalty_window: usize,
    pub seed: u64,
}

impl Default for SamplingParams {
    fn default() -> Self {
        SamplingParams {
            temperature: 0.3,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.15,
            repeat_penalty: 1.05,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            penalty_window: 64,
            seed: 0,
        }
    }
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum ParamError {
    #[error("{name} must be {rule}, got {value}")]
    Invalid {
        name: &'static str,
        rule: &'static str,
        value: f64,
    },
}

impl SamplingParams {
    /// Checks every field; messages say what range is allowed.
    pub fn validate(&self) -> Result<(), ParamError> {
        let check = |name, ok: bool, rule, value: f32| {
            if ok {
                Ok(())
            } else {
                Err(ParamError::Invalid {
                    name,
                    rule,
                    value: value.into(),
                })
            }
        };
        let t = self.temperature;
        check(
            "temperature",
            t.is_finite() && (0.0..=100.0).contains(&t),
            "between 0 and 100",
            t,
        )?;
        let p = self.top_p;
        check(
            "top_p",
            p.is_finite() && p > 0.0 && p <= 1.0,
            "in (0, 1]",
            p,
        )?;
        let m = self.min_p;
        check(
            "min_p",
            m.is_finite() && (0.0..=1.0).contains(&m),
            "in [0, 1]",
            m,
        )?;
        let r = self.repeat_penalty;
        check(
            "repeat_penalty",
            r.is_finite() && r > 0.0 && r <= 10.0,
            "in (0, 10]",
            r,
        )?;
        let pp = self.presence_penalty;
        check(
            "presence_penalty",
            pp.is_finite() && pp.abs() <= 10.0,
            "in [-10, 10]",
            pp,
        )?;
        let fp = self.frequency_penalty;
        check(
            "frequency_penalty",
            fp.is_finite() && fp.abs() <= 10.0,
            "in [-10, 10]",
            fp,
        )?;
        Ok(())
    }
}

/// A sampler for one sequence: parameters plus its own RNG stream.
pub struct Sampler {
    params: SamplingParams,
    rng: Rng,
}

impl Sampler {
    pub fn new(params: SamplingParams) -> Self {
        let rng = Rng::new(params.seed);
        Sampler { params, rng }
    }

    pub fn params(&self) -> &SamplingParams {
        &self.params
    }

    /// Picks the next token from `logits`, given the tokens so far (prompt
    /// and generated) for the penalties.
    ///
    /// The distribution is llama.cpp's chain (penalties, top-k, top-p,
    /// min-p, temperature) over the candidates sorted by logit (ties: lower
    /// id first), but found without sorting the vocabulary: min-p keeps
    /// only tokens within `ln(min_p)` of the best logit and top-k only `k`,
    /// so those are selected in O(vocab) and only the survivors are sorted
    /// (with the default min_p 0.15 a handful of 65,536). The softmax
    /// normalizer top-p needs is summed over the top-k set (all tokens
    /// without top-k) only when top-p is on.
    pub fn sample(&mut self, logits: &[f32], history: &[u32]) -> u32 {
        self.sample_allowed(logits, history, None)
    }

    /// [`Sampler::sample`] among the tokens `allowed` lets through (bit
    /// `t % 32` of word `t / 32`; a constraint's mask), applied after the
    /// penalties and before the cuts: the others' logits become -inf, so
    /// they are never candidates. The distribution over the allowed tokens
    /// is the one the parameters define over them alone.
    pub fn sample_allowed(
        &mut self,
        logits: &[f32],
        history: &[u32],
        allowed: Option<&[u32]>,
    ) -> u32 {
        let p = &self.params;
        let mut l = logits.to_vec();
        apply_penalties(p, &mut l, history);
        if let Some(bits) = allowed {
            for (i, v) in l.iter_mut().enumerate() {
                if bits.get(i / 32).is_none_or(|w| w >> (i % 32) & 1 == 0) {
                    *v = f32::NEG_INFINITY;
                }
            }
        }
        // NaN logits never win (and a NaN best leaves nothing to compare).
        let Some((best_id, max)) = l.iter().enumerate().filter(|(_, v)| !v.is_nan()).fold(
            None,
            |best: Option<(usize, f32)>, (i, &v)| match best {
                Some((_, b)) if v <= b => best,
                _ => Some((i, v)),
            },
        ) else {
            return 0;
        };
        if p.temperature <= 0.0 {
            // Greedy: highest logit, lowest id on ties.
            return best_id as u32;
        }
        // Candidates: every token if min-p is off, else those min-p can
        // keep: exp(l - max) >= min_p (the f32 difference, as `softmax`
        // takes it), found by a cheap bound then checked exactly.
        let mut cand: Vec<(u32, f32)> = if p.min_p > 0.0 {
            let bound = f64::from(p.min_p).ln() - 1e-6;
            l.iter()
                .enumerate()
                .filter(|&(_, &v)| {
                    let d = f64::from(v - max);
                    d >= bound && d.exp() >= f64::from(p.min_p)
                })
                .map(|(i, &v)| (i as u32, v))
                .collect()
        } else {
            l.iter()
                .enumerate()
                .filter(|&(_, &v)| !v.is_nan() && v > f32::NEG_INFINITY)
                .map(|(i, &v)| (i as u32, v))
                .collect()
        };
        let order = |a: &(u32, f32), b: &(u32, f32)| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0));
        if p.top_k > 0 && cand.len() > p.top_k {
            cand.select_nth_unstable_by(p.top_k - 1, order);
            cand.truncate(p.top_k);
        }
        cand.sort_unstable_by(order);
        if p.top_p < 1.0 {
            // The normalizer over the top-k set, of which `cand` may be
            // only the min-p part.
            let z = top_k_mass(&l, max, p.top_k);
            let mut acc = 0.0;
            let mut keep = cand.len();
            for (i, c) in cand.iter().enumerate() {
                acc += f64::from(c.1 - max).exp() / z;
                if acc >= f64::from(p.top_p) {
                    keep = i + 1;
                    break;
                }
            }
            cand.truncate(keep);
        }
        draw(&mut cand, p.temperature, &mut self.rng)
    }
}

/// The seeded draw from `cand` (sorted by logit, descending; not empty)
/// at `temperature`: cumulative probabilities in that order.
fn draw(cand: &mut [(u32, f32)], temperature: f32, rng: &mut Rng) -> u32 {
    for c in cand.iter_mut() {
        c.1 /= temperature;
    }
    let probs = softmax(cand);
    let r = rng.next_f32() as f64;
    let mut acc = 0.0;
    for (c, pr) in cand.iter().zip(&probs) {
        acc += pr;
        if r < acc {
            return c.0;
        }
    }
    cand[cand.len() - 1].0
}

/// Repetition, presence and frequency penalties on the tokens of the
/// recent window.
fn apply_penalties(p: &SamplingParams, l: &mut [f32], history: &[u32]) {
    let window = &history[history.len().saturating_sub(p.penalty_window)..];
    if window.is_empty()
        || (p.repeat_penalty == 1.0 && p.presence_penalty == 0.0 && p.frequency_penalty == 0.0)
    {
        return;
    }
    let mut counts: HashMap<u32, u32> = HashMap::new();
    for &t in window {
        *counts.entry(t).or_default() += 1;
    }
    for (&t, &c) in &counts {
        if let Some(v) = l.get_mut(t as usize) {
            *v = if *v > 0.0 {
                *v / p.repeat_penalty
            } else {
                *v * p.repeat_penalty
            };
            *v -= c as f32 * p.frequency_penalty + p.presence_penalty;
        }
    }
}

/// `sum exp(l - max)` over the `top_k` highest logits (all when 0), NaN
/// left out: softmax's normalizer over the top-k set.
fn top_k_mass(l: &[f32], max: f32, top_k: usize) -> f64 {
    let e = |v: f32| f64::from(v - max).exp();
    if top_k == 0 || top_k >= l.len() {
        return l.iter().filter(|v| !v.is_nan()).map(|&v| e(v)).sum();
    }
    let mut v: Vec<f32> = l.iter().copied().filter(|v| !v.is_nan()).collect();
    if v.len() > top_k {
        v.select_nth_unstable_by(top_k - 1, |a, b| b.total_cmp(a));
        v.truncate(top_k);
    }
    v.into_iter().map(e).sum()
}

/// Probabilities of candidates sorted by logit, descending.
fn softmax(cand: &[(u32, f32)]) -> Vec<f64> {
    let max = cand.iter().map(|c| c.1).fold(f32::NEG_INFINITY, f32::max);
    let e: Vec<f64> = cand.iter().map(|c| f64::from(c.1 - max).exp()).collect();
    let z: f64 = e.iter().sum();
    e.into_iter().map(|v| v / z).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The sampler as it was (a full sort of the vocabulary, then the same
    /// draw), kept as the reference the selection-based one must agree with.
    fn sample_by_sorting(
        p: &SamplingParams,
        rng: &mut Rng,
        logits: &[f32],
        history: &[u32],
        allowed: Option<&[bool]>,
    ) -> u32 {
        let mut l = logits.to_vec();
        apply_penalties(p, &mut l, history);
        let mut cand: Vec<(u32, f32)> = l.iter().enumerate().map(|(i, &v)| (i as u32, v)).collect();
        cand.retain(|c| !c.1.is_nan() && allowed.is_none_or(|a| a[c.0 as usize]));
        if cand.is_empty() {
            return 0;
        }
        if p.temperature <= 0.0 {
            return cand
                .iter()
                .fold(cand[0], |best, &c| if c.1 > best.1 { c } else { best })
                .0;
        }
        cand.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        if p.top_k > 0 {
            cand.truncate(p.top_k.max(1));
        }
        let probs = softmax(&cand);
        let mut keep = cand.len();
        if p.top_p < 1.0 {
            let mut acc = 0.0;
            for (i, pr) in probs.iter().enumerate() {
                acc += pr;
                if acc >= f64::from(p.top_p) {
                    keep = i + 1;
                    break;
                }
            }
        }
        if p.min_p > 0.0 {
            let floor = probs[0] * f64::from(p.min_p);
            keep = keep.min(probs.iter().take_while(|&&pr| pr >= floor).count().max(1));
        }
        cand.truncate(keep);
        draw(&mut cand, p.temperature, rng)
    }

    /// Same seed, same token as the sort-based sampler, for every
    /// combination of parameters, on random logits of several shapes
    /// (flat, peaked, ties, NaNs, a 65,536 vocabulary), with penalties;
    /// and under masks (a few tokens, a third, one), the same draw as the
    /// sort-based sampler over the allowed tokens alone.
    #[test]
    fn selection_draws_what_sorting_draws() {
        let mut rng = Rng::new(99);
        let mut draws = 0;
        for shape in 0..5 {
            let n = if shape == 4 { 65_536 } else { 500 };
            // The full-size vocabulary: fewer cases (the reference sorts it).
            let (cases, big) = if shape == 4 { (1, true) } else { (6, false) };
            for case in 0..cases {
                let logits: Vec<f32> = (0..n)
                    .map(|i| {
                        let u = rng.next_f32();
                        match shape {
                            0 => u * 2.0,                 // flat
                            1 => u * 30.0 - 15.0,         // wide
                            2 => (u * 8.0).round() * 0.5, // many ties
                            3 if i % 97 == 3 => f32::NAN, // NaNs
                            _ => u * 12.0 - (i % 7) as f32,
                        }
                    })
                    .collect();
                let history: Vec<u32> = (0..40)
                    .map(|_| (rng.next_f32() * n as f32) as u32 % n as u32)
                    .collect();
                // Masks letting through a few, a third, and one token.
                let masks: Vec<Vec<bool>> = [0.02f32, 0.33, 0.0]
                    .iter()
                    .map(|&share| {
                        let one = (rng.next_f32() * n as f32) as usize % n;
                        (0..n).map(|i| i == one || rng.next_f32() < share).collect()
                    })
                    .collect();
                let pick = |all: &'static [f32], few: &'static [f32]| if big { few } else { all };
                for &temperature in pick(&[0.0, 0.3, 1.0, 2.5], &[0.3, 1.0]) {
                    for top_k in if big { vec![0, 40] } else { vec![0, 1, 5, 40] } {
                        for &top_p in pick(&[1.0, 0.95, 0.5], &[1.0, 0.9]) {
                            for &min_p in pick(&[0.0, 0.05, 0.15, 0.9], &[0.0, 0.15]) {
                                for &repeat_penalty in pick(&[1.0, 1.05], &[1.05]) {
                                    let p = SamplingParams {
                                        temperature,
                                        top_k,
                                        top_p,
                                        min_p,
                                        repeat_penalty,
                                        presence_penalty: 0.1,
                                        seed: (shape * 100 + case) as u64,
                                        ..Default::default()
                                    };
                                    let mut s = Sampler::new(p.clone());
                                    let mut r = Rng::new(p.seed);
                                    for step in 0..3 {
                                        let h = &history[..10 * step + 10];
                                        let want = sample_by_sorting(&p, &mut r, &logits, h, None);
                                        let got = s.sample(&logits, h);
                                        assert_eq!(
                                            got, want,
                                            "shape {shape} case {case} {p:?} step {step}"
                                        );
                                        draws += 1;
                                    }
                                    // Under a mask (a constraint's): the same
                                    // draw over the allowed tokens alone.
                                    let mut s = Sampler::new(p.clone());
                                    let mut r = Rng::new(p.seed);
                                    for (step, a) in masks.iter().enumerate() {
                                        let h = &history[..10 * step + 10];
                                        let bits = bits_of(a);
                                        let want =
                                            sample_by_sorting(&p, &mut r, &logits, h, Some(a));
                                        let got = s.sample_allowed(&logits, h, Some(&bits));
                                        assert_eq!(
                                            got, want,
                                            "masked: shape {shape} case {case} {p:?} step {step}"
                                        );
                                        assert!(
                                            a[got as usize]
                                                || a.iter()
                                                    .zip(&logits)
                                                    .all(|(&ok, v)| !ok || v.is_nan())
                                        );
                                        draws += 1;
                                    }
                                }
                            }
                        }
                    }
                }
            }
        }
        assert!(draws > 8_000, "{draws}");
    }

    /// A mask as `sample_allowed` takes it: bit `t % 32` of word `t / 32`.
    fn bits_of(allowed: &[bool]) -> Vec<u32> {
        let mut w = vec![0u32; allowed.len().div_ceil(32)];
        for (i, _) in allowed.iter().enumerate().filter(|(_, a)| **a) {
            w[i / 32] |= 1 << (i % 32);
        }
        w
    }

    fn logits() -> Vec<f32> {
        (0..100)
            .map(|i| ((i * 37) % 17) as f32 * 0.3 - (i as f32) * 0.01)
            .collect()
    }

    fn greedy() -> SamplingParams {
        SamplingParams {
            temperature: 0.0,
            repeat_penalty: 1.0,
            ..Default::default()
        }
    }

    #[test]
    fn defaults_are_liquid_recommendations() {
        let d = SamplingParams::default();
        assert_eq!(
            (d.temperature, d.min_p, d.repeat_penalty),
            (0.3, 0.15, 1.05)
        );
        d.validate().unwrap();
    }

    #[test]
    fn greedy_takes_the_argmax() {
        let l = logits();
        let best = (0..100)
            .max_by(|&a, &b| l[a].total_cmp(&l[b]).then(b.cmp(&a)))
            .unwrap() as u32;
        assert_eq!(Sampler::new(greedy()).sample(&l, &[]), best);
    }

    #[test]
    fn same_seed_same_tokens_other_seed_differs() {
        let l: Vec<f32> = (0..50).map(|i| (i % 7) as f32 * 0.1).collect();
        let params = SamplingParams {
            temperature: 1.0,
            min_p: 0.0,
            seed: 42,
            ..Default::default()
        };
        let run = |p: SamplingParams| {
            let mut s = Sampler::new(p);
            (0..64).map(|_| s.sample(&l, &[])).collect::<Vec<_>>()
        };
        assert_eq!(run(params.clone()), run(params.clone()));
        assert_ne!(
            run(params.clone()),
            run(SamplingParams { seed: 43, ..params })
        );
    }

    #[test]
    fn top_k_one_and_tiny_top_p_are_greedy() {
        let l = logits();
        let g = Sampler::new(greedy()).sample(&l, &[]);
        for seed in 0..20 {
            let k1 = SamplingParams {
                temperature: 2.0,
                top_k: 1,
                min_p: 0.0,
                seed,
                ..Default::default()
            };
            assert_eq!(Sampler::new(k1).sample(&l, &[]), g);
            let p = SamplingParams {
                temperature: 2.0,
                top_p: 1e-6,
                min_p: 0.0,
                seed,
                ..Default::default()
            };
            assert_eq!(Sampler::new(p).sample(&l, &[]), g);
        }
    }

    #[test]
    fn min_p_excludes_unlikely_tokens() {
        // Token 0 dominates; with min_p 0.5 nothing else survives.
        let mut l = vec![0.0f32; 10];
        l[0] = 5.0;
        for seed in 0..50 {
            let p = SamplingParams {
                temperature: 5.0,
                min_p: 0.5,
                repeat_penalty: 1.0,
                seed,
                ..Default::default()
            };
            assert_eq!(Sampler::new(p).sample(&l, &[]), 0);
        }
        // Without min_p a hot temperature picks others sometimes.
        let picked: std::collections::HashSet<u32> = (0..50)
            .map(|seed| {
                let p = SamplingParams {
                    temperature: 5.0,
                    min_p: 0.0,
                    repeat_penalty: 1.0,
                    seed,
                    ..Default::default()
                };
                Sampler::new(p).sample(&l, &[])
            })
            .collect();
        assert!(picked.len() > 1);
    }

    #[test]
    fn penalties_push_repeated_tokens_down() {
        let mut l = vec![0.0f32; 4];
        l[2] = 1.0;
        l[1] = 0.9;
        let p = SamplingParams {
            repeat_penalty: 1.5,
            ..greedy()
        };
        assert_eq!(Sampler::new(p.clone()).sample(&l, &[]), 2);
        assert_eq!(Sampler::new(p.clone()).sample(&l, &[2]), 1, "1.0/1.5 < 0.9");
        // Outside the window the penalty no longer applies.
        let w = SamplingParams {
            penalty_window: 2,
            ..p
        };
        assert_eq!(Sampler::new(w).sample(&l, &[2, 0, 3]), 2);
        let f = SamplingParams {
            frequency_penalty: 0.05,
            ..greedy()
        };
        assert_eq!(Sampler::new(f.clone()).sample(&l, &[2]), 2);
        assert_eq!(Sampler::new(f).sample(&l, &[2, 2, 2]), 1);
        let pr = SamplingParams {
            presence_penalty: 0.2,
            ..greedy()
        };
        assert_eq!(Sampler::new(pr).sample(&l, &[2]), 1);
    }

    #[test]
    fn bad_parameters_are_named() {
        let bad = [
            SamplingParams {
                temperature: f32::NAN,
                ..Default::default()
            },
            SamplingParams {
                temperature: -1.0,
                ..Default::default()
            },
            SamplingParams {
                top_p: 0.0,
                ..Default::default()
            },
            SamplingParams {
                min_p: 1.5,
                ..Default::default()
            },
            SamplingParams {
                repeat_penalty: 0.0,
                ..Default::default()
            },
        ];
        let names = [
            "temperature",
            "temperature",
            "top_p",
            "min_p",
            "repeat_penalty",
        ];
        for (p, name) in bad.iter().zip(names) {
            let e = p.validate().unwrap_err().to_string();
            assert!(e.starts_with(name), "{e}");
        }
    }

    #[test]
    fn nan_logits_never_win() {
        let l = [f32::NAN, 1.0, f32::NAN];
        assert_eq!(Sampler::new(greedy()).sample(&l, &[]), 1);
    }
}
