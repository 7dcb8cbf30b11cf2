//! Engine invariants: a sequence's logits do not depend on what else is in
//! the batch or on how its tokens were split into calls, and bad input is
//! refused without touching state.

use lfm_engine::engine::{BatchItem, EngineError, LogitsWanted, Model, SeqState};
use lfm_engine::gguf::{GgmlType, Gguf};
use lfm_engine::synth;
use std::sync::Arc;

fn model(preset: &str, ty: GgmlType) -> Model {
    let mut bytes = Vec::new();
    synth::write_to(synth::find_preset(preset).unwrap(), ty, 4, &mut bytes).unwrap();
    Model::from_gguf(Arc::new(Gguf::from_bytes(bytes).unwrap())).unwrap()
}

fn run_all(m: &Model, st: &mut SeqState, tokens: &[u32]) -> Vec<f32> {
    m.forward(&mut [BatchItem {
        state: st,
        tokens,
        logits: LogitsWanted::All,
    }])
    .unwrap()
    .pop()
    .unwrap()
}

const A: &[u32] = &[1, 6, 300, 45, 99, 120, 7, 3, 200, 201, 17];
const B: &[u32] = &[1, 6, 11, 12, 13, 500];

#[test]
fn batching_and_splitting_do_not_change_logits() {
    for (preset, ty) in [
        ("tiny-moe", GgmlType::Q8_0),
        ("tiny-dense", GgmlType::F16),
        ("tiny-moe", GgmlType::Q4_0),
    ] {
        let m = model(preset, ty);
        let nv = m.n_vocab();
        let alone_a = run_all(&m, &mut SeqState::new(&m), A);
        let alone_b = run_all(&m, &mut SeqState::new(&m), B);

        // Both sequences in one call.
        let (mut sa, mut sb) = (SeqState::new(&m), SeqState::new(&m));
        let both = m
            .forward(&mut [
                BatchItem {
                    state: &mut sb,
                    tokens: B,
                    logits: LogitsWanted::All,
                },
                BatchItem {
                    state: &mut sa,
                    tokens: A,
                    logits: LogitsWanted::All,
                },
            ])
            .unwrap();
        assert_eq!(both[0], alone_b, "{preset} {ty}: B changed by batching");
        assert_eq!(both[1], alone_a, "{preset} {ty}: A changed by batching");

        // A prefilled in chunks, then decoded one token at a time, next to B's decode.
        let mut s = SeqState::new(&m);
        let mut got = run_all(&m, &mut s, &A[..3]);
        got.extend(run_all(&m, &mut s, &A[3..7]));
        let mut sb = SeqState::new(&m);
        run_all(&m, &mut sb, &B[..2]);
        for i in 7..A.len() {
            let mut out = m
                .forward(&mut [
                    BatchItem {
                        state: &mut s,
                        tokens: &A[i..=i],
                        logits: LogitsWanted::Last,
                    },
                    BatchItem {
                        state: &mut sb,
                        tokens: &B[2 + (i - 7)..3 + (i - 7)],
                        logits: LogitsWanted::None,
                    },
                ])
                .unwrap();
            assert!(out[1].is_empty());
            got.extend(out.swap_remove(0));
        }
        assert_eq!(got.len(), A.len() * nv);
        assert_eq!(
            got, alone_a,
            "{preset} {ty}: chunked prefill + decode differs from one call"
        );
        assert_eq!(s.len(), A.len());
    }
}

#[test]
fn bad_tokens_and_full_context_are_refused_without_side_effects() {
    let m = model("tiny-dense", GgmlType::Q8_0);
    let mut s = SeqState::new(&m);
    run_all(&m, &mut s, &A[..4]);
    let before = run_all(&m, &mut SeqState::new(&m), A);
    let err = m
        .forward(&mut [BatchItem {
            state: &mut s,
            tokens: &[5, 512],
            logits: LogitsWanted::Last,
        }])
        .unwrap_err();
    assert!(
        matches!(
            err,
            EngineError::BadToken {
                id: 512,
                n_vocab: 512
            }
        ),
        "{err}"
    );
    assert_eq!(s.len(), 4);
    let mut rest = run_all(&m, &mut SeqState::new(&m), &A[..4]);
    rest.extend(run_all(&m, &mut s, &A[4..]));
    assert_eq!(
        rest, before,
        "a refused call must leave the sequence as it was"
    );

    let long = vec![9u32; m.desc.n_ctx_train + 1];
    let mut s2 = SeqState::new(&m);
    let err = m
        .forward(&mut [BatchItem {
            state: &mut s2,
            tokens: &long,
            logits: LogitsWanted::None,
        }])
        .unwrap_err();
    assert!(
        err.to_string()
            .contains("beyond the model's 4096-token limit"),
        "{err}"
    );
    assert!(s2.is_empty());
}

/// The prefix cache's exactness: a state rebuilt from segments (cut at any
/// point, in one or several pieces) continues exactly as the state it was
/// cut from, alone and next to another sequence, on every synthetic type.
#[test]
fn a_state_rebuilt_from_segments_continues_bit_identically() {
    let types = lfm_engine::engine::SUPPORTED_TYPES;
    for (preset, &ty) in types
        .iter()
        .map(|t| ("tiny-moe", t))
        .chain(types.iter().map(|t| ("tiny-dense", t)))
    {
        let m = model(preset, ty);
        let nv = m.n_vocab();
        let cold = run_all(&m, &mut SeqState::new(&m), A);
        let alone_b = run_all(&m, &mut SeqState::new(&m), B);
        for cuts in [&[4][..], &[1, 7], &[3, 5, 10], &[0, 2]] {
            // Cut a state fed in pieces ending at the cuts.
            let mut st = SeqState::new(&m);
            let mut segs = Vec::new();
            let mut from = 0;
            for &c in cuts {
                run_all(&m, &mut st, &A[from..c]);
                segs.push(st.segment(from));
                from = c;
            }
            let at = *cuts.last().unwrap();
            let chain: Vec<_> = segs.iter().collect();
            let mut rebuilt = SeqState::from_segments(&m, &chain).unwrap();
            assert_eq!(rebuilt.len(), at);
            let got = run_all(&m, &mut rebuilt, &A[at..]);
            assert_eq!(
                got,
                cold[at * nv..],
                "{preset} {ty} cuts {cuts:?}: rebuilt state differs"
            );
            // In a batch beside B.
            let mut rebuilt = SeqState::from_segments(&m, &chain).unwrap();
            let mut sb = SeqState::new(&m);
            let both = m
                .forward(&mut [
                    BatchItem {
                        state: &mut sb,
                        tokens: B,
                        logits: LogitsWanted::All,
                    },
                    BatchItem {
                        state: &mut rebuilt,
                        tokens: &A[at..],
                        logits: LogitsWanted::All,
                    },
                ])
                .unwrap();
            assert_eq!(
                both[0], alone_b,
                "{preset} {ty}: B changed beside a rebuilt state"
            );
            assert_eq!(
                both[1],
                cold[at * nv..],
                "{preset} {ty}: rebuilt state differs in a batch"
            );
        }
    }
}

#[test]
fn segments_that_do_not_chain_are_refused() {
    let m = model("tiny-moe", GgmlType::Q8_0);
    let mut st = SeqState::new(&m);
    run_all(&m, &mut st, &A[..3]);
    let first = st.segment(0);
    run_all(&m, &mut st, &A[3..6]);
    let late = st.segment(4);
    assert_eq!(
        SeqState::from_segments(&m, &[&first, &late]).err(),
        Some(lfm_engine::engine::StateError::Gap {
            expected: 3,
            start: 4
        })
    );
    let other = model("tiny-dense", GgmlType::F16);
    assert!(matches!(
        SeqState::from_segments(&other, &[&first]),
        Err(lfm_engine::engine::StateError::Layout { .. })
    ));
}
