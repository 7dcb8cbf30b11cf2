//! Chat sessions: a conversation and the model state after it, kept between
//! turns so a follow-up prefills only its new tokens. A turn checks its
//! session out (one turn at a time) and the engine checks it back in with
//! the new state; a turn that fails or is cancelled leaves the conversation
//! as it was, without a state (the next turn prefills it all again).
//! Idle sessions expire, and the least recently used idle one makes room
//! when the cap is reached. The state itself lives in the prefix cache, as
//! a snapshot the session [`Pin`]s (one state store, not two).

use super::prefix::Pin;
use crate::chat::ChatMessage;
use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

/// A session is named by its client and scoped to its owner (the calling
/// user), so users sharing a daemon never see each other's conversations.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct SessionKey {
    pub owner: String,
    pub id: String,
}

/// A conversation as the model has seen it.
#[derive(Clone, Debug, Default)]
pub struct Conversation {
    pub messages: Vec<ChatMessage>,
    /// The rendered conversation through the last reply. The state has
    /// consumed it all but `tail`; it is reusable for the next turn exactly
    /// when the next render starts with this text (the turn then feeds
    /// `tail` and the tokens of the rest).
    pub text: String,
    /// Tokens of `text` the state has not consumed: the reply's last token
    /// when it ended on max_tokens (sampled, never fed).
    pub tail: Vec<u32>,
    /// The tokens the state has consumed.
    pub tokens: Vec<u32>,
}

struct Entry {
    conversation: Conversation,
    state: Option<Pin>,
    busy: bool,
    last_used: Instant,
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum SessionError {
    #[error(
        "session {0:?} is still answering an earlier turn; wait for that turn to finish (or cancel it) before sending the next"
    )]
    Busy(String),
    #[error(
        "all {0} session slots are answering right now; retry when one finishes, use no session_id, or start lfmd with a larger --max-sessions"
    )]
    Full(usize),
}

pub struct SessionStore {
    entries: Mutex<HashMap<SessionKey, Entry>>,
    cap: usize,
    idle_ttl: Duration,
}

impl SessionStore {
    pub fn new(cap: usize, idle_ttl: Duration) -> Arc<Self> {
        Arc::new(SessionStore {
            entries: Mutex::new(HashMap::new()),
            cap: cap.max(1),
            idle_ttl,
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<SessionKey, Entry>> {
        self.entries.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Sessions held (idle or busy), after dropping expired ones.
    pub fn len(&self, now: Instant) -> usize {
        let mut m = self.lock();
        self.expire(&mut m, now);
        m.len()
    }

    pub fn is_empty(&self, now: Instant) -> bool {
        self.len(now) == 0
    }

    fn expire(&self, m: &mut HashMap<SessionKey, Entry>, now: Instant) {
        m.retain(|_, e| e.busy || now.saturating_duration_since(e.last_used) < self.idle_ttl);
    }

    /// Takes the session for one turn, creating it if new.
    pub fn checkout(
        self: &Arc<Self>,
        key: SessionKey,
        now: Instant,
    ) -> Result<Lease, SessionError> {
        let mut m = self.lock();
        self.expire(&mut m, now);
        if !m.contains_key(&key) && m.len() >= self.cap {
            let lru = m
                .iter()
                .filter(|(_, e)| !e.busy)
                .min_by_key(|(_, e)| e.last_used)
                .map(|(k, _)| k.clone());
            match lru {
                Some(k) => {
                    m.remove(&k);
                }
                None => return Err(SessionError::Full(self.cap)),
            }
        }
        let e = m.entry(key.clone()).or_insert_with(|| Entry {
            conversation: Conversation::default(),
            state: None,
            busy: false,
            last_used: now,
        });
        if e.busy {
            return Err(SessionError::Busy(key.id));
        }
        e.busy = true;
        e.last_used = now;
        Ok(Lease {
            store: self.clone(),
            key,
            conversation: std::mem::take(&mut e.conversation),
            state: e.state.take(),
            returned: false,
        })
    }

    fn check_in(&self, key: &SessionKey, conversation: Conversation, state: Option<Pin>) {
        let mut m = self.lock();
        if let Some(e) = m.get_mut(key) {
            let reusable = state.is_some();
            e.conversation = conversation;
            if !reusable {
                e.conversation.text.clear();
                e.conversation.tail.clear();
                e.conversation.tokens.clear();
            }
            e.state = state;
            e.busy = false;
            e.last_used = Instant::now();
        }
    }
}

/// One turn's hold on a session. Dropped without [`Lease::finish`], it puts
/// the conversation back unchanged, with whatever state it still holds.
pub struct Lease {
    store: Arc<SessionStore>,
    key: SessionKey,
    /// The conversation before this turn.
    pub conversation: Conversation,
    /// The state after `conversation.tokens`, if kept; a turn takes it.
    pub state: Option<Pin>,
    returned: bool,
}

impl Lease {
    pub fn id(&self) -> &str {
        &self.key.id
    }

    /// Ends the turn: the session now holds `conversation` and `state`.
    pub fn finish(mut self, conversation: Conversation, state: Pin) {
        self.returned = true;
        self.store.check_in(&self.key, conversation, Some(state));
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        if !self.returned {
            let c = std::mem::take(&mut self.conversation);
            self.store.check_in(&self.key, c, self.state.take());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(id: &str) -> SessionKey {
        SessionKey {
            owner: "uid:1000".into(),
            id: id.into(),
        }
    }

    fn conv(text: &str) -> Conversation {
        Conversation {
            messages: vec![ChatMessage::new("user", text)],
            text: text.into(),
            tail: vec![4],
            tokens: vec![1, 2, 3],
        }
    }

    #[test]
    fn one_turn_at_a_time_and_a_dropped_turn_changes_nothing_but_the_state() {
        let s = SessionStore::new(4, Duration::from_secs(60));
        let t0 = Instant::now();
        let mut lease = s.checkout(key("a"), t0).unwrap();
        assert!(lease.conversation.messages.is_empty() && lease.state.is_none());
        assert_eq!(
            s.checkout(key("a"), t0).err(),
            Some(SessionError::Busy("a".into()))
        );
        // Another owner's session of the same name is another session.
        let other = SessionKey {
            owner: "uid:1001".into(),
            id: "a".into(),
        };
        drop(s.checkout(other, t0).unwrap());
        lease.conversation = conv("hi");
        drop(lease);
        let lease = s.checkout(key("a"), t0).unwrap();
        assert_eq!(lease.conversation.messages.len(), 1);
        // Without a state the consumed text and tail mean nothing: cleared.
        assert_eq!(lease.conversation.text, "");
        assert!(lease.conversation.tail.is_empty());
        assert!(lease.conversation.tokens.is_empty());
        assert_eq!(s.len(t0), 2);
    }

    #[test]
    fn idle_sessions_expire_and_the_oldest_idle_one_makes_room() {
        let s = SessionStore::new(2, Duration::from_secs(60));
        let t0 = Instant::now();
        drop(s.checkout(key("a"), t0).unwrap());
        let b = s.checkout(key("b"), t0 + Duration::from_secs(1)).unwrap();
        // Full: "a" is idle and goes; "b" is busy and stays.
        let c = s.checkout(key("c"), t0 + Duration::from_secs(2)).unwrap();
        assert_eq!(
            s.checkout(key("d"), t0 + Duration::from_secs(3)).err(),
            Some(SessionError::Full(2))
        );
        drop((b, c));
        assert_eq!(s.len(Instant::now()), 2);
        assert_eq!(s.len(Instant::now() + Duration::from_secs(61)), 0);
    }
}
