use lfm_kernels::dispatch::kernel;
use lfm_kernels::isa::Isa;
use lfm_kernels::matmul::matmul;
use lfm_kernels::pool::ThreadPool;
use std::time::Instant;
fn main() {
    let args: Vec<String> = std::env::args().collect();
    let rows: usize = args[1].parse().unwrap();
    let threads: usize = args[2].parse().unwrap();
    let ntok: usize = args.get(3).map(|s| s.parse().unwrap()).unwrap_or(1);
    let isa: Isa = args
        .get(4)
        .map(|s| Isa::from_name(s).unwrap())
        .unwrap_or(Isa::Avx512);
    let cols = 2048;
    let rb = cols / 32 * 18;
    let mut w = vec![0u8; rows * rb];
    let mut s = 1u64;
    for (i, b) in w.iter_mut().enumerate() {
        s = s
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        *b = if i % 18 == 1 { 0x20 } else { (s >> 33) as u8 };
    }
    let mut a = vec![0u8; ntok * cols / 32 * 34];
    for (i, b) in a.iter_mut().enumerate() {
        *b = if i % 34 == 1 { 0x20 } else { (i * 7) as u8 };
    }
    let pool = ThreadPool::new(threads);
    let mut y = vec![0f32; rows * ntok];
    let k = kernel(isa, lfm_kernels::WeightType::Q4_0);
    let reps = (4_000_000_000 / w.len()).max(3);
    let t = Instant::now();
    for _ in 0..reps {
        matmul(
            &pool,
            k,
            &w,
            rows,
            cols,
            rb,
            &a,
            cols / 32 * 34,
            ntok,
            &mut y,
        );
    }
    let dt = t.elapsed().as_secs_f64();
    println!(
        "rows {rows} ({:.1} MB) threads {threads} tok {ntok}: {:.2} GB/s, {:.1} us/call",
        w.len() as f64 / 1e6,
        (w.len() * reps) as f64 / dt / 1e9,
        dt / reps as f64 * 1e6
    );
}
