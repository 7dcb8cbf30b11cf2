//! Byte-pair encoding of one pre-token, as llama.cpp's
//! `llm_tokenizer_bpe_session` does it: lowest merge rank first, ties to the
//! leftmost pair, over a linked list of symbols and a heap of candidate pairs.
//!
//! Symbols are token ids rather than strings (every merge's parts and result
//! are tokens, checked at load), so each step is O(log n) and a pre-token of
//! any length costs O(n log n).

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};

/// Merge table: `(left, right)` token ids to `(rank, merged id)`.
pub type Merges = HashMap<(u32, u32), (u32, u32)>;

/// Marks a byte that has no token of its own: it merges with nothing and is
/// dropped from the output, as llama.cpp drops it.
const NO_TOKEN: u32 = u32::MAX;
const NONE: u32 = u32::MAX;

#[derive(Clone, Copy, Debug)]
struct Symbol {
    id: u32,
    prev: u32,
    next: u32,
    alive: bool,
}

/// Buffers reused across the pre-tokens of one `encode` call.
#[derive(Default)]
pub struct Scratch {
    symbols: Vec<Symbol>,
    /// `(rank, left symbol, right symbol)`, smallest first.
    heap: BinaryHeap<Reverse<(u32, u32, u32)>>,
}

/// Appends the tokens of `word` (the raw bytes of one pre-token) to `out`.
pub fn merge_word(
    word: &[u8],
    byte_ids: &[Option<u32>; 256],
    merges: &Merges,
    scratch: &mut Scratch,
    out: &mut Vec<u32>,
) {
    let Scratch { symbols, heap } = scratch;
    symbols.clear();
    heap.clear();
    // Indices are u32: a pre-token longer than 4 GiB cannot occur, since the
    // text of one encode call is itself a `&str` we hold in memory, but stay
    // total anyway by encoding such a word in 4 GiB pieces.
    if word.len() >= NONE as usize {
        for part in word.chunks(NONE as usize - 1) {
            merge_word(part, byte_ids, merges, scratch, out);
        }
        return;
    }
    let n = word.len() as u32;
    symbols.extend(word.iter().enumerate().map(|(i, &b)| Symbol {
        id: byte_ids[usize::from(b)].unwrap_or(NO_TOKEN),
        prev: if i == 0 { NONE } else { i as u32 - 1 },
        next: if i as u32 + 1 == n {
            NONE
        } else {
            i as u32 + 1
        },
        alive: true,
    }));
    let rank_of = |symbols: &[Symbol], left: u32, right: u32| -> Option<(u32, u32)> {
        let (l, r) = (symbols[left as usize].id, symbols[right as usize].id);
        if l == NO_TOKEN || r == NO_TOKEN {
            return None;
        }
        merges.get(&(l, r)).copied()
    };
    for left in 1..n {
        if let Some((rank, _)) = rank_of(symbols, left - 1, left) {
            heap.push(Reverse((rank, left - 1, left)));
        }
    }
    while let Some(Reverse((rank, left, right))) = heap.pop() {
        let (l, r) = (symbols[left as usize], symbols[right as usize]);
        // Stale when either side has merged since the pair was queued.
        if !l.alive || !r.alive || l.next != right {
            continue;
        }
        let Some((now_rank, merged)) = rank_of(symbols, left, right) else {
            continue;
        };
        if now_rank != rank {
            continue;
        }
        symbols[left as usize].id = merged;
        symbols[left as usize].next = r.next;
        symbols[right as usize].alive = false;
        if r.next != NONE {
            symbols[r.next as usize].prev = left;
        }
        if l.prev != NONE
            && let Some((rank, _)) = rank_of(symbols, l.prev, left)
        {
            heap.push(Reverse((rank, l.prev, left)));
        }
        if r.next != NONE
            && let Some((rank, _)) = rank_of(symbols, left, r.next)
        {
            heap.push(Reverse((rank, left, r.next)));
        }
    }
    out.extend(
        symbols
            .iter()
            .filter(|s| s.alive && s.id != NO_TOKEN)
            .map(|s| s.id),
    );
}
