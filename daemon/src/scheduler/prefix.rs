//! The prefix cache: model states at the end of prompt prefixes, so a
//! request that starts with a prefix seen before (a system prompt, a tool
//! list, a few-shot preamble) prefills only the rest.
//!
//! A hybrid model's state cannot be cut back to an earlier position (a conv
//! window only rolls forward), so the cache keeps snapshots at chosen points
//! of a prompt — each chat message's end, the prompt's end, every
//! [`SNAPSHOT_EVERY`] tokens — and a request resumes from the longest one
//! its tokens start with. Snapshots form a tree per scope: each holds the
//! tokens and KV rows from its parent's end to its own
//! ([`StateSegment`]), so a prefix's rows are stored once however many
//! snapshots follow it, and a state is rebuilt from the chain root to leaf.
//!
//! Memory is bounded: least recently used leaves go first, and a scope (a
//! user, unless the cache is shared) over its share of the limit gives way
//! before anyone else does, so one client flooding distinct prompts evicts
//! only its own entries. The limit shrinks while expert pages need the
//! memory ([`PrefixCache::set_limit`]).
//!
//! Chat sessions keep their state here too, as [`Pin`]ned snapshots: a
//! session's turns form a chain in its user's tree (sharing the rows of the
//! system prompt they started from), a pinned snapshot is never evicted
//! while its session holds it, and is counted with the rest. Pinned entries
//! are kept even with the cache off (`prefix_cache = none` turns off only
//! the reuse across requests).

use crate::engine::{Model, SeqState, StateError, StateSegment};
use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

/// A long prompt gets a snapshot every this many tokens (besides its
/// messages' ends and its own end): a prompt that shares only part of a long
/// prefix with a cached one still resumes near where they part.
pub const SNAPSHOT_EVERY: usize = 256;

/// A cached state: the state after `end()` tokens of some prompt.
pub struct Snapshot {
    id: u64,
    scope: Arc<str>,
    parent: Option<Arc<Snapshot>>,
    /// Tokens of positions `segment.start()..segment.end()`.
    tokens: Vec<u32>,
    segment: StateSegment,
}

impl Snapshot {
    /// Tokens the state has consumed.
    pub fn end(&self) -> usize {
        self.segment.end()
    }

    /// The state at this snapshot (a copy: the snapshot stays cached).
    pub fn state(&self, model: &Model) -> Result<SeqState, StateError> {
        let mut chain = vec![&self.segment];
        let mut at = self;
        while let Some(p) = &at.parent {
            chain.push(&p.segment);
            at = p;
        }
        chain.reverse();
        SeqState::from_segments(model, &chain)
    }

    fn bytes(&self) -> u64 {
        (self.segment.memory_bytes() + self.tokens.len() * 4 + std::mem::size_of::<Self>()) as u64
    }
}

/// The cache's figures, for status.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct PrefixStats {
    pub entries: usize,
    pub bytes: u64,
    /// The limit in force (the configured one, less what expert pages need).
    pub limit_bytes: u64,
    /// Requests that resumed from a snapshot, and that found none.
    pub hits: u64,
    pub misses: u64,
    /// Prompt tokens not prefilled thanks to a hit.
    pub tokens_saved: u64,
}

struct Entry {
    node: Arc<Snapshot>,
    children: Vec<u64>,
    last_used: u64,
    bytes: u64,
    /// Sessions holding it ([`Pin`]s): not evictable while above 0.
    pins: u32,
}

/// A session's hold on a snapshot: its state between turns. Dropping it
/// lets the snapshot go the way of any other entry.
pub struct Pin {
    cache: Arc<PrefixCache>,
    node: Arc<Snapshot>,
}

impl Pin {
    pub fn snapshot(&self) -> &Arc<Snapshot> {
        &self.node
    }
}

impl Drop for Pin {
    fn drop(&mut self) {
        let mut ix = self.cache.lock();
        if let Some(e) = ix.entries.get_mut(&self.node.id) {
            e.pins -= 1;
        }
    }
}

#[derive(Default)]
struct Index {
    entries: HashMap<u64, Entry>,
    /// Top-level snapshots (no parent) per scope.
    roots: HashMap<Arc<str>, Vec<u64>>,
    scope_bytes: HashMap<Arc<str>, u64>,
    bytes: u64,
    configured: u64,
    limit: u64,
    clock: u64,
    next_id: u64,
    hits: u64,
    misses: u64,
    tokens_saved: u64,
}

pub struct PrefixCache {
    index: Mutex<Index>,
}

impl PrefixCache {
    /// A cache of at most `limit` bytes (0: off).
    pub fn new(limit: u64) -> Self {
        PrefixCache {
            index: Mutex::new(Index {
                configured: limit,
                limit,
                ..Default::default()
            }),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Index> {
        self.index.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Whether it may hold anything.
    pub fn enabled(&self) -> bool {
        self.lock().configured > 0
    }

    /// The longest cached prefix of `tokens` in `scope` of at most
    /// `max_len` tokens (a request keeps at least its last token to feed,
    /// for its logits), counted as a hit or a miss.
    pub fn lookup(&self, scope: &str, tokens: &[u32], max_len: usize) -> Option<Arc<Snapshot>> {
        let mut ix = self.lock();
        if ix.configured == 0 {
            return None;
        }
        let max_len = max_len.min(tokens.len());
        let mut best: Option<u64> = None;
        // Children of one node may overlap (snapshots of different lengths
        // from different prompts); the walk takes the deepest match.
        let mut stack: Vec<u64> = ix.roots.get(scope).cloned().unwrap_or_default();
        while let Some(id) = stack.pop() {
            let e = &ix.entries[&id];
            let (s, end) = (e.node.segment.start(), e.node.end());
            if end > max_len || tokens[s..end] != e.node.tokens[..] {
                continue;
            }
            if best.is_none_or(|b| ix.entries[&b].node.end() < end) {
                best = Some(id);
            }
            stack.extend(e.children.iter().copied());
        }
        let Some(id) = best else {
            ix.misses += 1;
            return None;
        };
        ix.clock += 1;
        let now = ix.clock;
        let node = ix.entries[&id].node.clone();
        ix.touch(&node, now);
        ix.hits += 1;
        ix.tokens_saved += node.end() as u64;
        Some(node)
    }

    /// Caches `segment` (the state after `parent`'s end plus `tokens`) in
    /// `scope`; returns the snapshot to chain the next one to, or `None`
    /// when it was not kept (cache off, too large for the scope's share, or
    /// `parent` no longer cached).
    pub fn insert(
        &self,
        scope: &Arc<str>,
        parent: Option<&Arc<Snapshot>>,
        tokens: &[u32],
        segment: StateSegment,
    ) -> Option<Arc<Snapshot>> {
        let mut ix = self.lock();
        if ix.configured == 0 {
            return None;
        }
        ix.insert(scope, parent, tokens, segment, false)
    }

    /// Keeps `state` (after `tokens`, all it consumed) for a session: chained
    /// to `parent` when that is still cached and a prefix of it, else whole;
    /// kept even over the limit or with the cache off.
    pub fn pin(
        self: &Arc<Self>,
        scope: &Arc<str>,
        parent: Option<&Arc<Snapshot>>,
        tokens: &[u32],
        state: &SeqState,
    ) -> Option<Pin> {
        debug_assert_eq!(tokens.len(), state.len());
        let mut ix = self.lock();
        let parent = parent
            .filter(|p| ix.entries.contains_key(&p.id) && p.end() <= tokens.len() && p.end() > 0);
        let from = parent.map_or(0, |p| p.end());
        let node = if from == tokens.len() {
            parent.cloned()
        } else {
            ix.insert(scope, parent, &tokens[from..], state.segment(from), true)
        }?;
        ix.entries.get_mut(&node.id)?.pins += 1;
        Some(Pin {
            cache: self.clone(),
            node,
        })
    }
}

impl Index {
    /// Adds a snapshot under `parent` (which must be cached); `pinned` ones
    /// go in whatever the limit says.
    fn insert(
        &mut self,
        scope: &Arc<str>,
        parent: Option<&Arc<Snapshot>>,
        tokens: &[u32],
        segment: StateSegment,
        pinned: bool,
    ) -> Option<Arc<Snapshot>> {
        let ix = self;
        // A segment must start where its parent ends (at 0 without one) and
        // hold one row per token: anything else would rebuild a wrong state.
        let starts = parent.map_or(0, |p| p.end());
        if tokens.is_empty()
            || segment.start() != starts
            || tokens.len() != segment.end() - segment.start()
        {
            return None;
        }
        let siblings = match parent {
            Some(p) => &ix.entries.get(&p.id)?.children,
            None => ix.roots.get(scope).map_or(&[][..], |v| &v[..]),
        };
        // The same prompt cached by a request running beside this one.
        let same = siblings
            .iter()
            .map(|id| &ix.entries[id].node)
            .find(|n| n.tokens == tokens)
            .cloned();
        ix.clock += 1;
        let now = ix.clock;
        if let Some(same) = same {
            ix.touch(&same, now);
            return Some(same);
        }
        ix.next_id += 1;
        let node = Arc::new(Snapshot {
            id: ix.next_id,
            scope: scope.clone(),
            parent: parent.cloned(),
            tokens: tokens.to_vec(),
            segment,
        });
        let bytes = node.bytes();
        if let Some(p) = parent {
            // Keep the chain from being evicted to make room for its own
            // continuation.
            ix.touch(p, now);
        }
        if !ix.make_room(scope, bytes) && !pinned {
            return None;
        }
        match parent {
            Some(p) => ix.entries.get_mut(&p.id)?.children.push(node.id),
            None => ix.roots.entry(scope.clone()).or_default().push(node.id),
        }
        ix.entries.insert(
            node.id,
            Entry {
                node: node.clone(),
                children: Vec::new(),
                last_used: now,
                bytes,
                pins: 0,
            },
        );
        ix.bytes += bytes;
        *ix.scope_bytes.entry(scope.clone()).or_default() += bytes;
        Some(node)
    }
}

impl PrefixCache {
    /// Sets the limit in force (at most the configured one), evicting down
    /// to it.
    pub fn set_limit(&self, bytes: u64) {
        let mut ix = self.lock();
        ix.limit = bytes.min(ix.configured);
        while ix.bytes > ix.limit {
            let Some(v) = ix.victim(None, 0) else { break };
            ix.remove(v);
        }
    }

    /// The configured limit.
    pub fn configured(&self) -> u64 {
        self.lock().configured
    }

    pub fn stats(&self) -> PrefixStats {
        let ix = self.lock();
        PrefixStats {
            entries: ix.entries.len(),
            bytes: ix.bytes,
            limit_bytes: ix.limit,
            hits: ix.hits,
            misses: ix.misses,
            tokens_saved: ix.tokens_saved,
        }
    }
}

impl Index {
    /// Marks `node` and its ancestors used at `now` (a hit on a snapshot
    /// uses its whole chain).
    fn touch(&mut self, node: &Snapshot, now: u64) {
        let mut at = Some(node);
        while let Some(n) = at {
            if let Some(e) = self.entries.get_mut(&n.id) {
                e.last_used = now;
            }
            at = n.parent.as_deref();
        }
    }

    /// Evicts until `need` more bytes for `scope` fit; false if they
    /// cannot (more than the scope's share).
    fn make_room(&mut self, scope: &Arc<str>, need: u64) -> bool {
        while self.bytes + need > self.limit {
            let Some(v) = self.victim(Some(scope), need) else {
                return false;
            };
            self.remove(v);
        }
        true
    }

    /// The entry to evict: the least recently used leaf (deepest first on a
    /// tie) of a scope over its share of the limit — the inserting scope's
    /// own if it is over (counting `need`), so a scope that floods the
    /// cache only ever evicts itself.
    fn victim(&self, inserting: Option<&Arc<str>>, need: u64) -> Option<u64> {
        let mut scopes: Vec<&Arc<str>> = self.scope_bytes.keys().collect();
        if let Some(s) = inserting.filter(|s| !self.scope_bytes.contains_key(*s)) {
            scopes.push(s);
        }
        let share = self.limit / scopes.len().max(1) as u64;
        let usage = |s: &Arc<str>| {
            self.scope_bytes.get(s).copied().unwrap_or(0)
                + if inserting == Some(s) { need } else { 0 }
        };
        let over = |s: &Arc<str>| usage(s) > share;
        let pick = |scope_ok: &dyn Fn(&Arc<str>) -> bool| {
            self.entries
                .iter()
                .filter(|(_, e)| e.children.is_empty() && e.pins == 0 && scope_ok(&e.node.scope))
                .min_by_key(|(_, e)| (e.last_used, std::cmp::Reverse(e.node.end())))
                .map(|(&id, _)| id)
        };
        match inserting {
            Some(s) if over(s) => pick(&|x| x == s),
            _ => pick(&|x| over(x)).or_else(|| pick(&|_| true)),
        }
    }

    fn remove(&mut self, id: u64) {
        let Some(e) = self.entries.remove(&id) else {
            return;
        };
        debug_assert!(e.children.is_empty(), "only leaves are evicted");
        self.bytes -= e.bytes;
        let scope = &e.node.scope;
        if let Some(b) = self.scope_bytes.get_mut(scope) {
            *b -= e.bytes;
            if *b == 0 {
                self.scope_bytes.remove(scope);
            }
        }
        let siblings = match &e.node.parent {
            Some(p) => self.entries.get_mut(&p.id).map(|p| &mut p.children),
            None => self.roots.get_mut(scope),
        };
        if let Some(s) = siblings {
            s.retain(|&c| c != id);
        }
        if self.roots.get(scope).is_some_and(Vec::is_empty) {
            self.roots.remove(scope);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::{BatchItem, LogitsWanted};
    use crate::gguf::{GgmlType, Gguf};

    fn model() -> Model {
        let mut bytes = Vec::new();
        crate::synth::write_to(
            crate::synth::find_preset("tiny-moe").unwrap(),
            GgmlType::Q8_0,
            4,
            &mut bytes,
        )
        .unwrap();
        Model::from_gguf(Arc::new(Gguf::from_bytes(bytes).unwrap())).unwrap()
    }

    fn feed(m: &Model, st: &mut SeqState, tokens: &[u32]) {
        m.forward(&mut [BatchItem {
            state: st,
            tokens,
            logits: LogitsWanted::None,
        }])
        .unwrap();
    }

    /// Caches `tokens` as a chain of snapshots ending at `cuts`.
    fn cache_prompt(
        c: &PrefixCache,
        m: &Model,
        scope: &str,
        tokens: &[u32],
        cuts: &[usize],
    ) -> Vec<Option<Arc<Snapshot>>> {
        let scope: Arc<str> = scope.into();
        let mut st = SeqState::new(m);
        let (mut from, mut parent) = (0, None);
        let mut out = Vec::new();
        for &cut in cuts {
            feed(m, &mut st, &tokens[from..cut]);
            let n = c.insert(
                &scope,
                parent.as_ref(),
                &tokens[from..cut],
                st.segment(from),
            );
            out.push(n.clone());
            // As the worker does: a chain that could not be kept ends there.
            let Some(n) = n else { break };
            parent = Some(n);
            from = cut;
        }
        out
    }

    fn prompt(seed: u32, n: usize) -> Vec<u32> {
        (0..n as u32)
            .map(|i| (i * 7 + seed * 31) % 500 + 1)
            .collect()
    }

    #[test]
    fn the_longest_cached_prefix_is_found_and_rebuilds_the_state() {
        let m = model();
        let c = PrefixCache::new(64 << 20);
        let a = prompt(1, 40);
        cache_prompt(&c, &m, "alice", &a, &[10, 25, 40]);
        // Another prompt sharing the first 30 tokens.
        let mut b = a[..30].to_vec();
        b.extend(prompt(2, 10));
        let hit = c.lookup("alice", &b, b.len() - 1).unwrap();
        assert_eq!(hit.end(), 25);
        let st = hit.state(&m).unwrap();
        let mut cold = SeqState::new(&m);
        feed(&m, &mut cold, &a[..25]);
        assert_eq!(st.len(), 25);
        assert_eq!(st.segment(0).memory_bytes(), cold.segment(0).memory_bytes());
        // The whole prompt again: the last token is kept to feed.
        assert_eq!(c.lookup("alice", &a, a.len() - 1).unwrap().end(), 25);
        assert_eq!(c.lookup("alice", &a, a.len()).unwrap().end(), 40);
        // Another scope sees nothing; a different start nothing.
        assert!(c.lookup("bob", &a, a.len()).is_none());
        assert!(c.lookup("alice", &prompt(3, 40), 39).is_none());
        let s = c.stats();
        assert_eq!((s.hits, s.misses, s.tokens_saved), (3, 2, 90));
        assert_eq!(s.entries, 3);
    }

    #[test]
    fn a_segment_that_does_not_continue_its_parent_is_refused() {
        let m = model();
        let c = PrefixCache::new(64 << 20);
        let a = prompt(1, 20);
        let mut st = SeqState::new(&m);
        feed(&m, &mut st, &a);
        let scope: Arc<str> = "u".into();
        // No parent, but the rows start at 5; tokens and rows of other lengths.
        assert!(c.insert(&scope, None, &a[5..], st.segment(5)).is_none());
        assert!(c.insert(&scope, None, &a[..19], st.segment(0)).is_none());
        let root = c.insert(&scope, None, &a, st.segment(0)).unwrap();
        feed(&m, &mut st, &a[..4]);
        assert!(
            c.insert(&scope, Some(&root), &a[..4], st.segment(21))
                .is_none()
        );
        assert!(
            c.insert(&scope, Some(&root), &a[..4], st.segment(20))
                .is_some()
        );
        assert_eq!(c.stats().entries, 2);
    }

    #[test]
    fn a_prefix_is_stored_once_and_a_repeat_adds_nothing() {
        let m = model();
        let c = PrefixCache::new(64 << 20);
        let a = prompt(1, 40);
        let first = cache_prompt(&c, &m, "alice", &a, &[20, 40]);
        let bytes = c.stats().bytes;
        let again = cache_prompt(&c, &m, "alice", &a, &[20, 40]);
        assert_eq!(c.stats().bytes, bytes);
        assert!(Arc::ptr_eq(
            first[1].as_ref().unwrap(),
            again[1].as_ref().unwrap()
        ));
        // A continuation chained to the shared prefix holds only its own rows.
        let hit = c.lookup("alice", &a, 39).unwrap();
        let mut st = hit.state(&m).unwrap();
        let more = prompt(5, 30);
        feed(&m, &mut st, &more);
        let seg = st.segment(20);
        let own = seg.memory_bytes() as u64;
        c.insert(&"alice".into(), Some(&hit), &more, seg).unwrap();
        let added = c.stats().bytes - bytes;
        assert!(added < own + 1024, "{added} bytes added for {own} of rows");
        // Rows of 20 tokens in a 20-token segment: the chain does not copy its parent's.
        assert!(
            (own as usize) < 2 * hit.segment.memory_bytes(),
            "a child holds only its own positions"
        );
    }

    #[test]
    fn the_least_recently_used_leaf_goes_first_and_chains_stay_whole() {
        let m = model();
        let a = prompt(1, 30);
        let b = prompt(2, 30);
        let probe = PrefixCache::new(u64::MAX);
        cache_prompt(&probe, &m, "u", &a, &[15, 30]);
        let two = probe.stats().bytes;
        // Room for a bit more than two prompts' snapshots.
        let c = PrefixCache::new(two * 2 + two / 4);
        cache_prompt(&c, &m, "u", &a, &[15, 30]);
        cache_prompt(&c, &m, "u", &b, &[15, 30]);
        assert!(c.lookup("u", &a, 30).is_some()); // a is now the more recent
        cache_prompt(&c, &m, "u", &prompt(3, 30), &[15, 30]);
        assert!(c.stats().bytes <= c.stats().limit_bytes);
        assert_eq!(
            c.lookup("u", &a, 30).map(|s| s.end()),
            Some(30),
            "recently used kept"
        );
        // b's leaf went first; its root may follow, never the other way round.
        assert_ne!(c.lookup("u", &b, 30).map(|s| s.end()), Some(30));
        let ix = c.lock();
        for e in ix.entries.values() {
            if let Some(p) = &e.node.parent {
                assert!(
                    ix.entries.contains_key(&p.id),
                    "an entry's parent is cached"
                );
            }
        }
    }

    #[test]
    fn a_client_flooding_prompts_evicts_only_its_own_entries() {
        let m = model();
        let probe = PrefixCache::new(u64::MAX);
        cache_prompt(&probe, &m, "x", &prompt(0, 30), &[30]);
        let one = probe.stats().bytes;
        let c = PrefixCache::new(one * 8);
        let alice = prompt(1, 30);
        cache_prompt(&c, &m, "alice", &alice, &[30]);
        for i in 0..40 {
            cache_prompt(&c, &m, "mallory", &prompt(100 + i, 30), &[30]);
        }
        assert!(c.stats().bytes <= one * 8);
        assert!(
            c.lookup("alice", &alice, 30).is_some(),
            "another user's flood evicted alice's entry"
        );
        // Mallory still got the rest of the cache.
        assert!(c.stats().entries >= 6, "{:?}", c.stats());
    }

    #[test]
    fn a_smaller_limit_evicts_and_zero_turns_the_cache_off() {
        let m = model();
        let c = PrefixCache::new(64 << 20);
        let a = prompt(1, 40);
        cache_prompt(&c, &m, "u", &a, &[10, 20, 30, 40]);
        let full = c.stats().bytes;
        c.set_limit(full / 2);
        let s = c.stats();
        assert!(
            s.bytes <= full / 2 && s.entries < 4 && s.entries > 0,
            "{s:?}"
        );
        // The chain's start survives (leaves go first).
        let kept = c.lookup("u", &a, 40).map(|s| s.end());
        assert!(matches!(kept, Some(10 | 20)), "{kept:?}");
        c.set_limit(u64::MAX);
        assert_eq!(
            c.stats().limit_bytes,
            64 << 20,
            "never above the configured size"
        );
        let off = PrefixCache::new(0);
        assert!(cache_prompt(&off, &m, "u", &a, &[10])[0].is_none());
        assert!(off.lookup("u", &a, 40).is_none());
        assert_eq!(off.stats(), PrefixStats::default());
    }

    #[test]
    fn a_pinned_state_outlives_pressure_until_its_session_lets_go() {
        let m = model();
        for configured in [64 << 20, 0] {
            let c = Arc::new(PrefixCache::new(configured));
            let a = prompt(1, 30);
            let mut st = SeqState::new(&m);
            feed(&m, &mut st, &a);
            let scope: Arc<str> = "u".into();
            let pin = c
                .pin(&scope, None, &a, &st)
                .expect("kept even with the cache off");
            assert_eq!(pin.snapshot().end(), 30);
            c.set_limit(0);
            assert_eq!(c.stats().entries, 1, "a pinned entry is not evicted");
            // Chained to it, a later turn holds only its own rows.
            let rebuilt = pin.snapshot().state(&m).unwrap();
            let mut more = rebuilt;
            let b = prompt(2, 10);
            feed(&m, &mut more, &b);
            let all: Vec<u32> = a.iter().chain(&b).copied().collect();
            let next = c.pin(&scope, Some(pin.snapshot()), &all, &more).unwrap();
            assert_eq!(next.snapshot().tokens.len(), 10);
            drop(pin);
            c.set_limit(0);
            assert_eq!(c.stats().entries, 2, "the parent of a pinned entry stays");
            drop(next);
            c.set_limit(0);
            assert_eq!(c.stats().entries, 0, "unpinned, both go");
        }
    }

    /// One step of the property test: cache a prompt (a chain cut at
    /// `cuts`), look one up, pin one, unpin one, or change the limit.
    #[derive(Clone, Debug)]
    enum Op {
        Cache {
            scope: u8,
            seed: u8,
            len: u8,
            cuts: Vec<u8>,
        },
        Lookup {
            scope: u8,
            seed: u8,
            len: u8,
        },
        Pin {
            scope: u8,
            seed: u8,
            len: u8,
        },
        Unpin(u8),
        Limit(u32),
    }

    fn op() -> impl proptest::strategy::Strategy<Value = Op> {
        use proptest::prelude::*;
        let s = 0u8..3;
        let seed = 0u8..4;
        prop_oneof![
            4 => (s.clone(), seed.clone(), 1u8..40, proptest::collection::vec(1u8..40, 0..3))
                .prop_map(|(scope, seed, len, cuts)| Op::Cache { scope, seed, len, cuts }),
            3 => (s.clone(), seed.clone(), 1u8..48)
                .prop_map(|(scope, seed, len)| Op::Lookup { scope, seed, len }),
            1 => (s, seed, 1u8..40).prop_map(|(scope, seed, len)| Op::Pin { scope, seed, len }),
            1 => any::<u8>().prop_map(Op::Unpin),
            1 => any::<u32>().prop_map(Op::Limit),
        ]
    }

    /// Prompts of one seed share prefixes (so chains and hits happen).
    fn family(seed: u8, len: u8) -> Vec<u32> {
        (0..len as u32)
            .map(|i| (i * 13 + u32::from(seed) * (i / 10) * 7) % 500 + 1)
            .collect()
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig { cases: 48, ..Default::default() })]

        /// Whatever the order of operations: a hit is a prefix of the query
        /// in the query's scope that rebuilds to the right length, the bytes
        /// add up, every cached entry's parent is cached, and unpinned bytes
        /// stay within the limit.
        #[test]
        fn the_cache_keeps_its_invariants(ops in proptest::collection::vec(op(), 1..24)) {
            let m = model();
            let c = Arc::new(PrefixCache::new(2 << 20));
            let mut pins: Vec<Pin> = Vec::new();
            for o in ops {
                let limited = matches!(o, Op::Limit(_));
                match o {
                    Op::Cache { scope, seed, len, mut cuts } => {
                        let p = family(seed, len);
                        cuts.push(len);
                        cuts.retain(|&x| x <= len);
                        cuts.sort_unstable();
                        cuts.dedup();
                        let cuts: Vec<usize> = cuts.into_iter().map(usize::from).collect();
                        cache_prompt(&c, &m, &scope.to_string(), &p, &cuts);
                    }
                    Op::Lookup { scope, seed, len } => {
                        let p = family(seed, len);
                        if let Some(hit) = c.lookup(&scope.to_string(), &p, p.len()) {
                            let want = scope.to_string();
                            proptest::prop_assert_eq!(&*hit.scope, want.as_str());
                            let mut toks = hit.tokens.clone();
                            let mut at = hit.parent.clone();
                            while let Some(n) = at {
                                toks.splice(0..0, n.tokens.iter().copied());
                                at = n.parent.clone();
                            }
                            proptest::prop_assert_eq!(&toks[..], &p[..hit.end()]);
                            proptest::prop_assert_eq!(hit.state(&m).unwrap().len(), hit.end());
                        }
                    }
                    Op::Pin { scope, seed, len } => {
                        let p = family(seed, len);
                        let mut st = SeqState::new(&m);
                        feed(&m, &mut st, &p);
                        let pin = c.pin(&scope.to_string().into(), None, &p, &st);
                        proptest::prop_assert!(pin.is_some());
                        pins.extend(pin);
                    }
                    Op::Unpin(i) => {
                        if !pins.is_empty() {
                            pins.remove(usize::from(i) % pins.len());
                        }
                    }
                    Op::Limit(b) => c.set_limit(u64::from(b % 64) << 15),
                }
                let ix = c.lock();
                let sum: u64 = ix.entries.values().map(|e| e.bytes).sum();
                proptest::prop_assert_eq!(sum, ix.bytes);
                proptest::prop_assert_eq!(ix.scope_bytes.values().sum::<u64>(), ix.bytes);
                let pinned: u64 = ix.entries.values().filter(|e| e.pins > 0).map(|e| e.bytes).sum();
                for e in ix.entries.values() {
                    if let Some(p) = &e.node.parent {
                        proptest::prop_assert!(ix.entries.contains_key(&p.id));
                    }
                }
                for p in &pins {
                    proptest::prop_assert!(ix.entries.contains_key(&p.node.id), "a pinned entry was evicted");
                }
                // After a limit change the cache fits it, unless only pinned
                // entries (and their chains) remain.
                if limited {
                    let evictable = ix.entries.values().any(|e| e.children.is_empty() && e.pins == 0);
                    proptest::prop_assert!(ix.bytes <= ix.limit || !evictable,
                        "{} bytes ({} pinned), limit {}", ix.bytes, pinned, ix.limit);
                }
            }
        }
    }
}
