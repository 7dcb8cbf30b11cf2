//! The scheduler: one engine thread owns the [`Model`] and runs continuous
//! batching; any number of callers (the gRPC and D-Bus edges) submit
//! requests through a cloneable [`Handle`] and read [`Event`]s back.
//!
//! Requests are validated, rendered and tokenized on the caller's side, then
//! wait in a bounded [`FairQueue`] (interactive first, round robin across
//! clients). Between steps the engine admits waiting requests up to
//! `max_concurrent`, drops the ones whose receiver is gone or whose deadline
//! passed, and feeds every running sequence through one `Model::forward`:
//! decodes one token each, prompts in chunks from a per-step budget
//! ([`plan::plan_step`]). It never awaits; callers never touch the model.
//!
//! No wire types here: the edges convert to and from the types of `api.rs`.

mod api;
pub mod metrics;
pub mod plan;
pub mod prefix;
mod prepare;
pub mod queue;
pub mod sessions;
mod worker;

pub use api::*;
pub use queue::{FairQueue, Priority};
pub use sessions::{SessionError, SessionStore};

use crate::chat::ChatTemplate;
use crate::constraint::{Constraint, Grammars};
use crate::engine::Model;
use crate::sampler::SamplingParams;
use crate::stop::StopText;
use crate::tokenizer::Tokenizer;
use prepare::Prepared;
pub(crate) use prepare::SessionTurn;
use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};
use tokio::sync::mpsc;

/// A request ready for the engine: tokens to feed and how to sample.
pub(crate) struct Job {
    pub client: Client,
    /// Counts this request against its user's limit while it lives.
    pub user_slot: Option<UserSlot>,
    pub priority: Priority,
    pub tokens: Vec<u32>,
    /// Tokens already in `state` (a session's earlier turns).
    pub context: Vec<u32>,
    /// A session's state to continue (pinned in the prefix cache).
    pub state: Option<prefix::Pin>,
    pub sampling: SamplingParams,
    pub max_tokens: usize,
    pub stop: StopText,
    pub ignore_eos: bool,
    /// The response format the output keeps to.
    pub constraint: Option<Constraint>,
    /// Tool calling, when the request offered tools.
    pub tools: Option<crate::sequence::ToolUse>,
    pub session: Option<SessionTurn>,
    /// Positions in `tokens` where a fresh sequence's state goes into the
    /// prefix cache.
    pub snapshots: Vec<usize>,
    pub events: mpsc::UnboundedSender<Event>,
    pub deadline: Option<Instant>,
    pub arrived: Instant,
    /// Its entry in the outcome counts.
    pub tally: metrics::Tally,
}

/// One request's place in its user's count; dropping it gives it back.
pub(crate) struct UserSlot {
    shared: Arc<Shared>,
    owner: String,
}

impl Drop for UserSlot {
    fn drop(&mut self) {
        let mut users = self.shared.lock_users();
        if let Some(n) = users.get_mut(&self.owner) {
            *n -= 1;
            if *n == 0 {
                users.remove(&self.owner);
            }
        }
    }
}

pub(crate) struct Shutdown {
    /// Running requests still going then are stopped.
    pub cancel_at: Instant,
}

/// State shared by the engine thread and the handles.
pub(crate) struct Inner {
    pub queue: FairQueue<Job>,
    pub active: usize,
    pub shutdown: Option<Shutdown>,
    /// Set when the engine thread has died.
    pub dead: Option<String>,
    pub requests_total: u64,
    pub prompt_tokens_total: u64,
    pub prefilled_tokens_total: u64,
    pub generated_tokens_total: u64,
    /// (when, generated, prefilled) per engine step within the rate window.
    pub recent: VecDeque<(Instant, u32, u32)>,
    /// Moving average of the time a request holds a slot.
    pub mean_service: Option<Duration>,
    /// The limits in force (a reload changes them).
    pub limits: Limits,
    /// Published on every change of `active` or the queue's length.
    pub load: tokio::sync::watch::Sender<Load>,
}

impl Inner {
    pub fn set_active(&mut self, n: usize) {
        self.active = n;
        self.publish_load();
    }

    /// Tells watchers the current load if it changed.
    pub fn publish_load(&self) {
        let now = Load {
            active: self.active,
            queued: self.queue.len(),
        };
        self.load
            .send_if_modified(|l| std::mem::replace(l, now) != now);
    }
}

pub(crate) struct Shared {
    pub inner: Mutex<Inner>,
    pub wake: Condvar,
    /// Requests (running and waiting) per owner. Its own lock, taken alone
    /// or inside `inner`'s, never the other way round.
    pub users: Mutex<std::collections::HashMap<String, usize>>,
    /// When the engine loop last went round, in ms since `epoch`.
    pub heartbeat: AtomicU64,
    pub epoch: Instant,
    /// Prompt-prefix and session states (its own lock, never held with
    /// another).
    pub prefix: Arc<prefix::PrefixCache>,
    /// Outcomes and latencies, for `/metrics`.
    pub metrics: Arc<metrics::Metrics>,
}

impl Shared {
    pub fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub fn lock_users(&self) -> MutexGuard<'_, std::collections::HashMap<String, usize>> {
        self.users.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Called by the engine thread each time round its loop.
    pub fn beat(&self) {
        let ms = self.epoch.elapsed().as_millis() as u64;
        self.heartbeat.store(ms, Ordering::Relaxed);
    }
}

/// Why the engine thread stopped serving.
#[derive(Debug, thiserror::Error)]
pub enum EngineDied {
    /// It panicked outside any one step (each step's own panics fail only
    /// that step's requests); the message is the panic's.
    #[error("the engine thread failed: {0}")]
    Panicked(String),
    /// It ended without reporting (its channel closed).
    #[error("the engine thread vanished without a report")]
    Vanished,
}

/// Resolves when the engine thread ends: `Ok` after a shutdown, `Err` with
/// the reason if it died.
pub struct EngineExit(tokio::sync::oneshot::Receiver<Result<(), EngineDied>>);

impl EngineExit {
    pub async fn wait(self) -> Result<(), EngineDied> {
        self.0.await.unwrap_or(Err(EngineDied::Vanished))
    }
}

/// The cloneable front of the scheduler.
#[derive(Clone)]
pub struct Handle {
    shared: Arc<Shared>,
    sessions: Arc<SessionStore>,
    tokenizer: Arc<Tokenizer>,
    template: Arc<ChatTemplate>,
    /// Text of the BOS token, for chat templates.
    bos_text: String,
    /// Bytes of the longest token, to refuse hopeless prompts unencoded.
    longest_token: usize,
    info: Arc<ModelInfo>,
    config: Arc<Config>,
    next_id: Arc<AtomicU64>,
    started: Instant,
    /// The expert pager's figures, when experts are paged.
    paging: Option<crate::engine::PagingMonitor>,
    /// The response-format compiler for this vocabulary, built on the
    /// first request that asks for a format.
    grammars: Arc<std::sync::OnceLock<Result<Arc<Grammars>, String>>>,
}

/// Starts the engine thread with `model`; `info.path` is taken from the
/// caller (the model does not know its file name).
pub fn start(
    model: Model,
    path: &str,
    mut config: Config,
) -> std::io::Result<(Handle, EngineExit)> {
    config.n_ctx = config.n_ctx.clamp(2, model.desc.n_ctx_train.max(2));
    config.max_concurrent = config.max_concurrent.max(1);
    let tokenizer = Arc::new(
        Tokenizer::from_gguf(model.gguf())
            .map_err(|e| std::io::Error::other(format!("the model's tokenizer: {e}")))?,
    );
    let template_src = model
        .gguf()
        .get("tokenizer.chat_template")
        .and_then(crate::gguf::Value::as_str);
    let template = match template_src.map(ChatTemplate::new) {
        Some(Ok(t)) => t,
        Some(Err(e)) => {
            crate::warn!(
                "the model's chat template is unusable ({e}); using the built-in LFM2 one"
            );
            ChatTemplate::builtin()
        }
        None => ChatTemplate::builtin(),
    };
    let bos_text = tokenizer
        .bos()
        .and_then(|b| tokenizer.piece(b, true))
        .map(|p| String::from_utf8_lossy(p).into_owned())
        .unwrap_or_default();
    let info = model_info(&model, path, &config, template_src.is_some());
    let tokenizer_longest = tokenizer.longest_token_bytes();
    let paging = model.pager().map(crate::engine::paging::Pager::monitor);
    let shared = Arc::new(Shared {
        inner: Mutex::new(Inner {
            queue: FairQueue::new(config.queue_capacity),
            active: 0,
            shutdown: None,
            dead: None,
            requests_total: 0,
            prompt_tokens_total: 0,
            prefilled_tokens_total: 0,
            generated_tokens_total: 0,
            recent: VecDeque::new(),
            mean_service: None,
            limits: config.limits(),
            load: tokio::sync::watch::Sender::new(Load::default()),
        }),
        wake: Condvar::new(),
        users: Mutex::new(Default::default()),
        heartbeat: AtomicU64::new(0),
        epoch: Instant::now(),
        prefix: Arc::new(prefix::PrefixCache::new(config.prefix_cache_bytes)),
        metrics: Arc::default(),
    });
    let (tx, rx) = tokio::sync::oneshot::channel();
    let worker = worker::Worker::new(model, tokenizer.clone(), shared.clone(), config.clone());
    std::thread::Builder::new()
        .name("lfmd-engine".into())
        .spawn(move || {
            let _ = tx.send(worker.run());
        })?;
    let handle = Handle {
        shared,
        sessions: SessionStore::new(config.max_sessions, config.session_idle),
        tokenizer,
        template: Arc::new(template),
        bos_text,
        longest_token: tokenizer_longest,
        info: Arc::new(info),
        config: Arc::new(config),
        next_id: Arc::new(AtomicU64::new(1)),
        started: Instant::now(),
        paging,
        grammars: Arc::default(),
    };
    Ok((handle, EngineExit(rx)))
}

fn model_info(model: &Model, path: &str, config: &Config, has_template: bool) -> ModelInfo {
    let d = &model.desc;
    let report = crate::inspect::inspect(model.gguf().header(), path);
    ModelInfo {
        path: path.to_owned(),
        architecture: report.architecture.unwrap_or_default(),
        name: report.name.unwrap_or_default(),
        file_type: report.file_type.unwrap_or_default(),
        file_bytes: report.file_bytes,
        n_params: report.total_params,
        n_layer: d.n_layer,
        n_embd: d.n_embd,
        n_vocab: d.n_vocab,
        n_expert: d.n_expert,
        n_expert_used: d.n_expert_used,
        n_ctx_train: d.n_ctx_train,
        context: config.n_ctx,
        has_chat_template: has_template,
        isa: model.isa_name(),
        threads: model.n_threads(),
    }
}

impl Handle {
    pub fn model_info(&self) -> &ModelInfo {
        &self.info
    }

    /// The configuration, with the limits in force now.
    pub fn config(&self) -> Config {
        let limits = self.shared.lock().limits.clone();
        Config {
            max_concurrent: limits.max_concurrent,
            queue_capacity: limits.queue_capacity,
            max_per_user: limits.max_per_user,
            prefill_chunk: limits.prefill_chunk,
            default_max_tokens: limits.default_max_tokens,
            ..(*self.config).clone()
        }
    }

    /// Changes the limits while serving (a reload). Running requests are
    /// never stopped: a lower `max_concurrent` takes effect as they finish,
    /// and requests already waiting keep their places.
    pub fn set_limits(&self, mut limits: Limits) {
        limits.max_concurrent = limits.max_concurrent.max(1);
        limits.prefill_chunk = limits.prefill_chunk.max(1);
        limits.default_max_tokens = limits.default_max_tokens.max(1);
        let mut g = self.shared.lock();
        g.queue.set_capacity(limits.queue_capacity);
        g.limits = limits;
        drop(g);
        self.shared.wake.notify_all();
    }

    /// How long since the engine loop last went round: at most about
    /// `idle_wakeup` when idle, one step's time when busy; larger means
    /// the engine is stuck (or has stopped).
    pub fn engine_heartbeat_age(&self) -> Duration {
        let last = self.shared.heartbeat.load(Ordering::Relaxed);
        let now = self.shared.epoch.elapsed().as_millis() as u64;
        Duration::from_millis(now.saturating_sub(last))
    }

    /// Running and waiting requests, cheaply (no memory figures).
    pub fn load(&self) -> (usize, usize) {
        let g = self.shared.lock();
        (g.active, g.queue.len())
    }

    pub fn tokenizer(&self) -> &Tokenizer {
        &self.tokenizer
    }

    /// Token ids of `text` (BOS as the model says unless told).
    pub fn tokenize(&self, text: &str, add_bos: Option<bool>, parse_special: bool) -> Vec<u32> {
        let bos = add_bos.unwrap_or(self.tokenizer.special_ids().add_bos);
        self.tokenizer.encode(text, bos, parse_special)
    }

    /// Text of `ids` (special tokens as their text); ids outside the
    /// vocabulary are refused.
    pub fn detokenize(&self, ids: &[u32]) -> Result<String, SubmitError> {
        let n = self.tokenizer.n_vocab();
        if let Some((i, id)) = ids.iter().enumerate().find(|(_, id)| **id as usize >= n) {
            return Err(SubmitError::Invalid(format!(
                "token_ids[{i}] = {id} is outside the vocabulary (0..{n})"
            )));
        }
        Ok(self.tokenizer.decode(ids))
    }

    /// The load now and at every change (for edges that push it, like
    /// D-Bus property signals).
    pub fn watch_load(&self) -> tokio::sync::watch::Receiver<Load> {
        self.shared.lock().load.subscribe()
    }

    /// The expert pager's figures (`None`: a dense model, or one not
    /// mapped). With `measure`, residency is read from the page tables
    /// (per-expert detail); without, it is the pager's own belief (cheap
    /// enough for every status poll).
    pub fn paging_stats(&self, measure: bool) -> Option<crate::engine::PagingStats> {
        self.paging
            .as_ref()
            .map(|p| if measure { p.stats() } else { p.believed() })
    }

    pub fn status(&self) -> Status {
        let now = Instant::now();
        let mut g = self.shared.lock();
        while g
            .recent
            .front()
            .is_some_and(|(t, ..)| now.duration_since(*t) > RATE_WINDOW)
        {
            g.recent.pop_front();
        }
        let (generated, prefilled) = g.recent.iter().fold((0u64, 0u64), |(a, b), (_, x, y)| {
            (a + *x as u64, b + *y as u64)
        });
        let window = RATE_WINDOW
            .min(now.duration_since(self.started))
            .as_secs_f64()
            .max(1e-3);
        let s = Status {
            active: g.active,
            queued: g.queue.len(),
            max_concurrent: g.limits.max_concurrent,
            queue_capacity: g.limits.queue_capacity,
            sessions: 0,
            requests_total: g.requests_total,
            prompt_tokens_total: g.prompt_tokens_total,
            prefilled_tokens_total: g.prefilled_tokens_total,
            generated_tokens_total: g.generated_tokens_total,
            generated_tokens_per_second: generated as f64 / window,
            prefill_tokens_per_second: prefilled as f64 / window,
            uptime: now.duration_since(self.started),
            memory: None,
            prefix_cache: Default::default(),
        };
        drop(g);
        // Read outside the lock the engine takes every step: /proc is a
        // file read and a syscall.
        Status {
            sessions: self.sessions.len(now),
            memory: crate::procstat::memory(),
            prefix_cache: self.shared.prefix.stats(),
            ..s
        }
    }

    /// Stops taking requests: waiting ones fail now, running ones get
    /// `grace` to finish, then are stopped. The engine thread then exits
    /// (see [`EngineExit`]).
    pub fn shutdown(&self, grace: Duration) {
        let mut g = self.shared.lock();
        if g.shutdown.is_none() {
            g.shutdown = Some(Shutdown {
                cancel_at: Instant::now() + grace,
            });
        }
        drop(g);
        self.shared.wake.notify_all();
    }

    /// The response-format compiler, built on first use (indexing the
    /// vocabulary takes a fraction of a second).
    fn grammars(&self) -> Result<Arc<Grammars>, SubmitError> {
        self.grammars
            .get_or_init(|| {
                Grammars::new(self.tokenizer.clone())
                    .map(Arc::new)
                    .map_err(|e| e.to_string())
            })
            .clone()
            .map_err(SubmitError::Internal)
    }

    /// How a request's sequence treats tool calls: the call grammar
    /// compiled for `auto` (armed when the model opens a call), as the
    /// request's own constraint for `required` or a named tool (from the
    /// first token), the opening token banned for `none`.
    fn tool_use(
        &self,
        options: &Options,
        id: u64,
        constraint: &mut Option<Constraint>,
    ) -> Result<Option<crate::sequence::ToolUse>, SubmitError> {
        use crate::constraint::ResponseFormat;
        use crate::tools::{CALL_END, CALL_START, ToolChoice, call_grammar};
        if options.tools.is_empty() {
            return Ok(None);
        }
        let (Some(start), Some(end)) = (
            self.tokenizer.token_id(CALL_START),
            self.tokenizer.token_id(CALL_END),
        ) else {
            return Err(SubmitError::Invalid(format!(
                "this model's vocabulary has no {CALL_START} / {CALL_END} tokens, so it cannot call tools; send the request without tools"
            )));
        };
        let compile = |only: Option<&str>, opening: bool| {
            let g = call_grammar(&options.tools, only, opening)
                .map_err(|e| SubmitError::Invalid(e.to_string()))?;
            self.grammars()?
                .compile(&ResponseFormat::Lark(g))
                .map_err(|e| SubmitError::Invalid(format!("the tools' call grammar: {e}")))
        };
        let mut lazy = None;
        match &options.tool_choice {
            ToolChoice::Auto => lazy = Some(compile(None, false)?),
            ToolChoice::None => {}
            ToolChoice::Required => *constraint = Some(compile(None, true)?),
            ToolChoice::Named(n) => *constraint = Some(compile(Some(n), true)?),
        }
        Ok(Some(crate::sequence::ToolUse {
            start,
            end,
            lazy,
            banned: options.tool_choice == ToolChoice::None,
            id_prefix: format!("call_{id}"),
        }))
    }

    /// Validates, renders and tokenizes `req`, then queues it.
    pub fn submit(&self, req: Request) -> Result<Generation, SubmitError> {
        let edge = req.client.edge;
        self.submit_counted(req)
            .inspect_err(|e| self.shared.metrics.reject(edge, e))
    }

    /// The outcome and latency figures (`/metrics`).
    pub fn metrics(&self) -> &metrics::Metrics {
        &self.shared.metrics
    }

    fn submit_counted(&self, req: Request) -> Result<Generation, SubmitError> {
        let arrived = Instant::now();
        let Request {
            input,
            mut options,
            client,
            priority,
            deadline,
        } = req;
        validate(&input, &options)?;
        let limits = self.shared.lock().limits.clone();
        let max_tokens = options.max_tokens.unwrap_or(limits.default_max_tokens);
        let stop = StopText::new(std::mem::take(&mut options.stop))
            .map_err(|e| SubmitError::Invalid(e.to_string()))?;
        self.check_input_bytes(&input)?;
        // Compiled here, on the caller's thread, never the engine's.
        let mut constraint = match &options.format {
            Some(f) => Some(
                self.grammars()?
                    .compile(f)
                    .map_err(|e| SubmitError::Invalid(e.to_string()))?,
            ),
            None => None,
        };
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let tools = self.tool_use(&options, id, &mut constraint)?;
        let tools_json =
            (!options.tools.is_empty()).then(|| crate::tools::tools_json(&options.tools));
        let Prepared {
            tokens,
            context,
            mut state,
            mut session,
            snapshots,
        } = self.prepare(input, tools_json.as_ref(), &client, arrived)?;
        let prompt_tokens = context.len() + tokens.len();
        if prompt_tokens >= self.config.n_ctx {
            // The session keeps its state: this turn never ran.
            if let Some(turn) = &mut session {
                turn.lease.state = state.take();
            }
            let what = if context.is_empty() {
                format!("the prompt is {} tokens", tokens.len())
            } else {
                format!(
                    "the session's conversation would be {prompt_tokens} tokens ({} earlier, {} new)",
                    context.len(),
                    tokens.len()
                )
            };
            return Err(SubmitError::TooLong(format!(
                "{what}, but this daemon's context holds {} (lfmd serve --ctx, at most the model's {}); {}",
                self.config.n_ctx,
                self.info.n_ctx_train,
                if context.is_empty() {
                    "shorten the prompt"
                } else {
                    "start a new session"
                }
            )));
        }
        let user_slot = match self.take_user_slot(&client.owner, limits.max_per_user) {
            Ok(slot) => slot,
            Err(e) => {
                if let Some(turn) = &mut session {
                    turn.lease.state = state.take();
                }
                return Err(e);
            }
        };
        let (events, rx) = mpsc::unbounded_channel();
        let tally = metrics::Tally::new(self.shared.metrics.clone(), client.edge);
        let mut job = Job {
            tally,
            client,
            user_slot: Some(user_slot),
            priority,
            tokens,
            context,
            state,
            sampling: options.sampling,
            max_tokens,
            stop,
            ignore_eos: options.ignore_eos,
            constraint,
            tools,
            session,
            snapshots,
            events,
            deadline,
            arrived,
        };
        let mut g = self.shared.lock();
        if let Some(why) = &g.dead {
            job.tally.refused();
            return Err(SubmitError::EngineDown(why.clone()));
        }
        if g.shutdown.is_some() {
            job.tally.refused();
            return Err(SubmitError::ShuttingDown);
        }
        let (client_id, prio) = (job.client.id.clone(), job.priority);
        let max_concurrent = g.limits.max_concurrent;
        let headroom = max_concurrent.saturating_sub(g.active);
        if let Err(mut job) = g.queue.push(&client_id, prio, job, headroom) {
            let queued = g.queue.len();
            let mean = g.mean_service.unwrap_or(Duration::from_secs(1));
            drop(g);
            job.tally.refused();
            // The session keeps its state: this turn never ran.
            if let Some(turn) = &mut job.session {
                turn.lease.state = job.state.take();
            }
            let slots = max_concurrent as u32;
            let retry_after = (mean * (queued as u32 / slots).max(1))
                .clamp(Duration::from_millis(100), Duration::from_secs(60));
            return Err(SubmitError::QueueFull {
                queued,
                max_concurrent,
                retry_after,
            });
        }
        g.publish_load();
        drop(g);
        self.shared.wake.notify_one();
        Ok(Generation { id, events: rx })
    }

    /// Refuses, before any encoding, input whose bytes cannot fit in the
    /// context even if every token were the vocabulary's longest: a 10 MB
    /// prompt costs a comparison, not seconds of tokenizing.
    fn check_input_bytes(&self, input: &Input) -> Result<(), SubmitError> {
        let bytes = match input {
            Input::Prompt { text, .. } => text.len(),
            Input::Chat { messages, .. } => messages.iter().map(|m| m.content.len()).sum(),
        };
        let limit = self.config.n_ctx.saturating_mul(self.longest_token);
        if bytes <= limit {
            return Ok(());
        }
        Err(SubmitError::TooLong(format!(
            "the input is {bytes} bytes, more than this daemon's context of {} tokens can hold \
             (at most {limit} bytes with this vocabulary); shorten the prompt",
            self.config.n_ctx
        )))
    }

    /// Counts a request against its owner's limit (0: none), or refuses it.
    fn take_user_slot(&self, owner: &str, limit: usize) -> Result<UserSlot, SubmitError> {
        let mut users = self.shared.lock_users();
        let n = users.entry(owner.to_owned()).or_insert(0);
        if limit > 0 && *n >= limit {
            let held = *n;
            drop(users);
            return Err(SubmitError::UserLimit {
                owner: owner.replace("uid:", "uid "),
                held,
                limit,
            });
        }
        *n += 1;
        Ok(UserSlot {
            shared: self.shared.clone(),
            owner: owner.to_owned(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gguf::{GgmlType, Gguf};

    fn tiny_handle(config: Config) -> Handle {
        let mut bytes = Vec::new();
        let preset = crate::synth::find_preset("tiny-dense").unwrap();
        crate::synth::write_to(preset, GgmlType::Q8_0, 1, &mut bytes).unwrap();
        let g = Arc::new(Gguf::from_bytes(bytes).unwrap());
        let opts = crate::engine::EngineOptions {
            threads: Some(1),
            ..Default::default()
        };
        let model = Model::from_gguf_with(g, opts).unwrap();
        start(model, "tiny", config).unwrap().0
    }

    fn ask(h: &Handle, text: &str) -> Generation {
        h.submit(Request {
            input: Input::Prompt {
                text: text.into(),
                add_bos: Some(false),
            },
            options: Options {
                max_tokens: Some(3),
                ..Default::default()
            },
            client: Client {
                id: "t".into(),
                owner: "t".into(),
                ..Default::default()
            },
            priority: Priority::Interactive,
            deadline: None,
        })
        .unwrap()
    }

    async fn last(g: &mut Generation) -> Event {
        loop {
            match g.next().await.expect("a final event") {
                Event::Delta(_) => {}
                e => return e,
            }
        }
    }

    fn ask_n(h: &Handle, text: &str, max_tokens: usize) -> Generation {
        let input = Input::Prompt {
            text: text.into(),
            add_bos: Some(false),
        };
        greedy(h, input, max_tokens, text, "t")
    }

    /// Submits `input` from client `id` of `owner`: greedy, `max_tokens`
    /// past end-of-generation.
    fn greedy(h: &Handle, input: Input, max_tokens: usize, id: &str, owner: &str) -> Generation {
        h.submit(Request {
            input,
            options: Options {
                max_tokens: Some(max_tokens),
                ignore_eos: true,
                sampling: crate::sampler::SamplingParams {
                    temperature: 0.0,
                    ..Default::default()
                },
                ..Default::default()
            },
            client: Client {
                id: id.into(),
                owner: owner.into(),
                ..Default::default()
            },
            priority: Priority::Interactive,
            deadline: None,
        })
        .unwrap()
    }

    /// Every token of a generation, and how it ended.
    async fn tokens(g: &mut Generation) -> (Vec<u32>, Event) {
        let mut t = Vec::new();
        loop {
            match g.next().await.expect("a final event") {
                Event::Delta(d) => t.extend(d.tokens),
                e => return (t, e),
            }
        }
    }

    /// A fault in one sequence of a step (armed by `arm` for chunks of the
    /// faulty prompt's length) fails that request alone with `Internal`
    /// saying `says`; the request beside it gets the tokens it gets alone.
    /// Each test's faulty prompt has a length of its own: the hooks are
    /// process-wide and the tests run in parallel.
    async fn one_fault_fails_one_request(
        arm: &std::sync::atomic::AtomicUsize,
        faulty: &str,
        says: &str,
    ) {
        let h = tiny_handle(Config::default());
        let fine = "A quiet afternoon by the river";
        let n = h.tokenize(faulty, Some(false), true).len();
        assert!(n > 8 && h.tokenize(fine, Some(false), true).len() != n);
        let (alone, _) = tokens(&mut ask_n(&h, fine, 12)).await;
        arm.store(n, Ordering::Relaxed);
        // Both wait while the engine is busy with the first, then share steps.
        let mut busy = ask_n(&h, "Warm up the engine a little", 6);
        let mut good = ask_n(&h, fine, 12);
        let mut bad = ask_n(&h, faulty, 12);
        let (bad_tokens, bad_end) = tokens(&mut bad).await;
        let (good_tokens, good_end) = tokens(&mut good).await;
        let _ = tokens(&mut busy).await;
        arm.store(0, Ordering::Relaxed);
        let Event::Failed(Failure::Internal(why)) = bad_end else {
            panic!("the faulty request must fail, got {bad_end:?}");
        };
        assert!(why.contains(says), "{why}");
        assert!(bad_tokens.is_empty(), "{bad_tokens:?}");
        assert!(matches!(good_end, Event::Done(_)), "{good_end:?}");
        assert_eq!(good_tokens, alone, "the request beside the fault changed");
        assert_eq!(h.status().active, 0);
    }

    #[tokio::test]
    async fn a_nan_in_one_sequence_fails_it_alone() {
        let faulty = "One, two, three, four, five, six, seven, eight, nine, ten, eleven.";
        one_fault_fails_one_request(&worker::NAN_ON_CHUNK, faulty, "NaN").await;
    }

    #[tokio::test]
    async fn a_sequence_that_cannot_run_fails_alone() {
        let faulty = "Alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho sigma tau upsilon phi chi psi omega.";
        one_fault_fails_one_request(
            &worker::FAIL_CHECK_ON_CHUNK,
            faulty,
            "injected check failure",
        )
        .await;
    }

    #[tokio::test]
    async fn the_watchdog_is_withheld_while_the_engine_is_stuck() {
        let period = Duration::from_millis(400);
        // As `lfmd serve` configures the engine under a watchdog.
        let h = tiny_handle(Config {
            idle_wakeup: crate::systemd::engine_wakeup(Some(period)),
            ..Config::default()
        });
        let stuck = "The engine hangs on this prompt for a while, as a bad kernel would.";
        let n = h.tokenize(stuck, Some(false), true).len();
        assert!(n > 1);
        // Pings as systemd would see them, every half period while the
        // engine's heartbeat is fresh.
        let pings: Arc<Mutex<Vec<std::time::Instant>>> = Arc::default();
        let seen = pings.clone();
        let feeder = tokio::spawn(crate::systemd::feed_watchdog_with(
            h.clone(),
            period,
            move || {
                seen.lock().unwrap().push(std::time::Instant::now());
            },
        ));
        let count = || pings.lock().unwrap().len();
        tokio::time::sleep(Duration::from_millis(700)).await;
        assert!(count() >= 2, "an idle, healthy engine is pinged for");
        worker::STALL_ON_CHUNK.store(n, Ordering::Relaxed);
        let t0 = std::time::Instant::now();
        let mut req = ask(&h, stuck);
        let end = last(&mut req).await;
        worker::STALL_ON_CHUNK.store(0, Ordering::Relaxed);
        let stalled = t0.elapsed();
        assert!(matches!(end, Event::Done(_)), "{end:?}");
        assert!(stalled >= Duration::from_millis(worker::STALL_MS));
        tokio::time::sleep(Duration::from_millis(700)).await;
        feeder.abort();
        let pings = pings.lock().unwrap().clone();
        // No ping for well over a period while the engine was stuck (a
        // feeder that pinged regardless would leave no gap over ~200 ms)…
        let gap = pings.windows(2).map(|w| w[1] - w[0]).max().unwrap();
        assert!(
            gap >= Duration::from_millis(1000),
            "largest gap between pings {gap:?}"
        );
        // …and pings again once it went round.
        assert!(
            pings.iter().filter(|&&p| p > t0 + stalled).count() >= 2,
            "pings resume after the stall"
        );
    }

    #[tokio::test]
    async fn a_panic_in_a_step_fails_that_step_and_the_engine_serves_on() {
        let h = tiny_handle(Config::default());
        // The faulty prompt's prefill chunk (its whole length) panics.
        let faulty = "This prompt meets a kernel bug on its way through the model.";
        let n = h.tokenize(faulty, Some(false), true).len();
        let fine = "Hi";
        assert!(n > 1 && h.tokenize(fine, Some(false), true).len() != n);
        worker::PANIC_ON_CHUNK.store(n, Ordering::Relaxed);
        let mut bad = ask(&h, faulty);
        let Event::Failed(Failure::Internal(why)) = last(&mut bad).await else {
            panic!("the faulty step's request must fail");
        };
        assert!(why.contains("injected fault"), "{why}");
        worker::PANIC_ON_CHUNK.store(0, Ordering::Relaxed);
        let mut good = ask(&h, fine);
        assert!(matches!(last(&mut good).await, Event::Done(_)));
        assert_eq!(h.status().active, 0);
    }

    /// A system prompt of a few hundred tokens (past a snapshot interval).
    fn system_prompt() -> String {
        let mut s = String::from("You are the assistant of a home hub. ");
        for i in 0..60 {
            s.push_str(&format!(
                "Rule {i}: answer about room {} briefly. ",
                i * 7 % 13
            ));
        }
        s
    }

    /// The system prompt and `question`, greedy, from `owner`.
    fn chat(h: &Handle, owner: &str, question: &str, session: Option<&str>) -> Generation {
        let messages = vec![
            crate::chat::ChatMessage::new("system", system_prompt()),
            crate::chat::ChatMessage::new("user", question),
        ];
        chat_as(h, owner, messages, session)
    }

    /// `messages`, greedy, 5 tokens past end-of-generation, from `owner`.
    fn chat_as(
        h: &Handle,
        owner: &str,
        messages: Vec<crate::chat::ChatMessage>,
        session: Option<&str>,
    ) -> Generation {
        let input = Input::Chat {
            messages,
            session: session.map(str::to_owned),
        };
        greedy(h, input, 5, owner, owner)
    }

    /// Tokens and (prompt, prefilled) token counts of a finished request.
    async fn answer(g: Generation) -> (Vec<u32>, (usize, usize)) {
        let mut g = g;
        let (t, end) = tokens(&mut g).await;
        let Event::Done(d) = end else {
            panic!("{end:?}")
        };
        (t, (d.stats.prompt_tokens, d.stats.prefilled_tokens))
    }

    fn no_cache() -> Config {
        Config {
            prefix_cache_bytes: 0,
            ..Config::default()
        }
    }

    #[tokio::test]
    async fn a_cached_system_prompt_is_not_prefilled_again_and_changes_nothing() {
        let h = tiny_handle(Config::default());
        let cold = tiny_handle(no_cache());
        let system_tokens = h.tokenize(&system_prompt(), Some(false), true).len();
        assert!(system_tokens > crate::scheduler::prefix::SNAPSHOT_EVERY);
        let q = ["Is the kitchen light on?", "How warm is the bedroom?"];
        let (a0, (p0, f0)) = answer(chat(&h, "alice", q[0], None)).await;
        assert_eq!(f0, p0, "nothing cached yet");
        // Another question after the same system prompt.
        let (a1, (p1, f1)) = answer(chat(&h, "alice", q[1], None)).await;
        assert!(
            p1 - f1 >= system_tokens,
            "resumed after the system prompt: {p1} {f1}"
        );
        // The same conversation again: only the generation prompt is fed.
        let (a1b, (_, f1b)) = answer(chat(&h, "alice", q[1], None)).await;
        assert!(f1b <= 8, "{f1b} tokens prefilled for a repeat");
        // A new session's first turn uses the cache too.
        let (a1s, (_, f1s)) = answer(chat(&h, "alice", q[1], Some("s1"))).await;
        assert!(f1s <= 8, "{f1s}");
        // Another user does not see alice's entries.
        let (b0, (pb, fb)) = answer(chat(&h, "bob", q[0], None)).await;
        assert_eq!(fb, pb, "bob must not resume from alice's prompt");
        // Same tokens as without a cache.
        let (c0, _) = answer(chat(&cold, "alice", q[0], None)).await;
        let (c1, _) = answer(chat(&cold, "alice", q[1], None)).await;
        assert_eq!(a0, c0);
        assert_eq!(b0, c0);
        for a in [&a1, &a1b, &a1s] {
            assert_eq!(a, &c1, "a cache hit changed the answer");
        }
        let st = h.status().prefix_cache;
        assert_eq!(st.hits, 3, "{st:?}");
        assert!(st.misses >= 2 && st.entries > 0 && st.bytes > 0, "{st:?}");
        assert_eq!(
            st.tokens_saved as usize,
            (p1 - f1) + (p1 - f1b) + (p1 - f1s)
        );
        let off = cold.status().prefix_cache;
        assert_eq!((off.entries, off.hits), (0, 0));
    }

    #[tokio::test]
    async fn hits_in_a_batch_answer_as_cold_prefills_do() {
        let h = tiny_handle(Config::default());
        let cold = tiny_handle(no_cache());
        let qs = [
            "Lights off downstairs?",
            "What is on the calendar?",
            "Lock the front door.",
            "Play some music.",
        ];
        // Warm the cache, then four at once (each resumes while others run).
        answer(chat(&h, "u", "Hello", None)).await;
        let gens: Vec<_> = qs.iter().map(|q| chat(&h, "u", q, None)).collect();
        let mut got = Vec::new();
        for g in gens {
            got.push(answer(g).await);
        }
        for (q, (toks, (p, f))) in qs.iter().zip(got) {
            assert!(f < p, "{q}: no hit");
            let (want, _) = answer(chat(&cold, "u", q, None)).await;
            assert_eq!(toks, want, "{q}: differs from a cold prefill");
        }
    }

    #[tokio::test]
    async fn a_shared_cache_serves_every_user() {
        let h = tiny_handle(Config {
            prefix_cache_shared: true,
            ..Config::default()
        });
        answer(chat(&h, "alice", "Hi", None)).await;
        let (_, (p, f)) = answer(chat(&h, "bob", "Hello", None)).await;
        assert!(f < p, "bob resumes from alice's system prompt when shared");
    }

    #[tokio::test]
    async fn raw_prompts_resume_at_every_kind_of_snapshot_point() {
        let h = tiny_handle(Config::default());
        let cold = tiny_handle(no_cache());
        let words = |r: std::ops::Range<usize>, tag: &str| {
            r.map(|i| format!("{tag}{i}")).collect::<Vec<_>>().join(" ")
        };
        let long = words(0..150, "w");
        let n = h.tokenize(&long, Some(false), true).len();
        assert!(n > 300, "{n}");
        let check = |text: String| {
            let (h, cold) = (h.clone(), cold.clone());
            async move {
                let (got, (p, f)) = answer(ask_n(&h, &text, 4)).await;
                let (want, _) = answer(ask_n(&cold, &text, 4)).await;
                assert_eq!(got, want, "{text}: differs from a cold prefill");
                p - f
            }
        };
        assert_eq!(check(long.clone()).await, 0, "nothing cached yet");
        // A prompt that continues the first resumes at its end.
        let cont = format!("{long} and then more");
        let shared =
            h.tokenize(&cont, Some(false), true)[..n] == h.tokenize(&long, Some(false), true)[..];
        assert!(shared, "the continuation's tokens start with the prompt's");
        assert_eq!(check(cont).await, n, "the prompt-end snapshot");
        // One that parts from it after ~300 tokens resumes at the 256th.
        let parted = format!("{} {}", words(0..120, "w"), words(0..40, "x"));
        let toks = h.tokenize(&parted, Some(false), true);
        let common = toks
            .iter()
            .zip(h.tokenize(&long, Some(false), true))
            .take_while(|(a, b)| **a == *b)
            .count();
        assert!((256..n).contains(&common), "{common}");
        assert_eq!(check(parted).await, 256, "the every-256-tokens snapshot");
    }

    #[tokio::test]
    async fn the_prefix_cache_gives_way_to_expert_pages() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("moe.gguf");
        let preset = crate::synth::find_preset("tiny-moe").unwrap();
        crate::synth::write_model(preset, GgmlType::Q4_0, 3, &path).unwrap();
        let open = |budget| {
            let opts = crate::engine::EngineOptions {
                threads: Some(1),
                paging: crate::engine::PagingOptions {
                    budget,
                    ..Default::default()
                },
                ..Default::default()
            };
            Model::open_with(&path, opts).unwrap()
        };
        let probe = open(crate::engine::Budget::Bytes(u64::MAX / 2));
        let s = probe.pager().unwrap().monitor().believed();
        let (fixed, total) = (s.fixed_bytes, s.expert_total_bytes);
        drop(probe);
        let configured = 64 << 20;
        let model = open(crate::engine::Budget::Bytes(fixed + total / 2));
        let h = start(
            model,
            "moe",
            Config {
                prefix_cache_bytes: configured,
                ..Config::default()
            },
        )
        .unwrap()
        .0;
        let cap = h.paging_stats(false).unwrap().expert_cap_bytes.unwrap();
        assert!(cap < total);
        // The engine fits the cache as its loop goes round (a request).
        answer(ask_n(&h, "Wake the engine up", 2)).await;
        let t0 = Instant::now();
        while h.status().prefix_cache.limit_bytes == configured {
            assert!(
                t0.elapsed() < Duration::from_secs(10),
                "the cache never gave way"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        assert_eq!(
            h.status().prefix_cache.limit_bytes,
            configured - (total - cap),
            "the cache gives exactly what the experts lack"
        );
    }

    fn chat_turn(
        h: &Handle,
        messages: Vec<crate::chat::ChatMessage>,
        session: Option<&str>,
    ) -> Generation {
        chat_as(h, "alice", messages, session)
    }

    #[tokio::test]
    async fn sessions_keep_their_state_in_the_prefix_cache_even_with_it_off() {
        use crate::chat::ChatMessage;
        for config in [Config::default(), no_cache()] {
            let on = config.prefix_cache_bytes > 0;
            let h = tiny_handle(config);
            let system = ChatMessage::new("system", system_prompt());
            let hi = ChatMessage::new("user", "Hi there");
            let more = ChatMessage::new("user", "Tell me more");
            let mut g = chat_turn(&h, vec![system.clone(), hi.clone()], Some("s"));
            let (t1, end) = tokens(&mut g).await;
            let Event::Done(d1) = end else {
                panic!("{end:?}")
            };
            let p1 = d1.stats.prompt_tokens;
            let st = h.status().prefix_cache;
            assert!(
                st.entries >= 1 && st.bytes > 0,
                "on={on}: the session's state is an entry: {st:?}"
            );
            // The follow-up continues the pinned state.
            let (_, (p2, f2)) = answer(chat_turn(&h, vec![more.clone()], Some("s"))).await;
            assert!(f2 < 32 && p2 > 200, "on={on}: {p2} {f2}");
            // The same conversation without the session resumes (with the
            // cache on) at least from turn one's prompt: the session's chain
            // starts there. (The reply, tokenized again from its text, need
            // not be the tokens the session's state consumed.)
            let reply = h.detokenize(&t1).unwrap();
            let all = vec![system, hi, ChatMessage::new("assistant", reply), more];
            let (_, (p3, f3)) = answer(chat_turn(&h, all, None)).await;
            if on {
                assert!(f3 <= p3 - p1, "on: {f3} of {p3} prefilled");
            } else {
                assert_eq!(f3, p3);
            }
        }
    }

    #[tokio::test]
    async fn a_resent_conversation_resumes_at_its_last_shared_message() {
        use crate::chat::ChatMessage;
        let h = tiny_handle(Config::default());
        let cold = tiny_handle(no_cache());
        let system = ChatMessage::new("system", system_prompt());
        let long_answer = "The kitchen light is on and the oven is warm. ".repeat(6);
        let earlier = vec![
            system,
            ChatMessage::new("user", "Is the kitchen light on?"),
            ChatMessage::new("assistant", long_answer),
        ];
        let with = |q: &str| {
            let mut m = earlier.clone();
            m.push(ChatMessage::new("user", q));
            m
        };
        let (_, (p1, f1)) = answer(chat_turn(&h, with("Turn it off."), None)).await;
        assert_eq!(p1, f1);
        // Same first three messages, another question: resumes after the
        // assistant's message (a middle message end), not the system prompt.
        let (got, (p2, f2)) = answer(chat_turn(&h, with("And the hall?"), None)).await;
        let frame = h
            .tokenize(
                "And the hall?<|im_end|>\n<|im_start|>assistant\n",
                Some(false),
                true,
            )
            .len();
        assert!(
            f2 <= frame + 8,
            "{f2} prefilled of {p2}, the last message is {frame}"
        );
        let (want, _) = answer(chat_turn(&cold, with("And the hall?"), None)).await;
        assert_eq!(got, want);
    }
}
