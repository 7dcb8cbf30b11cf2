//! The matrix-times-activations driver: `y[t][r] = dot(W[r], A[t])` for a
//! weight matrix in its quantized row format and `n` activation rows already
//! in the paired activation format, split across the worker pool by weight
//! rows. Each output is one call of the same row-dot function whatever the
//! split or batch, so results are batch-invariant.

use crate::pool::ThreadPool;

/// Safe dot products of 1 to [`MAX_W_ROWS_PER_DOT`] weight rows with 1 to
/// [`MAX_ROWS_PER_DOT`] activation rows: `(weight_rows, activation_rows,
/// n_elements, out)`, `out[r * activation_rows.len() + t]`. A (row, token)
/// result must not depend on what else shares the call.
pub type DotFn = fn(&[&[u8]], &[&[u8]], usize, &mut [f32]);

/// Activation rows handed to one [`DotFn`] call.
pub const MAX_ROWS_PER_DOT: usize = 4;
/// Weight rows handed to one [`DotFn`] call (a register tile: each loaded
/// activation block serves both rows).
pub const MAX_W_ROWS_PER_DOT: usize = 2;

/// Shared output pointer for disjoint writes from pool threads.
struct OutPtr(*mut f32);
// SAFETY: threads write disjoint elements (distinct weight rows), and the
// pool's region ends before the owner of the slice uses it again.
unsafe impl Sync for OutPtr {}

/// `y[t * rows + r] = dot(w[r], act[t])`.
#[allow(clippy::too_many_arguments)]
pub fn matmul(
    pool: &ThreadPool,
    kernel: Kernel,
    w: &[u8],
    rows: usize,
    cols: usize,
    row_bytes: usize,
    act: &[u8],
    act_row_bytes: usize,
    n: usize,
    y: &mut [f32],
) {
    assert!(act.len() >= n * act_row_bytes, "activation slice too short");
    let acts = (0..n)
        .map(|t| &act[t * act_row_bytes..(t + 1) * act_row_bytes])
        .collect();
    matmul_many(
        pool,
        &mut [MatJob {
            kernel,
            w,
            rows,
            cols,
            row_bytes,
            acts,
            y,
        }],
    );
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

    fn dot_u8(ws: &[&[u8]], bs: &[&[u8]], _n: usize, out: &mut [f32]) {
        assert!((1..=MAX_W_ROWS_PER_DOT).contains(&ws.len()));
        assert!((1..=MAX_ROWS_PER_DOT).contains(&bs.len()));
        for (ri, a) in ws.iter().enumerate() {
            for (t, b) in bs.iter().enumerate() {
                out[ri * bs.len() + t] = dot_one(a, b);
            }
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
            matmul(
                &pool,
                Kernel::Rows(dot_u8),
                &w,
                rows,
                cols,
                cols,
                &a,
                cols,
                n,
                &mut y,
            );
            assert_eq!(y, want, "{threads} threads");
        }
    }
}

/// How one product's rows are computed: chosen by
/// [`crate::dispatch::kernel`] for the weight type and ISA.
#[derive(Clone, Copy)]
pub enum Kernel {
    /// Row dots, 1-2 weight rows x 1-4 activation rows per call.
    Rows(DotFn),
    /// Panels of 16 weight rows x every token (AVX-512 VNNI, or AVX2 in
    /// two groups of 8).
    Panel(PanelKernel),
}

/// A panel kernel; only [`crate::dispatch`] makes one, after detecting the
/// CPU features it needs.
#[derive(Clone, Copy)]
pub struct PanelKernel {
    #[cfg(target_arch = "x86_64")]
    pub(crate) format: PanelFormat,
    #[cfg(not(target_arch = "x86_64"))]
    pub(crate) never: std::convert::Infallible,
}

/// The weight formats with panel kernels.
#[cfg(target_arch = "x86_64")]
#[derive(Clone, Copy)]
pub(crate) enum PanelFormat {
    Legacy(crate::x86::avx512::Format),
    /// 8-row groups on AVX2 (`x86/avx2.rs`), the same bits as `Legacy`.
    Avx2(crate::x86::avx512::Format),
    K(crate::x86::avx512k::KFormat),
    /// 8-row k-quant groups on AVX2 (`x86/avx2k.rs`), the same bits as `K`.
    Avx2K(crate::x86::avx512k::KFormat),
    /// Rows streamed in 16-block chunks on AVX-512 VNNI/VBMI with GFNI
    /// (`x86/avx512s.rs`), the same bits as `Legacy`.
    Stream(crate::x86::avx512::Format),
    /// Q4_K rows streamed two super-blocks at a time on AVX-512
    /// VNNI/VBMI with GFNI (`x86/avx512sk.rs`), the same bits as `K`.
    StreamK(crate::x86::avx512k::KFormat),
    /// Q4_0 matrices repacked into the AVX-512 panels' layout at load
    /// (`x86/avx512r.rs`: the job's `w` is a `Repacked`'s bytes), the same
    /// bits as `Legacy`.
    Repacked,
    /// Q4_K / Q5_K matrices repacked with their blocks' dwords in lanes
    /// (`Repacked::dwords`, `avx512k::repacked_panel`), the same bits as `K`.
    RepackedK(crate::x86::avx512k::KFormat),
}

/// With many tokens, work units are dealt a few at a time: each panel
/// prefetches the next while it computes, which pays when the next is the
/// same thread's.
const UNITS_PER_PREFILL_CHUNK: usize = 4;
/// Weight rows per work unit: a panel, or 8 two-row tiles.
const UNIT_ROWS: usize = 16;
/// With more tokens than this, work units are dealt a few at a time (each
/// is long and their costs differ with each job's token count).
const FEW_TOKENS: usize = 4;

/// One matrix product of a fused batch: `y[t * rows + r] = dot(W[r], acts[t])`.
pub struct MatJob<'a> {
    pub kernel: Kernel,
    pub w: &'a [u8],
    pub rows: usize,
    pub cols: usize,
    pub row_bytes: usize,
    /// Activation rows, already in the format the kernel expects.
    pub acts: Vec<&'a [u8]>,
    pub y: &'a mut [f32],
}

/// What a panel product needs beside the activation rows.
#[cfg(target_arch = "x86_64")]
enum Side {
    None,
    Sums(crate::x86::avx512::ActSums),
    Stream(crate::x86::avx512s::StreamActs),
    StreamK(crate::x86::avx512sk::KStreamActs),
}

#[cfg(target_arch = "x86_64")]
fn side(job: &MatJob<'_>) -> Side {
    match job.kernel {
        Kernel::Rows(_) => Side::None,
        Kernel::Panel(PanelKernel {
            format: PanelFormat::Legacy(f) | PanelFormat::Avx2(f),
        }) => Side::Sums(crate::x86::avx512::ActSums::new(
            f,
            &job.acts,
            job.cols / 32,
        )),
        Kernel::Panel(PanelKernel {
            format: PanelFormat::Repacked,
        }) => Side::Sums(crate::x86::avx512::ActSums::new(
            crate::x86::avx512::Format::Q4_0,
            &job.acts,
            job.cols / 32,
        )),
        Kernel::Panel(PanelKernel {
            format: PanelFormat::Stream(_),
        }) => Side::Stream(crate::x86::avx512s::StreamActs::new(
            &job.acts,
            job.cols / 32,
        )),
        Kernel::Panel(PanelKernel {
            format: PanelFormat::StreamK(f),
        }) => Side::StreamK(crate::x86::avx512sk::KStreamActs::new(
            f,
            &job.acts,
            job.cols / 256,
        )),
        Kernel::Panel(_) => Side::None,
    }
}

/// Runs several independent matrix products in one parallel region: their
/// rows are dealt out together in units of 16, so small products (an
/// expert's slices, the q/k/v projections) keep every thread busy and pay
/// for one hand-off, not one each. Each output is computed by the same
/// operations whatever the split or batch.
pub fn matmul_many(pool: &ThreadPool, jobs: &mut [MatJob<'_>]) {
    let mut starts = Vec::with_capacity(jobs.len() + 1);
    let mut total = 0;
    let mut max_n = 0;
    for j in jobs.iter() {
        assert!(j.w.len() >= j.rows * j.row_bytes, "weight slice too short");
        assert_eq!(
            j.y.len(),
            j.acts.len() * j.rows,
            "output has the wrong size"
        );
        starts.push(total);
        total += j.rows.div_ceil(UNIT_ROWS);
        max_n = max_n.max(j.acts.len());
    }
    starts.push(total);
    if total == 0 {
        return;
    }
    #[cfg(target_arch = "x86_64")]
    let sides: Vec<Side> = jobs.iter().map(side).collect();
    let outs: Vec<OutPtr> = jobs.iter_mut().map(|j| OutPtr(j.y.as_mut_ptr())).collect();
    let jobs = &*jobs;
    let (outs, starts) = (&outs, &starts);
    #[cfg(target_arch = "x86_64")]
    let sides = &sides;
    let unit = |range: std::ops::Range<usize>| {
        // The range's units job by job: one search per job it touches.
        let mut first = range.start;
        while first < range.end {
            let k = starts.partition_point(|&s| s <= first) - 1;
            let (job, units) = (&jobs[k], first..range.end.min(starts[k + 1]));
            first = units.end;
            if job.acts.is_empty() {
                continue;
            }
            for u in units {
                let r0 = (u - starts[k]) * UNIT_ROWS;
                let rows = (job.rows - r0).min(UNIT_ROWS);
                let store = |r: usize, t: usize, v: f32| {
                    debug_assert!(r < job.rows && t < job.acts.len());
                    // SAFETY: r < job.rows and t < job.acts.len(), so the index is
                    // inside job k's output (checked above); each (job, row) is
                    // in exactly one unit, handed to one thread, and every output
                    // slice is exclusively borrowed here.
                    unsafe { *outs[k].0.add(t * job.rows + r) = v };
                };
                match job.kernel {
                    Kernel::Rows(dot) => rows_unit(job, dot, r0, rows, &store),
                    #[cfg(target_arch = "x86_64")]
                    Kernel::Panel(p) => {
                        let w = &job.w[r0 * job.row_bytes..];
                        // SAFETY: the results of rows r0..r0 + rows go to
                        // y[t * job.rows + r0 + r], inside job k's output; this
                        // unit is the only writer of those rows (see `store`).
                        let out = unsafe {
                            crate::x86::avx512::Out::raw(
                                outs[k].0.add(r0),
                                job.y.len() - r0,
                                job.rows,
                                rows,
                            )
                        };
                        match (p.format, &sides[k]) {
                            // SAFETY: a Legacy or K PanelKernel exists only after
                            // dispatch found AVX-512 F/BW/VL/VNNI on this CPU.
                            (PanelFormat::Legacy(f), Side::Sums(sums)) => unsafe {
                                crate::x86::avx512::panel(
                                    f,
                                    w,
                                    job.row_bytes,
                                    rows,
                                    &job.acts,
                                    sums,
                                    out,
                                )
                            },
                            // SAFETY: as above.
                            (PanelFormat::K(f), _) => unsafe {
                                crate::x86::avx512k::panel(
                                    f,
                                    w,
                                    job.row_bytes,
                                    rows,
                                    &job.acts,
                                    job.cols / 256,
                                    out,
                                )
                            },
                            // SAFETY: an AVX2 PanelKernel exists only after
                            // dispatch found AVX2/FMA/F16C on this CPU.
                            (PanelFormat::Avx2(f), Side::Sums(sums)) => unsafe {
                                crate::x86::avx2::panel(
                                    f,
                                    w,
                                    job.row_bytes,
                                    rows,
                                    &job.acts,
                                    sums,
                                    out,
                                )
                            },
                            // SAFETY: as above.
                            (PanelFormat::Avx2K(f), _) => unsafe {
                                crate::x86::avx2k::panel(
                                    f,
                                    w,
                                    job.row_bytes,
                                    rows,
                                    &job.acts,
                                    job.cols / 256,
                                    out,
                                )
                            },
                            // SAFETY: a Stream PanelKernel exists only after
                            // dispatch found AVX-512 F/BW/VL/VNNI/VBMI and GFNI.
                            (PanelFormat::Stream(f), Side::Stream(acts)) => unsafe {
                                crate::x86::avx512s::panel(f, w, job.row_bytes, rows, acts, out)
                            },
                            // SAFETY: as for Stream.
                            (PanelFormat::StreamK(f), Side::StreamK(acts)) => unsafe {
                                crate::x86::avx512sk::panel(f, w, job.row_bytes, rows, acts, out)
                            },
                            // SAFETY: a Repacked PanelKernel exists only after
                            // dispatch found AVX-512 F/BW/VL/VNNI; `w` starts at
                            // a panel (r0 is a multiple of 16 rows).
                            (PanelFormat::Repacked, Side::Sums(sums)) => unsafe {
                                crate::x86::avx512r::panel(w, rows, &job.acts, sums, out)
                            },
                            // SAFETY: a RepackedK PanelKernel exists only after
                            // dispatch found AVX-512 F/BW/VL/VNNI; `w` starts at
                            // a panel (r0 is a multiple of 16 rows).
                            (PanelFormat::RepackedK(f), _) => unsafe {
                                crate::x86::avx512k::repacked_panel(
                                    f,
                                    w,
                                    rows,
                                    &job.acts,
                                    job.cols / 256,
                                    out,
                                )
                            },
                            (
                                PanelFormat::Legacy(_)
                                | PanelFormat::Avx2(_)
                                | PanelFormat::Stream(_)
                                | PanelFormat::StreamK(_)
                                | PanelFormat::Repacked,
                                _,
                            ) => {
                                unreachable!("legacy panel jobs get their activation side")
                            }
                        }
                    }
                    #[cfg(not(target_arch = "x86_64"))]
                    Kernel::Panel(p) => match p.never {},
                }
            }
        }
    };
    if max_n > FEW_TOKENS {
        pool.for_chunks(total, UNITS_PER_PREFILL_CHUNK, &unit);
    } else {
        // Decode: long runs of rows per thread (one linear stream each),
        // shrinking at the end so neither thread waits for the other.
        pool.for_chunks_guided(total, 1, &unit);
    }
}

/// Rows `r0..r0 + rows` of `job` by two-row, four-token row dots.
fn rows_unit(
    job: &MatJob<'_>,
    dot: DotFn,
    r0: usize,
    rows: usize,
    store: &dyn Fn(usize, usize, f32),
) {
    let mut vals = [0.0f32; MAX_W_ROWS_PER_DOT * MAX_ROWS_PER_DOT];
    let mut r = r0;
    while r < r0 + rows {
        let nr = (r0 + rows - r).min(MAX_W_ROWS_PER_DOT);
        let wrows = [
            &job.w[r * job.row_bytes..(r + 1) * job.row_bytes],
            &job.w[(r + nr - 1) * job.row_bytes..(r + nr) * job.row_bytes],
        ];
        for (gi, group) in job.acts.chunks(MAX_ROWS_PER_DOT).enumerate() {
            let m = group.len();
            dot(&wrows[..nr], group, job.cols, &mut vals[..nr * m]);
            for ri in 0..nr {
                for (i, &v) in vals[ri * m..(ri + 1) * m].iter().enumerate() {
                    store(r + ri, gi * MAX_ROWS_PER_DOT + i, v);
                }
            }
        }
        r += nr;
    }
}

#[cfg(test)]
mod many_tests {
    use super::*;

    fn dot_sum(ws: &[&[u8]], bs: &[&[u8]], _n: usize, out: &mut [f32]) {
        for (ri, a) in ws.iter().enumerate() {
            for (t, b) in bs.iter().enumerate() {
                out[ri * bs.len() + t] = a
                    .iter()
                    .zip(b.iter())
                    .map(|(&x, &y)| f32::from(x) * f32::from(y))
                    .sum();
            }
        }
    }

    #[test]
    fn fused_products_equal_separate_ones() {
        let shapes = [(5usize, 3usize), (40, 1), (1, 6), (17, 4)];
        let cols = 8;
        let ws: Vec<Vec<u8>> = shapes
            .iter()
            .enumerate()
            .map(|(k, &(r, _))| (0..r * cols).map(|i| ((i + k) * 7 % 13) as u8).collect())
            .collect();
        let xs: Vec<Vec<u8>> = shapes
            .iter()
            .enumerate()
            .map(|(k, &(_, n))| (0..n * cols).map(|i| ((i + 3 * k) % 11) as u8).collect())
            .collect();
        for threads in [1, 2, 3] {
            let pool = ThreadPool::new(threads);
            let mut want: Vec<Vec<f32>> = Vec::new();
            for (k, &(rows, n)) in shapes.iter().enumerate() {
                let mut y = vec![0.0; rows * n];
                matmul(
                    &pool,
                    Kernel::Rows(dot_sum),
                    &ws[k],
                    rows,
                    cols,
                    cols,
                    &xs[k],
                    cols,
                    n,
                    &mut y,
                );
                want.push(y);
            }
            let mut got: Vec<Vec<f32>> =
                shapes.iter().map(|&(r, n)| vec![f32::NAN; r * n]).collect();
            let mut jobs: Vec<MatJob> = got
                .iter_mut()
                .enumerate()
                .map(|(k, y)| MatJob {
                    kernel: Kernel::Rows(dot_sum),
                    w: &ws[k],
                    rows: shapes[k].0,
                    cols,
                    row_bytes: cols,
                    acts: xs[k].chunks(cols).collect(),
                    y,
                })
                .collect();
            matmul_many(&pool, &mut jobs);
            drop(jobs);
            assert_eq!(got, want, "{threads} threads");
        }
    }
}
