//! The trace format: round trips, validation naming the tensor, and the synthetic generator.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use proptest::prelude::*;
use tq_kv::{Error, KvTrace, SyntheticTrace, calibrate_outliers};

fn small() -> KvTrace {
    SyntheticTrace {
        layers: 2,
        kv_heads: 1,
        q_heads: 2,
        tokens: 40,
        head_dim: 16,
        queries: 3,
        outlier_channels: 2,
        seed: 5,
    }
    .generate()
    .unwrap()
}

#[test]
fn round_trip_and_accessors() {
    let t = small();
    let back = KvTrace::from_safetensors(&t.to_safetensors().unwrap()).unwrap();
    assert_eq!(back, t);
    assert_eq!(t.keys_of(1, 0).len(), 40 * 16);
    assert_eq!(t.queries_of(1, 1).len(), 3 * 16);
    assert!(t.query_positions.iter().all(|&p| (1..=40).contains(&p)));
    assert_eq!(t.meta.source, "synthetic");
}

fn rewrite(t: &KvTrace, f: impl FnOnce(&mut KvTrace)) -> Vec<u8> {
    // Build a file that skips validation on write by editing the serialized header/data.
    let mut t = t.clone();
    f(&mut t);
    let fv = |v: &[f32]| -> Vec<u8> { v.iter().flat_map(|x| x.to_le_bytes()).collect() };
    let p: Vec<u8> = t
        .query_positions
        .iter()
        .flat_map(|&x| (x as i64).to_le_bytes())
        .collect();
    let (k, v, q) = (fv(&t.keys), fv(&t.values), fv(&t.queries));
    let views = vec![
        (
            "keys",
            safetensors::tensor::TensorView::new(
                safetensors::Dtype::F32,
                vec![t.layers, t.kv_heads, t.tokens, t.head_dim],
                &k,
            )
            .unwrap(),
        ),
        (
            "values",
            safetensors::tensor::TensorView::new(
                safetensors::Dtype::F32,
                vec![t.layers, t.kv_heads, t.tokens, t.head_dim],
                &v,
            )
            .unwrap(),
        ),
        (
            "queries",
            safetensors::tensor::TensorView::new(
                safetensors::Dtype::F32,
                vec![t.layers, t.q_heads, t.query_positions.len(), t.head_dim],
                &q,
            )
            .unwrap(),
        ),
        (
            "query_positions",
            safetensors::tensor::TensorView::new(
                safetensors::Dtype::I64,
                vec![t.query_positions.len()],
                &p,
            )
            .unwrap(),
        ),
    ];
    safetensors::serialize(views, None).unwrap()
}

fn tensor_of(e: Error) -> String {
    match e {
        Error::Trace { tensor, .. } => tensor,
        other => panic!("not a trace error: {other:?}"),
    }
}

#[test]
fn malformed_traces_name_the_tensor() {
    let t = small();
    let nan = rewrite(&t, |t| t.values[7] = f32::NAN);
    assert_eq!(
        tensor_of(KvTrace::from_safetensors(&nan).unwrap_err()),
        "values"
    );
    let pos = rewrite(&t, |t| t.query_positions[1] = 41);
    assert_eq!(
        tensor_of(KvTrace::from_safetensors(&pos).unwrap_err()),
        "query_positions"
    );
    let zero = rewrite(&t, |t| t.query_positions[0] = 0);
    assert_eq!(
        tensor_of(KvTrace::from_safetensors(&zero).unwrap_err()),
        "query_positions"
    );
    let heads = rewrite(&t, |t| {
        t.q_heads = 3;
        t.queries = vec![0.5; 2 * 3 * 3 * 16];
        t.kv_heads = 2;
        t.keys.extend(t.keys.clone());
        t.values.extend(t.values.clone());
    });
    assert_eq!(
        tensor_of(KvTrace::from_safetensors(&heads).unwrap_err()),
        "queries"
    );
    let missing = safetensors::serialize(
        Vec::<(&str, safetensors::tensor::TensorView<'_>)>::new(),
        None,
    )
    .unwrap();
    assert_eq!(
        tensor_of(KvTrace::from_safetensors(&missing).unwrap_err()),
        "keys"
    );
    assert!(matches!(
        KvTrace::load(std::path::Path::new("/nonexistent/trace.safetensors")),
        Err(Error::Io { .. })
    ));
}

#[test]
fn synthetic_keys_have_findable_outliers_a_mean_and_spread_norms() {
    let t = SyntheticTrace {
        layers: 1,
        kv_heads: 1,
        q_heads: 1,
        tokens: 400,
        head_dim: 64,
        queries: 4,
        outlier_channels: 4,
        seed: 9,
    }
    .generate()
    .unwrap();
    let k = t.keys_of(0, 0);
    let top = calibrate_outliers(k, 64, 4).unwrap();
    let rms = |c: usize| (k.chunks_exact(64).map(|r| r[c] * r[c]).sum::<f32>() / 400.0).sqrt();
    let typical = {
        let mut all: Vec<f32> = (0..64).map(rms).collect();
        all.sort_by(f32::total_cmp);
        all[32]
    };
    assert!(
        top.iter().all(|&c| rms(c) > 5.0 * typical),
        "outliers {top:?}"
    );
    let norms: Vec<f32> = k
        .chunks_exact(64)
        .map(|r| r.iter().map(|x| x * x).sum::<f32>().sqrt())
        .collect();
    let (lo, hi) = norms
        .iter()
        .fold((f32::MAX, 0f32), |(a, b), &n| (a.min(n), b.max(n)));
    assert!(hi / lo > 1.8, "norm spread {lo}..{hi}");
    // A non-zero mean: the mean key is far from 0 relative to its standard error (≈ rms/20).
    let mean_norm: f32 = (0..64)
        .map(|c| (k.chunks_exact(64).map(|r| r[c]).sum::<f32>() / 400.0).powi(2))
        .sum::<f32>()
        .sqrt();
    assert!(mean_norm > 2.0, "mean norm {mean_norm}");
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(128))]
    #[test]
    fn random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..400)) {
        let _ = KvTrace::from_safetensors(&bytes);
    }
}
