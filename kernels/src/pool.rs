//! A persistent worker pool for the compute kernels: threads are spawned once,
//! wait for work by spinning briefly and then parking, and run one parallel
//! region at a time with the calling thread taking part. No allocation or
//! thread spawn per operation.

use std::cell::UnsafeCell;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;

/// Spins before a waiting worker parks: long enough to cover the gap between
/// two kernels of one forward pass, short enough not to burn a core idle.
const SPIN_ROUNDS: u32 = 20_000;

type Job = dyn Fn(usize, usize) + Sync;

struct Shared {
    /// Bumped once per parallel region; workers run the job when it changes.
    epoch: AtomicU64,
    /// Workers still running the current job.
    busy: AtomicUsize,
    /// The current job, valid while `busy > 0` for the epoch it was set in.
    job: UnsafeCell<Option<*const Job>>,
    shutdown: AtomicBool,
    /// A worker's job panicked in the current region.
    panicked: AtomicBool,
    sleep: Mutex<()>,
    wake: Condvar,
    /// Workers parked on `wake` (or about to be): a region wakes them only
    /// then, so a region meeting spinning workers makes no system call.
    sleepers: AtomicUsize,
    n_threads: usize,
}

// SAFETY: `job` is written only by the pool owner between regions (when no
// worker reads it: `busy == 0`) and read by workers only during a region,
// which the epoch/busy protocol orders with Release/Acquire.
unsafe impl Sync for Shared {}
// SAFETY: as above; the raw job pointer is only dereferenced during a region
// whose caller keeps the closure alive until every worker finished.
unsafe impl Send for Shared {}

/// A fixed set of worker threads plus the caller.
pub struct ThreadPool {
    shared: Arc<Shared>,
    workers: Vec<JoinHandle<()>>,
    /// Serializes regions: the pool runs one job at a time.
    region: Mutex<()>,
}

impl ThreadPool {
    /// A pool of `n_threads` threads in all (the caller counts as one).
    pub fn new(n_threads: usize) -> Self {
        let n_threads = n_threads.max(1);
        let shared = Arc::new(Shared {
            epoch: AtomicU64::new(0),
            busy: AtomicUsize::new(0),
            job: UnsafeCell::new(None),
            shutdown: AtomicBool::new(false),
            panicked: AtomicBool::new(false),
            sleep: Mutex::new(()),
            wake: Condvar::new(),
            sleepers: AtomicUsize::new(0),
            n_threads,
        });
        let workers = (1..n_threads)
            .map(|tid| {
                let s = shared.clone();
                std::thread::Builder::new()
                    .name(format!("lfm-compute-{tid}"))
                    .spawn(move || worker(&s, tid))
                    .expect("spawn compute worker")
            })
            .collect();
        ThreadPool {
            shared,
            workers,
            region: Mutex::new(()),
        }
    }

    pub fn n_threads(&self) -> usize {
        self.shared.n_threads
    }

    /// Runs `f(thread_index, n_threads)` on every thread of the pool and
    /// returns when all have finished. `f` partitions the work itself.
    pub fn run(&self, f: &(dyn Fn(usize, usize) + Sync)) {
        let n = self.shared.n_threads;
        if n == 1 {
            f(0, 1);
            return;
        }
        let _region = self.region.lock().unwrap_or_else(|e| e.into_inner());
        let s = &*self.shared;
        // SAFETY: no region is running (we hold `region` and the previous
        // region waited for busy == 0), so no worker reads `job` now. The
        // pointer's lifetime is erased; `f` outlives its use because we wait
        // below until every worker is done with it.
        unsafe {
            let erased: *const Job =
                std::mem::transmute::<&(dyn Fn(usize, usize) + Sync), &'static Job>(f);
            *s.job.get() = Some(erased);
        }
        s.busy.store(n - 1, Ordering::Release);
        // SeqCst with the worker's `sleepers` increment and epoch check:
        // either it sees this epoch and does not park, or we see it parked
        // (or parking, under the lock) and wake it.
        s.epoch.fetch_add(1, Ordering::SeqCst);
        if s.sleepers.load(Ordering::SeqCst) > 0 {
            let _g = s.sleep.lock().unwrap_or_else(|e| e.into_inner());
            s.wake.notify_all();
        }
        f(0, n);
        let mut spins = 0u32;
        while s.busy.load(Ordering::Acquire) != 0 {
            spins += 1;
            if spins < SPIN_ROUNDS {
                std::hint::spin_loop();
            } else {
                std::thread::yield_now();
            }
        }
        if s.panicked.swap(false, Ordering::AcqRel) {
            panic!("a compute worker panicked");
        }
    }

    /// Runs `f(range)` over `0..n_items` in chunks of `chunk` items handed out
    /// dynamically, so uneven work (experts with many tokens and few) keeps
    /// every thread busy.
    pub fn for_chunks(
        &self,
        n_items: usize,
        chunk: usize,
        f: &(dyn Fn(std::ops::Range<usize>) + Sync),
    ) {
        let chunk = chunk.max(1);
        let next = AtomicUsize::new(0);
        self.run(&|_, _| loop {
            let start = next.fetch_add(chunk, Ordering::Relaxed);
            if start >= n_items {
                break;
            }
            f(start..(start + chunk).min(n_items));
        });
    }

    /// Runs `f(range)` over `0..n_items` in chunks that shrink as the work
    /// runs out (each a share of what is left, at least `min_chunk`): long
    /// contiguous runs while there is much to do, and at the end no thread
    /// waits for another's last long chunk. What is handed out depends on
    /// timing; the items each call sees are always disjoint and cover all.
    pub fn for_chunks_guided(
        &self,
        n_items: usize,
        min_chunk: usize,
        f: &(dyn Fn(std::ops::Range<usize>) + Sync),
    ) {
        let min_chunk = min_chunk.max(1);
        let share = 2 * self.n_threads();
        let next = AtomicUsize::new(0);
        self.run(&|_, _| {
            let mut start = next.load(Ordering::Relaxed);
            while start < n_items {
                let len = ((n_items - start) / share)
                    .max(min_chunk)
                    .min(n_items - start);
                match next.compare_exchange_weak(
                    start,
                    start + len,
                    Ordering::Relaxed,
                    Ordering::Relaxed,
                ) {
                    Ok(_) => {
                        f(start..start + len);
                        start = next.load(Ordering::Relaxed);
                    }
                    Err(now) => start = now,
                }
            }
        });
    }
}

/// A raw base pointer shared by pool threads that touch disjoint parts.
struct SharedMut<T>(*mut T);
// SAFETY: used only by `for_each_mut`, whose threads build non-overlapping
// sub-slices from it while the caller's exclusive borrow is held.
unsafe impl<T: Send> Sync for SharedMut<T> {}

impl ThreadPool {
    /// Calls `f(i, chunk)` for every `chunk_len`-sized piece of `data` (the
    /// last may be shorter), spread over the pool; each piece goes to exactly
    /// one thread, so `f` may write to it freely.
    pub fn for_each_mut<T: Send>(
        &self,
        data: &mut [T],
        chunk_len: usize,
        f: &(dyn Fn(usize, &mut [T]) + Sync),
    ) {
        let chunk_len = chunk_len.max(1);
        let len = data.len();
        let n_chunks = len.div_ceil(chunk_len);
        let base = SharedMut(data.as_mut_ptr());
        let base = &base;
        self.for_chunks(n_chunks, 1, &|range| {
            for i in range {
                let start = i * chunk_len;
                let end = (start + chunk_len).min(len);
                // SAFETY: start < end <= len, so the range lies in `data`;
                // chunk i is handed out once (for_chunks covers each index
                // exactly once), so no two threads alias; `data` stays
                // exclusively borrowed until the region ends.
                let chunk =
                    unsafe { std::slice::from_raw_parts_mut(base.0.add(start), end - start) };
                f(i, chunk);
            }
        });
    }
}

fn worker(s: &Shared, tid: usize) {
    let mut seen = 0u64;
    loop {
        let mut spins = 0u32;
        let epoch = loop {
            let e = s.epoch.load(Ordering::Acquire);
            if e != seen || s.shutdown.load(Ordering::Acquire) {
                break e;
            }
            spins += 1;
            if spins < SPIN_ROUNDS {
                std::hint::spin_loop();
            } else {
                let g = s.sleep.lock().unwrap_or_else(|e| e.into_inner());
                s.sleepers.fetch_add(1, Ordering::SeqCst);
                if s.epoch.load(Ordering::SeqCst) == seen && !s.shutdown.load(Ordering::Acquire) {
                    drop(s.wake.wait(g).unwrap_or_else(|e| e.into_inner()));
                }
                s.sleepers.fetch_sub(1, Ordering::SeqCst);
                spins = 0;
            }
        };
        if s.shutdown.load(Ordering::Acquire) {
            return;
        }
        seen = epoch;
        // SAFETY: the epoch changed, so the owner set `job` for this region
        // (Release on epoch, Acquire above) and keeps it alive until `busy`
        // reaches zero, which happens only after this call returns.
        let job = unsafe { (*s.job.get()).expect("job set before epoch bump") };
        // A panicking job must still count itself done, or the caller would
        // wait forever; the caller re-raises it.
        let ran = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            // SAFETY: see above: the closure behind the pointer is alive.
            unsafe { (*job)(tid, s.n_threads) }
        }));
        if ran.is_err() {
            s.panicked.store(true, Ordering::Release);
        }
        s.busy.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Drop for ThreadPool {
    fn drop(&mut self) {
        self.shared.shutdown.store(true, Ordering::Release);
        {
            let _g = self.shared.sleep.lock().unwrap_or_else(|e| e.into_inner());
            self.shared.wake.notify_all();
        }
        for w in self.workers.drain(..) {
            let _ = w.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_thread_runs_each_region_once() {
        for n in [1, 2, 3, 5] {
            let pool = ThreadPool::new(n);
            for round in 0..200 {
                let hits: Vec<AtomicUsize> = (0..n).map(|_| AtomicUsize::new(0)).collect();
                pool.run(&|tid, nth| {
                    assert_eq!(nth, n);
                    hits[tid].fetch_add(round + 1, Ordering::Relaxed);
                });
                assert!(hits.iter().all(|h| h.load(Ordering::Relaxed) == round + 1));
            }
        }
    }

    #[test]
    fn parked_workers_wake_for_the_next_region() {
        let pool = ThreadPool::new(3);
        for _ in 0..5 {
            // Longer than the spin: the workers park, and the next region
            // must wake them (a lost wake-up hangs here).
            std::thread::sleep(std::time::Duration::from_millis(30));
            let hits = AtomicUsize::new(0);
            pool.run(&|_, _| {
                hits.fetch_add(1, Ordering::Relaxed);
            });
            assert_eq!(hits.load(Ordering::Relaxed), 3);
        }
    }

    #[test]
    fn chunks_cover_every_item_exactly_once() {
        let pool = ThreadPool::new(3);
        for (n, chunk) in [(0, 4), (1, 4), (100, 7), (1000, 1)] {
            let seen: Vec<AtomicUsize> = (0..n).map(|_| AtomicUsize::new(0)).collect();
            pool.for_chunks(n, chunk, &|r| {
                for i in r {
                    seen[i].fetch_add(1, Ordering::Relaxed);
                }
            });
            assert!(
                seen.iter().all(|s| s.load(Ordering::Relaxed) == 1),
                "n {n} chunk {chunk}"
            );
        }
    }

    #[test]
    fn guided_chunks_cover_every_item_once_and_shrink() {
        for threads in [1, 2, 3] {
            let pool = ThreadPool::new(threads);
            for (n, min) in [(0, 1), (1, 1), (7, 3), (1000, 1), (896, 2)] {
                let seen: Vec<AtomicUsize> = (0..n).map(|_| AtomicUsize::new(0)).collect();
                let chunks = Mutex::new(Vec::new());
                pool.for_chunks_guided(n, min, &|r| {
                    chunks.lock().unwrap().push(r.clone());
                    for i in r {
                        seen[i].fetch_add(1, Ordering::Relaxed);
                    }
                });
                assert!(
                    seen.iter().all(|s| s.load(Ordering::Relaxed) == 1),
                    "n {n} min {min}"
                );
                let mut chunks = chunks.into_inner().unwrap();
                chunks.sort_by_key(|r| r.start);
                // In the order handed out: never longer than a share of
                // what was left, never shorter than the minimum (but the
                // tail), so the last ones are short.
                for r in &chunks {
                    let left = n - r.start;
                    let share = (left / (2 * threads)).max(min).min(left);
                    assert_eq!(r.len(), share, "n {n} min {min}: {chunks:?}");
                }
                if n >= 100 {
                    assert!(chunks.first().unwrap().len() >= n / (2 * threads));
                    assert!(chunks.last().unwrap().len() <= min);
                }
            }
        }
    }

    #[test]
    fn a_panicking_worker_is_reported_not_hung() {
        let pool = ThreadPool::new(2);
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            pool.run(&|tid, _| assert_ne!(tid, 1, "worker 1 fails"));
        }));
        assert!(r.is_err());
        // The pool still works afterwards.
        let count = AtomicUsize::new(0);
        pool.run(&|_, _| {
            count.fetch_add(1, Ordering::Relaxed);
        });
        assert_eq!(count.load(Ordering::Relaxed), 2);
    }

    #[test]
    fn each_piece_is_visited_once_with_its_index() {
        let pool = ThreadPool::new(3);
        let mut v = vec![0usize; 103];
        pool.for_each_mut(&mut v, 10, &|i, chunk| {
            for (k, x) in chunk.iter_mut().enumerate() {
                *x += i * 10 + k + 1;
            }
        });
        assert!(v.iter().enumerate().all(|(k, &x)| x == k + 1));
        let mut empty: Vec<u8> = Vec::new();
        pool.for_each_mut(&mut empty, 4, &|_, _| panic!("no pieces"));
    }
}
