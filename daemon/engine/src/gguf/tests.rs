//! Reader/writer tests: round trips of every value type, and hostile input
//! (truncation at every byte, byte flips, crafted headers) that must give
//! typed errors, never panics or out-of-bounds reads.

use super::*;
use proptest::prelude::*;

fn every_value() -> Vec<(String, Value)> {
    let s = |x: &str| x.to_owned();
    vec![
        (s("t.u8"), Value::U8(200)),
        (s("t.i8"), Value::I8(-100)),
        (s("t.u16"), Value::U16(60000)),
        (s("t.i16"), Value::I16(-30000)),
        (s("t.u32"), Value::U32(4_000_000_000)),
        (s("t.i32"), Value::I32(-2_000_000_000)),
        (s("t.f32"), Value::F32(-1.5e-7)),
        (s("t.bool"), Value::Bool(true)),
        (s("t.string"), Value::String("héllo, 世界 🦙".into())),
        (s("t.empty_string"), Value::String(String::new())),
        (s("t.u64"), Value::U64(u64::MAX)),
        (s("t.i64"), Value::I64(i64::MIN)),
        (s("t.f64"), Value::F64(std::f64::consts::PI)),
        (s("a.u8"), Value::Array(Array::U8(vec![1, 2, 3]))),
        (s("a.i8"), Value::Array(Array::I8(vec![-1, 2]))),
        (s("a.u16"), Value::Array(Array::U16(vec![7]))),
        (s("a.i16"), Value::Array(Array::I16(vec![-7, 8]))),
        (s("a.u32"), Value::Array(Array::U32(vec![1, 2]))),
        (s("a.i32"), Value::Array(Array::I32(vec![0, 8, 0, 8]))),
        (s("a.f32"), Value::Array(Array::F32(vec![0.5, -2.0]))),
        (
            s("a.bool"),
            Value::Array(Array::Bool(vec![true, false, true])),
        ),
        (
            s("a.string"),
            Value::Array(Array::String(vec![
                "a b".into(),
                String::new(),
                "Ġthe".into(),
            ])),
        ),
        (s("a.u64"), Value::Array(Array::U64(vec![u64::MAX, 0]))),
        (s("a.i64"), Value::Array(Array::I64(vec![-1]))),
        (s("a.f64"), Value::Array(Array::F64(vec![1e300]))),
        (s("a.empty"), Value::Array(Array::F32(vec![]))),
        (
            s("a.nested"),
            Value::Array(Array::Array(vec![
                Array::I32(vec![1, 2]),
                Array::String(vec!["x".into()]),
                Array::Array(vec![Array::Bool(vec![false])]),
            ])),
        ),
    ]
}

fn tensors() -> Vec<TensorSpec> {
    vec![
        TensorSpec::new("w.f32", &[3, 2], GgmlType::F32),
        TensorSpec::new("w.q8", &[64, 2], GgmlType::Q8_0),
        TensorSpec::new("w.q4k", &[256], GgmlType::Q4K),
        TensorSpec::new("w.4d", &[32, 1, 2, 1], GgmlType::Q4_0),
    ]
}

/// A small valid file; tensor data bytes are `(tensor index * 31 + i) as u8`.
fn sample_file(metadata: &[(String, Value)]) -> Vec<u8> {
    let specs = tensors();
    let sizes: Vec<u64> = specs.iter().map(|t| t.size().unwrap()).collect();
    let mut w = GgufWriter::new(Vec::new(), metadata, specs).unwrap();
    for (ti, size) in sizes.iter().enumerate() {
        let data: Vec<u8> = (0..*size).map(|i| (ti as u64 * 31 + i) as u8).collect();
        // Two chunks, to exercise chunked writes.
        let (a, b) = data.split_at(data.len() / 2);
        w.write_data(a).unwrap();
        w.write_data(b).unwrap();
    }
    w.finish().unwrap()
}

#[test]
fn every_value_type_round_trips() {
    let meta = every_value();
    let bytes = sample_file(&meta);
    let g = Gguf::from_bytes(bytes).unwrap();
    assert_eq!(g.version, 3);
    assert_eq!(g.metadata.len(), meta.len());
    for ((k, v), e) in meta.iter().zip(&g.metadata) {
        assert_eq!(&e.key, k);
        assert_eq!(&e.value, v, "value of {k}");
        assert_eq!(g.get(k), Some(v));
    }
    assert_eq!(g.alignment, DEFAULT_ALIGNMENT);
    assert_eq!(g.data_offset % DEFAULT_ALIGNMENT, 0);
    for (ti, spec) in tensors().iter().enumerate() {
        let t = g.tensor(&spec.name).unwrap();
        assert_eq!(t.dims, spec.dims);
        assert_eq!(t.ty, spec.ty);
        assert_eq!(t.offset % DEFAULT_ALIGNMENT, 0);
        let data = g.tensor_data(t);
        assert_eq!(data.len() as u64, spec.size().unwrap());
        assert!(
            data.iter()
                .enumerate()
                .all(|(i, &b)| b == (ti as u64 * 31 + i as u64) as u8)
        );
    }
}

#[test]
fn version_2_files_are_read() {
    let mut bytes = sample_file(&every_value());
    bytes[4..8].copy_from_slice(&2u32.to_le_bytes());
    let g = Gguf::from_bytes(bytes).unwrap();
    assert_eq!(g.version, 2);
    assert_eq!(g.metadata.len(), every_value().len());
}

#[test]
fn custom_alignment_is_honoured() {
    let meta = vec![("general.alignment".to_owned(), Value::U32(64))];
    let g = Gguf::from_bytes(sample_file(&meta)).unwrap();
    assert_eq!(g.alignment, 64);
    assert_eq!(g.data_offset % 64, 0);
    assert!(g.tensors.iter().all(|t| t.offset % 64 == 0));
    assert_eq!(g.tensor_data(g.tensor("w.q4k").unwrap())[0], 62);
}

#[test]
fn truncation_at_every_byte_is_an_error() {
    let bytes = sample_file(&every_value());
    // The writer pads after the last tensor too; the file ends for real where
    // the last tensor's data ends.
    let g = parse_header(&bytes).unwrap();
    let end = g.tensors.iter().map(|t| g.file_range(t).end).max().unwrap() as usize;
    assert!(end <= bytes.len() && bytes.len() - end < 32);
    for len in 0..end {
        let err = parse_header(&bytes[..len]).expect_err("a truncated file must not parse");
        assert!(
            matches!(
                err,
                GgufError::Truncated { .. }
                    | GgufError::BadMagic { .. }
                    | GgufError::Tensor { .. }
                    | GgufError::Header { .. }
                    | GgufError::Metadata { .. }
            ),
            "len {len}: {err}"
        );
    }
    assert!(parse_header(&bytes).is_ok());
}

#[test]
fn truncated_tensor_data_names_the_tensor() {
    let bytes = sample_file(&[]);
    let g = parse_header(&bytes).unwrap();
    let end = g.file_range(g.tensor("w.4d").unwrap()).end as usize;
    let err = parse_header(&bytes[..end - 1]).unwrap_err();
    let msg = err.to_string();
    assert!(
        msg.contains("w.4d") && msg.contains("past the end of the file"),
        "{msg}"
    );
}

fn header(version: u32, n_tensors: u64, n_kv: u64) -> Vec<u8> {
    let mut b = MAGIC.to_le_bytes().to_vec();
    b.extend_from_slice(&version.to_le_bytes());
    b.extend_from_slice(&n_tensors.to_le_bytes());
    b.extend_from_slice(&n_kv.to_le_bytes());
    b
}

fn kv(b: &mut Vec<u8>, key: &str, ty: u32, payload: &[u8]) {
    b.extend_from_slice(&(key.len() as u64).to_le_bytes());
    b.extend_from_slice(key.as_bytes());
    b.extend_from_slice(&ty.to_le_bytes());
    b.extend_from_slice(payload);
}

fn tensor_info(b: &mut Vec<u8>, name: &str, dims: &[u64], ty: u32, offset: u64) {
    b.extend_from_slice(&(name.len() as u64).to_le_bytes());
    b.extend_from_slice(name.as_bytes());
    b.extend_from_slice(&(dims.len() as u32).to_le_bytes());
    dims.iter()
        .for_each(|d| b.extend_from_slice(&d.to_le_bytes()));
    b.extend_from_slice(&ty.to_le_bytes());
    b.extend_from_slice(&offset.to_le_bytes());
}

fn err_of(bytes: &[u8]) -> String {
    parse_header(bytes)
        .expect_err("must be rejected")
        .to_string()
}

#[test]
fn crafted_headers_give_precise_errors() {
    assert!(err_of(b"GGML\x03\0\0\0").contains("not a GGUF file"));
    assert!(err_of(b"").contains("not a GGUF file"));
    assert!(err_of(&header(1, 0, 0)).contains("version 1"));
    assert!(err_of(&header(3u32.swap_bytes(), 0, 0)).contains("big-endian"));
    assert!(err_of(&header(7, 0, 0)).contains("unsupported GGUF version 7"));
    assert!(err_of(&header(3, 0, u64::MAX)).contains("metadata count"));
    assert!(err_of(&header(3, u64::MAX / 2, 0)).contains("tensor count"));

    let mut b = header(3, 0, 1);
    kv(&mut b, "x.bad", 13, &[0; 8]);
    assert!(err_of(&b).contains("unknown value type 13"));

    let mut b = header(3, 0, 1);
    kv(&mut b, "x.bool", 7, &[2]);
    let e = err_of(&b);
    assert!(
        e.contains("\"x.bool\"") && e.contains("expected 0 or 1"),
        "{e}"
    );

    let mut b = header(3, 0, 2);
    kv(&mut b, "x.a", 4, &1u32.to_le_bytes());
    kv(&mut b, "x.a", 4, &2u32.to_le_bytes());
    assert!(err_of(&b).contains("appears twice"));

    let mut b = header(3, 0, 1);
    let mut arr = 8u32.to_le_bytes().to_vec();
    arr.extend_from_slice(&(1u64 << 40).to_le_bytes());
    kv(&mut b, "x.huge", 9, &arr);
    assert!(err_of(&b).contains("cannot fit"));

    let mut b = header(3, 0, 1);
    let mut s = (3u64).to_le_bytes().to_vec();
    s.extend_from_slice(&[0xff, 0xfe, 0x41]);
    kv(&mut b, "x.s", 8, &s);
    assert!(err_of(&b).contains("not valid UTF-8"));

    // Arrays nested past the limit.
    let mut b = header(3, 0, 1);
    let mut nested = Vec::new();
    for _ in 0..=MAX_ARRAY_DEPTH + 1 {
        nested.extend_from_slice(&9u32.to_le_bytes());
        nested.extend_from_slice(&1u64.to_le_bytes());
    }
    nested.extend_from_slice(&[0; 64]);
    kv(&mut b, "x.deep", 9, &nested);
    assert!(err_of(&b).contains("nest deeper"));

    let mut b = header(3, 0, 1);
    kv(&mut b, "general.alignment", 4, &48u32.to_le_bytes());
    assert!(err_of(&b).contains("power of two"));

    let tensor_case = |dims: &[u64], ty: u32, offset: u64, extra: usize| {
        let mut b = header(3, 1, 0);
        tensor_info(&mut b, "blk.0.w", dims, ty, offset);
        b.resize(b.len().div_ceil(32) * 32 + extra, 0);
        err_of(&b)
    };
    assert!(tensor_case(&[32, 2], 2, 0, 0).contains("past the end of the file"));
    assert!(tensor_case(&[33], 2, 0, 1000).contains("not a multiple of the Q4_0 block size 32"));
    assert!(tensor_case(&[32], 4, 0, 1000).contains("Q4_2"));
    assert!(tensor_case(&[32], 99, 0, 1000).contains("unknown ggml type id 99"));
    assert!(tensor_case(&[4], 0, 8, 1000).contains("not a multiple of the alignment"));
    assert!(tensor_case(&[4, 0], 0, 0, 1000).contains("is zero"));
    assert!(tensor_case(&[1 << 32, 1 << 32], 0, 0, 1000).contains("63 bits"));
    assert!(tensor_case(&[1, 1, 1, 1, 1], 0, 0, 1000).contains("5 dimensions"));
    assert!(tensor_case(&[1 << 40], 0, u64::MAX - 63, 1000).contains("past the end"));
}

#[test]
fn duplicate_tensor_names_are_rejected() {
    let mut b = header(3, 2, 0);
    tensor_info(&mut b, "t", &[4], 0, 0);
    tensor_info(&mut b, "t", &[4], 0, 32);
    b.resize(b.len().div_ceil(32) * 32 + 64, 0);
    assert!(err_of(&b).contains("appears twice"));
}

#[test]
fn writer_refuses_bad_shapes_and_short_data() {
    let bad = GgufWriter::new(
        Vec::new(),
        &[],
        vec![TensorSpec::new("t", &[33], GgmlType::Q8_0)],
    );
    assert!(bad.err().unwrap().to_string().contains("does not fit"));
    let mut w = GgufWriter::new(
        Vec::new(),
        &[],
        vec![TensorSpec::new("t", &[4], GgmlType::F32)],
    )
    .unwrap();
    assert!(w.write_data(&[0; 17]).is_err());
    w.write_data(&[0; 15]).unwrap();
    assert!(
        w.finish()
            .err()
            .unwrap()
            .to_string()
            .contains("missing 1 of its 16 bytes")
    );
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    /// Flipped bytes anywhere either still parse (then every tensor slice is
    /// in bounds) or give an error; they never panic.
    #[test]
    fn byte_flips_never_panic(flips in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..8)) {
        let mut bytes = sample_file(&every_value());
        for (i, v) in flips {
            let at = i.index(bytes.len());
            bytes[at] ^= v | 1;
        }
        if let Ok(g) = Gguf::from_bytes(bytes) {
            for t in &g.tensors {
                prop_assert_eq!(g.tensor_data(t).len() as u64, t.size);
            }
        }
    }

    #[test]
    fn random_bytes_after_a_valid_magic_never_panic(tail in proptest::collection::vec(any::<u8>(), 0..512)) {
        let mut bytes = header(3, 0, 0)[..8].to_vec();
        bytes.extend_from_slice(&tail);
        let _ = parse_header(&bytes);
    }
}
