//! The pager's hands: a few I/O threads that carry out the policy's jobs on
//! the mapping (`MADV_POPULATE_READ` loads, `MADV_DONTNEED` +
//! `POSIX_FADV_DONTNEED` evictions, `mlock`), several loads in flight at
//! once (a disk reads faster with a queue than with one read at a time);
//! one of them at a time follows the host's memory once a second for an
//! `auto` budget, gives the slabs huge-page advice while every expert fits,
//! and sweeps stray mapped pages of experts believed out.

use super::policy::{Job, Policy};
use super::{Budget, PagingOptions, PagingStats};
use crate::gguf::Gguf;
use crate::model::ExpertIndex;
use std::ops::Range;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// Least time between two sweeps for stray mapped pages.
const SWEEP_EVERY: Duration = Duration::from_millis(100);
/// The longest the engine waits for one expert's load before it reads the
/// pages itself (a stalled disk or a lost I/O thread must not stop it).
const WAIT_AT_MOST: Duration = Duration::from_secs(2);

/// The policy and the I/O threads' own flags, under one lock.
pub(super) struct State {
    pub policy: Policy,
    shutdown: bool,
    /// Jobs taken by the I/O threads and not finished (for `quiesce`).
    in_flight: usize,
    /// A routing happened since the last sweep (the engine may have faulted
    /// pages of experts believed out).
    pub unswept: bool,
    /// Someone waits in `quiesce`: sweep now, not on the schedule.
    settle: bool,
    /// The huge-page advice last given to the expert slabs (`None`: none
    /// given yet).
    slabs_huge: Option<bool>,
    /// I/O threads running (the engine never waits for a load when none is):
    /// set by their spawner, each takes itself off when it stops.
    pub threads: usize,
    last_tick: Instant,
    last_sweep: Instant,
    sweeping: bool,
    /// An `mlock` failed: no more lock planning.
    lock_failed: bool,
}

/// What the engine's [`super::Pager`], the monitors and the I/O threads share.
pub(super) struct PagerShared {
    gguf: std::sync::Arc<Gguf>,
    index: ExpertIndex,
    pub opts: PagingOptions,
    /// The expert slabs are advised to huge pages and the kernel takes the
    /// advice: loads let the fault read them 2 MiB at a time instead of
    /// reading exactly their pages ahead.
    huge_experts: AtomicBool,
    state: Mutex<State>,
    pub wake: Condvar,
    idle: Condvar,
    /// Signalled when a load ends.
    loaded: Condvar,
}

impl PagerShared {
    /// Sets the first budget and advice and takes the mapping's present
    /// pages as the first belief.
    pub fn new(
        gguf: std::sync::Arc<Gguf>,
        index: ExpertIndex,
        opts: PagingOptions,
        policy: Policy,
    ) -> PagerShared {
        let shared = PagerShared {
            gguf,
            index,
            opts,
            huge_experts: AtomicBool::new(false),
            state: Mutex::new(State {
                policy,
                shutdown: false,
                in_flight: 0,
                unswept: false,
                settle: false,
                slabs_huge: None,
                threads: 0,
                last_tick: Instant::now(),
                last_sweep: Instant::now(),
                sweeping: false,
                lock_failed: false,
            }),
            wake: Condvar::new(),
            idle: Condvar::new(),
            loaded: Condvar::new(),
        };
        {
            let mut st = shared.lock();
            shared.follow_budget(&mut st);
            shared.advise_huge(&mut st);
            let measured = shared.measure_residency();
            st.policy.apply_residency(&measured);
            st.policy.shrink_to_cap();
        }
        shared
    }

    pub fn lock(&self) -> MutexGuard<'_, State> {
        // A panic elsewhere cannot leave the counters inconsistent enough to
        // matter: keep paging rather than propagate the poison.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Tells the I/O threads to stop.
    pub fn shut_down(&self) {
        self.lock().shutdown = true;
        self.wake.notify_all();
    }

    /// Of `experts` (MoE layer `layer`), which the engine may compute now,
    /// waiting until at least one may: a chosen expert's load is waited for
    /// rather than faulted in page by page beside it. Gives up (all ready:
    /// the engine then reads what is missing itself) after [`WAIT_AT_MOST`]
    /// or when no I/O thread runs.
    pub fn wait_ready(&self, layer: usize, experts: &[usize]) -> Vec<bool> {
        let t0 = Instant::now();
        let mut st = self.lock();
        loop {
            let ready: Vec<bool> = experts
                .iter()
                .map(|&e| !st.policy.loading(layer, e))
                .collect();
            let waited = t0.elapsed();
            if ready.iter().any(|&r| r) || st.threads == 0 || st.shutdown || waited >= WAIT_AT_MOST
            {
                st.policy.wait_seconds += waited.as_secs_f64();
                return if ready.iter().any(|&r| r) {
                    ready
                } else {
                    vec![true; experts.len()]
                };
            }
            st = self
                .loaded
                .wait_timeout(st, WAIT_AT_MOST - waited)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    /// Waits until nothing is queued, running or left to sweep.
    pub fn quiesce(&self) {
        let mut st = self.lock();
        let busy = |st: &State| {
            st.policy.has_jobs() || st.in_flight > 0 || st.unswept && st.policy.cap.is_some()
        };
        st.settle = true;
        while busy(&st) && !st.shutdown && st.threads > 0 {
            self.wake.notify_one();
            st = self.idle.wait(st).unwrap_or_else(|e| e.into_inner());
        }
        st.settle = false;
    }

    pub fn stats(&self, measure: bool) -> PagingStats {
        let measured = measure.then(|| self.measure_residency());
        let mut st = self.lock();
        if let Some(m) = &measured {
            st.policy.apply_residency(m);
        }
        let p = &st.policy;
        PagingStats {
            budget_bytes: p.budget_bytes,
            budget_mode: match self.opts.budget {
                Budget::Unlimited => "unlimited",
                Budget::Auto => "auto",
                Budget::Bytes(_) => "fixed",
            }
            .to_owned(),
            fixed_bytes: p.fixed_bytes,
            expert_resident_bytes: p.resident_bytes,
            expert_cap_bytes: p.cap,
            expert_total_bytes: p.total_bytes(),
            locked_bytes: p.locked_bytes,
            loads: p.loads,
            bytes_in: p.bytes_in,
            load_seconds: p.load_seconds,
            evictions: p.evictions,
            predictions: p.predictions,
            predictions_used: p.predictions_used,
            predicted_loads: p.predicted_loads,
            predicted_loads_used: p.predicted_loads_used,
            wait_seconds: p.wait_seconds,
            major_faults: crate::procstat::major_faults(),
            memory_pressure: p.pressure,
            layer_ids: self
                .index
                .layers
                .iter()
                .map(|l| l.first().map_or(0, |s| s.layer))
                .collect(),
            experts: p
                .slots
                .iter()
                .map(|l| l.iter().map(|s| s.stat.clone()).collect())
                .collect(),
        }
    }

    fn ranges(&self, layer: usize, expert: usize) -> [Range<u64>; 3] {
        let s = &self.index.layers[layer][expert];
        [s.gate.clone(), s.up.clone(), s.down.clone()]
    }

    /// Sets the budget from the options and (for `auto`) the memory the
    /// host and cgroup have now; returns whether the cap shrank.
    fn follow_budget(&self, st: &mut State) -> bool {
        let file_pages = match self.opts.budget {
            Budget::Auto => crate::procstat::headroom().map(|h| h.file_pages_bytes()),
            _ => None,
        };
        let budget = st.policy.budget_for(self.opts.budget, file_pages);
        st.policy.set_budget(budget)
    }

    /// Advises huge pages (2 MiB folios, one page-table entry each: decode
    /// streams ~1 GB of weights a token and spends far fewer TLB misses on
    /// them) for the tensors that never leave, and for the expert slabs
    /// while the cap holds every expert. When an `auto` cap shrinks below
    /// the model the slabs go back to small pages (eviction splits the huge
    /// ones it meets), and come back to huge pages when it grows again.
    /// Failures only cost speed: logged, not returned.
    fn advise_huge(&self, st: &mut State) {
        let whole = st.policy.holds_all();
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

    /// Mapped bytes of every expert's slabs (`/proc/self/pagemap`), read
    /// without the lock: for a 4 GB model this reads megabytes of pagemap.
    /// (The page cache may keep more of the file; those pages are clean,
    /// unmapped and the first the kernel reclaims.)
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

    /// One I/O thread: takes the policy's jobs until shutdown; whichever
    /// thread is free does the once-a-second budget tick and the sweeps.
    pub fn io_loop(&self) {
        let mut st = self.lock();
        loop {
            if st.shutdown {
                st.threads -= 1;
                self.idle.notify_all();
                self.loaded.notify_all();
                return;
            }
            if st.last_tick.elapsed() >= Duration::from_secs(1) {
                st.last_tick = Instant::now();
                st.policy.pressure = crate::procstat::memory_pressure();
                if self.follow_budget(&mut st) {
                    st.policy.shrink_to_cap();
                }
                self.advise_huge(&mut st);
                if !st.lock_failed {
                    st.policy.plan_locks();
                }
            }
            let job = st.policy.next_job();
            // A sweep reads the page tables of every expert believed out:
            // milliseconds of a core the compute threads want. At most one
            // per SWEEP_EVERY, unless someone waits for a settled state.
            let capped = st.policy.cap.is_some();
            let sweep_due = st.last_sweep.elapsed() >= SWEEP_EVERY || st.settle;
            // Only with no job running anywhere: a load's fault-around maps
            // pages of its neighbours, stray pages a sweep beside it would
            // miss (every load ends by asking for another sweep).
            let quiet = st.in_flight == 0 && !st.sweeping;
            if job.is_none() && capped && st.unswept && sweep_due && quiet {
                st.unswept = false;
                st.sweeping = true;
                st.in_flight += 1;
                st = self.sweep(st);
                st.in_flight -= 1;
                st.sweeping = false;
                st.last_sweep = Instant::now();
                continue;
            }
            let Some(job) = job else {
                if st.in_flight == 0 {
                    self.idle.notify_all();
                }
                let nap = if st.unswept && capped {
                    SWEEP_EVERY.saturating_sub(st.last_sweep.elapsed())
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
            st.policy.finished(
                job,
                outcome.as_ref().ok().copied(),
                t0.elapsed().as_secs_f64(),
            );
            if let Job::Load { .. } = job {
                st.unswept = true;
                self.loaded.notify_all();
            }
            match (job, outcome) {
                // Several threads may fail a lock before planning stops.
                (Job::Lock { .. }, Err(_)) if st.lock_failed => {}
                (Job::Lock { .. }, Err(e)) => {
                    st.lock_failed = true;
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
    /// honest; runs when no job runs after routings.
    fn sweep<'a>(&'a self, st: MutexGuard<'a, State>) -> MutexGuard<'a, State> {
        let out = st.policy.believed_out();
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
            if st.policy.slots[l][e].stat.resident || st.shutdown {
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
