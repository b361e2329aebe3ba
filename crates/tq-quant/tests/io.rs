//! Safetensors round trips and validation of untrusted bytes.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;

use proptest::prelude::*;
use tq_core::{RotationKind, SeededRng, rng::stream};
use tq_quant::{AnyBatch, EncodedVectors};
use tq_quant::{
    Error, MseBatch, MseConfig, MseQuantizer, ProdBatch, ProdConfig, ProdQuantizer, SketchKind,
};

fn rows(n: usize, d: usize) -> Vec<f32> {
    let mut r = SeededRng::new(3, stream::DATA);
    (0..n * d).map(|_| r.gaussian() as f32).collect()
}

fn mse_batch(d: usize, bits: u32, n: usize) -> MseBatch {
    let q =
        Arc::new(MseQuantizer::new(MseConfig::new(d, bits, RotationKind::Hadamard, 1)).unwrap());
    let mut b = MseBatch::new(q);
    b.extend(&rows(n, d)).unwrap();
    b
}

fn prod_batch(d: usize, bits: u32, n: usize) -> ProdBatch {
    let q = Arc::new(
        ProdQuantizer::new(ProdConfig {
            dim: d,
            bits,
            rotation: RotationKind::Haar,
            sketch: SketchKind::Orthogonal,
            seed: 1,
        })
        .unwrap(),
    );
    let mut b = ProdBatch::new(q);
    b.extend(&rows(n, d)).unwrap();
    b
}

#[test]
fn round_trips() {
    for (d, bits, n) in [
        (128usize, 4u32, 100usize),
        (7, 3, 33),
        (96, 1, 0),
        (200, 8, 5),
    ] {
        let b = mse_batch(d, bits, n);
        let bytes = b.to_safetensors().unwrap();
        let AnyBatch::Mse(back) = AnyBatch::from_safetensors(&bytes).unwrap() else {
            panic!("kind")
        };
        assert_eq!(back.codes(), b.codes());
        assert_eq!(back.norms(), b.norms());
        assert_eq!(back.quantizer().config(), b.quantizer().config());
        let p = prod_batch(d, bits, n);
        let bytes = p.to_safetensors().unwrap();
        let AnyBatch::Prod(back) = AnyBatch::from_safetensors(&bytes).unwrap() else {
            panic!("kind")
        };
        assert_eq!(back.codes(), p.codes());
        assert_eq!(back.signs(), p.signs());
        assert_eq!(back.residual_norms(), p.residual_norms());
        // A loaded batch scores exactly like the original (the quantizer is regenerated).
        if n > 0 {
            let q = rows(1, d);
            let (mut s1, mut s2) = (vec![0.0; n], vec![0.0; n]);
            p.score_exact_into(&p.quantizer().prepare_query(&q).unwrap(), &mut s1)
                .unwrap();
            back.score_exact_into(&back.quantizer().prepare_query(&q).unwrap(), &mut s2)
                .unwrap();
            assert_eq!(s1, s2);
        }
    }
}

fn rewrite(bytes: &[u8], f: impl FnOnce(&mut serde_json::Value)) -> Vec<u8> {
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let mut header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    f(&mut header);
    let h = serde_json::to_vec(&header).unwrap();
    let mut out = (h.len() as u64).to_le_bytes().to_vec();
    out.extend(h);
    out.extend(&bytes[8 + n..]);
    out
}

#[test]
fn malformed_metadata_and_tensors_are_typed_errors() {
    let good = mse_batch(64, 3, 10).to_safetensors().unwrap();
    let v = rewrite(&good, |h| h["__metadata__"]["version"] = "2".into());
    assert!(matches!(
        AnyBatch::from_safetensors(&v),
        Err(Error::UnsupportedVersion { .. })
    ));
    let v = rewrite(&good, |h| h["__metadata__"]["kind"] = "pq".into());
    assert!(matches!(
        AnyBatch::from_safetensors(&v),
        Err(Error::InvalidFormat {
            what: "__metadata__",
            ..
        })
    ));
    let v = rewrite(&good, |h| {
        h["__metadata__"]["config"] = r#"{"dim":64,"bits":9,"rotation":"hadamard","seed":1}"#.into()
    });
    assert!(matches!(
        AnyBatch::from_safetensors(&v),
        Err(Error::BitsOutOfRange { .. })
    ));
    let v = rewrite(&good, |h| {
        h["__metadata__"]["config"] = r#"{"dim":65,"bits":3,"rotation":"hadamard","seed":1}"#.into()
    });
    assert!(matches!(
        AnyBatch::from_safetensors(&v),
        Err(Error::InvalidFormat { what: "codes", .. })
    ));
    let v = rewrite(&good, |h| {
        h["__metadata__"].as_object_mut().unwrap().remove("config");
    });
    assert!(matches!(
        AnyBatch::from_safetensors(&v),
        Err(Error::InvalidFormat {
            what: "__metadata__",
            ..
        })
    ));
    // a NaN norm
    let n = u64::from_le_bytes(good[..8].try_into().unwrap()) as usize;
    let header: serde_json::Value = serde_json::from_slice(&good[8..8 + n]).unwrap();
    let start = 8 + n + header["norms"]["data_offsets"][0].as_u64().unwrap() as usize;
    let mut v = good.clone();
    v[start + 4..start + 8].copy_from_slice(&f32::NAN.to_le_bytes());
    let r = AnyBatch::from_safetensors(&v);
    assert!(
        matches!(r, Err(Error::InvalidFormat { what: "norms", .. })),
        "{r:?}"
    );
    // padding bits set in a code row (d = 7, b = 3: 21 of 24 bits used)
    let odd = mse_batch(7, 3, 2).to_safetensors().unwrap();
    let n = u64::from_le_bytes(odd[..8].try_into().unwrap()) as usize;
    let header: serde_json::Value = serde_json::from_slice(&odd[8..8 + n]).unwrap();
    let start = header["codes"]["data_offsets"][0].as_u64().unwrap() as usize;
    let mut v = odd.clone();
    v[8 + n + start + 2] |= 0x80;
    assert!(matches!(
        AnyBatch::from_safetensors(&v),
        Err(Error::InvalidFormat { what: "codes", .. })
    ));
}

#[test]
fn every_truncation_is_an_error() {
    let good = prod_batch(16, 3, 5).to_safetensors().unwrap();
    for cut in 0..good.len() {
        assert!(
            AnyBatch::from_safetensors(&good[..cut]).is_err(),
            "cut {cut}"
        );
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]
    #[test]
    fn random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        let _ = AnyBatch::from_safetensors(&bytes);
    }

    #[test]
    fn bit_flips_never_panic(pos in 0usize..10_000, bit in 0u8..8) {
        let mut v = mse_batch(16, 2, 3).to_safetensors().unwrap();
        let p = pos % v.len();
        v[p] ^= 1 << bit;
        let _ = AnyBatch::from_safetensors(&v);
    }
}

/// The same batch always serializes to the same bytes: the metadata entries are written in key
/// order, not in the writer's hash-map order (which differs between maps and runs).
#[test]
fn saved_bytes_are_deterministic() {
    let b = mse_batch(64, 3, 50);
    let first = b.to_safetensors().unwrap();
    for _ in 0..8 {
        assert_eq!(b.to_safetensors().unwrap(), first);
    }
    let header_len = u64::from_le_bytes(first[..8].try_into().unwrap()) as usize;
    let header = std::str::from_utf8(&first[8..8 + header_len]).unwrap();
    let keys = ["\"config\"", "\"format\"", "\"kind\"", "\"version\""];
    let at: Vec<usize> = keys.iter().map(|k| header.find(k).unwrap()).collect();
    assert!(at.windows(2).all(|w| w[0] < w[1]), "{header}");
    let p = prod_batch(32, 2, 10);
    assert_eq!(p.to_safetensors().unwrap(), p.to_safetensors().unwrap());
    assert_eq!(
        AnyBatch::from_safetensors(&first).unwrap().dequantize_all(),
        AnyBatch::from(b).dequantize_all()
    );
}
