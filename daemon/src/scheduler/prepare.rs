//! What a request becomes before it waits: its tokens, and for a chat turn
//! on a session the context and state it continues and what to check back
//! in when it ends.

use super::prefix::{Pin, SNAPSHOT_EVERY};
use super::sessions::{Conversation, Lease, SessionKey};
use super::{Client, Handle, Input, SubmitError};
use crate::chat::ChatMessage;
use std::time::Instant;

/// A request's input, ready to queue.
pub(super) struct Prepared {
    /// Tokens to feed.
    pub tokens: Vec<u32>,
    /// Tokens the state already holds (a session's earlier turns).
    pub context: Vec<u32>,
    /// The session's state to continue (`None`: a fresh sequence).
    pub state: Option<Pin>,
    /// The session turn, if the request is on one.
    pub session: Option<SessionTurn>,
    /// Positions in `tokens` worth a prefix-cache snapshot (ascending; only
    /// for a fresh sequence).
    pub snapshots: Vec<usize>,
}

impl Prepared {
    /// A request that starts from an empty context; `ends`: where its
    /// messages end.
    fn fresh(tokens: Vec<u32>, ends: Vec<usize>) -> Prepared {
        Prepared {
            snapshots: snapshot_points(tokens.len(), ends),
            tokens,
            context: Vec::new(),
            state: None,
            session: None,
        }
    }
}

/// A fresh prompt of `n` tokens' snapshot points: `ends` (its messages'),
/// every [`SNAPSHOT_EVERY`] tokens and its end, ascending.
fn snapshot_points(n: usize, mut ends: Vec<usize>) -> Vec<usize> {
    ends.extend((1..=n / SNAPSHOT_EVERY).map(|i| i * SNAPSHOT_EVERY));
    ends.push(n);
    ends.sort_unstable();
    ends.dedup();
    ends.retain(|&e| e > 0 && e <= n);
    ends
}

/// A chat turn on a session: what to check back in when it finishes.
pub(crate) struct SessionTurn {
    pub lease: Lease,
    /// The conversation including this turn's new messages.
    pub messages: Vec<ChatMessage>,
    /// Their render, whose tokens the state will have consumed.
    pub rendered: String,
}

impl Handle {
    /// Renders and tokenizes `input` (the caller's thread, not the
    /// engine's).
    pub(super) fn prepare(
        &self,
        input: Input,
        tools: Option<&serde_json::Value>,
        client: &Client,
        now: Instant,
    ) -> Result<Prepared, SubmitError> {
        match input {
            Input::Prompt { text, add_bos } => Ok(Prepared::fresh(
                self.tokenize(&text, add_bos, true),
                Vec::new(),
            )),
            Input::Chat { messages, session } => {
                self.prepare_chat(messages, tools, session, client, now)
            }
        }
    }

    /// A chat request's render and tokens, continuing its session's state
    /// where the session's text is a prefix of the new render.
    fn prepare_chat(
        &self,
        mut messages: Vec<ChatMessage>,
        tools: Option<&serde_json::Value>,
        session: Option<String>,
        client: &Client,
        now: Instant,
    ) -> Result<Prepared, SubmitError> {
        // An assistant turn's calls: for a template that does not render
        // them (LFM2-8B-A1B's drops them), written into its content as the
        // model writes them, so the model sees what it called.
        if !self.template.renders_tool_calls() {
            for m in messages.iter_mut().filter(|m| !m.tool_calls.is_empty()) {
                m.content
                    .push_str(&crate::tools::render_calls(&std::mem::take(
                        &mut m.tool_calls,
                    )));
            }
        }
        let render = |msgs: &[ChatMessage]| {
            self.template
                .render(msgs, tools, true, &self.bos_text)
                .map_err(|e| {
                    SubmitError::Invalid(format!(
                        "the model's chat template cannot render these messages: {e}"
                    ))
                })
        };
        let Some(id) = session else {
            let text = render(&messages)?;
            let tokens = self.tokenizer.encode(&text, false, true);
            let ends = self.message_ends(&messages, tools, &text, &tokens);
            return Ok(Prepared::fresh(tokens, ends));
        };
        let mut lease = self.sessions.checkout(
            SessionKey {
                owner: client.owner.clone(),
                id,
            },
            now,
        )?;
        let mut all = lease.conversation.messages.clone();
        all.extend(messages);
        let rendered = render(&all)?;
        let c = &lease.conversation;
        let reuse = lease.state.is_some()
            && !c.text.is_empty()
            && rendered.starts_with(&c.text)
            && rendered.len() > c.text.len();
        let (tokens, context, state) = if reuse {
            let mut tokens = c.tail.clone();
            tokens.extend(
                self.tokenizer
                    .encode(&rendered[c.text.len()..], false, true),
            );
            (tokens, c.tokens.clone(), lease.state.take())
        } else {
            // The state (if any) does not match this conversation: start over.
            lease.state = None;
            (
                self.tokenizer.encode(&rendered, false, true),
                Vec::new(),
                None,
            )
        };
        // A session's first turn (or one starting over) is a fresh
        // sequence: it may resume from, and adds to, the prefix cache.
        let snapshots = if !reuse {
            snapshot_points(
                tokens.len(),
                self.message_ends(&all, tools, &rendered, &tokens),
            )
        } else {
            Vec::new()
        };
        Ok(Prepared {
            tokens,
            context,
            state,
            session: Some(SessionTurn {
                lease,
                messages: all,
                rendered,
            }),
            snapshots,
        })
    }

    /// Token positions where messages end in `tokens` (the render of
    /// `messages`, `text`): the first message's (a system prompt, a tool
    /// list) and the last [`MESSAGE_ENDS`] ones' (an earlier turn of the
    /// conversation, the same conversation asked again). A position counts
    /// only where the render of the messages so far tokenizes to a prefix
    /// of `tokens`. Each point off a chunk's natural end costs the prompt
    /// one more (short) engine step.
    fn message_ends(
        &self,
        messages: &[ChatMessage],
        tools: Option<&serde_json::Value>,
        text: &str,
        tokens: &[u32],
    ) -> Vec<usize> {
        let n = messages.len();
        (1..=n)
            .filter(|&i| i == 1 || i + MESSAGE_ENDS > n)
            .filter_map(|i| {
                let part = self
                    .template
                    .render(&messages[..i], tools, false, &self.bos_text)
                    .ok()?;
                if !text.starts_with(&part) {
                    return None;
                }
                let ids = self.tokenizer.encode(&part, false, true);
                tokens.starts_with(&ids).then_some(ids.len())
            })
            .collect()
    }
}

/// Most message ends of a chat request marked for the prefix cache besides
/// the first (each is rendered and tokenized again on the caller's thread).
const MESSAGE_ENDS: usize = 16;

impl SessionTurn {
    /// Checks the session back in after a finished turn: the reply joins the
    /// conversation. `tail` says what of the reply the state has not
    /// consumed (`None`: the state does not match the reply's text, as
    /// after a stop string, and is dropped); `tokens` are what it has.
    pub(crate) fn finish(
        self,
        reply: String,
        tail: Option<Vec<u32>>,
        tokens: Vec<u32>,
        state: Option<Pin>,
    ) {
        let text = format!("{}{reply}", self.rendered);
        let mut messages = self.messages;
        messages.push(ChatMessage::new("assistant", reply));
        match (tail, state) {
            (Some(tail), Some(state)) => self.lease.finish(
                Conversation {
                    messages,
                    text,
                    tail,
                    tokens,
                },
                state,
            ),
            _ => {
                let mut lease = self.lease;
                lease.conversation = Conversation {
                    messages,
                    ..Default::default()
                };
                lease.state = None;
            }
        }
    }
}
