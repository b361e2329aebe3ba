//! Group-centred TurboQuant_mse against its definition (f16 channel means of each group removed,
//! then TurboQuant_mse), streaming fills, scoring on codes, rollback and saved batches.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;

use half::f16;
use tq_core::{SeededRng, rng::stream};
use tq_quant::{
    AnyBatch, EncodedVectors, Error, GroupMseBatch, GroupMseConfig, GroupMseQuantizer, MseBatch,
    RotationKind, ScaleMode,
};

fn rows(n: usize, d: usize, seed: u64) -> Vec<f32> {
    let mut r = SeededRng::new(seed, stream::DATA);
    (0..n * d)
        .map(|i| {
            let c = i % d;
            let offset = if c.is_multiple_of(5) {
                6.0 + (i / d) as f32 * 0.02
            } else {
                0.0
            };
            offset + r.gaussian() as f32
        })
        .collect()
}

fn batch(d: usize, bits: u32, group: usize) -> GroupMseBatch {
    GroupMseBatch::new(Arc::new(
        GroupMseQuantizer::new(GroupMseConfig {
            dim: d,
            bits,
            rotation: RotationKind::Hadamard,
            seed: 4,
            scale: ScaleMode::LeastSquares,
            group,
        })
        .unwrap(),
    ))
}

#[test]
fn groups_are_centred_then_quantized_by_turboquant_mse() {
    let (d, n, g) = (32, 70, 32);
    let xs = rows(n, d, 1);
    let mut b = batch(d, 3, g);
    b.extend(&xs).unwrap();
    assert_eq!((b.quantized_len(), b.residual_len()), (64, 6));
    // The definition: f16 means per channel and group, subtracted, then an MseBatch.
    // (Rows are held at model precision, f16, until their group fills.)
    let mut centred: Vec<f32> = xs[..64 * d]
        .iter()
        .map(|&x| f16::from_f32(x).to_f32())
        .collect();
    let mut means = Vec::new();
    for grp in centred.chunks_exact_mut(g * d) {
        for c in 0..d {
            let m: f64 = grp
                .iter()
                .skip(c)
                .step_by(d)
                .map(|&v| v as f64)
                .sum::<f64>()
                / g as f64;
            let m = f16::from_f64(m);
            means.push(m.to_bits());
            grp.iter_mut()
                .skip(c)
                .step_by(d)
                .for_each(|v| *v -= m.to_f32());
        }
    }
    let mut direct = MseBatch::new(b.quantizer().mse().clone());
    direct.extend(&centred).unwrap();
    assert_eq!(b.means(), &means[..]);
    assert_eq!(
        b.centred().codes().to_row_major(),
        direct.codes().to_row_major()
    );
    assert_eq!(b.centred().norms(), direct.norms());
    let bits16: Vec<u16> = xs[64 * d..]
        .iter()
        .map(|&x| f16::from_f32(x).to_bits())
        .collect();
    assert_eq!(b.residual(), &bits16[..]);
    // Decoding adds the means back; the residual decodes to its f16 values.
    let all = b.dequantize_all();
    let mut row = vec![0.0; d];
    for i in [0, 40, 63, 64, 69] {
        b.dequantize_row(i, &mut row).unwrap();
        assert_eq!(&all[i * d..(i + 1) * d], &row[..]);
    }
    let half: Vec<f32> = xs[64 * d..]
        .iter()
        .map(|&x| f16::from_f32(x).to_f32())
        .collect();
    assert_eq!(&all[64 * d..], &half[..]);
    // Stored bytes: MSE codes (12 B) and scale (4 B) per row, 2 B per mean, f16 residual.
    assert_eq!(b.stored_bytes(), 64 * 16 + 2 * 2 * d + 6 * d * 2);
    // Centring removes the offsets the rotation would otherwise spread: lower error than plain
    // MSE at the same bits on these rows.
    let mut plain = MseBatch::new(b.quantizer().mse().clone());
    plain.extend(&xs[..64 * d]).unwrap();
    let err = |dec: &[f32]| -> f64 {
        dec.iter()
            .zip(&xs)
            .map(|(a, b)| ((a - b) as f64).powi(2))
            .sum()
    };
    assert!(err(&all[..64 * d]) < 0.5 * err(&plain.dequantize_all()));
}

#[test]
fn any_fill_order_and_scores_on_codes() {
    let (d, n) = (64, 130);
    let xs = rows(n, d, 2);
    let mut whole = batch(d, 4, 16);
    whole.extend(&xs).unwrap();
    let mut single = batch(d, 4, 16);
    for r in xs.chunks_exact(d) {
        single.extend(r).unwrap();
    }
    assert_eq!(single.dequantize_all(), whole.dequantize_all());
    let q: Vec<f32> = rows(1, d, 3);
    let dec = whole.dequantize_all();
    let want: Vec<f32> = dec
        .chunks_exact(d)
        .map(|r| r.iter().zip(&q).map(|(a, b)| a * b).sum())
        .collect();
    let scale = want.iter().map(|v| v.abs()).fold(0.0f32, f32::max);
    let query = whole.encode_query(&q).unwrap();
    let (mut exact, mut fast) = (vec![0.0; n], vec![0.0; n]);
    whole.score_exact_into(&query, &mut exact).unwrap();
    whole.score_into(&query, &mut fast).unwrap();
    for i in 0..n {
        assert!((exact[i] - want[i]).abs() <= 1e-4 * scale, "row {i}");
        assert!((fast[i] - want[i]).abs() <= 0.02 * scale, "fast row {i}");
    }
}

#[test]
fn rollback_and_saved_batches() {
    let (d, g) = (32, 16);
    let xs = rows(60, d, 5);
    for n in [0, 7, 16, 20, 47, 48, 55] {
        let mut b = batch(d, 4, g);
        b.extend(&xs).unwrap();
        let before = b.dequantize_all();
        b.truncate(n);
        assert_eq!(b.len(), n);
        // Kept rows decode to what they decoded to before the cut: exactly in whole groups, and
        // rounded to f16 (the residual's precision) in the group the cut moved to the residual.
        let first = n / g * g;
        let want: Vec<f32> = before[..n * d]
            .iter()
            .enumerate()
            .map(|(i, &v)| {
                if i < first * d {
                    v
                } else {
                    f16::from_f32(v).to_f32()
                }
            })
            .collect();
        assert_eq!(b.dequantize_all(), want, "cut at {n}");
        b.extend(&xs[n * d..]).unwrap();
        assert_eq!((b.len(), b.quantized_len()), (60, 48));
    }
    let mut b = batch(d, 3, g);
    b.extend(&xs).unwrap();
    let bytes = b.to_safetensors().unwrap();
    let AnyBatch::Gmse(back) = AnyBatch::from_safetensors(&bytes).unwrap() else {
        panic!("a gmse batch loads as gmse")
    };
    assert_eq!(back.dequantize_all(), b.dequantize_all());
    for cut in (0..bytes.len()).step_by(89) {
        assert!(AnyBatch::from_safetensors(&bytes[..cut]).is_err());
    }
    let e = GroupMseQuantizer::new(GroupMseConfig {
        group: 48,
        ..*b.quantizer().config()
    })
    .unwrap_err();
    assert!(matches!(e, Error::ConfigMismatch(_)), "{e}");
    let mut empty = batch(4, 2, 16);
    assert!(empty.extend(&[1.0, 1e6, 0.0, 0.0]).is_err());
    assert!(empty.is_empty());
}

/// The fast weighted sums of a grouped-MSE batch: the centred rows' sums on the MSE batch's
/// integer path (4 bits), within a thousandth of the decoded rows' magnitude of the exact
/// route; the group means and the pending residual rows are added the same way by both.
#[test]
fn fast_weighted_sums_follow_the_exact_route() {
    let (d, n, g) = (64usize, 300usize, 32usize);
    let xs = rows(n, d, 9);
    let mut b = batch(d, 4, g);
    b.extend(&xs).unwrap();
    assert!(
        b.quantized_len() > 0 && b.quantized_len() < n,
        "a residual too"
    );
    let w: Vec<f32> = (0..n).map(|i| 1.0 / (1.0 + (i % 13) as f32)).collect();
    let (mut fast, mut exact) = (vec![0.0f32; d], vec![0.0f32; d]);
    b.weighted_sums_fast_into(&[&w], &mut [&mut fast]).unwrap();
    b.weighted_sums_into(&[&w], &mut [&mut exact]).unwrap();
    let scale = exact.iter().fold(0.0f32, |m, x| m.max(x.abs()));
    let worst = fast
        .iter()
        .zip(&exact)
        .fold(0.0f32, |m, (a, e)| m.max((a - e).abs()));
    assert!(worst > 0.0, "the fast route is taken");
    // The integer sums add about 0.001 of the 4-bit quantization error (`i16` weights; 0.05-0.08
    // with the byte sums of AVX-512 VNNI CPUs), itself about a tenth of a weighted sum's size:
    // measured 2.8e-6 / 1.8e-4 of the largest output, so 1e-3 leaves 5x over the byte sums.
    assert!(worst <= 1e-3 * scale, "{worst} against {scale}");
}
