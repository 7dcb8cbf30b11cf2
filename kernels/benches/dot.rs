//! Quick throughput check of the row dots (not a test): `cargo bench -p lfm-kernels --bench dot`.
use lfm_kernels::dispatch::dot_fn;
use lfm_kernels::isa::Isa;
use lfm_kernels::types::WeightType;
use std::time::Instant;

fn main() {
    {
        let x: Vec<f32> = (0..1 << 20)
            .map(|i| ((i * 7919 % 1000) as f32 - 500.0) / 300.0)
            .collect();
        for ty in [
            WeightType::Q4K,
            WeightType::Q5K,
            WeightType::Q6K,
            WeightType::Q4_1,
            WeightType::Q5_0,
        ] {
            let mut out = vec![0u8; ty.row_bytes(x.len())];
            let t0 = Instant::now();
            lfm_kernels::scalar::quantize_row(ty, &x, &mut out);
            println!(
                "quantize {ty:?}: {:.1} ns/weight",
                t0.elapsed().as_secs_f64() / x.len() as f64 * 1e9
            );
        }
    }
    let cols = 2048;
    let rows = 4096;
    let w: Vec<u8> = (0..rows * cols / 32 * 18)
        .map(|i| (i * 31 % 251) as u8)
        .collect();
    let x: Vec<u8> = (0..cols / 32 * 34).map(|i| (i * 17 % 253) as u8).collect();
    for isa in [Isa::Scalar, Isa::detect()] {
        let f = dot_fn(isa, WeightType::Q4_0);
        for pass in 0..2 {
            let t0 = Instant::now();
            let mut s = 0.0f32;
            for _ in 0..20 {
                for r in 0..rows {
                    let mut o = [0.0f32];
                    f(&[&w[r * 1152..(r + 1) * 1152]], &[&x], cols, &mut o);
                    s += o[0];
                }
            }
            let dt = t0.elapsed().as_secs_f64();
            let bytes = 20.0 * w.len() as f64;
            if pass == 1 {
                println!(
                    "{isa}: q4_0 row dot {:.2} GB/s of weights ({:.1} ns/block) [{s}]",
                    bytes / dt / 1e9,
                    dt / (20.0 * rows as f64 * 64.0) * 1e9
                );
            }
        }
    }
}
