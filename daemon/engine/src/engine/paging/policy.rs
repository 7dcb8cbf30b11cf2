//! The pager's decisions, without a mapping: which experts are believed in
//! memory, what to load and in which order, which expert gives way
//! (victims), whether a prediction may displace anything (admission), what
//! the cap is for a budget, and which experts to lock. Pure bookkeeping on
//! byte counts: the I/O threads ([`super::io`]) carry the jobs out and
//! report back, and these rules are unit-tested here on their own.

use super::{Budget, ExpertStat};
use std::collections::VecDeque;

/// Memory kept free for everything else when the budget is `auto`.
pub(super) const AUTO_RESERVE: u64 = 256 << 20;
/// Memory pressure (PSI "some avg10", percent) above which `auto` shrinks.
pub(super) const PRESSURE_HIGH: f32 = 5.0;
/// Steps over which an expert's use count halves.
const HALF_LIFE_STEPS: f32 = 64.0;

/// One expert's place in the cache.
#[derive(Clone, Debug, Default)]
pub(super) struct Slot {
    pub stat: ExpertStat,
    /// Decayed use count, as of step `scored_at`.
    score: f32,
    scored_at: u64,
    /// The `clock` of its last use.
    last_use: u64,
    pub bytes: u64,
    /// Predicted for the current step (cleared when routed).
    predicted_at: Option<u64>,
    /// That prediction found it out of memory (it queued a load).
    predicted_out: bool,
    /// A load of it is queued or running: the engine waits for it rather
    /// than fault its pages in.
    pub loading: bool,
    /// A job of it is running: its next job waits (jobs of one expert run
    /// in the order they were queued, whatever the number of I/O threads).
    busy: bool,
}

impl Slot {
    fn score_at(&self, step: u64) -> f32 {
        let age = step.saturating_sub(self.scored_at) as f32;
        self.score * (-age / HALF_LIFE_STEPS).exp2()
    }
}

/// Work for the I/O threads; `layer` is the MoE ordinal.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Job {
    Load { layer: usize, expert: usize },
    Evict { layer: usize, expert: usize },
    Lock { layer: usize, expert: usize },
    Unlock { layer: usize, expert: usize },
}

impl Job {
    /// The expert it is about.
    fn expert(self) -> (usize, usize) {
        match self {
            Job::Load { layer, expert }
            | Job::Evict { layer, expert }
            | Job::Lock { layer, expert }
            | Job::Unlock { layer, expert } => (layer, expert),
        }
    }
}

/// The cache's belief and rules. Every method is bookkeeping: nothing here
/// touches memory, files or the clock.
#[derive(Debug)]
pub(super) struct Policy {
    /// `[moe layer][expert]`.
    pub slots: Vec<Vec<Slot>>,
    /// Bytes of the mapping that are not experts.
    pub fixed_bytes: u64,
    /// Of those, bytes the model holds outside the mapping instead (fixed
    /// matrices repacked at load, their file pages given back): memory the
    /// host no longer counts as file pages, which `auto` must not take
    /// off twice.
    pub outside_bytes: u64,
    /// The least cap: one token's experts in every layer plus the next
    /// layer's predictions.
    pub min_cap: u64,
    total_bytes: u64,
    lock_bytes: u64,
    step: u64,
    /// Counts routings (one per MoE layer per step): the experts of the
    /// routing in progress are never victims.
    clock: u64,
    pub resident_bytes: u64,
    pub locked_bytes: u64,
    /// Cap on `resident_bytes` (`None`: unlimited).
    pub cap: Option<u64>,
    pub budget_bytes: Option<u64>,
    urgent: VecDeque<Job>,
    /// Predicted loads, with the step they were predicted for.
    speculative: VecDeque<(u64, Job)>,
    pub loads: u64,
    pub bytes_in: u64,
    pub load_seconds: f64,
    pub evictions: u64,
    pub predictions: u64,
    pub predictions_used: u64,
    /// Predictions that queued a load (of an expert not in memory), and of
    /// those the ones the router then chose: the precision that costs reads.
    pub predicted_loads: u64,
    pub predicted_loads_used: u64,
    pub pressure: Option<f32>,
    /// Time the engine spent waiting for chosen experts' loads.
    pub wait_seconds: f64,
}

impl Policy {
    /// A cache of experts of `slot_bytes[layer][expert]` bytes, none
    /// believed resident, no cap until [`Policy::set_budget`].
    pub fn new(slot_bytes: Vec<Vec<u64>>, fixed_bytes: u64, min_cap: u64, lock_bytes: u64) -> Self {
        let total_bytes = slot_bytes.iter().flatten().sum();
        Policy {
            slots: slot_bytes
                .into_iter()
                .map(|l| {
                    l.into_iter()
                        .map(|bytes| Slot {
                            bytes,
                            ..Slot::default()
                        })
                        .collect()
                })
                .collect(),
            fixed_bytes,
            outside_bytes: 0,
            min_cap,
            total_bytes,
            lock_bytes,
            step: 0,
            clock: 0,
            resident_bytes: 0,
            locked_bytes: 0,
            cap: None,
            budget_bytes: None,
            urgent: VecDeque::new(),
            speculative: VecDeque::new(),
            loads: 0,
            bytes_in: 0,
            load_seconds: 0.0,
            evictions: 0,
            predictions: 0,
            predictions_used: 0,
            predicted_loads: 0,
            predicted_loads_used: 0,
            pressure: None,
            wait_seconds: 0.0,
        }
    }

    pub fn total_bytes(&self) -> u64 {
        self.total_bytes
    }

    /// Every expert's slot with its (MoE layer, expert) position.
    pub fn each_slot(&self) -> impl Iterator<Item = (usize, usize, &Slot)> {
        self.slots
            .iter()
            .enumerate()
            .flat_map(|(l, layer)| layer.iter().enumerate().map(move |(e, s)| (l, e, s)))
    }

    /// Whether any job waits (urgent or predicted).
    pub fn has_jobs(&self) -> bool {
        !(self.urgent.is_empty() && self.speculative.is_empty())
    }

    /// A forward step begins: predictions for steps that are over are stale.
    pub fn begin_step(&mut self) {
        self.step += 1;
        let step = self.step;
        self.speculative.retain(|&(s, _)| s >= step);
    }

    /// MoE layer `layer`'s router chose `experts` (expert id, tokens
    /// choosing it), in the order their loads should run: count the use and
    /// admit, as urgent loads, those not resident. Returns whether a load
    /// was queued.
    pub fn route(&mut self, layer: usize, experts: &[(usize, usize)]) -> bool {
        let step = self.step;
        self.clock += 1;
        let clock = self.clock;
        let mut wanted = Vec::new();
        for &(e, tokens) in experts {
            let Some(slot) = self.slots[layer].get_mut(e) else {
                continue;
            };
            if slot.predicted_at == Some(step) {
                self.predictions_used += 1;
                if slot.predicted_out {
                    self.predicted_loads_used += 1;
                }
            }
            slot.predicted_at = None;
            slot.score = slot.score_at(step) + tokens as f32;
            slot.scored_at = step;
            slot.last_use = clock;
            slot.stat.hits += tokens as u64;
            if !slot.stat.resident {
                wanted.push(e);
            }
        }
        for &e in &wanted {
            self.admit(layer, e, true);
        }
        !wanted.is_empty()
    }

    /// Whether some expert of MoE layer `layer` is not resident (so a
    /// prediction for it could bring something in).
    pub fn wants_prediction(&self, layer: usize) -> bool {
        self.slots[layer].iter().any(|s| !s.stat.resident)
    }

    /// The engine expects MoE layer `layer` to choose `experts` this step:
    /// queue loads of those not resident, behind every urgent job. Returns
    /// whether one was queued.
    pub fn predict(&mut self, layer: usize, experts: &[usize]) -> bool {
        let step = self.step;
        let mut any = false;
        for &e in experts {
            let Some(slot) = self.slots[layer].get_mut(e) else {
                continue;
            };
            if slot.predicted_at == Some(step) {
                continue;
            }
            slot.predicted_at = Some(step);
            slot.predicted_out = !slot.stat.resident;
            self.predictions += 1;
            if !slot.stat.resident {
                self.predicted_loads += 1;
                self.speculative
                    .push_back((step, Job::Load { layer, expert: e }));
                any = true;
            }
        }
        any
    }

    /// Whether expert `expert` of MoE layer `layer` is believed in memory
    /// with no load of it pending: the engine may compute it now.
    pub fn ready(&self, layer: usize, expert: usize) -> bool {
        self.slots[layer]
            .get(expert)
            .is_none_or(|s| s.stat.resident && !s.loading)
    }

    /// Whether a load of the expert is queued or running.
    pub fn loading(&self, layer: usize, expert: usize) -> bool {
        self.slots[layer].get(expert).is_some_and(|s| s.loading)
    }

    /// The next job an I/O thread may run: the first urgent one whose
    /// expert has no job running, then predictions for this step that are
    /// still out and can be admitted without displacing an expert used as
    /// much as the guess is worth. The job's expert is busy until
    /// [`Policy::finished`].
    pub fn next_job(&mut self) -> Option<Job> {
        let job = self.next_job_inner()?;
        let (l, e) = job.expert();
        self.slots[l][e].busy = true;
        Some(job)
    }

    fn next_job_inner(&mut self) -> Option<Job> {
        let free = |slots: &[Vec<Slot>], j: &Job| {
            let (l, e) = j.expert();
            !slots[l][e].busy
        };
        if let Some(i) = self.urgent.iter().position(|j| free(&self.slots, j)) {
            return self.urgent.remove(i);
        }
        if !self.urgent.is_empty() {
            // Every urgent job waits for its expert: predictions would only
            // take a thread the urgent ones want next.
            return None;
        }
        let step = self.step;
        while let Some((s, job)) = self.speculative.pop_front() {
            let Job::Load { layer, expert } = job else {
                continue;
            };
            if s >= step
                && !self.slots[layer][expert].stat.resident
                && !self.slots[layer][expert].busy
                && self.admit(layer, expert, false)
            {
                // Its evictions, if any, first: they make its room (none
                // of them busy: a busy expert is never a victim).
                return self.urgent.pop_front();
            }
        }
        None
    }

    /// Records a job's outcome: for a load, the bytes it read in and the
    /// time it took. A failed job changes nothing but what it reports (a
    /// failed load leaves its expert to be faulted in by the engine).
    pub fn finished(&mut self, job: Job, read_in: Option<u64>, seconds: f64) {
        let (l, e) = job.expert();
        self.slots[l][e].busy = false;
        if let Job::Load { .. } = job {
            self.load_seconds += seconds;
            // The last queued load of it is done (its jobs run in order).
            if !self.urgent.contains(&job) {
                self.slots[l][e].loading = false;
            }
        }
        let Some(fresh) = read_in else { return };
        match job {
            Job::Load { layer, expert } => {
                self.loads += 1;
                self.bytes_in += fresh;
                let s = &mut self.slots[layer][expert].stat;
                s.loads += 1;
                s.bytes_in += fresh;
            }
            Job::Lock { layer, expert } => {
                let slot = &mut self.slots[layer][expert];
                slot.stat.locked = true;
                let bytes = slot.bytes;
                // mlock reads in what was out.
                let was_in = std::mem::replace(&mut slot.stat.resident, true);
                self.locked_bytes += bytes;
                if !was_in {
                    self.resident_bytes += bytes;
                }
            }
            Job::Unlock { layer, expert } => {
                self.slots[layer][expert].stat.locked = false;
                self.locked_bytes -= self.slots[layer][expert].bytes;
            }
            Job::Evict { .. } => {}
        }
        // An admission that found no victim (all busy or in use) went over
        // the cap: with this expert free again, come back under it.
        if self.cap.is_some_and(|c| self.resident_bytes > c) {
            self.shrink_to_cap();
        }
    }

    /// Marks an expert resident and queues its load, first making room
    /// under the cap by queueing evictions. `urgent`: chosen now, so it is
    /// admitted even when no victim is left (a prediction then is not).
    fn admit(&mut self, layer: usize, expert: usize, urgent: bool) -> bool {
        let bytes = self.slots[layer][expert].bytes;
        // A prediction is worth one more use: it may only displace experts
        // used less than that, or a wrong guess evicts a hot expert.
        let worth = self.slots[layer][expert].score_at(self.step) + 1.0;
        if let Some(cap) = self.cap {
            while self.resident_bytes + bytes > cap {
                let victim = self
                    .victim()
                    .filter(|&(l, e)| urgent || self.slots[l][e].score_at(self.step) < worth);
                let Some((l, e)) = victim else {
                    if urgent {
                        // Over the cap for now: everything resident is in
                        // use this step. The next step evicts.
                        break;
                    }
                    return false;
                };
                self.evict(l, e);
            }
        }
        let slot = &mut self.slots[layer][expert];
        slot.stat.resident = true;
        slot.loading = true;
        self.resident_bytes += bytes;
        self.urgent.push_back(Job::Load { layer, expert });
        true
    }

    /// Marks an expert out and queues its eviction.
    fn evict(&mut self, l: usize, e: usize) {
        let slot = &mut self.slots[l][e];
        slot.stat.resident = false;
        slot.stat.evictions += 1;
        self.resident_bytes -= slot.bytes;
        self.evictions += 1;
        self.urgent.push_back(Job::Evict {
            layer: l,
            expert: e,
        });
    }

    /// The resident, unlocked expert with the lowest decayed use, oldest
    /// first, that the routing in progress did not choose, that is not
    /// predicted for this step and has no job running (its load, say).
    fn victim(&self) -> Option<(usize, usize)> {
        let step = self.step;
        let mut best: Option<(f32, u64, usize, usize)> = None;
        for (l, e, s) in self.each_slot() {
            if !s.stat.resident || s.stat.locked || s.last_use == self.clock && self.clock > 0 {
                continue;
            }
            if s.busy {
                continue;
            }
            if s.predicted_at == Some(step) {
                continue;
            }
            let key = (s.score_at(step), s.last_use);
            if best.is_none_or(|b| key.0 < b.0 || key.0 == b.0 && key.1 < b.1) {
                best = Some((key.0, key.1, l, e));
            }
        }
        best.map(|b| (b.2, b.3))
    }

    /// Sets the budget for the whole mapping (`None`: unlimited) and the
    /// experts' cap under it; returns whether the cap shrank (or appeared),
    /// after which the caller should [`Policy::shrink_to_cap`].
    pub fn set_budget(&mut self, budget: Option<u64>) -> bool {
        let before = self.cap;
        self.budget_bytes = budget;
        self.cap = budget
            .map(|b| b.saturating_sub(self.fixed_bytes).max(self.min_cap))
            .filter(|&c| c < self.total_bytes);
        match (before, self.cap) {
            (_, None) => false,
            (None, Some(_)) => true,
            (Some(b), Some(c)) => c < b,
        }
    }

    /// The budget `mode` gives, where `auto` follows `file_pages` (bytes the
    /// host and cgroup let file pages take, `None`: unknown) and the memory
    /// pressure.
    pub fn budget_for(&self, mode: Budget, file_pages: Option<u64>) -> Option<u64> {
        let floor = self.fixed_bytes + self.min_cap;
        match mode {
            Budget::Unlimited => None,
            Budget::Bytes(b) => Some(b),
            Budget::Auto => file_pages.map(|f| {
                // Our own mapped pages are already inside it (reclaimable
                // to the host, cache to the cgroup); our copies of fixed
                // matrices are not, but the cap takes them off with the
                // fixed bytes.
                let mut b = (f.saturating_sub(AUTO_RESERVE) + self.outside_bytes).max(floor);
                if self.pressure.is_some_and(|p| p > PRESSURE_HIGH) {
                    // The kernel is already reclaiming: keep a tenth more
                    // free. Of the headroom, not of what is resident, so
                    // lasting pressure (our own refaults count) does not
                    // compound into a collapse.
                    b = b / 10 * 9;
                }
                b.max(floor)
            }),
        }
    }

    /// Whether the cap holds every expert (or there is none).
    pub fn holds_all(&self) -> bool {
        self.cap.is_none_or(|c| c >= self.total_bytes)
    }

    /// Evicts until the believed resident bytes fit the cap (after the cap
    /// shrank).
    pub fn shrink_to_cap(&mut self) {
        let Some(cap) = self.cap else { return };
        while self.resident_bytes > cap {
            let Some((l, e)) = self.victim() else {
                break;
            };
            self.evict(l, e);
        }
    }

    /// Queues locks of the hottest experts up to the lock budget and
    /// unlocks of those that cooled, leaving one token's working set of the
    /// cap unlocked.
    pub fn plan_locks(&mut self) {
        if self.lock_bytes == 0 {
            return;
        }
        let step = self.step;
        let mut order: Vec<(f32, usize, usize)> = self
            .each_slot()
            .map(|(l, e, s)| (s.score_at(step), l, e))
            .filter(|x| x.0 > 0.0)
            .collect();
        order.sort_by(|a, b| b.0.total_cmp(&a.0));
        let mut budget = match self.cap {
            Some(cap) => self.lock_bytes.min(cap.saturating_sub(self.min_cap)),
            None => self.lock_bytes,
        };
        let mut want: Vec<Vec<bool>> = self.slots.iter().map(|l| vec![false; l.len()]).collect();
        for (_, l, e) in order {
            let b = self.slots[l][e].bytes;
            if b <= budget {
                budget -= b;
                want[l][e] = true;
            }
        }
        for (l, layer) in want.iter().enumerate() {
            for (e, &w) in layer.iter().enumerate() {
                let (layer, expert) = (l, e);
                match (w, self.slots[l][e].stat.locked) {
                    (true, false) => self.urgent.push_back(Job::Lock { layer, expert }),
                    (false, true) => self.urgent.push_back(Job::Unlock { layer, expert }),
                    _ => {}
                }
            }
        }
    }

    /// Takes measured mapped bytes per expert as the belief: half in counts
    /// as in (a load would read the rest on touch).
    pub fn apply_residency(&mut self, measured: &[Vec<u64>]) {
        let mut resident = 0;
        for (layer, got) in self.slots.iter_mut().zip(measured) {
            for (s, &got) in layer.iter_mut().zip(got) {
                s.stat.resident = got * 2 >= s.bytes;
                if s.stat.resident {
                    resident += s.bytes;
                }
            }
        }
        self.resident_bytes = resident;
    }

    /// Experts believed out and not locked: where stray mapped pages would
    /// break the budget.
    pub fn believed_out(&self) -> Vec<(usize, usize)> {
        self.each_slot()
            .filter(|(_, _, s)| !s.stat.resident && !s.stat.locked)
            .map(|(l, e, _)| (l, e))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MB: u64 = 1 << 20;

    /// 2 MoE layers × 4 experts of 1 MB each, no fixed bytes, a 1 MB
    /// working set, `lock` bytes to lock.
    fn policy(cap_experts: Option<u64>, lock: u64) -> Policy {
        let mut p = Policy::new(vec![vec![MB; 4]; 2], 0, MB, lock);
        p.set_budget(cap_experts.map(|n| n * MB));
        p
    }

    /// Runs every queued job as if it succeeded (loads read their bytes).
    fn drain(p: &mut Policy) -> Vec<Job> {
        let mut done = Vec::new();
        while let Some(j) = p.next_job() {
            p.finished(j, Some(MB), 0.0);
            done.push(j);
        }
        done
    }

    fn load(layer: usize, expert: usize) -> Job {
        Job::Load { layer, expert }
    }

    fn evict(layer: usize, expert: usize) -> Job {
        Job::Evict { layer, expert }
    }

    fn resident(p: &Policy) -> Vec<(usize, usize)> {
        p.each_slot()
            .filter(|(_, _, s)| s.stat.resident)
            .map(|(l, e, _)| (l, e))
            .collect()
    }

    #[test]
    fn chosen_experts_load_in_router_order_and_count_hits() {
        let mut p = policy(None, 0);
        p.begin_step();
        assert!(p.route(0, &[(2, 3), (0, 1)]));
        assert_eq!(drain(&mut p), [load(0, 2), load(0, 0)]);
        assert_eq!(p.slots[0][2].stat.hits, 3);
        assert_eq!((p.loads, p.bytes_in, p.resident_bytes), (2, 2 * MB, 2 * MB));
        // Resident now: chosen again, nothing to do.
        p.begin_step();
        assert!(!p.route(0, &[(2, 1)]));
        assert!(drain(&mut p).is_empty());
    }

    #[test]
    fn the_least_used_expert_gives_way_oldest_first_on_ties() {
        let mut p = policy(Some(3), 0);
        p.begin_step();
        p.route(0, &[(0, 5)]);
        p.route(0, &[(1, 1)]);
        p.route(0, &[(2, 1)]);
        drain(&mut p);
        // Expert 1 and 2 used once, 1 first: 1 goes.
        p.begin_step();
        p.route(1, &[(0, 1)]);
        assert_eq!(drain(&mut p), [evict(0, 1), load(1, 0)]);
        assert_eq!(resident(&p), [(0, 0), (0, 2), (1, 0)]);
        assert!(p.resident_bytes <= 3 * MB);
        assert_eq!(p.evictions, 1);
        assert_eq!(p.slots[0][1].stat.evictions, 1);
    }

    #[test]
    fn use_decays_with_a_half_life() {
        let mut p = policy(Some(2), 0);
        p.begin_step();
        p.route(0, &[(0, 4)]);
        drain(&mut p);
        // 64 steps later expert 0's 4 uses count 2; expert 1's fresh 3 win.
        for _ in 0..64 {
            p.begin_step();
        }
        assert!((p.slots[0][0].score_at(p.step) - 2.0).abs() < 1e-4);
        p.route(0, &[(1, 3)]);
        p.begin_step();
        p.route(1, &[(0, 1)]);
        assert_eq!(drain(&mut p), [load(0, 1), evict(0, 0), load(1, 0)]);
    }

    #[test]
    fn the_routing_in_progress_is_never_a_victim_even_over_the_cap() {
        let mut p = policy(Some(2), 0);
        p.begin_step();
        // One routing chooses three experts under a cap of two: the last
        // is admitted over the cap rather than evicting a chosen one.
        p.route(0, &[(0, 1), (1, 1), (2, 1)]);
        let jobs = drain(&mut p);
        assert!(
            jobs.iter().all(|j| matches!(j, Job::Load { .. })),
            "{jobs:?}"
        );
        assert_eq!(p.resident_bytes, 3 * MB);
        // The next routing makes room: back under the cap.
        p.begin_step();
        p.route(1, &[(0, 1)]);
        let jobs = drain(&mut p);
        assert_eq!(jobs.len(), 3, "two evictions and a load: {jobs:?}");
        assert_eq!(p.resident_bytes, 2 * MB);
    }

    #[test]
    fn locked_and_predicted_experts_are_not_victims() {
        let mut p = policy(Some(2), MB);
        p.begin_step();
        p.route(0, &[(0, 1)]);
        p.route(0, &[(1, 9)]);
        drain(&mut p);
        p.plan_locks();
        assert_eq!(
            drain(&mut p),
            [Job::Lock {
                layer: 0,
                expert: 1
            }]
        );
        assert_eq!(p.locked_bytes, MB);
        p.begin_step();
        p.predict(0, &[0]);
        // 0 is predicted, 1 locked: the new expert goes over the cap.
        p.route(1, &[(3, 1)]);
        let jobs = drain(&mut p);
        assert!(
            !jobs.iter().any(|j| matches!(j, Job::Evict { .. })),
            "{jobs:?}"
        );
    }

    #[test]
    fn a_prediction_never_displaces_an_expert_used_more_than_it_is_worth() {
        let mut p = policy(Some(3), 0);
        p.begin_step();
        p.route(0, &[(0, 5)]);
        p.route(0, &[(1, 5)]);
        p.route(1, &[(3, 5)]);
        drain(&mut p);
        p.begin_step();
        assert!(p.predict(1, &[2]));
        assert_eq!(p.predictions, 1);
        // (0, 0) and (0, 1) could give way, but are worth 5 uses and the
        // guess 1: nothing happens.
        assert!(drain(&mut p).is_empty());
        assert!(!p.slots[1][2].stat.resident);
        // A cold resident does give way to it.
        let mut p = policy(Some(2), 0);
        p.begin_step();
        p.route(0, &[(0, 5)]);
        drain(&mut p);
        for _ in 0..64 * 8 {
            p.begin_step();
        }
        p.route(0, &[(1, 5)]);
        drain(&mut p);
        p.begin_step();
        p.predict(1, &[2]);
        assert_eq!(drain(&mut p), [evict(0, 0), load(1, 2)]);
        // Routed later in the step, the prediction counts as used, and as a
        // used one of those that queued a load.
        p.route(1, &[(2, 1)]);
        assert_eq!(p.predictions_used, 1);
        assert_eq!((p.predicted_loads, p.predicted_loads_used), (1, 1));
        // A prediction of a resident expert costs no load.
        p.begin_step();
        p.predict(1, &[2]);
        p.route(1, &[(2, 1)]);
        assert_eq!(p.predictions_used, 2);
        assert_eq!((p.predicted_loads, p.predicted_loads_used), (1, 1));
    }

    #[test]
    fn urgent_jobs_go_before_predictions_and_stale_predictions_are_dropped() {
        let mut p = policy(None, 0);
        p.begin_step();
        p.predict(1, &[1]);
        p.route(0, &[(3, 1)]);
        assert_eq!(p.next_job(), Some(load(0, 3)));
        assert_eq!(p.next_job(), Some(load(1, 1)));
        // A prediction not run before the step ended is forgotten.
        p.predict(1, &[2]);
        p.begin_step();
        assert!(!p.has_jobs());
        assert_eq!(p.next_job(), None);
        // The same expert predicted twice in a step is queued once.
        assert!(p.predict(0, &[1]));
        assert!(!p.predict(0, &[1]));
        assert_eq!(p.predictions, 3);
    }

    #[test]
    fn no_prediction_is_wanted_for_a_layer_wholly_in_memory() {
        let mut p = policy(None, 0);
        p.begin_step();
        assert!(p.wants_prediction(0));
        p.route(0, &[(0, 1), (1, 1), (2, 1), (3, 1)]);
        drain(&mut p);
        assert!(!p.wants_prediction(0));
        assert!(p.wants_prediction(1));
    }

    #[test]
    fn the_cap_follows_the_budget_and_auto_follows_the_host() {
        let mut p = Policy::new(vec![vec![MB; 8]], 10 * MB, 2 * MB, 0);
        // A fixed budget: the cap is what the fixed weights leave, floored
        // at the working set; none when it holds every expert.
        assert!(p.set_budget(Some(14 * MB)));
        assert_eq!(p.cap, Some(4 * MB));
        assert!(p.set_budget(Some(11 * MB)));
        assert_eq!(p.cap, Some(2 * MB));
        assert!(!p.set_budget(Some(20 * MB)));
        assert_eq!((p.cap, p.budget_bytes), (None, Some(20 * MB)));
        assert!(p.holds_all());
        assert_eq!(p.budget_for(Budget::Unlimited, Some(1)), None);
        assert_eq!(p.budget_for(Budget::Bytes(5), None), Some(5));
        // auto: what file pages may take minus a reserve, a tenth less
        // under pressure, never under the floor; unknown: no budget.
        let host = AUTO_RESERVE + 100 * MB;
        assert_eq!(p.budget_for(Budget::Auto, Some(host)), Some(100 * MB));
        p.pressure = Some(PRESSURE_HIGH + 1.0);
        assert_eq!(
            p.budget_for(Budget::Auto, Some(host)),
            Some(100 * MB / 10 * 9)
        );
        assert_eq!(p.budget_for(Budget::Auto, Some(0)), Some(12 * MB));
        assert_eq!(p.budget_for(Budget::Auto, None), None);
        // Fixed bytes held outside the mapping are outside the host's file
        // pages too: auto adds them back before the cap takes the fixed
        // bytes off (the cap is then what it was with them mapped).
        p.pressure = None;
        p.outside_bytes = 6 * MB;
        assert_eq!(p.budget_for(Budget::Auto, Some(host)), Some(106 * MB));
        assert_eq!(p.budget_for(Budget::Bytes(5), None), Some(5));
    }

    #[test]
    fn a_shrunk_cap_evicts_the_coldest_first() {
        let mut p = policy(None, 0);
        p.begin_step();
        for (e, uses) in [(0, 4), (1, 1), (2, 3), (3, 2)] {
            p.route(0, &[(e, uses)]);
        }
        p.begin_step();
        // (The latest routing's experts are never victims: route another.)
        p.route(1, &[(0, 1)]);
        drain(&mut p);
        assert!(p.set_budget(Some(3 * MB)));
        p.shrink_to_cap();
        assert_eq!(drain(&mut p), [evict(0, 1), evict(0, 3)]);
        assert_eq!(resident(&p), [(0, 0), (0, 2), (1, 0)]);
    }

    #[test]
    fn locks_take_the_hottest_up_to_the_budget_and_leave_cooled_ones() {
        // Cap 3 experts, working set 1: at most 2 may be locked though
        // the lock budget asks for 3.
        let mut p = Policy::new(vec![vec![MB; 4]], 0, MB, 3 * MB);
        p.set_budget(Some(3 * MB));
        p.begin_step();
        p.route(0, &[(0, 1), (1, 5), (2, 3)]);
        drain(&mut p);
        p.plan_locks();
        let jobs = drain(&mut p);
        assert_eq!(
            jobs,
            [
                Job::Lock {
                    layer: 0,
                    expert: 1
                },
                Job::Lock {
                    layer: 0,
                    expert: 2
                }
            ]
        );
        assert_eq!(p.locked_bytes, 2 * MB);
        // Expert 3 becomes the hottest: 2 is unlocked, 3 locked.
        for _ in 0..256 {
            p.begin_step();
        }
        p.route(0, &[(3, 50)]);
        drain(&mut p);
        p.plan_locks();
        let jobs = drain(&mut p);
        assert!(
            jobs.contains(&Job::Unlock {
                layer: 0,
                expert: 2
            }),
            "{jobs:?}"
        );
        assert!(
            jobs.contains(&Job::Lock {
                layer: 0,
                expert: 3
            }),
            "{jobs:?}"
        );
        assert_eq!(p.locked_bytes, 2 * MB);
        // No lock budget: no lock jobs at all.
        let mut p = policy(None, 0);
        p.route(0, &[(0, 1)]);
        drain(&mut p);
        p.plan_locks();
        assert!(!p.has_jobs());
    }

    #[test]
    fn a_failed_job_changes_only_its_time() {
        let mut p = policy(None, 0);
        p.begin_step();
        p.route(0, &[(0, 1)]);
        let j = p.next_job().unwrap();
        p.finished(j, None, 0.5);
        assert_eq!((p.loads, p.bytes_in, p.load_seconds), (0, 0, 0.5));
        p.finished(
            Job::Lock {
                layer: 0,
                expert: 1,
            },
            None,
            0.0,
        );
        assert_eq!(p.locked_bytes, 0);
        assert!(!p.slots[0][1].stat.locked);
    }

    #[test]
    fn loads_of_different_experts_run_at_once_and_the_engine_knows_when() {
        let mut p = policy(None, 0);
        p.begin_step();
        p.route(0, &[(3, 1), (1, 1)]);
        assert!(!p.ready(0, 3) && p.loading(0, 3));
        assert!(
            !p.ready(0, 2) && !p.loading(0, 2),
            "not chosen, not resident"
        );
        // Two I/O threads take the two loads, in router order.
        let (a, b) = (p.next_job().unwrap(), p.next_job().unwrap());
        assert_eq!((a, b), (load(0, 3), load(0, 1)));
        p.finished(b, Some(MB), 0.0);
        assert!(p.ready(0, 1) && !p.ready(0, 3));
        p.finished(a, Some(MB), 0.0);
        assert!(p.ready(0, 3));
        // A failed load stops the wait too (the engine faults it in).
        p.route(0, &[(2, 1)]);
        let j = p.next_job().unwrap();
        p.finished(j, None, 0.0);
        assert!(!p.loading(0, 2));
    }

    #[test]
    fn jobs_of_one_expert_run_one_at_a_time_in_order() {
        let mut p = policy(None, 0);
        p.begin_step();
        p.route(0, &[(0, 1)]);
        p.route(0, &[(1, 1)]);
        drain(&mut p);
        // The cap shrinks: expert 0 (the older) is evicted, and chosen
        // again before its eviction ran.
        p.begin_step();
        p.set_budget(Some(MB));
        p.shrink_to_cap();
        let ev = p.next_job().unwrap();
        assert_eq!(ev, evict(0, 0));
        p.route(0, &[(0, 1)]);
        // Its load waits for the running eviction; other experts' jobs
        // do not (here: 1 gives way to make room).
        assert_eq!(p.next_job(), Some(evict(0, 1)));
        assert_eq!(p.next_job(), None, "load of 0 waits for its eviction");
        p.finished(ev, Some(0), 0.0);
        assert_eq!(p.next_job(), Some(load(0, 0)));
    }

    #[test]
    fn an_expert_whose_load_runs_is_not_a_victim() {
        let mut p = policy(Some(2), 0);
        p.begin_step();
        p.route(0, &[(0, 1)]);
        let j = p.next_job().unwrap();
        p.route(0, &[(1, 1)]);
        let j1 = p.next_job().unwrap();
        p.finished(j1, Some(MB), 0.0);
        p.route(0, &[(2, 1)]);
        // 0's load is still running: 1 gives way (2 is the routing in
        // progress), though 0 is the oldest.
        let mut jobs = Vec::new();
        while let Some(j) = p.next_job() {
            jobs.push(j);
        }
        assert!(jobs.contains(&evict(0, 1)), "{jobs:?}");
        assert!(!jobs.contains(&evict(0, 0)), "{jobs:?}");
        p.finished(j, Some(MB), 0.0);
    }

    #[test]
    fn over_the_cap_for_want_of_victims_comes_back_when_a_job_ends() {
        let mut p = policy(Some(2), 0);
        p.begin_step();
        p.route(0, &[(0, 1)]);
        p.route(0, &[(1, 1)]);
        let (a, b) = (p.next_job().unwrap(), p.next_job().unwrap());
        // Both loads run: neither may give way, so 2 goes over the cap.
        p.route(1, &[(2, 1)]);
        assert_eq!(p.resident_bytes, 3 * MB);
        p.finished(a, Some(MB), 0.0);
        assert_eq!(p.resident_bytes, 2 * MB, "back under the cap");
        assert_eq!(p.slots[0][0].stat.evictions, 1);
        p.finished(b, Some(MB), 0.0);
        assert_eq!(drain(&mut p), [load(1, 2), evict(0, 0)]);
    }

    #[test]
    fn measured_residency_replaces_the_belief() {
        let mut p = policy(Some(3), 0);
        p.apply_residency(&[vec![MB, MB / 2, MB / 2 - 1, 0], vec![0, 0, 0, MB]]);
        assert_eq!(resident(&p), [(0, 0), (0, 1), (1, 3)]);
        assert_eq!(p.resident_bytes, 3 * MB);
        assert_eq!(p.believed_out().len(), 5);
    }
}
