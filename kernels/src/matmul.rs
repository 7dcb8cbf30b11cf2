//! The matrix-times-activations driver: `y[t][r] = dot(W[r], A[t])` for a
//! weight matrix in its quantized row format and `n` activation rows already
//! in the paired activation format, split across the worker pool by weight
//! rows. Each output is one call of the same row-dot function whatever the
//! split or batch, so results are batch-invariant.

use crate::pool::ThreadPool;

/// Safe row dot products of one weight row with 1 to [`MAX_ROWS_PER_DOT`]
/// activation rows: `(weight_row, activation_rows, n_elements, out)`. A row's
/// result must not depend on how many others share the call.
pub type DotFn = fn(&[u8], &[&[u8]], usize, &mut [f32]);

/// Activation rows handed to one [`DotFn`] call.
pub const MAX_ROWS_PER_DOT: usize = 4;

/// Shared output pointer for disjoint writes from pool threads.
struct OutPtr(*mut f32);
// SAFETY: threads write disjoint elements (distinct weight rows), and the
// pool's region ends before the owner of the slice uses it again.
unsafe impl Sync for OutPtr {}

/// Weight rows are handed out in about this many chunks per thread: few, so
/// each thread streams long contiguous runs of the matrix (what the memory
/// system rewards in decode), more than one, so uneven progress balances.
const CHUNKS_PER_THREAD: usize = 2;
/// Never hand out fewer rows than this at a time.
const MIN_ROWS_PER_CHUNK: usize = 16;

/// `y[t * rows + r] = dot(w[r], act[t])`.
#[allow(clippy::too_many_arguments)]
pub fn matmul(
    pool: &ThreadPool,
    dot: DotFn,
    w: &[u8],
    rows: usize,
    cols: usize,
    row_bytes: usize,
    act: &[u8],
    act_row_bytes: usize,
    n: usize,
    y: &mut [f32],
) {
    assert!(w.len() >= rows * row_bytes, "weight slice too short");
    assert!(act.len() >= n * act_row_bytes, "activation slice too short");
    assert_eq!(y.len(), n * rows, "output has the wrong size");
    let out = OutPtr(y.as_mut_ptr());
    let out = &out;
    let acts: Vec<&[u8]> = (0..n)
        .map(|t| &act[t * act_row_bytes..(t + 1) * act_row_bytes])
        .collect();
    let chunk = rows
        .div_ceil(pool.n_threads() * CHUNKS_PER_THREAD)
        .max(MIN_ROWS_PER_CHUNK);
    pool.for_chunks(rows, chunk, &|range| {
        let mut vals = [0.0f32; MAX_ROWS_PER_DOT];
        for r in range {
            let wr = &w[r * row_bytes..(r + 1) * row_bytes];
            for (g, group) in acts.chunks(MAX_ROWS_PER_DOT).enumerate() {
                dot(wr, group, cols, &mut vals[..group.len()]);
                for (k, &v) in vals[..group.len()].iter().enumerate() {
                    let t = g * MAX_ROWS_PER_DOT + k;
                    // SAFETY: r < rows and t < n, so the index is inside `y`
                    // (length n * rows, checked above); no other thread writes
                    // row r, and `y` is exclusively borrowed for this call.
                    unsafe { *out.0.add(t * rows + r) = v };
                }
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dot_one(a: &[u8], b: &[u8]) -> f32 {
        a.iter()
            .zip(b)
            .map(|(&x, &y)| f32::from(x) * f32::from(y))
            .sum()
    }

    fn dot_u8(a: &[u8], bs: &[&[u8]], _n: usize, out: &mut [f32]) {
        assert!((1..=MAX_ROWS_PER_DOT).contains(&bs.len()));
        for (b, o) in bs.iter().zip(out) {
            *o = dot_one(a, b);
        }
    }

    #[test]
    fn every_output_is_the_row_dot_whatever_the_threads() {
        let (rows, cols, n) = (37, 8, 5);
        let w: Vec<u8> = (0..rows * cols).map(|i| (i * 7 % 13) as u8).collect();
        let a: Vec<u8> = (0..n * cols).map(|i| (i * 3 % 11) as u8).collect();
        let mut want = vec![0.0; n * rows];
        for t in 0..n {
            for r in 0..rows {
                want[t * rows + r] =
                    dot_one(&w[r * cols..(r + 1) * cols], &a[t * cols..(t + 1) * cols]);
            }
        }
        for threads in [1, 2, 3] {
            let pool = ThreadPool::new(threads);
            let mut y = vec![f32::NAN; n * rows];
            matmul(&pool, dot_u8, &w, rows, cols, cols, &a, cols, n, &mut y);
            assert_eq!(y, want, "{threads} threads");
        }
    }
}
