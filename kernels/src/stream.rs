//! The rate the pool's threads read memory with nothing else to do: the
//! ceiling for decode, whose products read each weight once per token, so
//! a decode rate can be put as a share of what the machine could stream.

use crate::pool::ThreadPool;

/// Bytes each hand-out covers: long runs, as a product's rows are, so the
/// hardware prefetchers see streams.
const RUN: usize = 1 << 20;

/// Reads every byte of `parts` once on all the pool's threads and returns
/// the wrapping sum of their 8-byte little-endian words (a last partial
/// word of a part zero-padded), so the reads cannot be optimized away.
pub fn read_all(pool: &ThreadPool, parts: &[&[u8]]) -> u64 {
    // (part, first byte) of every run; runs start at multiples of RUN, so
    // of 8, and the words each run sums are whole words of its part.
    let runs: Vec<(usize, usize)> = parts
        .iter()
        .enumerate()
        .flat_map(|(p, b)| (0..b.len()).step_by(RUN).map(move |at| (p, at)))
        .collect();
    let total = std::sync::atomic::AtomicU64::new(0);
    pool.for_chunks(runs.len(), 1, &|range| {
        let mut sum = 0u64;
        for &(p, at) in &runs[range] {
            let b = parts[p];
            sum = sum.wrapping_add(word_sum(&b[at..(at + RUN).min(b.len())]));
        }
        total.fetch_add(sum, std::sync::atomic::Ordering::Relaxed);
    });
    total.into_inner()
}

/// The wrapping sum of `b`'s 8-byte little-endian words, eight lanes at a
/// time (one cache line per step) so the compiler keeps it in vectors.
fn word_sum(b: &[u8]) -> u64 {
    let mut lanes = [0u64; 8];
    let mut lines = b.chunks_exact(64);
    for line in &mut lines {
        for (lane, w) in lanes.iter_mut().zip(line.chunks_exact(8)) {
            *lane = lane.wrapping_add(u64::from_le_bytes(w.try_into().expect("8-byte word")));
        }
    }
    let mut sum = lanes.iter().fold(0u64, |s, &l| s.wrapping_add(l));
    for w in lines.remainder().chunks(8) {
        let mut word = [0u8; 8];
        word[..w.len()].copy_from_slice(w);
        sum = sum.wrapping_add(u64::from_le_bytes(word));
    }
    sum
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The plain definition: words one by one, a part's tail zero-padded.
    fn naive(parts: &[&[u8]]) -> u64 {
        parts
            .iter()
            .flat_map(|p| p.chunks(8))
            .map(|w| {
                let mut word = [0u8; 8];
                word[..w.len()].copy_from_slice(w);
                u64::from_le_bytes(word)
            })
            .fold(0u64, |s, w| s.wrapping_add(w))
    }

    #[test]
    fn reads_every_byte_of_every_part_once() {
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        let mut bytes = |n: usize| -> Vec<u8> {
            (0..n)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    x as u8
                })
                .collect()
        };
        // Several runs, a run boundary inside a part, odd tails, an empty part.
        let a = bytes(3 * RUN + 77);
        let b = bytes(5);
        let c = bytes(0);
        let d = bytes(RUN);
        let parts: Vec<&[u8]> = vec![&a, &b, &c, &d];
        for threads in [1, 2, 3] {
            let pool = ThreadPool::new(threads);
            assert_eq!(read_all(&pool, &parts), naive(&parts), "{threads} threads");
        }
        // A changed byte anywhere changes the sum: nothing is skipped.
        let mut e = a.clone();
        e[2 * RUN + 70] ^= 1;
        let pool = ThreadPool::new(2);
        assert_ne!(read_all(&pool, &[&e]), read_all(&pool, &[&a]));
    }
}
