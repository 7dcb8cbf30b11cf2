//! A generation in progress: prompt tokens still to feed, the sampler, the
//! stop rules and the streaming detokenizer. It never calls the model
//! itself: a driver (the CLI loop, the scheduler) feeds chunks of
//! [`Sequence::next_input`] through `Model::forward` together with other
//! sequences and hands back the logits, so many sequences share one batch.

use crate::constraint::{Constraint, FormatError};
use crate::engine::{Model, SeqState};
use crate::sampler::{Sampler, SamplingParams};
use crate::stop::StopText;
use crate::tokenizer::{StreamDecoder, Tokenizer};
use crate::tools::{CALL_END, CALL_START, ToolCall};
use std::sync::Arc;

/// Why a generation ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FinishReason {
    /// The model produced an end-of-generation token.
    Eos,
    /// A stop string appeared (text up to it was delivered).
    StopString,
    /// `max_tokens` were generated.
    Length,
    /// The sequence reached the model's context limit.
    ContextFull,
    /// The client cancelled or went away.
    Cancelled,
    /// The response format's output is complete: nothing may follow it.
    Complete,
}

impl FinishReason {
    pub fn as_str(&self) -> &'static str {
        match self {
            FinishReason::Eos | FinishReason::Complete => "stop",
            FinishReason::StopString => "stop_string",
            FinishReason::Length => "length",
            FinishReason::ContextFull => "context_full",
            FinishReason::Cancelled => "cancelled",
        }
    }
}

/// What one step produced for the client.
#[derive(Clone, Debug, PartialEq)]
pub struct Step {
    /// The sampled token (also for the final step).
    pub token: u32,
    /// Text that became printable with this token (may be empty).
    pub text: String,
    /// Text of the reply that is not shown (a tool call's markup, given
    /// whole when the call closes): the reply is `markup` and `text` of
    /// every step, in order.
    pub markup: String,
    /// Tool calls this token completed.
    pub tool_calls: Vec<ToolCall>,
    pub finished: Option<FinishReason>,
}

pub struct Sequence {
    pub state: SeqState,
    tokenizer: Arc<Tokenizer>,
    /// Tokens to feed before the next sample (the prompt, then each sampled token).
    pending: Vec<u32>,
    history: Vec<u32>,
    n_prompt: usize,
    sampler: Sampler,
    stop: StopText,
    decoder: StreamDecoder<Arc<Tokenizer>>,
    /// End-of-generation ids: EOS and `<|im_end|>`.
    eog: Vec<u32>,
    max_tokens: usize,
    n_ctx: usize,
    generated: Vec<u32>,
    finished: Option<FinishReason>,
    /// The response format the output keeps to, if any.
    constraint: Option<Constraint>,
    /// Tool calling, when the request offered tools.
    tools: Option<ToolUse>,
    /// The call grammar of a call the model opened (auto), while open.
    call: Option<Constraint>,
    /// The tokens of the call list being written (after its opening
    /// token), while one is open.
    in_call: Option<Vec<u32>>,
    /// Every tool call made.
    calls: Vec<ToolCall>,
}

/// How a sequence treats LFM2's tool-call tokens ([`Sequence::use_tools`]).
pub struct ToolUse {
    /// `<|tool_call_start|>` and `<|tool_call_end|>`.
    pub start: u32,
    pub end: u32,
    /// The grammar of a call list, armed when the model opens one (tool
    /// choice `auto`); `None` when the request's own constraint holds the
    /// calls from the first token (`required`, a named tool).
    pub lazy: Option<Constraint>,
    /// The model may not open a call (tool choice `none`): the opening
    /// token is masked out.
    pub banned: bool,
    /// Calls are named `{id_prefix}_{n}`.
    pub id_prefix: String,
}

/// A vocabulary's end-of-generation ids, sorted: EOS, `<|im_end|>`,
/// `<|endoftext|>` (those it has).
pub fn end_of_generation_ids(tokenizer: &Tokenizer) -> Vec<u32> {
    let mut eog: Vec<u32> = tokenizer.eos().into_iter().collect();
    eog.extend(tokenizer.token_id("<|im_end|>"));
    eog.extend(tokenizer.token_id("<|endoftext|>"));
    eog.sort_unstable();
    eog.dedup();
    eog
}

impl Sequence {
    pub fn new(
        model: &Model,
        tokenizer: Arc<Tokenizer>,
        prompt: Vec<u32>,
        params: SamplingParams,
        max_tokens: usize,
        stop: StopText,
    ) -> Self {
        Self::resume(
            model,
            tokenizer,
            SeqState::new(model),
            Vec::new(),
            prompt,
            params,
            max_tokens,
            stop,
        )
    }

    /// Continues from `state`, which has consumed `context` (the tokens of
    /// earlier turns, as far as the repetition penalties should see them):
    /// only `prompt` goes through the model. With a fresh state and empty
    /// context this is [`Sequence::new`].
    #[allow(clippy::too_many_arguments)]
    pub fn resume(
        model: &Model,
        tokenizer: Arc<Tokenizer>,
        state: SeqState,
        mut context: Vec<u32>,
        prompt: Vec<u32>,
        params: SamplingParams,
        max_tokens: usize,
        stop: StopText,
    ) -> Self {
        let eog = end_of_generation_ids(&tokenizer);
        let decoder = StreamDecoder::new(tokenizer.clone());
        context.extend_from_slice(&prompt);
        Sequence {
            state,
            n_prompt: prompt.len(),
            history: context,
            pending: prompt,
            sampler: Sampler::new(params),
            stop,
            decoder,
            eog,
            max_tokens,
            n_ctx: model.desc.n_ctx_train,
            generated: Vec::new(),
            finished: None,
            constraint: None,
            tools: None,
            call: None,
            in_call: None,
            calls: Vec::new(),
            tokenizer,
        }
    }

    /// Caps the sequence below the model's trained context (a daemon's
    /// configured context size).
    pub fn set_context_limit(&mut self, n_ctx: usize) {
        self.n_ctx = self.n_ctx.min(n_ctx);
    }

    /// Generation runs on through end-of-generation tokens (they are
    /// sampled and shown as text like any other), for benchmarks.
    pub fn ignore_eos(&mut self) {
        self.eog.clear();
    }

    /// Every token sampled from now on keeps the output inside a response
    /// format; generation ends when the output is complete.
    pub fn constrain(&mut self, constraint: Constraint) {
        self.constraint = Some(constraint);
    }

    /// Tool calls: `<|tool_call_start|>…<|tool_call_end|>` is parsed into
    /// [`Step::tool_calls`] instead of shown, under the call grammar.
    pub fn use_tools(&mut self, tools: ToolUse) {
        self.tools = Some(tools);
    }

    /// Every tool call made so far.
    pub fn tool_calls(&self) -> &[ToolCall] {
        &self.calls
    }

    /// Whether a response format was given and the output so far is not a
    /// whole match of it (it ended early: max tokens, context, a stop
    /// string, a cancel), so it will not parse; or it ended inside a tool
    /// call.
    pub fn output_incomplete(&mut self) -> bool {
        self.in_call.is_some() || self.constraint.as_mut().is_some_and(|c| !c.is_accepting())
    }

    /// Tokens to feed next: at most `max` of them (chunked prefill).
    pub fn next_input(&self, max: usize) -> &[u32] {
        &self.pending[..self.pending.len().min(max)]
    }

    /// Whether feeding `n` tokens completes the pending input, so the call
    /// must return the last token's logits for sampling.
    pub fn needs_logits(&self, n: usize) -> bool {
        n == self.pending.len()
    }

    pub fn is_finished(&self) -> bool {
        self.finished.is_some()
    }

    pub fn finish_reason(&self) -> Option<&FinishReason> {
        self.finished.as_ref()
    }

    pub fn n_prompt(&self) -> usize {
        self.n_prompt
    }

    pub fn generated(&self) -> &[u32] {
        &self.generated
    }

    pub fn tokenizer(&self) -> &Tokenizer {
        &self.tokenizer
    }

    /// Every token this sequence has seen or made: context, prompt, output.
    pub fn history(&self) -> &[u32] {
        &self.history
    }

    /// Tokens still to feed before the next sample.
    pub fn pending_len(&self) -> usize {
        self.pending.len()
    }

    /// The model state, for keeping a conversation (a finished sequence has
    /// consumed all but its last sampled token).
    pub fn into_state(self) -> SeqState {
        self.state
    }

    /// Records that `n` pending tokens went through the model. With the
    /// last token's `logits`, samples the next token and returns the step.
    ///
    /// Under a response format, only tokens that keep the output inside it
    /// are sampled; an error of the format's engine (its per-token work
    /// limit) fails this sequence alone.
    pub fn advance(
        &mut self,
        n: usize,
        logits: Option<&[f32]>,
    ) -> Result<Option<Step>, FormatError> {
        self.pending.drain(..n);
        let Some(logits) = logits else {
            return Ok(None);
        };
        debug_assert!(self.pending.is_empty());
        // An open call's grammar masks first, then the request's format;
        // with calls banned, the opening token alone is masked out.
        let token = match self.call.as_mut().or(self.constraint.as_mut()) {
            Some(c) => {
                let allowed = c.allowed()?;
                let token = self
                    .sampler
                    .sample_allowed(logits, &self.history, Some(&allowed));
                c.accept(token)?;
                token
            }
            None => match self.tools.as_ref().filter(|t| t.banned) {
                Some(t) => {
                    let mut bits = vec![u32::MAX; logits.len().div_ceil(32)];
                    bits[t.start as usize / 32] &= !(1 << (t.start % 32));
                    self.sampler
                        .sample_allowed(logits, &self.history, Some(&bits))
                }
                None => self.sampler.sample(logits, &self.history),
            },
        };
        self.history.push(token);
        self.generated.push(token);
        let mut finished = None;
        let mut text = String::new();
        let mut markup = String::new();
        let mut tool_calls = Vec::new();
        let complete = self
            .constraint
            .as_ref()
            .is_some_and(Constraint::is_complete);
        let tool_token = self.tools.as_ref().and_then(|t| {
            if token == t.start && self.in_call.is_none() {
                Some(true)
            } else if self.in_call.is_some() {
                Some(false)
            } else {
                None
            }
        });
        if let Some(opens) = tool_token {
            // A call list is written: kept out of the text, parsed whole.
            let t = self.tools.as_ref().expect("tools");
            if opens {
                self.in_call = Some(Vec::new());
                if self.call.is_none() && self.constraint.is_none() {
                    self.call = t.lazy.clone();
                }
            } else if token == t.end {
                let body = self.in_call.take().unwrap_or_default();
                let list = self.tokenizer.decode(&body);
                markup = format!("{CALL_START}{list}{CALL_END}");
                self.call = None;
                match crate::tools::parse_calls(&list) {
                    Ok(calls) => {
                        for mut c in calls {
                            c.id = format!("{}_{}", t.id_prefix, self.calls.len());
                            self.calls.push(c.clone());
                            tool_calls.push(c);
                        }
                    }
                    // Only without a grammar (cannot happen): shown as is.
                    Err(_) => text = std::mem::take(&mut markup),
                }
            } else if let Some(body) = &mut self.in_call {
                body.push(token);
            }
            if complete {
                finished = Some(FinishReason::Complete);
            } else if self.generated.len() >= self.max_tokens {
                finished = Some(FinishReason::Length);
            } else if self.state.len() + 1 >= self.n_ctx {
                finished = Some(FinishReason::ContextFull);
            }
            if finished.is_some()
                && let Some(body) = &self.in_call
            {
                // Ended inside the call: the reply keeps what was written.
                markup = format!("{CALL_START}{}", self.tokenizer.decode(body));
            }
        } else if self.eog.binary_search(&token).is_ok() {
            finished = Some(FinishReason::Eos);
        } else {
            let piece = self.decoder.push(token);
            text = self.stop.push(&piece);
            if self.stop.stopped() {
                finished = Some(FinishReason::StopString);
            } else if complete {
                finished = Some(FinishReason::Complete);
            } else if self.generated.len() >= self.max_tokens {
                finished = Some(FinishReason::Length);
            } else if self.state.len() + 1 >= self.n_ctx {
                finished = Some(FinishReason::ContextFull);
            }
        }
        if finished.is_some() {
            if finished != Some(FinishReason::StopString) {
                text.push_str(&self.stop.push(&self.decoder.finish()));
                text.push_str(&self.stop.finish());
            }
            self.finished = finished.clone();
        } else {
            self.pending.push(token);
        }
        Ok(Some(Step {
            token,
            text,
            markup,
            tool_calls,
            finished,
        }))
    }
}
