//! Under a memory budget the pager's I/O threads read the chosen experts in
//! and the engine waits for each load instead of touching its pages first:
//! no compute thread takes a major fault on an expert. (Its own binary: the
//! fault counts are per thread of this process, and no other test may run
//! beside it.)

mod common;

use common::{expert_bytes, synth_tiny_moe};
use lfm_engine::engine::paging::IO_THREAD_NAME;
use lfm_engine::engine::{
    BatchItem, Budget, EngineOptions, LogitsWanted, Model, PagingOptions, SeqState,
};
use lfm_engine::procstat::major_faults_except;

/// Major faults of every thread of this process but the pager's I/O threads.
fn compute_major_faults() -> u64 {
    major_faults_except(IO_THREAD_NAME).unwrap()
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

#[test]
fn compute_threads_take_no_major_fault_on_experts_under_a_budget() {
    let dir = tempfile::tempdir().unwrap();
    let path = synth_tiny_moe(dir.path());
    let probe = Model::open(&path).unwrap();
    let s = probe.paging_stats().unwrap();
    let expert = expert_bytes(&s);
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
