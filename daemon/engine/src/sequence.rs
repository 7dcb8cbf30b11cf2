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

    /// Whether a response format was given and the output so far is not a
    /// whole match of it (it ended early: max tokens, context, a stop
    /// string, a cancel), so it will not parse.
    pub fn output_incomplete(&mut self) -> bool {
        self.constraint.as_mut().is_some_and(|c| !c.is_accepting())
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
        let token = match &mut self.constraint {
            Some(c) => {
                let allowed = c.allowed()?;
                let token = self
                    .sampler
                    .sample_allowed(logits, &self.history, Some(&allowed));
                c.accept(token)?;
                token
            }
            None => self.sampler.sample(logits, &self.history),
        };
        self.history.push(token);
        self.generated.push(token);
        let mut finished = None;
        let mut text = String::new();
        let complete = self
            .constraint
            .as_ref()
            .is_some_and(Constraint::is_complete);
        if self.eog.binary_search(&token).is_ok() {
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
            finished,
        }))
    }
}
