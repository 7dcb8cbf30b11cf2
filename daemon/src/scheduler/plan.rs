//! What one engine step feeds: every decoding sequence its one token, and
//! prompt chunks from a bounded prefill budget, so a long prompt joining the
//! batch delays running decodes by at most one chunk's worth of compute.

use super::queue::Priority;

/// A running sequence as the planner sees it.
#[derive(Clone, Copy, Debug)]
pub struct StepNeed {
    /// Tokens still to feed before its next sample (1 while decoding).
    pub pending: usize,
    pub priority: Priority,
}

/// Tokens each sequence feeds this step (0: it waits), in input order.
///
/// Decoding sequences (one pending token) always run. Prefilling sequences
/// share `prefill_budget` tokens: interactive before background, then in
/// admission order (the input order), each taking as much of what is left
/// as it needs, so the oldest prompt finishes first. A budget of 0 is taken
/// as 1: prefill always progresses.
pub fn plan_step(running: &[StepNeed], prefill_budget: usize) -> Vec<usize> {
    let mut take = vec![0; running.len()];
    let mut budget = prefill_budget.max(1);
    for (i, r) in running.iter().enumerate() {
        if r.pending == 1 {
            take[i] = 1;
        }
    }
    for class in [Priority::Interactive, Priority::Background] {
        for (i, r) in running.iter().enumerate() {
            if r.pending > 1 && r.priority == class && budget > 0 {
                take[i] = r.pending.min(budget);
                budget -= take[i];
            }
        }
    }
    take
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(pending: usize) -> StepNeed {
        StepNeed {
            pending,
            priority: Priority::Interactive,
        }
    }

    fn bg(pending: usize) -> StepNeed {
        StepNeed {
            pending,
            priority: Priority::Background,
        }
    }

    #[test]
    fn decodes_always_run_and_prompts_share_the_budget() {
        let r = [run(1), run(600), run(1), run(100)];
        assert_eq!(plan_step(&r, 256), [1, 256, 1, 0]);
        let r = [run(1), run(200), run(100), run(1)];
        assert_eq!(plan_step(&r, 256), [1, 200, 56, 1]);
    }

    #[test]
    fn interactive_prompts_prefill_before_background_ones() {
        let r = [bg(300), run(1), run(100)];
        assert_eq!(plan_step(&r, 256), [156, 1, 100]);
        let r = [bg(300), run(300)];
        assert_eq!(plan_step(&r, 256), [0, 256]);
    }

    #[test]
    fn a_long_prompt_is_fed_in_chunks_until_done() {
        let mut left = 1000;
        let mut chunks = Vec::new();
        while left > 0 {
            let t = plan_step(&[run(left), run(1)], 256);
            assert_eq!(t[1], 1, "the running decode is never stalled");
            chunks.push(t[0]);
            left -= t[0];
        }
        assert_eq!(chunks, [256, 256, 256, 232]);
        assert_eq!(plan_step(&[run(5)], 0), [1]);
    }
}
