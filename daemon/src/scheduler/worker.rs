//! The engine thread's loop. Each turn: admit waiting requests into free
//! slots, drop running ones whose receiver is gone or whose deadline passed,
//! then one forward step over everything running (decodes plus a bounded
//! prefill budget), sample, and send the events. It sleeps only when
//! nothing runs. A panic inside a step fails the requests of that step and
//! the loop goes on; a panic elsewhere ends the thread, failing everything,
//! and is reported through `EngineExit`.

use super::plan::{StepNeed, plan_step};
use super::prefix::{Pin, Snapshot};
use super::{Config, Done, Event, Failure, Job, Priority, SessionTurn, Shared, Stats, UserSlot};
use crate::engine::{BatchItem, LogitsWanted, Model, SeqState};
use crate::sequence::{FinishReason, Sequence};
use crate::tokenizer::Tokenizer;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Arc;
use std::time::Instant;
use tokio::sync::mpsc::UnboundedSender;

/// One sequence's share of a step's sampling, done on a pool thread.
struct Advance<'a> {
    /// Its place in the running list.
    index: usize,
    seq: &'a mut Sequence,
    /// Tokens it fed this step.
    n: usize,
    /// Its logits, if it asked for them.
    row: Option<&'a [f32]>,
    out: Option<Result<Option<crate::sequence::Step>, String>>,
}

pub(crate) struct Worker {
    model: Model,
    tokenizer: Arc<Tokenizer>,
    shared: Arc<Shared>,
    config: Config,
}

/// A request holding a slot.
struct Admitted {
    seq: Sequence,
    priority: Priority,
    events: UnboundedSender<Event>,
    deadline: Option<Instant>,
    arrived: Instant,
    admitted: Instant,
    first_token: Option<Instant>,
    /// When it last generated a token.
    last_token: Option<Instant>,
    prompt_tokens: usize,
    prefilled_tokens: usize,
    /// The text sent so far (kept for sessions only).
    reply: String,
    session: Option<SessionTurn>,
    /// Given back before the final event, so a client that sees it may
    /// send its next request at once.
    user_slot: Option<UserSlot>,
    /// Its prefix-cache scope (its user's, or the shared one).
    scope: Arc<str>,
    /// The latest cached snapshot its state continues (a hit, its session's
    /// state, or one it took): where its next snapshot chains to.
    chain: Option<Arc<Snapshot>>,
    /// Its entry in the outcome counts.
    tally: super::metrics::Tally,
    /// Its session's state, held until the turn's own is kept.
    base: Option<Pin>,
    /// Prompt positions still to snapshot.
    snap: Option<SnapPlan>,
}

/// A fresh sequence's prefix-cache snapshots still to take (the tokens
/// are the sequence's own history).
struct SnapPlan {
    /// Prompt positions still to snapshot, ascending.
    points: std::collections::VecDeque<usize>,
}

impl SnapPlan {
    /// Tokens the sequence may feed in this step so its chunk ends at the
    /// next snapshot point, given `consumed` so far.
    fn cap(&self, consumed: usize) -> Option<usize> {
        self.points
            .front()
            .map(|&p| p.saturating_sub(consumed).max(1))
    }
}

impl Job {
    /// Gives a session back its untouched state (the job never ran).
    fn abandon(mut self) {
        if let Some(turn) = &mut self.session {
            turn.lease.state = self.state.take();
        }
    }

    fn fail(mut self, why: Failure) {
        drop(self.user_slot.take());
        self.tally.fail(&why);
        let _ = self.events.send(Event::Failed(why));
        self.abandon();
    }
}

impl Admitted {
    fn fail(mut self, why: Failure) {
        // The session (if any) keeps its conversation; its state was
        // partly advanced, so it is dropped with the sequence.
        drop(self.user_slot.take());
        self.tally.fail(&why);
        let _ = self.events.send(Event::Failed(why));
    }
}

/// Tests arm this with a chunk length: a sequence feeding a chunk of exactly
/// that many tokens fails the engine's per-sequence check.
#[cfg(test)]
pub(crate) static FAIL_CHECK_ON_CHUNK: std::sync::atomic::AtomicUsize =
    std::sync::atomic::AtomicUsize::new(0);

/// Tests arm this with a chunk length: the logits of a sequence that fed a
/// chunk of exactly that many tokens get a NaN, as a numeric fault would.
#[cfg(test)]
pub(crate) static NAN_ON_CHUNK: std::sync::atomic::AtomicUsize =
    std::sync::atomic::AtomicUsize::new(0);

/// Tests arm this with a chunk length: a forward call feeding a chunk of
/// exactly that many tokens panics, as a kernel bug would.
#[cfg(test)]
pub(crate) static PANIC_ON_CHUNK: std::sync::atomic::AtomicUsize =
    std::sync::atomic::AtomicUsize::new(0);

/// Tests arm this with a chunk length: a step feeding a chunk of exactly
/// that many tokens first stalls for `STALL_MS`, as a hung kernel would
/// (the engine loop does not go round meanwhile).
#[cfg(test)]
pub(crate) static STALL_ON_CHUNK: std::sync::atomic::AtomicUsize =
    std::sync::atomic::AtomicUsize::new(0);
#[cfg(test)]
pub(crate) const STALL_MS: u64 = 1500;

/// How often the engine fits the prefix cache to what paging leaves.
const PREFIX_FIT_EVERY: std::time::Duration = std::time::Duration::from_secs(1);

fn panic_message(p: &(dyn std::any::Any + Send)) -> String {
    p.downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| p.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "panic".into())
}

impl Worker {
    pub fn new(
        model: Model,
        tokenizer: Arc<Tokenizer>,
        shared: Arc<Shared>,
        config: Config,
    ) -> Self {
        Worker {
            model,
            tokenizer,
            shared,
            config,
        }
    }

    /// Runs until shutdown (`Ok`) or an unrecoverable failure (`Err`).
    pub fn run(self) -> Result<(), super::EngineDied> {
        let mut running = Vec::new();
        match catch_unwind(AssertUnwindSafe(|| self.serve(&mut running))) {
            Ok(()) => Ok(()),
            Err(p) => {
                let msg = panic_message(&*p);
                crate::error!("the engine thread failed and stops serving: {msg}");
                let mut g = self.shared.lock();
                g.dead = Some(msg.clone());
                let queued = g.queue.drain();
                g.set_active(0);
                drop(g);
                for job in queued {
                    job.fail(Failure::Internal(msg.clone()));
                }
                for r in running.drain(..) {
                    r.fail(Failure::Internal(msg.clone()));
                }
                Err(super::EngineDied::Panicked(msg))
            }
        }
    }

    fn serve(&self, running: &mut Vec<Admitted>) {
        let mut fitted: Option<Instant> = None;
        while let Some(prefill_chunk) = self.admit(running) {
            if fitted.is_none_or(|t| t.elapsed() >= PREFIX_FIT_EVERY) {
                self.fit_prefix_cache();
                fitted = Some(Instant::now());
            }
            self.drop_gone(running);
            if !running.is_empty() {
                self.step(running, prefill_chunk);
            }
        }
    }

    /// Housekeeping under the lock, then fills free slots. Waits while
    /// nothing runs; returns the step's prefill budget, or `None` when shut
    /// down and drained.
    fn admit(&self, running: &mut Vec<Admitted>) -> Option<usize> {
        let mut g = self.shared.lock();
        loop {
            self.shared.beat();
            let now = Instant::now();
            let gone = g
                .queue
                .retain(|j| !j.events.is_closed() && j.deadline.is_none_or(|d| now < d));
            for job in gone {
                if job.events.is_closed() {
                    job.abandon();
                } else {
                    job.fail(Failure::DeadlineExceeded);
                }
            }
            if let Some(sd) = &g.shutdown {
                let cancel = now >= sd.cancel_at;
                for job in g.queue.drain() {
                    job.fail(Failure::ShuttingDown);
                }
                if cancel {
                    for r in running.drain(..) {
                        r.fail(Failure::ShuttingDown);
                    }
                }
            }
            while running.len() < g.limits.max_concurrent {
                let Some(job) = g.queue.pop() else { break };
                g.requests_total += 1;
                g.prompt_tokens_total += job.tokens.len() as u64;
                running.push(self.start(job, now));
            }
            g.set_active(running.len());
            if !running.is_empty() {
                return Some(g.limits.prefill_chunk);
            }
            if g.shutdown.is_some() {
                return None;
            }
            g = self
                .shared
                .wake
                .wait_timeout(g, self.config.idle_wakeup)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    fn start(&self, mut job: Job, now: Instant) -> Admitted {
        let prompt_tokens = job.context.len() + job.tokens.len();
        let scope: Arc<str> = if self.config.prefix_cache_shared {
            "".into()
        } else {
            job.client.owner.as_str().into()
        };
        let base = job.state.take();
        let (state, chain, snap) = match &base {
            Some(pin) => match pin.snapshot().state(&self.model) {
                Ok(st) => (st, Some(pin.snapshot().clone()), None),
                Err(e) => {
                    // Cannot happen with one model; prefill it all again.
                    crate::warn!(
                        "a session's kept state does not fit the model ({e}); prefilling the conversation again"
                    );
                    let mut all = std::mem::take(&mut job.context);
                    all.append(&mut job.tokens);
                    job.tokens = all;
                    (SeqState::new(&self.model), None, None)
                }
            },
            None => self.resume_from_cache(&scope, &mut job),
        };
        let prefilled_tokens = job.tokens.len();
        let mut seq = Sequence::resume(
            &self.model,
            self.tokenizer.clone(),
            state,
            std::mem::take(&mut job.context),
            std::mem::take(&mut job.tokens),
            std::mem::take(&mut job.sampling),
            job.max_tokens,
            std::mem::take(&mut job.stop),
        );
        seq.set_context_limit(self.config.n_ctx);
        if job.ignore_eos {
            seq.ignore_eos();
        }
        if let Some(c) = job.constraint.take() {
            seq.constrain(c);
        }
        if let Some(t) = job.tools.take() {
            seq.use_tools(t);
        }
        job.tally.queued(now.duration_since(job.arrived));
        Admitted {
            scope,
            chain,
            base,
            snap,
            seq,
            priority: job.priority,
            events: job.events.clone(),
            deadline: job.deadline,
            arrived: job.arrived,
            admitted: now,
            first_token: None,
            last_token: None,
            tally: job.tally,
            prompt_tokens,
            prefilled_tokens,
            reply: String::new(),
            session: job.session.take(),
            user_slot: job.user_slot.take(),
        }
    }

    /// Shrinks the prefix cache by what expert pages lack: while the pager
    /// cannot keep every expert in memory, cached prompt states give way to
    /// expert pages (never the other way round).
    fn fit_prefix_cache(&self) {
        let cache = &self.shared.prefix;
        let Some(pager) = self.model.pager() else {
            return;
        };
        let s = pager.monitor().believed();
        let short = s
            .expert_cap_bytes
            .map_or(0, |cap| s.expert_total_bytes.saturating_sub(cap));
        cache.set_limit(cache.configured().saturating_sub(short));
    }

    /// For a fresh sequence: the state of the longest cached prefix of
    /// `job`'s prompt (its context set, its tokens cut to the rest) and
    /// that snapshot, or a new state; and the snapshots it adds.
    fn resume_from_cache(
        &self,
        scope: &str,
        job: &mut Job,
    ) -> (SeqState, Option<Arc<Snapshot>>, Option<SnapPlan>) {
        let cache = &self.shared.prefix;
        let fresh = SeqState::new(&self.model);
        if !cache.enabled() || job.tokens.is_empty() {
            return (fresh, None, None);
        }
        let n = job.tokens.len();
        let hit = cache.lookup(scope, &job.tokens, n - 1).and_then(|hit| {
            match hit.state(&self.model) {
                Ok(state) => Some((hit, state)),
                Err(e) => {
                    crate::warn!(
                        "a cached prompt state does not fit the model ({e}); prefilling it again"
                    );
                    None
                }
            }
        });
        let (state, chain) = match hit {
            Some((hit, state)) => {
                job.context = job.tokens.drain(..hit.end()).collect();
                (state, Some(hit))
            }
            None => (fresh, None),
        };
        let from = state.len();
        let plan = SnapPlan {
            points: std::mem::take(&mut job.snapshots)
                .into_iter()
                .filter(|&p| p > from && p <= n)
                .collect(),
        };
        (state, chain, Some(plan))
    }

    /// Puts the states of sequences that reached a snapshot point into the
    /// prefix cache.
    fn take_snapshots(&self, running: &mut [Admitted]) {
        for r in running.iter_mut() {
            let Some(plan) = &mut r.snap else { continue };
            let at = r.seq.state.len();
            if plan.points.front() != Some(&at) {
                continue;
            }
            plan.points.pop_front();
            let from = r.chain.as_ref().map_or(0, |c| c.end());
            let segment = r.seq.state.segment(from);
            let node = self.shared.prefix.insert(
                &r.scope,
                r.chain.as_ref(),
                &r.seq.history()[from..at],
                segment,
            );
            // Done, or the chain could not be kept: nothing more to add.
            if node.is_none() || plan.points.is_empty() {
                r.snap = None;
            }
            r.chain = node.or(r.chain.take());
        }
    }

    /// Frees the slots of requests whose client went away (cancelled) or
    /// whose deadline passed.
    fn drop_gone(&self, running: &mut Vec<Admitted>) {
        let now = Instant::now();
        let before = running.len();
        let mut expired = Vec::new();
        let mut i = 0;
        while i < running.len() {
            let r = &running[i];
            if r.events.is_closed() {
                running.remove(i);
            } else if r.deadline.is_some_and(|d| now >= d) {
                expired.push(running.remove(i));
            } else {
                i += 1;
            }
        }
        if running.len() != before {
            self.shared.lock().set_active(running.len());
        }
        for r in expired {
            r.fail(Failure::DeadlineExceeded);
        }
    }

    /// One forward call over every running sequence, then sampling.
    fn step(&self, running: &mut Vec<Admitted>, prefill_chunk: usize) {
        let views: Vec<StepNeed> = running
            .iter()
            .map(|r| {
                let pending = r.seq.pending_len();
                // A chunk ends at the next snapshot point.
                let cap = r.snap.as_ref().and_then(|s| s.cap(r.seq.state.len()));
                StepNeed {
                    pending: cap.map_or(pending, |c| pending.min(c)),
                    priority: r.priority,
                }
            })
            .collect();
        let take = plan_step(&views, prefill_chunk);
        let mut chunks: Vec<Vec<u32>> = running
            .iter()
            .zip(&take)
            .map(|(r, &n)| r.seq.next_input(n).to_vec())
            .collect();
        // A sequence whose input cannot run (a token outside the vocabulary,
        // no room left) fails alone; the others go on.
        let mut refused = Vec::new();
        for i in (0..running.len()).rev() {
            if chunks[i].is_empty() {
                continue;
            }
            let checked = self.model.check(&running[i].seq.state, &chunks[i]);
            #[cfg(test)]
            let checked = match FAIL_CHECK_ON_CHUNK.load(std::sync::atomic::Ordering::Relaxed) {
                n if n == chunks[i].len() => Err("injected check failure".to_owned()),
                _ => checked.map_err(|e| e.to_string()),
            };
            #[cfg(not(test))]
            let checked = checked.map_err(|e| e.to_string());
            if let Err(why) = checked {
                chunks.remove(i);
                refused.push((running.remove(i), why));
            }
        }
        if !refused.is_empty() {
            self.shared.lock().set_active(running.len());
            for (r, why) in refused {
                crate::error!("a sequence's input cannot run ({why}); failing its request");
                r.fail(Failure::Internal(why));
            }
        }

        let wants: Vec<bool> = running
            .iter()
            .zip(&chunks)
            .map(|(r, c)| !c.is_empty() && r.seq.needs_logits(c.len()))
            .collect();
        let prefill: usize = running
            .iter()
            .zip(&chunks)
            .filter(|(r, _)| r.seq.generated().is_empty())
            .map(|(_, c)| c.len())
            .sum();

        let forward = catch_unwind(AssertUnwindSafe(|| {
            #[cfg(test)]
            {
                let n = PANIC_ON_CHUNK.load(std::sync::atomic::Ordering::Relaxed);
                assert!(
                    n == 0 || chunks.iter().all(|c| c.len() != n),
                    "injected fault"
                );
                let n = STALL_ON_CHUNK.load(std::sync::atomic::Ordering::Relaxed);
                if n != 0 && chunks.iter().any(|c| c.len() == n) {
                    std::thread::sleep(std::time::Duration::from_millis(STALL_MS));
                }
            }
            let mut items: Vec<BatchItem<'_>> = running
                .iter_mut()
                .zip(&chunks)
                .zip(&wants)
                .filter(|((_, c), _)| !c.is_empty())
                .map(|((r, c), &want)| BatchItem {
                    state: &mut r.seq.state,
                    tokens: c,
                    logits: if want {
                        LogitsWanted::Last
                    } else {
                        LogitsWanted::None
                    },
                })
                .collect();
            self.model.forward(&mut items)
        }));
        let logits = match forward {
            Ok(Ok(l)) => l,
            failed => {
                let why = match failed {
                    Ok(Err(e)) => e.to_string(),
                    Err(p) => panic_message(&*p),
                    Ok(Ok(_)) => unreachable!(),
                };
                crate::error!("a forward step failed ({why}); failing its requests");
                let mut i = 0;
                let mut failed = Vec::new();
                for c in &chunks {
                    if c.is_empty() {
                        i += 1;
                    } else {
                        failed.push(running.remove(i));
                    }
                }
                self.shared.lock().set_active(running.len());
                for r in failed {
                    r.fail(Failure::Internal(why.clone()));
                }
                return;
            }
        };

        self.take_snapshots(running);
        let now = Instant::now();
        // Sampling (and detokenizing, stop strings) of every sequence that
        // got logits, in parallel on the pool when there are several: each
        // is O(vocabulary) and independent of the others.
        let mut work: Vec<Advance<'_>> = Vec::with_capacity(running.len());
        let mut k = 0;
        for (i, r) in running.iter_mut().enumerate() {
            let (chunk, want) = (&chunks[i], wants[i]);
            if chunk.is_empty() {
                continue;
            }
            let row = want.then(|| &logits[k][..]);
            k += 1;
            work.push(Advance {
                index: i,
                seq: &mut r.seq,
                n: chunk.len(),
                row,
                out: None,
            });
        }
        #[cfg(test)]
        let poisoned: Vec<Vec<f32>>;
        #[cfg(test)]
        {
            let n = NAN_ON_CHUNK.load(std::sync::atomic::Ordering::Relaxed);
            poisoned = work
                .iter()
                .map(|a| match a.row {
                    Some(r) if a.n == n => {
                        let mut r = r.to_vec();
                        let mid = r.len() / 2;
                        r[mid] = f32::NAN;
                        r
                    }
                    _ => Vec::new(),
                })
                .collect();
            for (a, p) in work.iter_mut().zip(&poisoned) {
                if !p.is_empty() {
                    a.row = Some(p);
                }
            }
        }
        let advance = |a: &mut Advance<'_>| {
            // A NaN means this sequence's numbers went wrong (its state, or
            // the model file): it ends alone, nothing is sampled from them.
            if a.row.is_some_and(|r| r.iter().any(|v| v.is_nan())) {
                a.out = Some(Err(
                    "the model produced a NaN logit for this request (a numeric fault in the model file or the engine); it was stopped, other requests are unaffected".into(),
                ));
                return;
            }
            a.out = Some(
                catch_unwind(AssertUnwindSafe(|| a.seq.advance(a.n, a.row)))
                    .map_err(|p| panic_message(&*p))
                    .and_then(|r| r.map_err(|e| e.to_string())),
            );
        };
        if work.iter().filter(|a| a.row.is_some()).count() > 1 {
            self.model
                .pool()
                .for_each_mut(&mut work, 1, &|_, part| part.iter_mut().for_each(advance));
        } else {
            work.iter_mut().for_each(advance);
        }
        let outcomes: Vec<(usize, Result<Option<crate::sequence::Step>, String>)> = work
            .into_iter()
            .map(|a| (a.index, a.out.unwrap_or_else(|| Err("not sampled".into()))))
            .collect();
        let mut generated = 0u32;
        let mut finished = Vec::new();
        for (i, advanced) in outcomes {
            let r = &mut running[i];
            let step = match advanced {
                Ok(s) => s,
                Err(why) => {
                    finished.push((i, Err(Failure::Internal(why))));
                    continue;
                }
            };
            let Some(step) = step else { continue };
            generated += 1;
            match r.last_token.replace(now) {
                Some(last) => r.tally.next_token(now.duration_since(last)),
                None => r.tally.first_token(now.duration_since(r.arrived)),
            }
            r.first_token.get_or_insert(now);
            if r.session.is_some() {
                r.reply.push_str(&step.markup);
                r.reply.push_str(&step.text);
            }
            let _ = r.events.send(Event::Delta(super::Delta {
                text: step.text,
                tokens: vec![step.token],
                tool_calls: step.tool_calls,
            }));
            if step.finished.is_some() {
                finished.push((i, Ok(())));
            }
        }
        let mut service = Vec::new();
        let mut ended = Vec::new();
        for (i, outcome) in finished.into_iter().rev() {
            let r = running.remove(i);
            service.push(now.duration_since(r.admitted));
            ended.push((r, outcome));
        }

        // Counts first, so a client that sees its final event and asks for
        // the status no longer finds itself running.
        let mut g = self.shared.lock();
        g.generated_tokens_total += generated as u64;
        g.prefilled_tokens_total += prefill as u64;
        g.recent.push_back((now, generated, prefill as u32));
        while g
            .recent
            .front()
            .is_some_and(|(t, ..)| now.duration_since(*t) > super::RATE_WINDOW)
        {
            g.recent.pop_front();
        }
        for s in service {
            g.mean_service = Some(match g.mean_service {
                Some(m) => (m * 7 + s) / 8,
                None => s,
            });
        }
        g.set_active(running.len());
        drop(g);
        for (r, outcome) in ended.into_iter().rev() {
            match outcome {
                Ok(()) => self.finish(r, now),
                Err(why) => r.fail(why),
            }
        }
    }

    /// Checks a session back in, then sends the final event (in that
    /// order, so a client may send its next turn as soon as it sees Done).
    fn finish(&self, mut r: Admitted, now: Instant) {
        let reason = r.seq.finish_reason().cloned().expect("finished");
        let output_incomplete = r.seq.output_incomplete();
        let tool_calls = r.seq.tool_calls().to_vec();
        let first = r.first_token.unwrap_or(now);
        r.tally.end(match reason {
            FinishReason::Eos | FinishReason::Complete if !tool_calls.is_empty() => "tool_calls",
            FinishReason::Eos | FinishReason::Complete => "stop",
            FinishReason::StopString => "stop_string",
            FinishReason::Length => "length",
            FinishReason::ContextFull => "context_full",
            FinishReason::Cancelled => "cancelled",
        });
        let stats = Stats {
            prompt_tokens: r.prompt_tokens,
            prefilled_tokens: r.prefilled_tokens,
            generated_tokens: r.seq.generated().len(),
            queue: r.admitted.duration_since(r.arrived),
            time_to_first_token: first.duration_since(r.arrived),
            total: now.duration_since(r.arrived),
        };
        drop(r.user_slot);
        let events = r.events;
        let session = r.session.as_ref().map(|t| t.lease.id().to_owned());
        if let Some(turn) = r.session {
            // A finished sequence has fed all it saw but its last sampled
            // token. After an end-of-generation token the template closes
            // the reply itself; after max_tokens the last token is still to
            // feed. Other endings leave a state that does not match the
            // reply's text.
            let mut tokens = r.seq.history().to_vec();
            let state = r.seq.into_state();
            let last = tokens.pop();
            let tail = match (&reason, last) {
                (FinishReason::Eos, Some(_)) => Some(Vec::new()),
                (FinishReason::Length | FinishReason::Complete, Some(t)) => Some(vec![t]),
                _ => None,
            }
            .filter(|_| tokens.len() == state.len());
            // The state goes into the prefix cache, chained to what it
            // continues, pinned for the session.
            let kept = tail.as_ref().and_then(|_| {
                self.shared
                    .prefix
                    .pin(&r.scope, r.chain.as_ref(), &tokens, &state)
            });
            drop(r.base);
            turn.finish(r.reply, tail, tokens, kept);
        }
        let _ = events.send(Event::Done(Done {
            reason,
            stats,
            session,
            output_incomplete,
            tool_calls,
        }));
    }
}
