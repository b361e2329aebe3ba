//! Saving and restoring whole caches.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use proptest::prelude::*;
use tq_core::{SeededRng, rng::stream};
use tq_kv::{
    Error, HeadConfig, KeyStrategy, ModelCache, MultiHeadCache, Outliers, Precision,
    calibrate_outliers,
};

fn rows(n: usize, seed: u64) -> Vec<f32> {
    let mut r = SeededRng::new(seed, stream::DATA);
    (0..n).map(|_| r.gaussian() as f32).collect()
}

fn model() -> (ModelCache, Vec<f32>, Vec<f32>) {
    let (d, nkv, nq, t) = (32, 2, 4, 50);
    let cfg = HeadConfig {
        key_strategy: KeyStrategy::Prod,
        window: 6,
        seed: 9,
        ..HeadConfig::new(
            d,
            Precision::parse("2.5", d).unwrap(),
            Precision::Uniform(3),
        )
    };
    let (k, v) = (rows(nkv * t * d, 1), rows(nkv * t * d, 2));
    let mut layers = Vec::new();
    for _ in 0..2 {
        let outliers: Vec<Outliers> = (0..nkv)
            .map(|h| Outliers {
                keys: Some(calibrate_outliers(&k[h * t * d..(h + 1) * t * d], d, 8).unwrap()),
                values: None,
                ..Default::default()
            })
            .collect();
        let mut layer = MultiHeadCache::new(nq, nkv, &cfg, &outliers).unwrap();
        layer.append(&k, &v).unwrap();
        layers.push(layer);
    }
    (ModelCache::from_layers(layers), k, v)
}

#[test]
fn round_trip_gives_identical_attention_and_continues_identically() {
    let (mut m, _, _) = model();
    let bytes = m.to_safetensors().unwrap();
    let mut back = ModelCache::from_safetensors(&bytes).unwrap();
    assert_eq!(back.memory_bytes(), m.memory_bytes());
    let q = rows(4 * 32, 3);
    for l in 0..2 {
        let (mut a, mut b) = (vec![0.0; 4 * 32], vec![0.0; 4 * 32]);
        m.layer(l).unwrap().attend(&q, &mut a).unwrap();
        back.layer(l).unwrap().attend(&q, &mut b).unwrap();
        assert_eq!(a, b);
        assert_eq!(
            m.layer(l).unwrap().head(1).unwrap().keys().unwrap(),
            back.layer(l).unwrap().head(1).unwrap().keys().unwrap()
        );
    }
    // Prefix reuse: appending to the restored cache equals appending to the original.
    let (k2, v2) = (rows(2 * 7 * 32, 4), rows(2 * 7 * 32, 5));
    m.layer_mut(0).unwrap().append(&k2, &v2).unwrap();
    back.layer_mut(0).unwrap().append(&k2, &v2).unwrap();
    let (mut a, mut b) = (vec![0.0; 4 * 32], vec![0.0; 4 * 32]);
    m.layer(0).unwrap().attend(&q, &mut a).unwrap();
    back.layer(0).unwrap().attend(&q, &mut b).unwrap();
    assert_eq!(a, b);
}

#[test]
fn every_truncation_and_a_foreign_file_are_errors() {
    let (m, _, _) = model();
    let bytes = m.to_safetensors().unwrap();
    for cut in (0..bytes.len()).step_by(97) {
        assert!(ModelCache::from_safetensors(&bytes[..cut]).is_err());
    }
    let other = safetensors::serialize(
        Vec::<(&str, safetensors::tensor::TensorView<'_>)>::new(),
        None,
    )
    .unwrap();
    assert!(matches!(
        ModelCache::from_safetensors(&other),
        Err(Error::InvalidCache { .. })
    ));
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]
    #[test]
    fn bit_flips_never_panic(pos in 0usize..1_000_000, bit in 0u8..8) {
        let (m, _, _) = model();
        let mut bytes = m.to_safetensors().unwrap();
        let p = pos % bytes.len();
        bytes[p] ^= 1 << bit;
        let _ = ModelCache::from_safetensors(&bytes);
    }
}
