//! Row-dot functions per (weight type, ISA), looked up once per matmul, and
//! the activation format each weight type is multiplied against. The SIMD
//! entries are safe wrappers around `#[target_feature]` kernels and are
//! handed out only for an ISA that [`Isa::available`] confirmed.

use crate::isa::Isa;
#[cfg(target_arch = "x86_64")]
use crate::matmul::PanelFormat;
#[cfg(target_arch = "x86_64")]
use crate::matmul::PanelKernel;
use crate::matmul::{DotFn, Kernel};
use crate::scalar;
use crate::types::{ActType, WeightType};
#[cfg(target_arch = "x86_64")]
use crate::x86::avx512::{ActSums, Format, Out, PANEL};
#[cfg(target_arch = "x86_64")]
use crate::x86::avx512k::KFormat;
use half::{bf16, f16};

/// The activation format used against `ty`: llama.cpp's pairing for the
/// quantized types (Q8_0, Q8_1, Q8_K), but f32 for float weights, where
/// ggml would round activations to f16/bf16 (we compute more exactly).
pub fn act_type_for(ty: WeightType) -> ActType {
    match ty {
        WeightType::F32 | WeightType::F16 | WeightType::BF16 => ActType::F32,
        q => q.act_type(),
    }
}

fn f32s(b: &[u8]) -> impl Iterator<Item = f32> + '_ {
    b.chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
}

/// Applies a one-row, one-token dot to every (weight row, activation row).
macro_rules! each {
    ($name:ident, |$w:ident, $x:ident, $n:ident| $body:expr) => {
        fn $name(ws: &[&[u8]], xs: &[&[u8]], $n: usize, out: &mut [f32]) {
            for (ri, $w) in ws.iter().enumerate() {
                for (t, $x) in xs.iter().enumerate() {
                    out[ri * xs.len() + t] = $body;
                }
            }
        }
    };
}

each!(dot_f32, |w, x, _n| f32s(w)
    .zip(f32s(x))
    .map(|(a, b)| a * b)
    .sum());
each!(dot_f16, |w, x, _n| {
    w.chunks_exact(2)
        .map(|c| f16::from_le_bytes([c[0], c[1]]).to_f32())
        .zip(f32s(x))
        .map(|(a, b)| a * b)
        .sum()
});
each!(dot_bf16, |w, x, _n| {
    w.chunks_exact(2)
        .map(|c| bf16::from_le_bytes([c[0], c[1]]).to_f32())
        .zip(f32s(x))
        .map(|(a, b)| a * b)
        .sum()
});
each!(ref_q4_0, |w, x, n| scalar::vec_dot(
    WeightType::Q4_0,
    w,
    x,
    n
));
each!(ref_q4_1, |w, x, n| scalar::vec_dot(
    WeightType::Q4_1,
    w,
    x,
    n
));
each!(ref_q5_0, |w, x, n| scalar::vec_dot(
    WeightType::Q5_0,
    w,
    x,
    n
));
each!(ref_q5_1, |w, x, n| scalar::vec_dot(
    WeightType::Q5_1,
    w,
    x,
    n
));
each!(ref_q8_0, |w, x, n| scalar::vec_dot(
    WeightType::Q8_0,
    w,
    x,
    n
));
each!(ref_q4k, |w, x, n| scalar::vec_dot(WeightType::Q4K, w, x, n));
each!(ref_q5k, |w, x, n| scalar::vec_dot(WeightType::Q5K, w, x, n));
each!(ref_q6k, |w, x, n| scalar::vec_dot(WeightType::Q6K, w, x, n));

#[cfg(target_arch = "x86_64")]
fn q4_0_avx2(ws: &[&[u8]], xs: &[&[u8]], n: usize, out: &mut [f32]) {
    panel_rows(PanelFormat::Avx2(Format::Q4_0), ws, xs, n, out)
}

#[cfg(target_arch = "x86_64")]
fn q8_0_avx2(ws: &[&[u8]], xs: &[&[u8]], n: usize, out: &mut [f32]) {
    panel_rows(PanelFormat::Avx2(Format::Q8_0), ws, xs, n, out)
}

/// A panel kernel's results for up to two arbitrary rows, through the
/// same code as whole panels (bit-identical to them).
#[cfg(target_arch = "x86_64")]
fn panel_rows(kind: PanelFormat, ws: &[&[u8]], xs: &[&[u8]], n: usize, out: &mut [f32]) {
    let format = match kind {
        PanelFormat::Legacy(f) | PanelFormat::Avx2(f) => f,
        PanelFormat::K(_)
        | PanelFormat::Avx2K(_)
        | PanelFormat::Stream(_)
        | PanelFormat::StreamK(_)
        | PanelFormat::Repacked
        | PanelFormat::RepackedK(_) => {
            unreachable!(
                "k-quant panels go through kpanel_rows; stream and repacked kernels are not row dots"
            )
        }
    };
    let sums = ActSums::new(format, xs, n / 32);
    let mut tmp = vec![0.0f32; xs.len() * PANEL];
    for (ri, w) in ws.iter().enumerate() {
        let dst = Out::new(&mut tmp, PANEL, 1);
        match kind {
            // SAFETY: handed out by `dot_fn` only when `panel_available()`.
            PanelFormat::Legacy(_) => unsafe {
                crate::x86::avx512::panel(format, w, w.len(), 1, xs, &sums, dst)
            },
            // SAFETY: handed out by `dot_fn` only when `avx2_panel_format`
            // found AVX2/FMA/F16C.
            _ => unsafe { crate::x86::avx2::panel(format, w, w.len(), 1, xs, &sums, dst) },
        }
        for t in 0..xs.len() {
            out[ri * xs.len() + t] = tmp[t * PANEL];
        }
    }
}

#[cfg(target_arch = "x86_64")]
fn f32_avx512(ws: &[&[u8]], xs: &[&[u8]], n: usize, out: &mut [f32]) {
    // SAFETY: handed out by `dot_fn` only for an available `Isa::Avx512`
    // (which implies AVX-512 F and BW); the driver's rows hold n values.
    unsafe { crate::x86::avx512::dot_f32(ws, xs, n, out) }
}

#[cfg(target_arch = "x86_64")]
fn f16_avx512(ws: &[&[u8]], xs: &[&[u8]], n: usize, out: &mut [f32]) {
    // SAFETY: as for `f32_avx512`.
    unsafe { crate::x86::avx512::dot_f16(ws, xs, n, out) }
}

#[cfg(target_arch = "x86_64")]
fn bf16_avx512(ws: &[&[u8]], xs: &[&[u8]], n: usize, out: &mut [f32]) {
    // SAFETY: as for `f32_avx512`.
    unsafe { crate::x86::avx512::dot_bf16(ws, xs, n, out) }
}

#[cfg(target_arch = "x86_64")]
fn f32_avx2(ws: &[&[u8]], xs: &[&[u8]], n: usize, out: &mut [f32]) {
    use crate::x86::avx512::FloatRow;
    // SAFETY: handed out by `dot_fn` only for an available `Isa::Avx2` or
    // `Isa::Avx512` (both imply AVX2, FMA and F16C); rows hold n values.
    unsafe { crate::x86::avx2::dot_float(FloatRow::F32, ws, xs, n, out) }
}

#[cfg(target_arch = "x86_64")]
fn f16_avx2(ws: &[&[u8]], xs: &[&[u8]], n: usize, out: &mut [f32]) {
    use crate::x86::avx512::FloatRow;
    // SAFETY: as for `f32_avx2`.
    unsafe { crate::x86::avx2::dot_float(FloatRow::F16, ws, xs, n, out) }
}

#[cfg(target_arch = "x86_64")]
fn bf16_avx2(ws: &[&[u8]], xs: &[&[u8]], n: usize, out: &mut [f32]) {
    use crate::x86::avx512::FloatRow;
    // SAFETY: as for `f32_avx2`.
    unsafe { crate::x86::avx2::dot_float(FloatRow::BF16, ws, xs, n, out) }
}

#[cfg(target_arch = "x86_64")]
fn q4_0_panel(ws: &[&[u8]], xs: &[&[u8]], n: usize, out: &mut [f32]) {
    panel_rows(PanelFormat::Legacy(Format::Q4_0), ws, xs, n, out)
}

#[cfg(target_arch = "x86_64")]
fn q8_0_panel(ws: &[&[u8]], xs: &[&[u8]], n: usize, out: &mut [f32]) {
    panel_rows(PanelFormat::Legacy(Format::Q8_0), ws, xs, n, out)
}

/// AVX-512 VNNI (and VL) on this CPU: the `_vnni` row kernels need both.
#[cfg(target_arch = "x86_64")]
fn vnni() -> bool {
    is_x86_feature_detected!("avx512vnni") && is_x86_feature_detected!("avx512vl")
}

/// AVX-512 with VNNI: what the panel kernels need.
#[cfg(target_arch = "x86_64")]
fn panel_available(isa: Isa) -> bool {
    isa == Isa::Avx512 && isa.available() && is_x86_feature_detected!("avx512vnni")
}

/// The legacy panel format for `ty` on `isa`, if there is a panel kernel.
#[cfg(target_arch = "x86_64")]
fn panel_format(isa: Isa, ty: WeightType) -> Option<Format> {
    if !panel_available(isa) {
        return None;
    }
    match ty {
        WeightType::Q4_0 => Some(Format::Q4_0),
        WeightType::Q8_0 => Some(Format::Q8_0),
        _ => None,
    }
}

/// The legacy format for `ty` if it runs as AVX2 8-row groups on `isa`:
/// AVX2, or AVX-512 without the VNNI its own panels need.
#[cfg(target_arch = "x86_64")]
fn avx2_panel_format(isa: Isa, ty: WeightType) -> Option<Format> {
    if !matches!(isa, Isa::Avx2 | Isa::Avx512) || !isa.available() || panel_available(isa) {
        return None;
    }
    match ty {
        WeightType::Q4_0 => Some(Format::Q4_0),
        WeightType::Q8_0 => Some(Format::Q8_0),
        _ => None,
    }
}

/// The k-quant panel format for `ty` on `isa`, if there is a panel kernel.
#[cfg(target_arch = "x86_64")]
fn kpanel_format(isa: Isa, ty: WeightType) -> Option<KFormat> {
    if !panel_available(isa) {
        return None;
    }
    match ty {
        WeightType::Q4K => Some(KFormat::Q4K),
        WeightType::Q5K => Some(KFormat::Q5K),
        WeightType::Q6K => Some(KFormat::Q6K),
        _ => None,
    }
}

/// The k-quant format for `ty` if it runs as AVX2 8-row groups on `isa`:
/// AVX2, or AVX-512 without the VNNI its own panels need.
#[cfg(target_arch = "x86_64")]
fn avx2_kpanel_format(isa: Isa, ty: WeightType) -> Option<KFormat> {
    if !matches!(isa, Isa::Avx2 | Isa::Avx512) || !isa.available() || panel_available(isa) {
        return None;
    }
    match ty {
        WeightType::Q4K => Some(KFormat::Q4K),
        WeightType::Q5K => Some(KFormat::Q5K),
        WeightType::Q6K => Some(KFormat::Q6K),
        _ => None,
    }
}

/// A k-quant panel kernel's results for up to two arbitrary rows (the same
/// code as whole panels, so bit-identical to them).
#[cfg(target_arch = "x86_64")]
fn kpanel_rows(format: KFormat, ws: &[&[u8]], xs: &[&[u8]], n: usize, out: &mut [f32]) {
    let mut tmp = vec![0.0f32; xs.len() * PANEL];
    for (ri, w) in ws.iter().enumerate() {
        // SAFETY: handed out by `dot_fn` only when `panel_available()`.
        unsafe {
            crate::x86::avx512k::panel(
                format,
                w,
                w.len(),
                1,
                xs,
                n / 256,
                Out::new(&mut tmp, PANEL, 1),
            )
        };
        for t in 0..xs.len() {
            out[ri * xs.len() + t] = tmp[t * PANEL];
        }
    }
}

#[cfg(target_arch = "x86_64")]
fn q4k_panel(ws: &[&[u8]], xs: &[&[u8]], n: usize, out: &mut [f32]) {
    kpanel_rows(KFormat::Q4K, ws, xs, n, out)
}

#[cfg(target_arch = "x86_64")]
fn q5k_panel(ws: &[&[u8]], xs: &[&[u8]], n: usize, out: &mut [f32]) {
    kpanel_rows(KFormat::Q5K, ws, xs, n, out)
}

#[cfg(target_arch = "x86_64")]
fn q6k_panel(ws: &[&[u8]], xs: &[&[u8]], n: usize, out: &mut [f32]) {
    kpanel_rows(KFormat::Q6K, ws, xs, n, out)
}

/// On an AVX-512 CPU, the largest product (in activation rows: tokens)
/// that runs on the AVX2 kernels instead of the AVX-512 ones, per weight
/// type; 0 where AVX-512 serves every size.
///
/// Measured, not guessed (a Zen 4 VM, `cargo bench -p lfm-kernels --bench
/// kernels -- matmul/`, one thread, ns per weight row from cache, AVX2 /
/// AVX-512 VNNI; then 2 threads from DRAM, GB/s of weights):
///
/// | tokens | 1 | 2 | 4 | 6 | 8 | 4, DRAM | 8, DRAM |
/// | --- | --- | --- | --- | --- | --- | --- | --- |
/// | Q4_0 | | | 136 / 141 | 155 / 148 | 184 / 173 | 13.8-14.3 / 13.6 | 8.9-9.2 / 9.9 |
/// | Q8_0 | 91 / 74 | 126 / 90 | 189 / 120 | 277 / 156 | 333 / 180 | 16.8-17.9 / 25.4-27.3 | 8.3-10.6 / 16.8-16.9 |
/// | Q4_K | | | 117 / 95 | 150 / 131 | 178 / 156 | 14.8-16.7 / 15.3-16.0 | 9.2-10.3 / 10.1-10.2 |
/// | Q5_K | 68 / 91 | 88 / 98 | 147 / 124 | 176 / 158 | 206 / 182 | 15.1-16.0 / 15.8-17.3 | 9.7-10.9 / 11.0-11.6 |
/// | Q6_K | | | 151 / 131 | 192 / 171 | 226 / 199 | 15.6-17.6 / 16.5-17.6 | 10.5-11.6 / 12.0-12.7 |
///
/// (Blank: the stream kernels take those sizes on CPUs with VBMI and GFNI,
/// [`stream_up_to_tokens`].) The AVX2 groups stream weight rows straight
/// from the mapping; the AVX-512 panels load each block of 16 rows and
/// transpose it into lanes (`avx512::transposed_window`), or pack a Q4_0
/// panel by transposes on CPUs with VBMI (`avx512s::pack_q4_0`; by gathers
/// without, where the AVX2 groups were level at 8 tokens and ahead below),
/// which pays once a block serves enough tokens. So: Q8_0 on AVX-512 at
/// every size (1.2-2.2x); the k-quants from 4 tokens (Q5_K, which has no
/// stream kernel, from 3: at 1-2 the AVX2 groups are 10-25% ahead from
/// cache, 6-16% behind from DRAM, and level in `lfmd bench -s 1/-s 2` on
/// Q5_K_M); Q4_0 from 9 (the panels 5-8% ahead at 6-8 with VBMI,
/// level in `lfmd bench -s 8`, behind without VBMI). Float weights and
/// Q4_1/Q5_0/Q5_1 keep their AVX-512 kernels at every size: unmeasured,
/// and the AVX-512 and AVX2 float dots sum in different orders, so
/// switching by size would make a sequence's logits depend on its batch.
/// Switching is safe for the types below because both families give the
/// same bits (Q4_0/Q8_0: the scalar reference's; k-quants: the panels'
/// order), which `tests/isa_paths.rs` checks across the crossover.
pub fn avx2_up_to_tokens(ty: WeightType) -> usize {
    match ty {
        WeightType::Q4_0 => 8,
        WeightType::Q4K | WeightType::Q6K => 3,
        WeightType::Q5K => 2,
        WeightType::Q8_0
        | WeightType::F32
        | WeightType::F16
        | WeightType::BF16
        | WeightType::Q4_1
        | WeightType::Q5_0
        | WeightType::Q5_1 => 0,
    }
}

/// On an AVX-512 CPU with VNNI, VBMI and GFNI, the largest product (in tokens)
/// that streams weight rows in 16-block chunks (`x86/avx512s.rs`) instead
/// of taking the family [`family`] picks; 0 where no stream kernel exists
/// for `ty`.
///
/// Measured (Zen 4 VM, 2 threads, `cargo bench -p lfm-kernels --bench
/// kernels -- matmul/q4_0/`, GB/s of weights, stream / AVX2 groups):
///
/// | tokens | 1 | 2 | 4 | 6 | 8 | 1, DRAM | 8, DRAM |
/// | --- | --- | --- | --- | --- | --- | --- | --- |
/// | Q4_0 | 47-53 / 39-42 | 34-36 / 25-30 | 21 / 14-19 | 6.8 / 7.7 (1 thread) | 5.5 / 6.5 (1 thread) | 26-29 / 23-24 | 6.7 / 8.7 |
///
/// Q4_K and Q6_K (`x86/avx512sk.rs`; one thread from cache, two from
/// DRAM, three alternating rounds):
///
/// | tokens | 1 | 2 | 4 | 1, DRAM | 2, DRAM | 4, DRAM |
/// | --- | --- | --- | --- | --- | --- | --- |
/// | Q4_K | 25.7-26.1 / 25.7-26.1 | 17.4-19.0 / 18.5-18.7 | 11.2-11.6 / 9.7-9.9 | 27-33 / 21-25 | 19-27 / 19-24 | 15-18 / 12-15 |
/// | Q6_K | 27.5-27.9 / 22.7-22.8 | 18.4-21.5 / 16.1 | 11.3-14.4 / 11.0-11.1 | 22-30 / 22-26 | 25-29 / 18-20 | 19-22 / 11-17 |
///
/// Past 4 tokens the stream kernels read each row once per 4-token tile
/// and the AVX2 groups' unpacked panels win. Each gives the bits of the
/// family it stands in for (Q4_0: the scalar reference's, Q4_K: the
/// panels' order), so the choice never changes a result. Q5_K has none
/// yet (few files use it: a Q4_K_M file's 16 MiB of it).
pub fn stream_up_to_tokens(ty: WeightType) -> usize {
    match ty {
        WeightType::Q4_0 | WeightType::Q4K | WeightType::Q6K => 4,
        _ => 0,
    }
}

/// Whether this CPU runs the stream kernels (AVX-512 F/BW/VL, VNNI, VBMI,
/// and GFNI).
pub fn has_stream() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        Isa::Avx512.available()
            && is_x86_feature_detected!("avx512vnni")
            && is_x86_feature_detected!("avx512vbmi")
            && is_x86_feature_detected!("gfni")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// The stream kernel for `ty`, if this CPU runs one: what [`kernel`] picks
/// on AVX-512 up to [`stream_up_to_tokens`]. Benchmarks and tests reach
/// the family through it.
pub fn stream_kernel(ty: WeightType) -> Option<Kernel> {
    #[cfg(target_arch = "x86_64")]
    if has_stream() {
        let format = match ty {
            WeightType::Q4_0 => Some(PanelFormat::Stream(Format::Q4_0)),
            WeightType::Q4K => Some(PanelFormat::StreamK(KFormat::Q4K)),
            WeightType::Q6K => Some(PanelFormat::StreamK(KFormat::Q6K)),
            _ => None,
        };
        return format.map(|format| Kernel::Panel(PanelKernel { format }));
    }
    let _ = ty;
    None
}

/// The kernel for `ty` matrices repacked at load (`crate::repack`: Q4_0
/// into the Q4_0 panels' layout, Q4_K and Q5_K with their blocks' dwords
/// in lanes), if this CPU runs it (AVX-512 F/BW/VL and VNNI) and `isa` is
/// AVX-512: for every token count, what the engine uses for the matrices
/// it repacked. The job's weights are then the repacked bytes, never the
/// file's.
pub fn repacked_kernel(isa: Isa, ty: WeightType) -> Option<Kernel> {
    #[cfg(target_arch = "x86_64")]
    if isa == Isa::Avx512 && isa.available() && has_vnni() {
        let format = match ty {
            WeightType::Q4_0 => Some(PanelFormat::Repacked),
            WeightType::Q4K => Some(PanelFormat::RepackedK(KFormat::Q4K)),
            WeightType::Q5K => Some(PanelFormat::RepackedK(KFormat::Q5K)),
            _ => None,
        };
        return format.map(|format| Kernel::Panel(PanelKernel { format }));
    }
    let _ = (isa, ty);
    None
}

/// `ty`'s matrix of `rows` rows of `cols` elements (`row_bytes` apart in
/// `w`) repacked for [`repacked_kernel`], if `ty` has a repacked layout
/// (and, for the k-quants, rows a multiple of 4 bytes apart).
pub fn repack(
    ty: WeightType,
    w: &[u8],
    rows: usize,
    cols: usize,
    row_bytes: usize,
) -> Option<crate::repack::Repacked> {
    use crate::repack::Repacked;
    let nb = cols / ty.block_size();
    match ty {
        WeightType::Q4_0 => Some(Repacked::new(w, rows, row_bytes, nb)),
        // The products read whole registers: every panel 64-byte aligned.
        WeightType::Q4K | WeightType::Q5K if (16 * row_bytes).is_multiple_of(64) => {
            Some(Repacked::dwords(w, rows, row_bytes, nb, ty.block_bytes()))
        }
        _ => None,
    }
}

/// The kernel family that runs a product of `tokens` activation rows with
/// `ty` weights when the chosen path is `isa` on a CPU with (`vnni`) or
/// without AVX-512 VNNI: `isa` itself, except on AVX-512 where the AVX2
/// kernels are the faster ones for few tokens ([`avx2_up_to_tokens`]). A
/// pure function of its arguments, so the choice is testable on any CPU.
pub fn family(isa: Isa, vnni: bool, ty: WeightType, tokens: usize) -> Isa {
    // Without VNNI the AVX-512 path has no quantized kernels of its own:
    // `family_kernel` already gives it the AVX2 ones.
    if isa == Isa::Avx512 && vnni && tokens <= avx2_up_to_tokens(ty) {
        Isa::Avx2
    } else {
        isa
    }
}

/// Whether this CPU has AVX-512 VNNI (what the AVX-512 panels need).
pub fn has_vnni() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        is_x86_feature_detected!("avx512vnni")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// How a product of `tokens` activation rows with weights of `ty` runs on
/// `isa` (which must be available): on AVX-512 the stream kernel up to
/// [`stream_up_to_tokens`] where this CPU has it, else the faster family
/// for that size ([`family`]), then that family's kernel
/// ([`family_kernel`]). Every choice for a type gives the same bits, so a
/// sequence's results never depend on how many tokens share its products.
pub fn kernel(isa: Isa, ty: WeightType, tokens: usize) -> Kernel {
    if isa == Isa::Avx512
        && tokens <= stream_up_to_tokens(ty)
        && let Some(k) = stream_kernel(ty)
    {
        return k;
    }
    family_kernel(family(isa, has_vnni(), ty, tokens), ty)
}

/// The name of the kernel family [`kernel`] runs for `tokens` rows of `ty`
/// on `isa`, as `Isa`'s display (`avx2`, `avx512+vnni`, …, and `avx512+vnni
/// stream` for the stream kernels): for reports.
pub fn kernel_name(isa: Isa, ty: WeightType, tokens: usize) -> String {
    if isa == Isa::Avx512 && tokens <= stream_up_to_tokens(ty) && stream_kernel(ty).is_some() {
        return format!("{isa} stream");
    }
    family(isa, has_vnni(), ty, tokens).to_string()
}

/// How products with weights of `ty` run on the kernel family `isa` (which
/// must be available), whatever their size: 16-row panels where the ISA has
/// them, row dots otherwise. Benchmarks and tests use it to reach one
/// family; the engine uses [`kernel`].
pub fn family_kernel(isa: Isa, ty: WeightType) -> Kernel {
    #[cfg(target_arch = "x86_64")]
    if let Some(f) = panel_format(isa, ty) {
        return Kernel::Panel(PanelKernel {
            format: PanelFormat::Legacy(f),
        });
    }
    #[cfg(target_arch = "x86_64")]
    if let Some(f) = kpanel_format(isa, ty) {
        return Kernel::Panel(PanelKernel {
            format: PanelFormat::K(f),
        });
    }
    #[cfg(target_arch = "x86_64")]
    if let Some(f) = avx2_panel_format(isa, ty) {
        return Kernel::Panel(PanelKernel {
            format: PanelFormat::Avx2(f),
        });
    }
    #[cfg(target_arch = "x86_64")]
    if let Some(f) = avx2_kpanel_format(isa, ty) {
        return Kernel::Panel(PanelKernel {
            format: PanelFormat::Avx2K(f),
        });
    }
    Kernel::Rows(dot_fn(isa, ty))
}

/// Safe [`DotFn`]s around x86 kernels whose only precondition is the CPU
/// features: the kernels check row lengths and tile shape themselves.
#[cfg(target_arch = "x86_64")]
macro_rules! x86_dots {
    ($($name:ident => $kernel:path,)*) => {
        $(
            fn $name(ws: &[&[u8]], xs: &[&[u8]], _n: usize, out: &mut [f32]) {
                // SAFETY: `dot_fn` hands this out only for an ISA whose
                // detected features include the kernel's (AVX2/FMA/F16C, plus
                // AVX-512 VNNI/VL for the `_vnni` ones).
                unsafe { $kernel(ws, xs, out) }
            }
        )*
    };
}

#[cfg(target_arch = "x86_64")]
x86_dots! {
    q4_1_avx2 => crate::x86::legacy::dot_q4_1_q8_1,
    q5_0_avx2 => crate::x86::legacy::dot_q5_0_q8_0,
    q5_1_avx2 => crate::x86::legacy::dot_q5_1_q8_1,
    // The k-quant tiles compute what the AVX2 groups and the panels do
    // (bit-identical), two rows at a time.
    q4k_avx2 => crate::x86::kquants::dot_q4k_q8k,
    q5k_avx2 => crate::x86::kquants::dot_q5k_q8k,
    q6k_avx2 => crate::x86::kquants::dot_q6k_q8k,
    q4_1_vnni => crate::x86::legacy::dot_q4_1_q8_1_vnni,
    q5_0_vnni => crate::x86::legacy::dot_q5_0_q8_0_vnni,
    q5_1_vnni => crate::x86::legacy::dot_q5_1_q8_1_vnni,
}

/// Safe [`DotFn`] wrappers around the aarch64 kernels.
#[cfg(target_arch = "aarch64")]
macro_rules! neon_dots {
    ($($name:ident => $kernel:path,)*) => {$(
        fn $name(ws: &[&[u8]], xs: &[&[u8]], _n: usize, out: &mut [f32]) {
            // SAFETY: handed out by `dot_fn` only when NEON is present, and
            // the `_sdot` ones only when dotprod is too; the matmul driver
            // passes 1..=2 weight rows and 1..=4 activation rows of the same
            // length (the kernels assert it).
            unsafe { $kernel(ws, xs, out) }
        }
    )*};
}

#[cfg(target_arch = "aarch64")]
neon_dots! {
    f32_neon => crate::arm::float::f32_f32,
    f16_neon => crate::arm::float::f16_f32,
    bf16_neon => crate::arm::float::bf16_f32,
    q4_0_neon => crate::arm::legacy::q4_0,
    q4_1_neon => crate::arm::legacy::q4_1,
    q5_0_neon => crate::arm::legacy::q5_0,
    q5_1_neon => crate::arm::legacy::q5_1,
    q8_0_neon => crate::arm::legacy::q8_0,
    q4_0_sdot => crate::arm::legacy::q4_0_sdot,
    q4_1_sdot => crate::arm::legacy::q4_1_sdot,
    q5_0_sdot => crate::arm::legacy::q5_0_sdot,
    q5_1_sdot => crate::arm::legacy::q5_1_sdot,
    q8_0_sdot => crate::arm::legacy::q8_0_sdot,
    q4k_neon => crate::arm::kquants::q4k,
    q5k_neon => crate::arm::kquants::q5k,
    q6k_neon => crate::arm::kquants::q6k,
}

/// The row dot for weights of `ty` against activations of
/// [`act_type_for`]`(ty)` on `isa` (which must be available).
pub fn dot_fn(isa: Isa, ty: WeightType) -> DotFn {
    debug_assert!(isa.available());
    #[cfg(target_arch = "x86_64")]
    if isa == Isa::Avx512 && isa.available() {
        match ty {
            WeightType::F32 => return f32_avx512,
            WeightType::F16 => return f16_avx512,
            WeightType::BF16 => return bf16_avx512,
            WeightType::Q4_1 if vnni() => return q4_1_vnni,
            WeightType::Q5_0 if vnni() => return q5_0_vnni,
            WeightType::Q5_1 if vnni() => return q5_1_vnni,
            _ => {}
        }
    }
    #[cfg(target_arch = "x86_64")]
    match panel_format(isa, ty) {
        Some(Format::Q4_0) => return q4_0_panel,
        Some(Format::Q8_0) => return q8_0_panel,
        None => {}
    }
    #[cfg(target_arch = "x86_64")]
    match kpanel_format(isa, ty) {
        Some(KFormat::Q4K) => return q4k_panel,
        Some(KFormat::Q5K) => return q5k_panel,
        Some(KFormat::Q6K) => return q6k_panel,
        None => {}
    }
    #[cfg(target_arch = "x86_64")]
    if matches!(isa, Isa::Avx2 | Isa::Avx512) && isa.available() {
        match ty {
            WeightType::F32 => return f32_avx2,
            WeightType::F16 => return f16_avx2,
            WeightType::BF16 => return bf16_avx2,
            WeightType::Q4_0 => return q4_0_avx2,
            WeightType::Q8_0 => return q8_0_avx2,
            WeightType::Q4_1 => return q4_1_avx2,
            WeightType::Q5_0 => return q5_0_avx2,
            WeightType::Q5_1 => return q5_1_avx2,
            WeightType::Q4K => return q4k_avx2,
            WeightType::Q5K => return q5k_avx2,
            WeightType::Q6K => return q6k_avx2,
        }
    }
    #[cfg(target_arch = "aarch64")]
    if isa == Isa::Neon && isa.available() {
        // The k-quants have no sdot variant (see `arm::kquants`).
        let sdot = crate::arm::has_dotprod();
        return match ty {
            WeightType::F32 => f32_neon,
            WeightType::F16 => f16_neon,
            WeightType::BF16 => bf16_neon,
            WeightType::Q4_0 if sdot => q4_0_sdot,
            WeightType::Q4_0 => q4_0_neon,
            WeightType::Q4_1 if sdot => q4_1_sdot,
            WeightType::Q4_1 => q4_1_neon,
            WeightType::Q5_0 if sdot => q5_0_sdot,
            WeightType::Q5_0 => q5_0_neon,
            WeightType::Q5_1 if sdot => q5_1_sdot,
            WeightType::Q5_1 => q5_1_neon,
            WeightType::Q8_0 if sdot => q8_0_sdot,
            WeightType::Q8_0 => q8_0_neon,
            WeightType::Q4K => q4k_neon,
            WeightType::Q5K => q5k_neon,
            WeightType::Q6K => q6k_neon,
        };
    }
    match ty {
        WeightType::F32 => dot_f32,
        WeightType::F16 => dot_f16,
        WeightType::BF16 => dot_bf16,
        WeightType::Q4_0 => ref_q4_0,
        WeightType::Q4_1 => ref_q4_1,
        WeightType::Q5_0 => ref_q5_0,
        WeightType::Q5_1 => ref_q5_1,
        WeightType::Q8_0 => ref_q8_0,
        WeightType::Q4K => ref_q4k,
        WeightType::Q5K => ref_q5k,
        WeightType::Q6K => ref_q6k,
    }
}

/// Converts activation rows of `cols` values to the format used against
/// `ty`; returns the bytes per row.
pub fn quantize_activations(ty: WeightType, x: &[f32], cols: usize, out: &mut Vec<u8>) -> usize {
    let act = act_type_for(ty);
    let row = act.row_bytes(cols);
    out.clear();
    out.resize(row * (x.len() / cols), 0);
    for (xr, or) in x.chunks_exact(cols).zip(out.chunks_exact_mut(row)) {
        scalar::quantize_acts(act, xr, or);
    }
    row
}

/// One activation row on `isa`: the AVX-512 and AVX2 quantizers write the
/// same bytes as the scalar ones (tested), only faster.
fn quantize_row(isa: Isa, act: ActType, x: &[f32], out: &mut [u8]) {
    #[cfg(target_arch = "x86_64")]
    if isa == Isa::Avx512 && isa.available() {
        match act {
            // SAFETY: `Isa::Avx512` available implies AVX-512 F and BW.
            ActType::Q8_0 => return unsafe { crate::x86::avx512::quantize_q8_0(x, out) },
            // SAFETY: as above.
            ActType::Q8K => return unsafe { crate::x86::avx512::quantize_q8k(x, out) },
            _ => {}
        }
    }
    #[cfg(target_arch = "x86_64")]
    if isa == Isa::Avx2 && isa.available() {
        match act {
            // SAFETY: `Isa::Avx2` available implies AVX2, FMA and F16C.
            ActType::Q8_0 => return unsafe { crate::x86::avx2::quantize_q8_0(x, out) },
            // SAFETY: as above.
            ActType::Q8K => return unsafe { crate::x86::avx2::quantize_q8k(x, out) },
            _ => {}
        }
    }
    let _ = isa;
    scalar::quantize_acts(act, x, out)
}

/// [`quantize_activations`] on `isa` with the rows spread over `pool`
/// (every path writes the same bytes).
pub fn quantize_activations_on(
    pool: &crate::pool::ThreadPool,
    isa: Isa,
    ty: WeightType,
    x: &[f32],
    cols: usize,
    out: &mut Vec<u8>,
) -> usize {
    let act = act_type_for(ty);
    let row = act.row_bytes(cols);
    let n = x.len() / cols;
    out.clear();
    out.resize(row * n, 0);
    // A few rows are not worth a parallel region.
    if n < 2 * pool.n_threads() {
        for (xr, or) in x.chunks_exact(cols).zip(out.chunks_exact_mut(row)) {
            quantize_row(isa, act, xr, or);
        }
        return row;
    }
    let per = n.div_ceil(2 * pool.n_threads());
    pool.for_each_mut(out, per * row, &|i, chunk| {
        let xs = &x[i * per * cols..];
        for (xr, or) in xs.chunks_exact(cols).zip(chunk.chunks_exact_mut(row)) {
            quantize_row(isa, act, xr, or);
        }
    });
    row
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Q4_0 and Q4_K have stream kernels, for one to four tokens; where the
    /// CPU runs them, `kernel` and `kernel_name` pick them for exactly those
    /// sizes.
    #[test]
    fn stream_kernels_serve_one_to_four_q4_0_and_q4_k_tokens() {
        for ty in WeightType::ALL {
            let want = if matches!(ty, WeightType::Q4_0 | WeightType::Q4K | WeightType::Q6K) {
                4
            } else {
                0
            };
            assert_eq!(stream_up_to_tokens(ty), want, "{ty:?}");
            assert_eq!(stream_kernel(ty).is_some(), has_stream() && want > 0);
        }
        if has_stream() {
            for ty in [WeightType::Q4_0, WeightType::Q4K, WeightType::Q6K] {
                for n in 1..=9 {
                    let name = kernel_name(Isa::Avx512, ty, n);
                    assert_eq!(name.ends_with("stream"), n <= 4, "{ty:?} {n}: {name}");
                }
            }
        }
    }

    /// The size-based choice: on an AVX-512 VNNI CPU the AVX2 family up to
    /// the crossover, AVX-512 beyond it, Q8_0, floats and the tile-only legacy
    /// types always AVX-512; nothing changes on other paths or without VNNI.
    /// Pure, so it runs on any CPU (`tests/isa_paths.rs` runs the kernels).
    #[test]
    fn avx512_cpus_take_the_avx2_kernels_for_few_tokens() {
        use WeightType::*;
        for (ty, up_to) in [(Q4_0, 8), (Q4K, 3), (Q5K, 2), (Q6K, 3)] {
            assert_eq!(avx2_up_to_tokens(ty), up_to, "{ty:?}");
            for n in 1..=up_to {
                assert_eq!(family(Isa::Avx512, true, ty, n), Isa::Avx2, "{ty:?} {n}");
            }
            for n in [up_to + 1, 9, 12, 16, 64, 512] {
                assert_eq!(family(Isa::Avx512, true, ty, n), Isa::Avx512, "{ty:?} {n}");
            }
        }
        for ty in [Q8_0, F32, F16, BF16, Q4_1, Q5_0, Q5_1] {
            for n in [1, 8, 64] {
                assert_eq!(family(Isa::Avx512, true, ty, n), Isa::Avx512, "{ty:?} {n}");
            }
        }
        for ty in WeightType::ALL {
            for n in [1, 4, 8, 9, 64] {
                assert_eq!(family(Isa::Avx512, false, ty, n), Isa::Avx512);
                for isa in [Isa::Scalar, Isa::Avx2, Isa::Neon] {
                    for vnni in [false, true] {
                        assert_eq!(family(isa, vnni, ty, n), isa, "{isa} {ty:?} {n}");
                    }
                }
            }
        }
    }

    /// On aarch64 the NEON entry of every quantized type gives the scalar
    /// entry's bits for every tile shape (so each type is wired to its own
    /// kernel, and the sdot choice changes nothing).
    #[cfg(target_arch = "aarch64")]
    #[test]
    fn neon_quantized_entries_give_the_scalar_bits() {
        let mut seed = 11u64;
        let mut rnd = || {
            seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((seed >> 33) as f32 / (1u64 << 31) as f32) * 2.0 - 1.0
        };
        for ty in WeightType::ALL
            .into_iter()
            .filter(|t| act_type_for(*t) != ActType::F32)
        {
            let n = 5 * ty.block_size();
            let ws: Vec<Vec<u8>> = (0..2)
                .map(|_| {
                    let w: Vec<f32> = (0..n).map(|_| rnd()).collect();
                    let mut wq = vec![0u8; ty.row_bytes(n)];
                    scalar::quantize_row(ty, &w, &mut wq);
                    wq
                })
                .collect();
            let x: Vec<f32> = (0..4 * n).map(|_| rnd() * 3.0).collect();
            let mut xq = Vec::new();
            let row = quantize_activations(ty, &x, n, &mut xq);
            let xs: Vec<&[u8]> = xq.chunks_exact(row).collect();
            for r in 1..=2 {
                let wr: Vec<&[u8]> = ws[..r].iter().map(Vec::as_slice).collect();
                for t in 1..=4 {
                    let (mut got, mut want) = (vec![0.0f32; r * t], vec![0.0f32; r * t]);
                    dot_fn(Isa::Neon, ty)(&wr, &xs[..t], n, &mut got);
                    dot_fn(Isa::Scalar, ty)(&wr, &xs[..t], n, &mut want);
                    let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
                    assert_eq!(bits(&got), bits(&want), "{ty:?} {r}x{t}");
                }
            }
        }
    }

    /// Every (ISA, type) entry agrees with the scalar reference of the same
    /// pairing on random rows, including odd block counts.
    #[test]
    fn every_entry_matches_the_reference() {
        let mut seed = 7u64;
        let mut rnd = || {
            seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((seed >> 33) as f32 / (1u64 << 31) as f32) * 2.0 - 1.0
        };
        for isa in Isa::ALL.into_iter().filter(|i| i.available()) {
            for ty in WeightType::ALL {
                for blocks in [1, 3, 8] {
                    let n = blocks * ty.block_size().max(32);
                    let w: Vec<f32> = (0..n).map(|_| rnd()).collect();
                    let x: Vec<f32> = (0..n).map(|_| rnd() * 3.0).collect();
                    let mut wq = vec![0u8; ty.row_bytes(n)];
                    scalar::quantize_row(ty, &w, &mut wq);
                    let mut xq = Vec::new();
                    quantize_activations(ty, &x, n, &mut xq);
                    let mut got = [0.0f32];
                    dot_fn(isa, ty)(&[&wq], &[&xq], n, &mut got);
                    let got = got[0];
                    // The reference: dequantized weights against the same activations.
                    let mut wd = vec![0.0; n];
                    scalar::dequantize_row(ty, &wq, &mut wd);
                    let mut xd = vec![0.0; n];
                    match act_type_for(ty) {
                        ActType::F32 => xd.copy_from_slice(&x),
                        a => {
                            let mut tmp = vec![0.0; n];
                            // Activation formats share block layouts with weight types.
                            let as_w = match a {
                                ActType::Q8_0 => WeightType::Q8_0,
                                _ => {
                                    // Q8_1 / Q8_K: compare against the scalar pairing instead.
                                    let want = scalar::vec_dot(ty, &wq, &xq, n);
                                    assert!(
                                        (got - want).abs() <= 1e-4 * want.abs().max(1.0),
                                        "{isa} {ty:?} n={n}: {got} vs {want}"
                                    );
                                    continue;
                                }
                            };
                            scalar::dequantize_row(as_w, &xq, &mut tmp);
                            xd.copy_from_slice(&tmp);
                        }
                    }
                    let want: f32 = wd.iter().zip(&xd).map(|(a, b)| a * b).sum();
                    assert!(
                        (got - want).abs() <= 1e-4 * want.abs().max(1.0),
                        "{isa} {ty:?} n={n}: {got} vs {want}"
                    );
                }
            }
        }
    }
}
