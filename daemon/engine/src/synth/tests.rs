//! Synthetic models: deterministic per seed, loadable by our own model
//! description, and with the parameter counts of the real shapes.

use super::*;
use crate::gguf::{Gguf, parse_header_prefix};
use crate::inspect::inspect;
use crate::model::{LayerKind, ModelDesc};
use std::io;

fn tiny(preset: &str, ty: GgmlType, seed: u64) -> Vec<u8> {
    let mut buf = Vec::new();
    write_to(find_preset(preset).unwrap(), ty, seed, &mut buf).unwrap();
    buf
}

#[test]
fn same_seed_same_bytes_other_seed_other_weights() {
    let a = tiny("tiny-dense", GgmlType::Q8_0, 5);
    let b = tiny("tiny-dense", GgmlType::Q8_0, 5);
    let c = tiny("tiny-dense", GgmlType::Q8_0, 6);
    assert_eq!(a, b);
    assert_eq!(a.len(), c.len());
    assert_ne!(a, c);
}

#[test]
fn every_small_preset_and_type_loads_and_validates() {
    for preset in ["tiny-moe", "tiny-dense"] {
        for &ty in SYNTH_QUANTS {
            let g = Gguf::from_bytes(tiny(preset, ty, 1)).unwrap();
            let d = ModelDesc::from_header(&g).unwrap();
            d.validate_tensors(&g).unwrap();
            let p = find_preset(preset).unwrap();
            assert_eq!(d.arch, p.arch);
            assert_eq!(
                (d.n_layer, d.n_embd, d.n_vocab, d.n_ff),
                (p.n_layer, p.n_embd, p.n_vocab, p.n_ff)
            );
            assert_eq!(d.tied_output, p.tied_output);
            for (i, l) in d.layers.iter().enumerate() {
                let attn = p.attention_layers.contains(&i);
                assert_eq!(
                    matches!(l.kind, LayerKind::Attention { n_head_kv } if n_head_kv as usize == p.n_head_kv),
                    attn
                );
            }
            // Norms, conv kernels, router and expert bias stay F32 as in LiquidAI's files.
            for t in &g.tensors {
                let f32_only = t.dims.len() == 1
                    || t.name.contains("shortconv.conv")
                    || t.name.contains("ffn_gate_inp");
                assert_eq!(
                    t.ty == GgmlType::F32,
                    f32_only || ty == GgmlType::F32,
                    "{} is {}",
                    t.name,
                    t.ty
                );
            }
        }
    }
}

#[test]
fn f16_copy_agrees_with_f32_original() {
    // Weight scales must keep an F16 copy at cosine >= 0.9999 of its F32 original.
    let a = Gguf::from_bytes(tiny("tiny-moe", GgmlType::F32, 2)).unwrap();
    let b = Gguf::from_bytes(tiny("tiny-moe", GgmlType::F16, 2)).unwrap();
    for ta in a
        .tensors
        .iter()
        .filter(|t| t.dims.len() >= 2 && !t.name.contains("conv.weight"))
    {
        let tb = b.tensor(&ta.name).unwrap();
        if tb.ty != GgmlType::F16 {
            continue;
        }
        let xa = a
            .tensor_data(ta)
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()) as f64);
        let xb = b
            .tensor_data(tb)
            .chunks_exact(2)
            .map(|c| f16::from_le_bytes(c.try_into().unwrap()).to_f64());
        let (mut dot, mut na, mut nb) = (0.0, 0.0, 0.0);
        for (x, y) in xa.zip(xb) {
            dot += x * y;
            na += x * x;
            nb += y * y;
        }
        let cos = dot / (na.sqrt() * nb.sqrt());
        assert!(cos >= 0.9999, "{}: cosine {cos}", ta.name);
    }
}

/// Keeps the first bytes written and counts the rest, so a multi-gigabyte
/// model can be checked without storing it.
struct HeadSink {
    head: Vec<u8>,
    len: u64,
}

impl io::Write for HeadSink {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let room = (16usize << 20).saturating_sub(self.head.len());
        self.head.extend_from_slice(&buf[..room.min(buf.len())]);
        self.len += buf.len() as u64;
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// The header of a full-size preset, from metadata and tensor infos alone.
fn full_size_header(preset: &str, ty: GgmlType) -> crate::gguf::GgufHeader {
    let p = find_preset(preset).unwrap();
    let specs: Vec<TensorSpec> = plan(p, ty.into()).into_iter().map(|t| t.spec).collect();
    let total: u64 = specs
        .iter()
        .map(|s| s.size().unwrap().div_ceil(32) * 32)
        .sum();
    let mut sink = HeadSink {
        head: Vec::new(),
        len: 0,
    };
    GgufWriter::new(&mut sink, &metadata(p, ty.into(), 0), specs).unwrap();
    parse_header_prefix(&sink.head, sink.len + total).unwrap()
}

#[test]
fn lfm2_8b_a1b_shape_has_the_published_parameter_counts() {
    let h = full_size_header("8b-a1b", GgmlType::Q4_0);
    let r = inspect(&h, "8b-a1b");
    let d = r.model.as_ref().expect("loadable");
    assert_eq!(
        (d.n_layer, d.n_attention_layers(), d.n_moe_layers()),
        (24, 6, 22)
    );
    assert_eq!(
        (d.n_expert, d.n_expert_used, d.n_embd, d.n_vocab),
        (32, 4, 2048, 65536)
    );
    // LiquidAI: 8.3B parameters, 1.5B active.
    assert!(
        (8.30e9..8.40e9).contains(&(r.total_params as f64)),
        "{}",
        r.total_params
    );
    assert!(
        (1.45e9..1.60e9).contains(&(r.active_params as f64)),
        "{}",
        r.active_params
    );
    assert_eq!(r.experts.len(), 22 * 32);
    // Q4_0 is 4.5 bits a weight: the file is about 4.7 GB like the real one.
    let q4: u64 = r.bytes_by_type["Q4_0"].bytes;
    assert!((4.5e9..4.8e9).contains(&(q4 as f64)), "{q4}");
    // Every expert's gate slab is 2048 x 1792 weights at 18 bytes per 32.
    let e = &r.experts[0];
    assert_eq!(e.gate.end - e.gate.start, 2048 * 1792 / 32 * 18);
}

#[test]
fn lfm2_350m_shape_matches_the_real_model() {
    let h = full_size_header("350m", GgmlType::F16);
    let r = inspect(&h, "350m");
    let d = r.model.as_ref().expect("loadable");
    let attn: Vec<usize> = d
        .layers
        .iter()
        .enumerate()
        .filter(|(_, l)| matches!(l.kind, LayerKind::Attention { .. }))
        .map(|(i, _)| i)
        .collect();
    assert_eq!(attn, [2, 5, 8, 10, 12, 14]);
    assert_eq!(
        (d.n_embd, d.n_ff, d.n_head, d.head_dim),
        (1024, 4608, 16, 64)
    );
    // LFM2-350M: about 354M parameters.
    assert!(
        (3.4e8..3.7e8).contains(&(r.total_params as f64)),
        "{}",
        r.total_params
    );
}

#[test]
fn unknown_preset_and_quant_are_clear_errors() {
    let p = find_preset("tiny-dense").unwrap();
    let e = write_to(p, GgmlType::IQ2XXS, 0, Vec::new())
        .unwrap_err()
        .to_string();
    assert!(e.contains("llama-quantize"), "{e}");
    assert!(find_preset("9b").is_none());
    assert!(
        SynthError::UnknownPreset("9b".into())
            .to_string()
            .contains("tiny-moe")
    );
}

/// The 8b-a1b header with one edit to its tensors or metadata.
fn edited_header(
    edit_specs: impl FnOnce(&mut Vec<TensorSpec>),
    edit_meta: impl FnOnce(&mut Vec<(String, Value)>),
) -> crate::gguf::GgufHeader {
    let p = find_preset("8b-a1b").unwrap();
    let mut specs: Vec<TensorSpec> = plan(p, GgmlType::Q4_0.into())
        .into_iter()
        .map(|t| t.spec)
        .collect();
    edit_specs(&mut specs);
    let mut meta = metadata(p, GgmlType::Q4_0.into(), 0);
    edit_meta(&mut meta);
    let total: u64 = specs
        .iter()
        .map(|s| s.size().unwrap().div_ceil(32) * 32)
        .sum();
    let mut sink = HeadSink {
        head: Vec::new(),
        len: 0,
    };
    GgufWriter::new(&mut sink, &meta, specs).unwrap();
    parse_header_prefix(&sink.head, sink.len + total).unwrap()
}

#[test]
fn wrong_expert_count_in_a_tensor_is_named_with_both_shapes() {
    let h = edited_header(
        |specs| {
            let t = specs
                .iter_mut()
                .find(|t| t.name == "blk.7.ffn_up_exps.weight")
                .unwrap();
            t.dims = vec![2048, 1792, 16];
        },
        |_| {},
    );
    let d = ModelDesc::from_header(&h).unwrap();
    assert_eq!(
        d.validate_tensors(&h).unwrap_err().to_string(),
        "blk.7.ffn_up_exps.weight: expected [2048, 1792, 32], found [2048, 1792, 16]"
    );
}

#[test]
fn missing_tensors_and_bad_metadata_are_named() {
    let h = edited_header(
        |specs| specs.retain(|t| t.name != "blk.3.shortconv.conv.weight"),
        |_| {},
    );
    let e = ModelDesc::from_header(&h)
        .unwrap()
        .validate_tensors(&h)
        .unwrap_err()
        .to_string();
    assert_eq!(
        e,
        "tensor blk.3.shortconv.conv.weight is missing (expected shape [3, 2048])"
    );

    let h = edited_header(
        |_| {},
        |m| m.retain(|(k, _)| k != "lfm2moe.expert_gating_func"),
    );
    let e = ModelDesc::from_header(&h).unwrap_err().to_string();
    assert!(
        e.contains("\"lfm2moe.expert_gating_func\" is missing"),
        "{e}"
    );

    let h = edited_header(
        |_| {},
        |m| {
            let v = m
                .iter_mut()
                .find(|(k, _)| k == "lfm2moe.attention.head_count_kv")
                .unwrap();
            v.1 = Value::Array(Array::I32(vec![0; 23]));
        },
    );
    let e = ModelDesc::from_header(&h).unwrap_err().to_string();
    assert!(
        e.contains("lfm2moe.attention.head_count_kv") && e.contains("24 integers"),
        "{e}"
    );

    let h = edited_header(
        |_| {},
        |m| {
            let v = m
                .iter_mut()
                .find(|(k, _)| k == "general.architecture")
                .unwrap();
            v.1 = Value::String("llama".into());
        },
    );
    let e = ModelDesc::from_header(&h).unwrap_err().to_string();
    assert!(e.contains("\"llama\" is not supported"), "{e}");

    let h = edited_header(
        |_| {},
        |m| {
            let v = m
                .iter_mut()
                .find(|(k, _)| k == "lfm2moe.expert_used_count")
                .unwrap();
            v.1 = Value::U32(33);
        },
    );
    let e = ModelDesc::from_header(&h).unwrap_err().to_string();
    assert!(e.contains("between 1 and the expert count 32"), "{e}");
}

#[test]
fn a_type_we_cannot_compute_names_tensor_and_type() {
    let h = edited_header(
        |specs| {
            let t = specs
                .iter_mut()
                .find(|t| t.name == "blk.5.ffn_down_exps.weight")
                .unwrap();
            t.ty = GgmlType::IQ2XXS;
        },
        |_| {},
    );
    let d = ModelDesc::from_header(&h).unwrap();
    d.validate_tensors(&h).unwrap();
    let e = d
        .check_types(&h, &[GgmlType::F32, GgmlType::Q4_0])
        .unwrap_err()
        .to_string();
    assert!(
        e.starts_with(
            "tensor blk.5.ffn_down_exps.weight has type IQ2_XXS, which lfmd cannot compute yet"
        ),
        "{e}"
    );
}
