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
    pub fn sample(&mut self, logits: &[f32], history: &[u32]) -> u32 {
        let p = &self.params;
        let mut cand: Vec<(u32, f32)> = logits
            .iter()
            .enumerate()
            .map(|(i, &l)| (i as u32, l))
            .collect();
        let window = &history[history.len().saturating_sub(p.penalty_window)..];
        if !window.is_empty()
            && (p.repeat_penalty != 1.0 || p.presence_penalty != 0.0 || p.frequency_penalty != 0.0)
        {
            let mut counts: HashMap<u32, u32> = HashMap::new();
            for &t in window {
                *counts.entry(t).or_default() += 1;
            }
            for (&t, &c) in &counts {
                if let Some((_, l)) = cand.get_mut(t as usize) {
                    *l = if *l > 0.0 {
                        *l / p.repeat_penalty
                    } else {
                        *l * p.repeat_penalty
                    };
                    *l -= c as f32 * p.frequency_penalty + p.presence_penalty;
                }
            }
        }
        // NaN logits never win.
        cand.retain(|c| !c.1.is_nan());
        if cand.is_empty() {
            return 0;
        }
        if p.temperature <= 0.0 {
            // Greedy: highest logit, lowest id on ties.
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
        for c in &mut cand {
            c.1 /= p.temperature;
        }
        let probs = softmax(&cand);
        let r = self.rng.next_f32() as f64;
        let mut acc = 0.0;
        for (c, pr) in cand.iter().zip(&probs) {
            acc += pr;
            if r < acc {
                return c.0;
            }
        }
        cand[cand.len() - 1].0
    }
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
