//! Matrices repacked into the AVX-512 panels' lane layouts: Q4_0 into the
//! Q4_0 panels' (`Repacked::new`; products in `x86::avx512r`), Q4_K and Q5_K
//! with their blocks' dwords in lanes (`Repacked::dwords`; products in
//! `x86::avx512k::repacked_panel`). Layouts and builders are plain byte
//! moves any CPU runs; `dispatch::repacked_kernel` says whether this CPU
//! has the products. The engine repacks the dense matrices every token reads once, at
//! load, and multiplies those copies instead of the file's rows.

/// Rows per panel: one per 32-bit lane of a zmm register.
const PANEL: usize = 16;
/// Bytes of a Q4_0 block: an f16 scale and 16 bytes of nibbles.
const Q4_0_BYTES: usize = 18;
/// Bytes of a panel's block: four 64-byte registers of quant dwords (lane
/// `r`: row `r`'s dword `k`, both nibbles), and 16 f16 scales.
pub(crate) const QUANT_BYTES: usize = 256;
pub(crate) const SCALE_BYTES: usize = 32;
const _: () = assert!(QUANT_BYTES + SCALE_BYTES == PANEL * Q4_0_BYTES);

/// A Q4_0 matrix in panel order: panel `p` (rows `16p..16p + 16`) is
/// `nb * 288` bytes at `p * 16 * row_bytes`, its `nb` blocks' quant
/// registers (256 bytes each) and scales (32 bytes each) where `offsets`
/// puts them. Rows past the matrix in the last panel are zeros (their
/// results are never stored). Row `r`'s panel thus starts at `r * row_bytes` for `r` a
/// multiple of 16, as in the file, so a product's work units address it as
/// they address the file's rows.
pub struct Repacked {
    buf: Vec<u8>,
    /// Where the 64-byte aligned data starts in `buf`.
    at: usize,
    len: usize,
    rows: usize,
    row_bytes: usize,
}

impl Repacked {
    /// Repacks `rows` Q4_0 rows of `nb` blocks each, `row_bytes` apart in
    /// `w`, into the Q4_0 panels' layout (plain byte moves: any CPU can
    /// build it).
    ///
    /// # Panics
    /// If `w` is shorter than the rows or `row_bytes` shorter than `nb`
    /// blocks.
    pub fn new(w: &[u8], rows: usize, row_bytes: usize, nb: usize) -> Repacked {
        Repacked::build(w, rows, row_bytes, nb, Q4_0_BYTES, |panel, i, r, b| {
            let (quants, scales) = offsets(nb, i);
            panel[scales + 2 * r..][..2].copy_from_slice(&b[..2]);
            for k in 0..4 {
                let to = quants + 64 * k + 4 * r;
                panel[to..to + 4].copy_from_slice(&b[2 + 4 * k..6 + 4 * k]);
            }
        })
    }

    /// The rows' panels, 64-byte aligned and zeroed, with `place(panel, i,
    /// r, block)` called for block `i` of each panel's row `r`.
    fn build(
        w: &[u8],
        rows: usize,
        row_bytes: usize,
        nb: usize,
        block_bytes: usize,
        place: impl Fn(&mut [u8], usize, usize, &[u8]),
    ) -> Repacked {
        assert!(row_bytes >= nb * block_bytes, "row shorter than its blocks");
        assert!(
            rows == 0 || w.len() >= (rows - 1) * row_bytes + nb * block_bytes,
            "matrix past the weights"
        );
        let panel_bytes = PANEL * row_bytes;
        let len = rows.div_ceil(PANEL) * panel_bytes;
        let mut buf = vec![0u8; len + 63];
        let at = buf.as_ptr().align_offset(64).min(63);
        for (p, panel) in buf[at..at + len].chunks_exact_mut(panel_bytes).enumerate() {
            for r in 0..PANEL.min(rows - p * PANEL) {
                let row = &w[(p * PANEL + r) * row_bytes..][..nb * block_bytes];
                for (i, b) in row.chunks_exact(block_bytes).enumerate() {
                    place(panel, i, r, b);
                }
            }
        }
        Repacked {
            buf,
            at,
            len,
            rows,
            row_bytes,
        }
    }

    /// Repacks `rows` rows of `nb` k-quant blocks of `block_bytes` each
    /// (`row_bytes` apart in `w`) with each block's dwords in lanes: per
    /// panel and block, register `d` (64 bytes) holds bytes `4d..4d + 4` of
    /// the 16 rows' block, lane `r` row `r`'s (zeros past the block's end
    /// and past the matrix). For Q4_K (144) and Q5_K (176) that is the
    /// file's bytes again, so a panel starts at `16 * row_bytes`; the
    /// products (`x86::avx512k::repacked_panel`) then skip the transposes.
    ///
    /// # Panics
    /// If `w` is shorter than the rows, `row_bytes` shorter than `nb`
    /// blocks, or `block_bytes` not a multiple of 4.
    pub fn dwords(
        w: &[u8],
        rows: usize,
        row_bytes: usize,
        nb: usize,
        block_bytes: usize,
    ) -> Repacked {
        assert!(block_bytes.is_multiple_of(4), "blocks of whole dwords only");
        let regs = block_bytes / 4;
        Repacked::build(w, rows, row_bytes, nb, block_bytes, |panel, i, r, b| {
            for (d, dw) in b.chunks_exact(4).enumerate() {
                let to = (i * regs + d) * 64 + 4 * r;
                panel[to..to + 4].copy_from_slice(dw);
            }
        })
    }

    /// The repacked bytes: `x86::avx512r::panel`'s input, `row_bytes` per row as in the
    /// file (a whole number of panels).
    pub fn bytes(&self) -> &[u8] {
        &self.buf[self.at..self.at + self.len]
    }

    /// The matrix's rows.
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Bytes between rows, as in the file.
    pub fn row_bytes(&self) -> usize {
        self.row_bytes
    }
}

/// Where block `i` of a panel of `nb` blocks keeps its quant registers and
/// its scales: blocks go in pairs, 576 bytes (nine cache lines) each, the
/// two blocks' quants then their scales, so a panel is one sequential
/// stream of whole lines (scales in a separate area were a second stream
/// that stalled 1-token products from DRAM at half the read rate); an odd
/// last block is alone, its scales after its quants.
#[inline]
pub(crate) fn offsets(nb: usize, i: usize) -> (usize, usize) {
    let pair = i / 2;
    let base = pair * 2 * (QUANT_BYTES + SCALE_BYTES);
    let in_pair = (nb - 2 * pair).min(2);
    (
        base + (i % 2) * QUANT_BYTES,
        base + in_pair * QUANT_BYTES + (i % 2) * SCALE_BYTES,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_byte_of_every_block_lands_once() {
        // 37 rows (a partial panel), odd and even block counts, padded rows.
        for (nb, pad) in [(1, 0), (2, 5), (7, 0), (8, 18)] {
            let row_bytes = nb * Q4_0_BYTES + pad;
            let rows = 37;
            let w: Vec<u8> = (0..rows * row_bytes)
                .map(|i| (i * 31 % 251) as u8)
                .collect();
            let r = Repacked::new(&w, rows, row_bytes, nb);
            let b = r.bytes();
            assert_eq!(b.len(), rows.div_ceil(PANEL) * PANEL * row_bytes);
            assert_eq!(b.as_ptr() as usize % 64, 0, "aligned");
            for row in 0..rows {
                let (p, lane) = (row / PANEL, row % PANEL);
                let panel = &b[p * PANEL * row_bytes..];
                for i in 0..nb {
                    let blk = &w[row * row_bytes + i * Q4_0_BYTES..][..Q4_0_BYTES];
                    let (q, s) = offsets(nb, i);
                    assert_eq!(&panel[s + 2 * lane..][..2], &blk[..2], "scale {row} {i}");
                    for k in 0..4 {
                        assert_eq!(
                            &panel[q + 64 * k + 4 * lane..][..4],
                            &blk[2 + 4 * k..6 + 4 * k],
                            "quants {row} {i} {k}"
                        );
                    }
                }
            }
            // The blocks tile the panel: nb * 288 bytes, no overlap.
            let mut seen = vec![0u8; nb * (QUANT_BYTES + SCALE_BYTES)];
            for i in 0..nb {
                let (q, s) = offsets(nb, i);
                seen[q..q + QUANT_BYTES].iter_mut().for_each(|x| *x += 1);
                seen[s..s + SCALE_BYTES].iter_mut().for_each(|x| *x += 1);
            }
            assert!(seen.iter().all(|&x| x == 1), "nb {nb}");
        }
    }

    #[test]
    fn k_quant_dwords_land_in_their_lanes() {
        // Q4_K-sized blocks (144 bytes), 37 rows, padded rows.
        for (nb, pad) in [(1, 0), (3, 16)] {
            let (bytes, rows) = (144, 37);
            let row_bytes = nb * bytes + pad;
            let w: Vec<u8> = (0..rows * row_bytes)
                .map(|i| (i * 17 % 253) as u8)
                .collect();
            let r = Repacked::dwords(&w, rows, row_bytes, nb, bytes);
            let b = r.bytes();
            assert_eq!(b.len(), rows.div_ceil(PANEL) * PANEL * row_bytes);
            assert_eq!(b.as_ptr() as usize % 64, 0, "aligned");
            for row in 0..rows {
                let (p, lane) = (row / PANEL, row % PANEL);
                for i in 0..nb {
                    for d in 0..bytes / 4 {
                        let at = p * PANEL * row_bytes + (i * bytes / 4 + d) * 64 + 4 * lane;
                        let from = row * row_bytes + i * bytes + 4 * d;
                        assert_eq!(&b[at..at + 4], &w[from..from + 4], "{row} {i} {d}");
                    }
                }
            }
            // Lanes past the matrix are zeros.
            let last = (rows - 1) / PANEL * PANEL * row_bytes;
            assert!(
                b[last..last + 64][4 * (rows % PANEL)..]
                    .iter()
                    .all(|&x| x == 0)
            );
        }
    }
}
