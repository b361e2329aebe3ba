//! The quantizer contract: every kind behind `AnyBatch` answers exactly as its concrete batch, a
//! query of another kind is a typed error, weighted sums equal sums of decoded rows, and a spec
//! builds the configuration it names.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use tq_core::{SeededRng, rng::stream};
use tq_quant::{
    AnyBatch, EncodedVectors, Error, MseBatch, QuantizerKind, QuantizerSpec, RotationKind,
    ScaleMode,
};

fn gaussian(n: usize, d: usize, seed: u64) -> Vec<f32> {
    let mut r = SeededRng::new(seed, stream::DATA);
    (0..n * d).map(|_| r.gaussian() as f32 + 0.3).collect()
}

const KINDS: [QuantizerKind; 5] = [
    QuantizerKind::Mse,
    QuantizerKind::Prod,
    QuantizerKind::Polar,
    QuantizerKind::Kivi,
    QuantizerKind::Gmse,
];

#[test]
fn any_batch_answers_as_its_concrete_batch() {
    let (n, d) = (100, 64);
    let xs = gaussian(n, d, 1);
    let q = gaussian(1, d, 2);
    for kind in KINDS {
        let quantizer = QuantizerSpec::new(kind, d, 4, RotationKind::Hadamard, 7)
            .build()
            .unwrap();
        assert_eq!(quantizer.kind(), kind);
        let mut any = quantizer.new_batch();
        any.extend(&xs).unwrap();
        assert_eq!((any.len(), any.dim(), any.kind()), (n, d, kind));
        assert_eq!(any.bytes_per_vector(), quantizer.bytes_per_vector());
        let query = any.encode_query(&q).unwrap();
        let (mut fast, mut exact) = (vec![0.0; n], vec![0.0; n]);
        any.score_into(&query, &mut fast).unwrap();
        any.score_exact_into(&query, &mut exact).unwrap();
        // The concrete batch, through its own inherent API, gives the same numbers.
        let (mut f2, mut e2) = (vec![0.0; n], vec![0.0; n]);
        match &any {
            AnyBatch::Mse(b) => {
                let mq = b.quantizer().prepare_query(&q).unwrap();
                b.score_into(&mq, &mut f2).unwrap();
                b.score_exact_into(&mq, &mut e2).unwrap();
            }
            AnyBatch::Prod(b) => {
                let pq = b.quantizer().prepare_query(&q).unwrap();
                b.score_into(&pq, &mut f2).unwrap();
                b.score_exact_into(&pq, &mut e2).unwrap();
            }
            AnyBatch::Polar(b) => {
                b.score_into(&q, &mut f2).unwrap();
                b.score_into(&q, &mut e2).unwrap();
            }
            AnyBatch::Kivi(b) => {
                let kq = b.quantizer().prepare_query(&q).unwrap();
                b.score_into(&kq, &mut f2).unwrap();
                b.score_exact_into(&kq, &mut e2).unwrap();
            }
            AnyBatch::Gmse(b) => {
                let gq = b.quantizer().prepare_query(&q).unwrap();
                b.score_into(&gq, &mut f2).unwrap();
                b.score_exact_into(&gq, &mut e2).unwrap();
            }
        }
        assert_eq!(fast, f2, "{kind}");
        assert_eq!(exact, e2, "{kind}");
        // top-k ranks by the scores, best first.
        let hits = any.top_k(&query, 5).unwrap();
        assert_eq!(hits.len(), 5);
        let best = exact
            .iter()
            .enumerate()
            .max_by(|a, b| a.1.total_cmp(b.1))
            .unwrap()
            .0;
        assert_eq!(hits[0].index, best, "{kind}");
        // Decoding every row equals decoding row by row.
        let all = any.dequantize_all();
        let mut row = vec![0.0; d];
        for i in [0, 37, n - 1] {
            any.dequantize_row(i, &mut row).unwrap();
            assert_eq!(&all[i * d..(i + 1) * d], &row[..], "{kind} row {i}");
        }
        // Saved and loaded, the batch scores the same.
        let back = AnyBatch::from_safetensors(&any.to_safetensors().unwrap()).unwrap();
        assert!(back.quantizer().same_config(&quantizer));
        let mut again = vec![0.0; n];
        back.score_exact_into(&back.encode_query(&q).unwrap(), &mut again)
            .unwrap();
        assert_eq!(again, exact, "{kind}");
        any.truncate(10);
        assert_eq!(any.len(), 10);
    }
}

#[test]
fn a_query_of_another_kind_is_a_typed_error() {
    let d = 32;
    let xs = gaussian(4, d, 3);
    let build = |kind| {
        let mut b = QuantizerSpec::new(kind, d, 3, RotationKind::Hadamard, 1)
            .build()
            .unwrap()
            .new_batch();
        b.extend(&xs).unwrap();
        b
    };
    let (mse, prod) = (build(QuantizerKind::Mse), build(QuantizerKind::Prod));
    let q = prod.encode_query(&xs[..d]).unwrap();
    let mut out = vec![0.0; 4];
    let e = mse.score_into(&q, &mut out).unwrap_err();
    assert!(matches!(e, Error::ConfigMismatch(_)), "{e}");
    assert!(
        e.to_string().contains("prod") && e.to_string().contains("mse"),
        "{e}"
    );
    assert!(mse.top_k(&q, 2).is_err());
}

#[test]
fn weighted_sums_equal_sums_of_decoded_rows() {
    let (n, d) = (70, 32);
    let xs = gaussian(n, d, 4);
    let mean = tq_quant::MseQuantizer::calibrate_mean(&xs, d).unwrap();
    let specs = [
        QuantizerSpec::new(QuantizerKind::Mse, d, 4, RotationKind::Hadamard, 5),
        QuantizerSpec::new(QuantizerKind::Mse, d, 3, RotationKind::Haar, 5)
            .with_scale(ScaleMode::LeastSquares)
            .with_mean(Some(mean)),
        QuantizerSpec::new(QuantizerKind::Prod, d, 3, RotationKind::Hadamard, 5),
        QuantizerSpec::new(QuantizerKind::Polar, d, 4, RotationKind::Hadamard, 5),
        QuantizerSpec::new(QuantizerKind::Kivi, d, 2, RotationKind::Hadamard, 5)
            .with_kivi(16, tq_quant::KiviAxis::Channel),
        QuantizerSpec::new(QuantizerKind::Kivi, d, 3, RotationKind::Hadamard, 5)
            .with_kivi(16, tq_quant::KiviAxis::Token),
        QuantizerSpec::new(QuantizerKind::Gmse, d, 3, RotationKind::Hadamard, 5)
            .with_scale(ScaleMode::LeastSquares)
            .with_kivi(16, tq_quant::KiviAxis::Channel),
    ];
    let w1: Vec<f32> = (0..n).map(|i| ((i * 7 % 11) as f32) / 11.0).collect();
    let w2: Vec<f32> = (0..n).map(|i| if i % 3 == 0 { 0.0 } else { 0.5 }).collect();
    for spec in specs {
        let mut b = spec.build().unwrap().new_batch();
        b.extend(&xs).unwrap();
        let rows = b.dequantize_all();
        let (mut o1, mut o2) = (vec![9.0; d], vec![9.0; d]);
        b.weighted_sums_into(&[&w1, &w2], &mut [&mut o1, &mut o2])
            .unwrap();
        for (w, o) in [(&w1, &o1), (&w2, &o2)] {
            let mut want = vec![0.0f64; d];
            for (i, r) in rows.chunks_exact(d).enumerate() {
                for (acc, v) in want.iter_mut().zip(r) {
                    *acc += w[i] as f64 * *v as f64;
                }
            }
            let scale = want.iter().map(|v| v.abs()).fold(0.0, f64::max);
            for (a, b) in o.iter().zip(&want) {
                assert!(
                    (*a as f64 - b).abs() <= 1e-4 * scale,
                    "{:?}: {a} vs {b}",
                    spec.kind
                );
            }
        }
        // Shapes are checked.
        let short = vec![1.0; n - 1];
        let mut out = vec![0.0; d];
        assert!(b.weighted_sums_into(&[&short], &mut [&mut out]).is_err());
        let mut narrow = vec![0.0; d - 1];
        assert!(b.weighted_sums_into(&[&w1], &mut [&mut narrow]).is_err());
    }
}

#[test]
fn a_spec_builds_what_it_names_and_refuses_a_mean_it_cannot_use() {
    let d = 16;
    let mean = vec![0.5; d];
    for kind in [
        QuantizerKind::Prod,
        QuantizerKind::Polar,
        QuantizerKind::Kivi,
    ] {
        let e = QuantizerSpec::new(kind, d, 4, RotationKind::Hadamard, 0)
            .with_mean(Some(mean.clone()))
            .build()
            .unwrap_err();
        assert!(matches!(e, Error::ConfigMismatch(_)), "{e}");
    }
    let centred = QuantizerSpec::new(QuantizerKind::Mse, d, 4, RotationKind::Hadamard, 0)
        .with_mean(Some(mean.clone()))
        .build()
        .unwrap();
    assert_eq!(centred.mean(), Some(&mean[..]));
    // Polar levels default to b, b/2, b/2, b/2 and can be given.
    let polar = QuantizerSpec::new(QuantizerKind::Polar, d, 4, RotationKind::Hadamard, 0)
        .build()
        .unwrap();
    let given = QuantizerSpec::new(QuantizerKind::Polar, d, 4, RotationKind::Hadamard, 0)
        .with_polar_levels(Some(vec![4, 2, 2, 2]))
        .build()
        .unwrap();
    assert!(polar.same_config(&given));
    assert_eq!(tq_quant::polar_levels_for(3), vec![3, 1, 1, 1]);
    // Kinds parse from and print as their names.
    for kind in KINDS {
        assert_eq!(kind.name().parse::<QuantizerKind>().unwrap(), kind);
    }
    assert!("pq".parse::<QuantizerKind>().is_err());
    // An MseBatch converts into the enum without copying its configuration.
    let b: AnyBatch = MseBatch::new(match centred {
        tq_quant::AnyQuantizer::Mse(q) => q,
        _ => unreachable!(),
    })
    .into();
    assert_eq!(b.mean(), Some(&mean[..]));
}

/// A finite query large enough for the rotation's sums to pass `f32::MAX` is a typed error at
/// every width (at 6-8 bits it reached an assertion of the integer grid before), a query at the
/// bound scores finitely, and a query so small that its integer unit is subnormal scores through
/// the exact path at 6-8 bits (its fast scores equal its exact ones and the true dots).
#[test]
fn extreme_queries_are_refused_or_scored_exactly() {
    use tq_quant::{MseConfig, MseQuantizer};
    let (n, d) = (64, 128);
    let xs = gaussian(n, d, 5);
    for bits in [1u32, 4, 5, 6, 8] {
        let q = std::sync::Arc::new(
            MseQuantizer::new(MseConfig::new(d, bits, RotationKind::Hadamard, 3)).unwrap(),
        );
        let bound = f32::MAX / (2 * d) as f32;
        let huge = vec![f32::MAX / 2.0; d];
        assert!(
            matches!(
                q.prepare_query(&huge),
                Err(Error::ValueOutOfRange { index: 0, .. })
            ),
            "bits {bits}"
        );
        let mut batch = MseBatch::new(q.clone());
        batch.extend(&xs).unwrap();
        let edge: Vec<f32> = (0..d)
            .map(|j| if j % 2 == 0 { bound } else { -bound })
            .collect();
        let prepared = q.prepare_query(&edge).unwrap();
        let mut out = vec![0.0f32; n];
        batch.score_exact_into(&prepared, &mut out).unwrap();
        assert!(out.iter().all(|v| v.is_finite()), "bits {bits}: {out:?}");
        let tiny: Vec<f32> = gaussian(1, d, 6).iter().map(|v| v * 1e-36).collect();
        let prepared = q.prepare_query(&tiny).unwrap();
        let (mut fast, mut exact) = (vec![0.0f32; n], vec![0.0f32; n]);
        batch.score_into(&prepared, &mut fast).unwrap();
        batch.score_exact_into(&prepared, &mut exact).unwrap();
        if bits >= 6 {
            assert_eq!(fast, exact, "bits {bits}");
            assert!(!prepared.has_fast_path(), "bits {bits}");
        }
        let scale = exact.iter().fold(0.0f32, |m, v| m.max(v.abs()));
        assert!(scale > 0.0 && scale.is_normal(), "bits {bits}: {scale}");
    }
}
