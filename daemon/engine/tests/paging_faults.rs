//! Under a memory budget the pager's I/O threads read the chosen experts in
//! and the engine waits for each load instead of touching its pages first:
//! no compute thread takes a major fault on an expert. (Its own binary: the
//! fault counts are per thread of this process, and no other test may run
//! beside it.)

use lfm_engine::engine::SeqState;
use lfm_engine::engine::{BatchItem, Budget, EngineOptions, LogitsWanted, Model, PagingOptions};
use std::path::Path;

/// Major faults of every thread of this process but the pager's I/O
/// threads (`/proc/self/task/*/stat`, field 12).
fn compute_major_faults() -> u64 {
    let mut sum = 0;
    for task in std::fs::read_dir("/proc/self/task").unwrap() {
        let dir = task.unwrap().path();
        let comm = std::fs::read_to_string(dir.join("comm")).unwrap_or_default();
        if comm.starts_with("lfmd-pager") {
            continue;
        }
        let Ok(stat) = std::fs::read_to_string(dir.join("stat")) else {
            continue; // the thread ended
        };
        let rest = &stat[stat.rfind(')').unwrap() + 2..];
        sum += rest
            .split_whitespace()
            .nth(9)
            .unwrap()
            .parse::<u64>()
            .unwrap();
    }
    sum
}

fn decode(m: &Model, st: &mut SeqState, tokens: &[u32]) {
    for t in tokens {
        m.forward(&mut [BatchItem {
            state: &mut *st,
            tokens: std::slice::from_ref(t),
            logits: LogitsWanted::Last,
        }])
        .unwrap();
    }
}

fn synth(dir: &Path) -> std::path::PathBuf {
    let path = dir.join("tiny-moe.gguf");
    let p = lfm_engine::synth::find_preset("tiny-moe").unwrap();
    let q = lfm_engine::synth::SynthQuant::parse("q4_0").unwrap();
    lfm_engine::synth::write_model(p, q, 3, &path).unwrap();
    // Written back, so the pages the pager gives back leave the page cache
    // and a touch of them has to read the disk (a major fault).
    std::fs::File::open(&path).unwrap().sync_all().unwrap();
    path
}

#[test]
fn compute_threads_take_no_major_fault_on_experts_under_a_budget() {
    let dir = tempfile::tempdir().unwrap();
    let path = synth(dir.path());
    let probe = Model::open(&path).unwrap();
    let s = probe.paging_stats().unwrap();
    let expert = s.expert_total_bytes / (s.experts.len() * s.experts[0].len()) as u64;
    let k = probe.desc.n_expert_used as u64;
    let vocab = probe.n_vocab() as u32;
    drop(probe);
    let m = Model::open_with(
        &path,
        EngineOptions {
            threads: Some(2),
            paging: PagingOptions {
                budget: Budget::Bytes(s.fixed_bytes + 2 * k * expert),
                ..Default::default()
            },
            ..Default::default()
        },
    )
    .unwrap();
    let tokens: Vec<u32> = (0..64u32).map(|i| (i * 7919 + 13) % vocab).collect();
    let mut st = SeqState::new(&m);
    // The fixed weights' first touches are not the pager's business.
    decode(&m, &mut st, &tokens[..8]);
    m.pager().unwrap().quiesce();
    let before = (compute_major_faults(), m.paging_stats().unwrap());
    decode(&m, &mut st, &tokens[8..]);
    let after = (compute_major_faults(), m.paging_stats().unwrap());
    let loads = after.1.loads - before.1.loads;
    let evictions = after.1.evictions - before.1.evictions;
    assert!(
        loads > 20 && evictions > 20,
        "the budget must make experts page: {loads} loads, {evictions} evictions"
    );
    assert_eq!(
        after.0 - before.0,
        0,
        "compute threads took major faults over {} tokens ({loads} expert loads)",
        tokens.len() - 8
    );
}
