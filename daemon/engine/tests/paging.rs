//! Expert paging on a real mapped file: results are bit-identical at any
//! budget, the budget holds (resident pages of the mapping in
//! /proc/self/smaps), and the cache keeps the experts that are used most.

use lfm_engine::engine::{
    BatchItem, Budget, EngineOptions, LogitsWanted, Model, PagingOptions, SeqState,
};
mod common;

use common::{expert_bytes, synth_tiny_moe};
use lfm_engine::model::ExpertIndex;
use std::path::Path;

fn open(path: &Path, budget: Budget, lookahead: usize) -> Model {
    open_predicting(path, budget, lookahead, 0.0)
}

fn open_predicting(path: &Path, budget: Budget, lookahead: usize, predict_margin: f32) -> Model {
    Model::open_with(
        path,
        EngineOptions {
            threads: Some(2),
            paging: PagingOptions {
                budget,
                lock_bytes: 0,
                lookahead,
                predict_margin,
                ..Default::default()
            },
            ..Default::default()
        },
    )
    .unwrap()
}

/// Teacher-forced logits of `tokens`: a 6-token prefill, then one token per
/// step (many steps, so the pager sees many routings).
fn logits(m: &Model, tokens: &[u32]) -> Vec<Vec<f32>> {
    let mut st = SeqState::new(m);
    let mut out = m
        .forward(&mut [BatchItem {
            state: &mut st,
            tokens: &tokens[..6],
            logits: LogitsWanted::All,
        }])
        .unwrap();
    for t in &tokens[6..] {
        out.extend(
            m.forward(&mut [BatchItem {
                state: &mut st,
                tokens: std::slice::from_ref(t),
                logits: LogitsWanted::Last,
            }])
            .unwrap(),
        );
    }
    out
}

fn tokens(n: usize, vocab: u32) -> Vec<u32> {
    (0..n as u32).map(|i| (i * 7919 + 13) % vocab).collect()
}

#[test]
fn a_budget_changes_no_logit_and_holds() {
    let dir = tempfile::tempdir().unwrap();
    let path = synth_tiny_moe(dir.path());
    let free = open(&path, Budget::Unlimited, 2);
    let toks = tokens(40, free.n_vocab() as u32);
    let want = logits(&free, &toks);

    let s = free.paging_stats().unwrap();
    let expert = expert_bytes(&s);
    let k = free.desc.n_expert_used as u64;
    // Our mapping alone: pages another mapping holds stay in memory.
    drop(free);
    // Too small: refused with the minimum in the message.
    let err = Model::open_with(
        &path,
        EngineOptions {
            paging: PagingOptions {
                budget: Budget::Bytes(s.fixed_bytes + expert),
                ..Default::default()
            },
            ..Default::default()
        },
    )
    .err()
    .unwrap()
    .to_string();
    assert!(
        err.contains("memory budget") && err.contains("--memory-budget"),
        "{err}"
    );

    // Room for the fixed weights and 2k experts: a third of all experts.
    let budget = s.fixed_bytes + 2 * k * expert;
    assert!(budget < s.fixed_bytes + s.expert_total_bytes / 2);
    for lookahead in [0, 2] {
        let tight = open(&path, Budget::Bytes(budget), lookahead);
        let got = logits(&tight, &toks);
        assert_eq!(want.len(), got.len());
        for (i, (a, b)) in want.iter().zip(&got).enumerate() {
            let same = a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits());
            assert!(
                same,
                "lookahead {lookahead}: logits of token {i} differ under a budget"
            );
        }
        let pager = tight.pager().unwrap();
        pager.quiesce();
        let st = tight.paging_stats().unwrap();
        assert_eq!(st.budget_bytes, Some(budget));
        assert!(st.evictions > 0 && st.loads > 0, "{st:?}");
        assert!(st.expert_resident_bytes <= budget - s.fixed_bytes, "{st:?}");
        let hits: u64 = st.experts.iter().flatten().map(|e| e.hits).sum();
        // Every token chose k experts in every MoE layer.
        assert_eq!(hits, toks.len() as u64 * k * st.experts.len() as u64);
        if lookahead > 0 {
            assert!(st.predictions > 0 && st.predictions_used > 0, "{st:?}");
        } else {
            assert_eq!(st.predictions, 0);
        }
        // What the kernel says this process has mapped of the file: at most
        // every page except those lying wholly inside an expert slab the
        // pager says is out (a page a slab shares with a neighbour may stay
        // for the neighbour). With the bookkeeping held to the budget above,
        // this holds the real pages to it, page-rounded: a pager that only
        // believed it evicted, or left a slab's inner pages behind, fails.
        let (addr, len) = tight.gguf().map_addr().unwrap();
        let rss = lfm_engine::procstat::mapping_rss(addr, len).unwrap();
        let page = lfm_engine::gguf::page_size() as u64;
        let index = ExpertIndex::build(tight.gguf().header(), &tight.desc);
        let mut out_pages = 0u64;
        for (layer, stats) in index.layers.iter().zip(&st.experts) {
            for (slices, stat) in layer.iter().zip(stats) {
                if stat.resident {
                    continue;
                }
                for r in [&slices.gate, &slices.up, &slices.down] {
                    out_pages += (r.end / page).saturating_sub(r.start.div_ceil(page));
                }
            }
        }
        let allowed = (len as u64).div_ceil(page).saturating_sub(out_pages) * page;
        assert!(
            rss <= allowed,
            "mapping RSS {rss} over the {allowed} bytes of pages the budget {budget} allows"
        );
    }
}

/// A prediction reads an expert ahead only when the router would choose it
/// with the margin to spare: a larger margin predicts a subset, none when
/// no selection score can clear it, and the logits never change.
#[test]
fn predictions_need_their_margin() {
    let dir = tempfile::tempdir().unwrap();
    let path = synth_tiny_moe(dir.path());
    let free = open(&path, Budget::Unlimited, 0);
    let toks = tokens(30, free.n_vocab() as u32);
    let want = logits(&free, &toks);
    let s = free.paging_stats().unwrap();
    let budget = s.fixed_bytes + 2 * free.desc.n_expert_used as u64 * expert_bytes(&s);
    drop(free);
    let mut seen = Vec::new();
    // Selection scores are a sigmoid (0..1) plus the bias: no gap reaches 1e3.
    for margin in [0.0, 0.02, 1e3] {
        let m = open_predicting(&path, Budget::Bytes(budget), 1, margin);
        let got = logits(&m, &toks);
        assert!(
            want.iter()
                .flatten()
                .zip(got.iter().flatten())
                .all(|(a, b)| a.to_bits() == b.to_bits())
        );
        m.pager().unwrap().quiesce();
        seen.push(m.paging_stats().unwrap().predictions);
    }
    assert!(seen[0] > 0, "no prediction at margin 0: {seen:?}");
    assert!(
        seen[1] < seen[0],
        "a margin predicted as much as none: {seen:?}"
    );
    assert_eq!(seen[2], 0, "{seen:?}");
}

#[test]
fn the_cache_keeps_what_is_used_most() {
    let dir = tempfile::tempdir().unwrap();
    let path = synth_tiny_moe(dir.path());
    let m = open(&path, Budget::Unlimited, 0);
    let s = m.paging_stats().unwrap();
    let expert = expert_bytes(&s);
    drop(m);
    let m = open(&path, Budget::Bytes(s.fixed_bytes + 9 * expert), 0);
    let p = m.pager().unwrap();
    let layer = s.layer_ids[0];
    // Expert 0 is used by many tokens every step; 1..8 by one token each,
    // in turn, with other layers' experts in between.
    let mut before = None;
    for step in 0..40 {
        if step == 1 {
            p.quiesce();
            before = Some(m.paging_stats().unwrap().experts[0][0].evictions);
        }
        p.begin_step();
        p.route(layer, &[(0, 8), (1 + step % 7, 1)]);
        p.route(s.layer_ids[1], &[(step % 8, 1), ((step + 3) % 8, 1)]);
    }
    p.quiesce();
    let st = m.paging_stats().unwrap();
    assert!(st.experts[0][0].resident, "{:?}", st.experts[0]);
    assert_eq!(Some(st.experts[0][0].evictions), before);
    assert!(st.evictions > 0);
    let res: Vec<Vec<bool>> = st
        .experts
        .iter()
        .map(|l| l.iter().map(|e| e.resident).collect())
        .collect();
    assert!(
        st.expert_resident_bytes <= 9 * expert,
        "{} > 9 x {expert}: {res:?}",
        st.expert_resident_bytes
    );
}

/// Bytes the kernel reports locked in this process (`VmLck`).
fn vm_locked() -> u64 {
    let s = std::fs::read_to_string("/proc/self/status").unwrap();
    let kb: u64 = s
        .lines()
        .find_map(|l| l.strip_prefix("VmLck:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap();
    kb << 10
}

#[test]
fn the_hottest_experts_are_locked_and_never_given_back() {
    let dir = tempfile::tempdir().unwrap();
    let path = synth_tiny_moe(dir.path());
    let s = open(&path, Budget::Unlimited, 0).paging_stats().unwrap();
    let expert = expert_bytes(&s);
    let locked_before = vm_locked();
    let m = Model::open_with(
        &path,
        EngineOptions {
            threads: Some(1),
            paging: PagingOptions {
                budget: Budget::Bytes(s.fixed_bytes + 9 * expert),
                lock_bytes: 2 * expert,
                lookahead: 0,
                ..Default::default()
            },
            ..Default::default()
        },
    )
    .unwrap();
    let p = m.pager().unwrap();
    let (a, b) = (s.layer_ids[0], s.layer_ids[1]);
    // Expert 0 of both layers carries most tokens; others take one each.
    let mut step = 0;
    let mut run = |n: usize, hot: bool| {
        for _ in 0..n {
            p.begin_step();
            let cold = 1 + step % 7;
            if hot {
                p.route(a, &[(0, 8), (cold, 1)]);
                p.route(b, &[(0, 8), (cold, 1)]);
            } else {
                p.route(a, &[(cold, 1), (1 + (step + 3) % 7, 1)]);
                p.route(b, &[(cold, 1), (1 + (step + 3) % 7, 1)]);
            }
            step += 1;
        }
    };
    run(10, true);
    // Locks are planned on the pager's one-second tick.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    let st = loop {
        p.quiesce();
        let st = m.paging_stats().unwrap();
        if st.locked_bytes > 0 || std::time::Instant::now() > deadline {
            break st;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    };
    assert_eq!(st.locked_bytes, 2 * expert, "two experts locked");
    assert!(st.experts[0][0].locked && st.experts[1][0].locked);
    let locked: usize = st.experts.iter().flatten().filter(|e| e.locked).count();
    assert_eq!(locked, 2);
    assert!(
        vm_locked() >= locked_before + 2 * expert,
        "the kernel holds them locked: VmLck {} < {} + {}",
        vm_locked(),
        locked_before,
        2 * expert
    );
    let evictions = (st.experts[0][0].evictions, st.experts[1][0].evictions);
    // Now only cold experts, more of them than fit: the cache cycles
    // around the locked two.
    run(30, false);
    p.quiesce();
    let st = m.paging_stats().unwrap();
    assert!(st.evictions > 0, "the budget forced evictions");
    assert!(st.experts[0][0].resident && st.experts[1][0].resident);
    assert_eq!(
        (st.experts[0][0].evictions, st.experts[1][0].evictions),
        evictions
    );
    assert!(st.expert_resident_bytes <= 9 * expert);
}

/// Bytes of the model's mapping advised to huge pages and not, from
/// /proc/self/smaps (the advice splits the mapping into pieces).
fn huge_advice(m: &Model) -> (u64, u64) {
    let (addr, len) = m.gguf().map_addr().unwrap();
    let vmas = lfm_engine::procstat::mappings(addr..addr + len).unwrap();
    assert!(vmas.last().unwrap().end >= addr + len, "{vmas:?}");
    let bytes = |huge: bool| {
        vmas.iter()
            .filter(|v| v.huge_advised == huge)
            .map(|v| (v.end - v.start) as u64)
            .sum()
    };
    (bytes(true), bytes(false))
}

#[test]
fn huge_pages_are_advised_for_all_that_stays_mapped() {
    if !Path::new("/sys/kernel/mm/transparent_hugepage/enabled").exists() {
        eprintln!("skipped: this kernel has no transparent huge pages");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let path = synth_tiny_moe(dir.path());
    // No cap: the whole file, expert slabs included.
    let free = open(&path, Budget::Unlimited, 0);
    let s = free.paging_stats().unwrap();
    let len = free.gguf().bytes().len().next_multiple_of(4096) as u64;
    let k = free.desc.n_expert_used as u64;
    assert_eq!(huge_advice(&free), (len, 0));
    drop(free);
    // A cap below the model: the fixed tensors only; the slabs stay on
    // small pages, so loads and evictions move exactly their pages. Pages
    // shared by a slab and its neighbour go with the fixed tensors.
    let expert = expert_bytes(&s);
    let tight = open(&path, Budget::Bytes(s.fixed_bytes + 4 * k * expert), 0);
    let (huge, small) = huge_advice(&tight);
    assert_eq!(huge + small, len);
    let edges = 2 * 4096 * 3 * s.experts.len() as u64;
    assert!(
        small <= s.expert_total_bytes && small + edges >= s.expert_total_bytes,
        "{small} bytes without advice for {} of experts",
        s.expert_total_bytes
    );
}
