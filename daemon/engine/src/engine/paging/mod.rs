//! Expert paging: the expert slabs of the mapping as a cache the daemon
//! manages instead of a page-cache accident.
//!
//! The engine tells the [`Pager`] which experts each MoE layer's router chose
//! ([`Pager::route`]) and which it expects the next layers to choose
//! ([`Pager::predict`]). The pager keeps a belief of which experts are in
//! memory, and hands work to a few I/O threads: bring chosen experts in, in
//! router order, several at once (`MADV_POPULATE_READ`, which reads and maps
//! them while the engine computes the resident ones; the engine then waits
//! for each load, [`Pager::wait_ready`], instead of faulting its pages in
//! one by one beside it), bring predicted ones in when nothing urgent is
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
//!
//! Two parts: [`policy`] decides (the belief, victims, admission, the cap,
//! lock planning: bookkeeping only, unit-tested without a mapping) and
//! [`io`] acts (the I/O threads' madvise/fadvise/mlock calls, reading the
//! host's memory and the page tables). [`Pager`] is the engine's side.

mod io;
mod policy;

use crate::gguf::Gguf;
use crate::model::ExpertIndex;
use io::PagerShared;
use serde::Serialize;
use std::sync::Arc;
use std::thread::JoinHandle;

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
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct PagingOptions {
    pub budget: Budget,
    /// `mlock` the hottest experts up to this many bytes (0: none).
    pub lock_bytes: u64,
    /// How many MoE layers ahead to predict and prefetch (0: none).
    pub lookahead: usize,
    /// How sure a prediction must be to read an expert ahead: the least
    /// gap, in the router's selection score (a sigmoid plus the selection
    /// bias), between a predicted expert and the best one not predicted
    /// for the same token. 0 reads every predicted expert.
    pub predict_margin: f32,
    /// I/O threads, each with one expert's reads in flight (at least 1).
    pub io_threads: usize,
}

impl Default for PagingOptions {
    fn default() -> Self {
        PagingOptions {
            budget: Budget::Auto,
            lock_bytes: 0,
            lookahead: 0,
            predict_margin: DEFAULT_PREDICT_MARGIN,
            io_threads: DEFAULT_IO_THREADS,
        }
    }
}

/// The default [`PagingOptions::predict_margin`].
pub const DEFAULT_PREDICT_MARGIN: f32 = 0.1;

/// The I/O threads' names start with this (`lfmd-pager-N`).
pub const IO_THREAD_NAME: &str = "lfmd-pager";

/// I/O threads by default: with one read at a time a disk gives a fraction
/// of what it gives with a queue (NVMe most of all), and each thread keeps
/// one expert's three slabs in flight.
pub const DEFAULT_IO_THREADS: usize = 4;

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
    /// Time the I/O threads spent in loads (reading ahead and populating),
    /// summed over threads.
    pub load_seconds: f64,
    /// Time the engine waited for chosen experts' loads (compute stalled
    /// on I/O).
    pub wait_seconds: f64,
    pub evictions: u64,
    pub predictions: u64,
    /// Predicted experts the router then chose (per layer and token).
    pub predictions_used: u64,
    /// Predictions that queued a load (the expert was not in memory), and
    /// of those the ones the router chose.
    pub predicted_loads: u64,
    pub predicted_loads_used: u64,
    /// Major page faults of the process (all of them, not just ours).
    pub major_faults: Option<u64>,
    pub memory_pressure: Option<f32>,
    /// `[moe layer][expert]`; `layers[i]` is model layer `layer_ids[i]`.
    pub layer_ids: Vec<usize>,
    pub experts: Vec<Vec<ExpertStat>>,
}

/// The expert cache of one model. Dropping it stops its I/O threads.
pub struct Pager {
    shared: Arc<PagerShared>,
    /// Model layer index → MoE ordinal.
    moe_of: Vec<Option<usize>>,
    threads: Vec<JoinHandle<()>>,
}

/// Reads a [`Pager`]'s figures from any thread; cheap to clone. Holds the
/// pager's bookkeeping, not its I/O threads.
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
        let slot_bytes = index
            .layers
            .iter()
            .map(|l| l.iter().map(|s| s.bytes()).collect())
            .collect();
        let policy = policy::Policy::new(slot_bytes, fixed_bytes, working, opts.lock_bytes);
        let shared = Arc::new(PagerShared::new(gguf, index, opts, policy));
        let threads: Vec<JoinHandle<()>> = (0..opts.io_threads.max(1))
            .map_while(|i| {
                let s = Arc::clone(&shared);
                std::thread::Builder::new()
                    .name(format!("{IO_THREAD_NAME}-{i}"))
                    .spawn(move || s.io_loop())
                    .ok()
            })
            .collect();
        shared.lock().threads = threads.len();
        if threads.is_empty() {
            crate::warn!("expert paging: could not start its I/O threads; experts page on demand");
        }
        Ok(Some(Pager {
            shared,
            moe_of,
            threads,
        }))
    }

    /// Tells the pager that `bytes` of the mapping's fixed (non-expert)
    /// bytes now live outside it (the engine's repacked matrices, their file
    /// pages given back), so an `auto` budget does not count them twice;
    /// the cap follows within the I/O threads' next second.
    pub fn set_outside_bytes(&self, bytes: u64) {
        self.shared.lock().policy.outside_bytes = bytes;
    }

    /// The MoE ordinal of model layer `layer`, if it is a MoE layer.
    pub fn moe_ordinal(&self, layer: usize) -> Option<usize> {
        self.moe_of.get(layer).copied().flatten()
    }

    /// [`PagingOptions::predict_margin`].
    pub fn predict_margin(&self) -> f32 {
        self.shared.opts.predict_margin
    }

    /// The next MoE layers after model layer `layer`, up to the lookahead.
    pub fn next_moe_layers(&self, layer: usize) -> impl Iterator<Item = usize> + '_ {
        (layer + 1..self.moe_of.len())
            .filter(|&l| self.moe_of[l].is_some())
            .take(self.shared.opts.lookahead)
    }

    /// Starts a forward step (one batch through all layers).
    pub fn begin_step(&self) {
        self.shared.lock().policy.begin_step();
    }

    /// Layer `layer`'s router chose `experts` (expert id, tokens choosing
    /// it), in router order: count the use and bring in what is not
    /// resident, first, loads in that order. Returns which of them the
    /// engine may compute now; for the others, [`Pager::wait_ready`].
    pub fn route(&self, layer: usize, experts: &[(usize, usize)]) -> Vec<bool> {
        let Some(ord) = self.moe_ordinal(layer) else {
            return vec![true; experts.len()];
        };
        let mut st = self.shared.lock();
        // The engine may fault pages of experts believed out: sweep later.
        st.unswept = true;
        let queued = st.policy.route(ord, experts);
        let no_threads = st.threads == 0;
        let ready = experts
            .iter()
            .map(|&(e, _)| no_threads || st.policy.ready(ord, e))
            .collect();
        drop(st);
        if queued {
            self.shared.wake.notify_all();
        }
        ready
    }

    /// Of `experts` of model layer `layer` (ones [`Pager::route`] said were
    /// not ready), which are ready now, waiting until at least one is. The
    /// time waited counts as `wait_seconds`.
    pub fn wait_ready(&self, layer: usize, experts: &[usize]) -> Vec<bool> {
        match self.moe_ordinal(layer) {
            Some(ord) => self.shared.wait_ready(ord, experts),
            None => vec![true; experts.len()],
        }
    }

    /// Whether predictions for model layer `layer` could bring anything in
    /// (some expert of it is not resident). When not, the engine skips the
    /// prediction's router product.
    pub fn wants_prediction(&self, layer: usize) -> bool {
        self.moe_ordinal(layer)
            .is_some_and(|ord| self.shared.lock().policy.wants_prediction(ord))
    }

    /// The engine expects layer `layer` to choose `experts`: bring in those
    /// not resident when the I/O threads have nothing urgent.
    pub fn predict(&self, layer: usize, experts: &[usize]) {
        let Some(ord) = self.moe_ordinal(layer) else {
            return;
        };
        let queued = self.shared.lock().policy.predict(ord, experts);
        if queued {
            self.shared.wake.notify_all();
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

    /// Waits until the I/O threads have nothing queued or running (tests
    /// and benchmarks that want a settled state).
    pub fn quiesce(&self) {
        self.shared.quiesce();
    }
}

impl Drop for Pager {
    fn drop(&mut self) {
        self.shared.shut_down();
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}
