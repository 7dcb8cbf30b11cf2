//! Expert paging: the expert slabs of the mapping as a cache the daemon
//! manages instead of a page-cache accident.
//!
//! The engine tells the [`Pager`] which experts each MoE layer's router chose
//! ([`Pager::route`]) and which it expects the next layers to choose
//! ([`Pager::predict`]). The pager keeps a belief of which experts are in
//! memory, and hands work to one I/O thread: bring chosen experts in
//! (`MADV_POPULATE_READ`, which reads and maps them while the engine computes
//! the experts before them), bring predicted ones in when nothing urgent is
//! waiting, and give cold experts back (`MADV_DONTNEED` + `POSIX_FADV_DONTNEED`)
//! so the experts' resident bytes stay under the cap. Victims are the experts
//! with the lowest decayed use count (LFU with a half-life), oldest use first
//! on ties; experts chosen in the current step are never victims.
//!
//! The cap comes from a fixed budget for the whole mapping, or (`auto`) from
//! what the host and the memory cgroup can hold, re-read every second and
//! shrunk while the kernel reports memory pressure (PSI). Paging never
//! changes a result: it moves bytes between disk and memory, and the
//! engine's reads of the mapping see the same bytes wherever they are.

use crate::gguf::Gguf;
use crate::model::ExpertIndex;
use serde::Serialize;
use std::collections::VecDeque;
use std::ops::Range;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// How much of the model may be in memory.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Budget {
    /// No cap: experts are prefetched, never given back.
    Unlimited,
    /// A cap from the memory the host and the cgroup have, followed live.
    #[default]
    Auto,
    /// At most this many bytes of the mapping resident.
    Bytes(u64),
}

/// How the engine pages experts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PagingOptions {
    pub budget: Budget,
    /// `mlock` the hottest experts up to this many bytes (0: none).
    pub lock_bytes: u64,
    /// How many MoE layers ahead to predict and prefetch (0: none).
    pub lookahead: usize,
}

impl Default for PagingOptions {
    fn default() -> Self {
        PagingOptions {
            budget: Budget::Auto,
            lock_bytes: 0,
            lookahead: 0,
        }
    }
}

/// Memory kept free for everything else when the budget is `auto`.
const AUTO_RESERVE: u64 = 256 << 20;
/// Memory pressure (PSI "some avg10", percent) above which `auto` shrinks.
const PRESSURE_HIGH: f32 = 5.0;
/// Least time between two sweeps for stray mapped pages.
const SWEEP_EVERY: Duration = Duration::from_millis(100);
/// Steps over which an expert's use count halves.
const HALF_LIFE_STEPS: f32 = 64.0;

#[derive(Debug, thiserror::Error)]
pub enum PagingError {
    #[error(
        "memory budget {budget} bytes is below the {min} bytes this model needs: its \
         non-expert weights take {fixed} bytes and one token's experts {working}; \
         raise --memory-budget (or use `auto`)"
    )]
    BudgetTooSmall {
        budget: u64,
        min: u64,
        fixed: u64,
        working: u64,
    },
}

/// One expert's counters.
#[derive(Clone, Debug, Default, Serialize)]
pub struct ExpertStat {
    /// Times a token chose it.
    pub hits: u64,
    /// Whether the pager believes it is in memory.
    pub resident: bool,
    pub locked: bool,
    /// Times the pager brought it in, and the bytes that were not in memory.
    pub loads: u64,
    pub bytes_in: u64,
    pub evictions: u64,
}

/// The pager's figures, for status and `lfmctl stats --experts`.
#[derive(Clone, Debug, Default, Serialize)]
pub struct PagingStats {
    /// The budget in force: bytes of the mapping allowed resident (`None`:
    /// unlimited).
    pub budget_bytes: Option<u64>,
    /// `auto`, `fixed` or `unlimited`.
    pub budget_mode: String,
    /// Bytes of the mapping that are not experts (kept resident).
    pub fixed_bytes: u64,
    /// Bytes of expert slabs believed resident, and their cap.
    pub expert_resident_bytes: u64,
    pub expert_cap_bytes: Option<u64>,
    pub expert_total_bytes: u64,
    pub locked_bytes: u64,
    pub loads: u64,
    pub bytes_in: u64,
    /// Time the I/O thread spent in loads (reading ahead and populating).
    pub load_seconds: f64,
    pub evictions: u64,
    pub predictions: u64,
    /// Predicted experts the router then chose (per layer and token).
    pub predictions_used: u64,
    /// Major page faults of the process (all of them, not just ours).
    pub major_faults: Option<u64>,
    pub memory_pressure: Option<f32>,
    /// `[moe layer][expert]`; `layers[i]` is model layer `layer_ids[i]`.
    pub layer_ids: Vec<usize>,
    pub experts: Vec<Vec<ExpertStat>>,
}

#[derive(Clone, Debug, Default)]
struct Slot {
    stat: ExpertStat,
    /// Decayed use count, as of step `scored_at`.
    score: f32,
    scored_at: u64,
    /// The `clock` of its last use.
    last_use: u64,
    bytes: u64,
    /// Predicted for the current step (cleared when routed).
    predicted_at: Option<u64>,
}

impl Slot {
    fn score_at(&self, step: u64) -> f32 {
        let age = step.saturating_sub(self.scored_at) as f32;
        self.score * (-age / HALF_LIFE_STEPS).exp2()
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Job {
    Load { layer: usize, expert: usize },
    Evict { layer: usize, expert: usize },
    Lock { layer: usize, expert: usize },
    Unlock { layer: usize, expert: usize },
}

struct State {
    slots: Vec<Vec<Slot>>,
    step: u64,
    /// Counts routings (one per MoE layer per step): the experts of the
    /// routing in progress are never victims.
    clock: u64,
    resident_bytes: u64,
    locked_bytes: u64,
    /// Cap on `resident_bytes` (`None`: unlimited).
    cap: Option<u64>,
    budget_bytes: Option<u64>,
    urgent: VecDeque<Job>,
    /// Predicted loads, with the step they were predicted for.
    speculative: VecDeque<(u64, Job)>,
    loads: u64,
    bytes_in: u64,
    load_seconds: f64,
    evictions: u64,
    predictions: u64,
    predictions_used: u64,
    pressure: Option<f32>,
    shutdown: bool,
    /// Jobs taken by the I/O thread and not finished (for `quiesce`).
    in_flight: usize,
    /// A routing happened since the last sweep (the engine may have faulted
    /// pages of experts believed out).
    unswept: bool,
    /// Someone waits in `quiesce`: sweep now, not on the schedule.
    settle: bool,
    /// The huge-page advice last given to the expert slabs (`None`: none
    /// given yet).
    slabs_huge: Option<bool>,
}

impl State {
    /// Every expert's slot with its (MoE layer, expert) position.
    fn each_slot(&self) -> impl Iterator<Item = (usize, usize, &Slot)> {
        self.slots
            .iter()
            .enumerate()
            .flat_map(|(l, layer)| layer.iter().enumerate().map(move |(e, s)| (l, e, s)))
    }
}

struct PagerShared {
    gguf: Arc<Gguf>,
    index: ExpertIndex,
    opts: PagingOptions,
    fixed_bytes: u64,
    min_cap: u64,
    /// The expert slabs are advised to huge pages and the kernel takes the
    /// advice: loads let the fault read them 2 MiB at a time instead of
    /// reading exactly their pages ahead.
    huge_experts: AtomicBool,
    state: Mutex<State>,
    wake: Condvar,
    idle: Condvar,
}

/// The expert cache of one model. Dropping it stops its I/O thread.
pub struct Pager {
    shared: Arc<PagerShared>,
    /// Model layer index → MoE ordinal.
    moe_of: Vec<Option<usize>>,
    thread: Option<JoinHandle<()>>,
}

/// Reads a [`Pager`]'s figures from any thread; cheap to clone. Holds the
/// pager's bookkeeping, not its I/O thread.
#[derive(Clone)]
pub struct PagingMonitor(Arc<PagerShared>);

impl PagingMonitor {
    /// The figures with residency measured from the page tables.
    pub fn stats(&self) -> PagingStats {
        self.0.stats(true)
    }

    /// The figures as the pager believes them, without reading the page
    /// tables (megabytes of pagemap for a large model): for totals polled
    /// often, such as every `GetStatus`.
    pub fn believed(&self) -> PagingStats {
        self.0.stats(false)
    }
}

impl Pager {
    /// A pager for `gguf`'s experts, or `None` when there is nothing to page
    /// (no experts, or the model is not mapped).
    pub fn new(
        gguf: Arc<Gguf>,
        index: ExpertIndex,
        n_layer: usize,
        n_expert_used: usize,
        opts: PagingOptions,
    ) -> Result<Option<Pager>, PagingError> {
        if index.layers.is_empty() || gguf.mmap().is_none() {
            return Ok(None);
        }
        let total = index.total_bytes();
        let fixed_bytes = (gguf.bytes().len() as u64).saturating_sub(total);
        let largest = index
            .layers
            .iter()
            .flatten()
            .map(|s| s.bytes())
            .max()
            .unwrap_or(0);
        // One token needs k experts in every layer; keep room for that and
        // the next layer's predictions.
        let working = largest * n_expert_used as u64 * 2;
        let min_cap = working;
        if let Budget::Bytes(b) = opts.budget
            && b < fixed_bytes + working
        {
            return Err(PagingError::BudgetTooSmall {
                budget: b,
                min: fixed_bytes + working,
                fixed: fixed_bytes,
                working,
            });
        }
        let mut moe_of = vec![None; n_layer];
        for (ord, l) in index.layers.iter().enumerate() {
            if let Some(first) = l.first()
                && first.layer < n_layer
            {
                moe_of[first.layer] = Some(ord);
            }
        }
        let slots = index
            .layers
            .iter()
            .map(|l| {
                l.iter()
                    .map(|s| Slot {
                        bytes: s.bytes(),
                        ..Slot::default()
                    })
                    .collect()
            })
            .collect();
        let shared = Arc::new(PagerShared {
            gguf,
            index,
            opts,
            fixed_bytes,
            min_cap,
            huge_experts: AtomicBool::new(false),
            state: Mutex::new(State {
                slots,
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
                pressure: None,
                shutdown: false,
                in_flight: 0,
                unswept: false,
                settle: false,
                slabs_huge: None,
            }),
            wake: Condvar::new(),
            idle: Condvar::new(),
        });
        {
            let mut st = shared.lock();
            shared.set_budget(&mut st);
            shared.advise_huge(&mut st);
            shared.scan_residency(&mut st);
            shared.shrink_to_cap(&mut st);
        }
        let s = Arc::clone(&shared);
        let thread = std::thread::Builder::new()
            .name("lfmd-pager".into())
            .spawn(move || s.io_loop())
            .ok();
        if thread.is_none() {
            crate::warn!("expert paging: could not start its I/O thread; experts page on demand");
        }
        Ok(Some(Pager {
            shared,
            moe_of,
            thread,
        }))
    }

    /// The MoE ordinal of model layer `layer`, if it is a MoE layer.
    pub fn moe_ordinal(&self, layer: usize) -> Option<usize> {
        self.moe_of.get(layer).copied().flatten()
    }

    /// The next MoE layers after model layer `layer`, up to the lookahead.
    pub fn next_moe_layers(&self, layer: usize) -> impl Iterator<Item = usize> + '_ {
        (layer + 1..self.moe_of.len())
            .filter(|&l| self.moe_of[l].is_some())
            .take(self.shared.opts.lookahead)
    }

    /// Starts a forward step (one batch through all layers).
    pub fn begin_step(&self) {
        let mut st = self.shared.lock();
        st.step += 1;
        // Predictions for a step that is over are stale.
        let step = st.step;
        st.speculative.retain(|&(s, _)| s >= step);
    }

    /// Layer `layer`'s router chose `experts` (expert id, tokens choosing
    /// it): count the use and bring in what is not resident, first.
    pub fn route(&self, layer: usize, experts: &[(usize, usize)]) {
        let Some(ord) = self.moe_ordinal(layer) else {
            return;
        };
        let sh = &*self.shared;
        let mut st = sh.lock();
        let step = st.step;
        st.clock += 1;
        st.unswept = true;
        let clock = st.clock;
        let mut wanted = Vec::new();
        for &(e, tokens) in experts {
            let Some(slot) = st.slots[ord].get_mut(e) else {
                continue;
            };
            if slot.predicted_at == Some(step) {
                st.predictions_used += 1;
            }
            let slot = &mut st.slots[ord][e];
            slot.predicted_at = None;
            slot.score = slot.score_at(step) + tokens as f32;
            slot.scored_at = step;
            slot.last_use = clock;
            slot.stat.hits += tokens as u64;
            if !slot.stat.resident {
                wanted.push(e);
            }
        }
        if wanted.is_empty() {
            return;
        }
        for &e in &wanted {
            sh.admit(&mut st, ord, e, true);
        }
        drop(st);
        sh.wake.notify_one();
    }

    /// Whether predictions for model layer `layer` could bring anything in
    /// (some expert of it is not resident). When not, the engine skips the
    /// prediction's router product.
    pub fn wants_prediction(&self, layer: usize) -> bool {
        let Some(ord) = self.moe_ordinal(layer) else {
            return false;
        };
        self.shared.lock().slots[ord]
            .iter()
            .any(|s| !s.stat.resident)
    }

    /// The engine expects layer `layer` to choose `experts`: bring in those
    /// not resident when the I/O thread has nothing urgent.
    pub fn predict(&self, layer: usize, experts: &[usize]) {
        let Some(ord) = self.moe_ordinal(layer) else {
            return;
        };
        let sh = &*self.shared;
        let mut st = sh.lock();
        let step = st.step;
        let mut any = false;
        for &e in experts {
            let Some(slot) = st.slots[ord].get_mut(e) else {
                continue;
            };
            if slot.predicted_at == Some(step) {
                continue;
            }
            slot.predicted_at = Some(step);
            st.predictions += 1;
            if !st.slots[ord][e].stat.resident {
                st.speculative.push_back((
                    step,
                    Job::Load {
                        layer: ord,
                        expert: e,
                    },
                ));
                any = true;
            }
        }
        drop(st);
        if any {
            sh.wake.notify_one();
        }
    }

    /// The pager's figures; residency per expert is measured (the
    /// mapping's present pages).
    pub fn stats(&self) -> PagingStats {
        self.shared.stats(true)
    }

    /// A handle that reads the figures from other threads (the daemon's
    /// status) while the engine thread owns the pager.
    pub fn monitor(&self) -> PagingMonitor {
        PagingMonitor(Arc::clone(&self.shared))
    }

    /// Waits until the I/O thread has nothing queued or running (tests and
    /// benchmarks that want a settled state).
    pub fn quiesce(&self) {
        let sh = &*self.shared;
        let mut st = sh.lock();
        let busy = |st: &State| {
            !(st.urgent.is_empty() && st.speculative.is_empty() && st.in_flight == 0)
                || st.unswept && st.cap.is_some()
        };
        st.settle = true;
        while busy(&st) && self.thread.is_some() {
            sh.wake.notify_one();
            st = sh.idle.wait(st).unwrap_or_else(|e| e.into_inner());
        }
        st.settle = false;
    }
}

impl Drop for Pager {
    fn drop(&mut self) {
        self.shared.lock().shutdown = true;
        self.shared.wake.notify_all();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl PagerShared {
    fn stats(&self, measure: bool) -> PagingStats {
        let measured = measure.then(|| self.measure_residency());
        let mut st = self.lock();
        if let Some(m) = &measured {
            self.apply_residency(&mut st, m);
        }
        PagingStats {
            budget_bytes: st.budget_bytes,
            budget_mode: match self.opts.budget {
                Budget::Unlimited => "unlimited",
                Budget::Auto => "auto",
                Budget::Bytes(_) => "fixed",
            }
            .to_owned(),
            fixed_bytes: self.fixed_bytes,
            expert_resident_bytes: st.resident_bytes,
            expert_cap_bytes: st.cap,
            expert_total_bytes: self.index.total_bytes(),
            locked_bytes: st.locked_bytes,
            loads: st.loads,
            bytes_in: st.bytes_in,
            load_seconds: st.load_seconds,
            evictions: st.evictions,
            predictions: st.predictions,
            predictions_used: st.predictions_used,
            major_faults: crate::procstat::major_faults(),
            memory_pressure: st.pressure,
            layer_ids: self
                .index
                .layers
                .iter()
                .map(|l| l.first().map_or(0, |s| s.layer))
                .collect(),
            experts: st
                .slots
                .iter()
                .map(|l| l.iter().map(|s| s.stat.clone()).collect())
                .collect(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic elsewhere cannot leave the counters inconsistent enough to
        // matter: keep paging rather than propagate the poison.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn ranges(&self, layer: usize, expert: usize) -> [Range<u64>; 3] {
        let s = &self.index.layers[layer][expert];
        [s.gate.clone(), s.up.clone(), s.down.clone()]
    }

    /// Marks an expert resident and queues its load, first making room
    /// under the cap by queueing evictions. `urgent`: chosen now, so it is
    /// admitted even when no victim is left (a prediction then is not).
    fn admit(&self, st: &mut State, layer: usize, expert: usize, urgent: bool) -> bool {
        let bytes = st.slots[layer][expert].bytes;
        // A prediction is worth one more use: it may only displace experts
        // used less than that, or a wrong guess evicts a hot expert.
        let worth = st.slots[layer][expert].score_at(st.step) + 1.0;
        if let Some(cap) = st.cap {
            while st.resident_bytes + bytes > cap {
                let victim = self
                    .victim(st)
                    .filter(|&(l, e)| urgent || st.slots[l][e].score_at(st.step) < worth);
                let Some((l, e)) = victim else {
                    if urgent {
                        // Over the cap for now: everything resident is in
                        // use this step. The next step evicts.
                        break;
                    }
                    return false;
                };
                self.mark_evicted(st, l, e);
                st.urgent.push_back(Job::Evict {
                    layer: l,
                    expert: e,
                });
            }
        }
        let slot = &mut st.slots[layer][expert];
        slot.stat.resident = true;
        st.resident_bytes += bytes;
        st.urgent.push_back(Job::Load { layer, expert });
        true
    }

    fn mark_evicted(&self, st: &mut State, l: usize, e: usize) {
        let slot = &mut st.slots[l][e];
        slot.stat.resident = false;
        slot.stat.evictions += 1;
        st.resident_bytes -= slot.bytes;
        st.evictions += 1;
    }

    /// The resident, unlocked expert with the lowest decayed use, oldest
    /// first, that the routing in progress did not choose and that is not
    /// predicted for this step.
    fn victim(&self, st: &State) -> Option<(usize, usize)> {
        let step = st.step;
        let mut best: Option<(f32, u64, usize, usize)> = None;
        for (l, layer) in st.slots.iter().enumerate() {
            for (e, s) in layer.iter().enumerate() {
                if !s.stat.resident || s.stat.locked || s.last_use == st.clock && st.clock > 0 {
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
        }
        best.map(|b| (b.2, b.3))
    }

    /// Sets the cap from the budget (and, for `auto`, from the memory the
    /// system has now and its pressure).
    fn set_budget(&self, st: &mut State) {
        let total = self.index.total_bytes();
        let budget = match self.opts.budget {
            Budget::Unlimited => None,
            Budget::Bytes(b) => Some(b),
            Budget::Auto => crate::procstat::headroom().map(|h| {
                // What file pages may take: our own mapped pages are
                // already inside it (reclaimable to the host, cache to the
                // cgroup).
                let mut b = h
                    .file_pages_bytes()
                    .saturating_sub(AUTO_RESERVE)
                    .max(self.fixed_bytes + self.min_cap);
                if st.pressure.is_some_and(|p| p > PRESSURE_HIGH) {
                    // The kernel is already reclaiming: keep a tenth more
                    // free. Of the headroom, not of what is resident, so
                    // lasting pressure (our own refaults count) does not
                    // compound into a collapse.
                    b = b / 10 * 9;
                }
                b.max(self.fixed_bytes + self.min_cap)
            }),
        };
        st.budget_bytes = budget;
        st.cap = budget
            .map(|b| b.saturating_sub(self.fixed_bytes).max(self.min_cap))
            .filter(|&c| c < total);
    }

    /// Advises huge pages (2 MiB folios, one page-table entry each: decode
    /// streams ~1 GB of weights a token and spends far fewer TLB misses on
    /// them) for the tensors that never leave, and for the expert slabs
    /// while the cap holds every expert. When an `auto` cap shrinks below
    /// the model the slabs go back to small pages (eviction splits the huge
    /// ones it meets), and come back to huge pages when it grows again.
    /// Failures only cost speed: logged, not returned.
    fn advise_huge(&self, st: &mut State) {
        let whole = st.cap.is_none_or(|c| c >= self.index.total_bytes());
        if st.slabs_huge == Some(whole) {
            return;
        }
        let first = st.slabs_huge.is_none();
        st.slabs_huge = Some(whole);
        let g = &*self.gguf;
        let advise = |r: Range<u64>, huge: bool| {
            g.advise_huge(r, huge).unwrap_or_else(|e| {
                crate::warn!("expert paging: huge pages: {e}");
                false
            })
        };
        let slabs = self.slab_ranges();
        if first {
            let mut at = 0;
            for r in slabs.iter().chain([&(g.bytes().len() as u64..u64::MAX)]) {
                if r.start > at {
                    advise(at..r.start, true);
                }
                at = r.end;
            }
        }
        let mut on = false;
        for r in slabs {
            on |= advise(r, whole);
        }
        self.huge_experts.store(whole && on, Ordering::Relaxed);
    }

    /// The expert slabs' byte ranges in the file, sorted, adjacent ones
    /// merged (one range per run of expert tensors).
    fn slab_ranges(&self) -> Vec<Range<u64>> {
        let mut slabs: Vec<Range<u64>> = self
            .index
            .layers
            .iter()
            .flatten()
            .flat_map(|s| [s.gate.clone(), s.up.clone(), s.down.clone()])
            .collect();
        slabs.sort_by_key(|r| r.start);
        let mut merged: Vec<Range<u64>> = Vec::with_capacity(slabs.len());
        for r in slabs {
            match merged.last_mut() {
                Some(m) if r.start <= m.end => m.end = m.end.max(r.end),
                _ => merged.push(r),
            }
        }
        merged
    }

    /// Brings the belief in line with what is really mapped into this
    /// process: experts whose pages the kernel took are marked out, experts
    /// found mapped marked in. (The page cache may keep more of the file;
    /// those pages are clean, unmapped and the first the kernel reclaims.)
    fn scan_residency(&self, st: &mut State) {
        let measured = self.measure_residency();
        self.apply_residency(st, &measured);
    }

    /// Mapped bytes of every expert's slabs (`/proc/self/pagemap`), read
    /// without the lock: for a 4 GB model this reads megabytes of pagemap.
    fn measure_residency(&self) -> Vec<Vec<u64>> {
        self.index
            .layers
            .iter()
            .map(|layer| {
                layer
                    .iter()
                    .map(|s| {
                        [s.gate.clone(), s.up.clone(), s.down.clone()]
                            .into_iter()
                            .map(|r| {
                                let len = r.end - r.start;
                                self.gguf.mapped_bytes(r).unwrap_or(0).min(len)
                            })
                            .sum()
                    })
                    .collect()
            })
            .collect()
    }

    fn apply_residency(&self, st: &mut State, measured: &[Vec<u64>]) {
        let mut resident = 0;
        for (layer, got) in st.slots.iter_mut().zip(measured) {
            for (s, &got) in layer.iter_mut().zip(got) {
                // Half in counts as in: a load would read the rest on touch.
                s.stat.resident = got * 2 >= s.bytes;
                if s.stat.resident {
                    resident += s.bytes;
                }
            }
        }
        st.resident_bytes = resident;
    }

    /// Evicts until the believed resident bytes fit the cap (after the cap
    /// shrank).
    fn shrink_to_cap(&self, st: &mut State) {
        let Some(cap) = st.cap else { return };
        while st.resident_bytes > cap {
            let Some((l, e)) = self.victim(st) else {
                break;
            };
            self.mark_evicted(st, l, e);
            st.urgent.push_back(Job::Evict {
                layer: l,
                expert: e,
            });
        }
    }

    /// Locks the hottest experts up to `lock_bytes`, unlocks those that
    /// cooled.
    fn plan_locks(&self, st: &mut State) {
        if self.opts.lock_bytes == 0 {
            return;
        }
        let step = st.step;
        let mut order: Vec<(f32, usize, usize)> = st
            .each_slot()
            .map(|(l, e, s)| (s.score_at(step), l, e))
            .filter(|x| x.0 > 0.0)
            .collect();
        order.sort_by(|a, b| b.0.total_cmp(&a.0));
        // Locked experts cannot be given back: leave room under the cap
        // for one token's working set.
        let mut budget = match st.cap {
            Some(cap) => self.opts.lock_bytes.min(cap.saturating_sub(self.min_cap)),
            None => self.opts.lock_bytes,
        };
        let mut want = vec![vec![false; self.index.layers[0].len()]; st.slots.len()];
        for (_, l, e) in order {
            let b = st.slots[l][e].bytes;
            if b <= budget {
                budget -= b;
                want[l][e] = true;
            }
        }
        for (l, layer) in want.iter().enumerate() {
            for (e, &w) in layer.iter().enumerate() {
                let locked = st.slots[l][e].stat.locked;
                if w && !locked {
                    st.urgent.push_back(Job::Lock {
                        layer: l,
                        expert: e,
                    });
                } else if !w && locked {
                    st.urgent.push_back(Job::Unlock {
                        layer: l,
                        expert: e,
                    });
                }
            }
        }
    }

    fn io_loop(&self) {
        let mut last_tick = Instant::now();
        let mut last_sweep = Instant::now();
        let mut lock_failed = false;
        let mut st = self.lock();
        loop {
            if st.shutdown {
                return;
            }
            if last_tick.elapsed() >= Duration::from_secs(1) {
                last_tick = Instant::now();
                st.pressure = crate::procstat::memory_pressure();
                let before = st.cap;
                self.set_budget(&mut st);
                self.advise_huge(&mut st);
                if st.cap < before || before.is_none() && st.cap.is_some() {
                    self.shrink_to_cap(&mut st);
                }
                if !lock_failed {
                    self.plan_locks(&mut st);
                }
            }
            let job = match st.urgent.pop_front() {
                Some(j) => Some(j),
                None => {
                    let step = st.step;
                    loop {
                        match st.speculative.pop_front() {
                            Some((s, Job::Load { layer, expert })) if s >= step => {
                                // Still not resident and room without
                                // evicting anything in recent use?
                                if !st.slots[layer][expert].stat.resident
                                    && self.admit(&mut st, layer, expert, false)
                                {
                                    break st.urgent.pop_front();
                                }
                            }
                            Some(_) => continue,
                            None => break None,
                        }
                    }
                }
            };
            // A sweep reads the page tables of every expert believed out:
            // milliseconds of a core the compute threads want. At most one
            // per SWEEP_EVERY, unless someone waits for a settled state.
            let sweep_due = last_sweep.elapsed() >= SWEEP_EVERY || st.settle;
            if job.is_none() && st.cap.is_some() && st.unswept && sweep_due {
                st.unswept = false;
                st.in_flight += 1;
                st = self.sweep(st);
                st.in_flight -= 1;
                last_sweep = Instant::now();
                continue;
            }
            let Some(job) = job else {
                self.idle.notify_all();
                let nap = if st.unswept && st.cap.is_some() {
                    SWEEP_EVERY.saturating_sub(last_sweep.elapsed())
                } else {
                    Duration::from_millis(1000)
                };
                let (g, _) = self
                    .wake
                    .wait_timeout(st, nap.max(Duration::from_millis(1)))
                    .unwrap_or_else(|e| e.into_inner());
                st = g;
                continue;
            };
            st.in_flight += 1;
            drop(st);
            let t0 = Instant::now();
            let outcome = self.run(job);
            st = self.lock();
            st.in_flight -= 1;
            if let Job::Load { .. } = job {
                st.load_seconds += t0.elapsed().as_secs_f64();
            }
            match (job, outcome) {
                (Job::Load { layer, expert }, Ok(fresh)) => {
                    st.loads += 1;
                    st.bytes_in += fresh;
                    let s = &mut st.slots[layer][expert].stat;
                    s.loads += 1;
                    s.bytes_in += fresh;
                }
                (Job::Lock { layer, expert }, Ok(_)) => {
                    let slot = &mut st.slots[layer][expert];
                    slot.stat.locked = true;
                    let bytes = slot.bytes;
                    // mlock reads in what was out.
                    let was_in = std::mem::replace(&mut slot.stat.resident, true);
                    st.locked_bytes += bytes;
                    if !was_in {
                        st.resident_bytes += bytes;
                    }
                }
                (Job::Unlock { layer, expert }, Ok(_)) => {
                    st.slots[layer][expert].stat.locked = false;
                    st.locked_bytes -= st.slots[layer][expert].bytes;
                }
                (Job::Lock { .. }, Err(e)) => {
                    lock_failed = true;
                    crate::warn!(
                        "expert paging: mlock failed ({e}); not locking experts. Raise \
                         LimitMEMLOCK= (systemd) or `ulimit -l`, or set lock_experts = 0"
                    );
                }
                (_, Err(e)) => crate::warn!("expert paging: {job:?}: {e}"),
                _ => {}
            }
        }
    }

    /// Gives back pages of experts believed out that are mapped anyway: by
    /// the kernel's fault-around next to a neighbour, or by the engine
    /// touching an expert before its load ran. Keeps the budget
    /// honest; runs when the I/O thread is idle after routings.
    fn sweep<'a>(&'a self, st: MutexGuard<'a, State>) -> MutexGuard<'a, State> {
        let out: Vec<(usize, usize)> = st
            .each_slot()
            .filter(|(_, _, s)| !s.stat.resident && !s.stat.locked)
            .map(|(l, e, _)| (l, e))
            .collect();
        drop(st);
        for (l, e) in out {
            let stray = self
                .ranges(l, e)
                .into_iter()
                .any(|r| self.gguf.mapped_bytes(r).is_ok_and(|b| b > 0));
            if !stray {
                continue;
            }
            // Chosen again meanwhile? Then it is wanted, not stray.
            let st = self.lock();
            if st.slots[l][e].stat.resident || st.shutdown {
                continue;
            }
            for r in self.ranges(l, e) {
                if let Err(err) = self.gguf.evict(r) {
                    crate::warn!("expert paging: evicting stray pages: {err}");
                }
            }
            drop(st);
        }
        self.lock()
    }

    /// Does one job; for loads, returns the bytes that were not resident.
    fn run(&self, job: Job) -> std::io::Result<u64> {
        let g = &*self.gguf;
        match job {
            Job::Load { layer, expert } => {
                let ranges = self.ranges(layer, expert);
                let mut fresh = 0;
                for r in &ranges {
                    let len = r.end - r.start;
                    fresh += len - g.resident_bytes(r.clone())?.min(len);
                    // All three reads in flight at once, and no further
                    // (huge-page slabs are read by the fault, 2 MiB at a time).
                    if !self.huge_experts.load(Ordering::Relaxed) {
                        g.read_ahead(r.clone())?;
                    }
                }
                for r in ranges {
                    g.populate(r)?;
                }
                Ok(fresh)
            }
            Job::Evict { layer, expert } => {
                let mut n = 0;
                for r in self.ranges(layer, expert) {
                    n += g.evict(r)?;
                }
                Ok(n)
            }
            Job::Lock { layer, expert } => {
                for r in self.ranges(layer, expert) {
                    g.lock(r)?;
                }
                Ok(0)
            }
            Job::Unlock { layer, expert } => {
                for r in self.ranges(layer, expert) {
                    g.unlock(r)?;
                }
                Ok(0)
            }
        }
    }
}
