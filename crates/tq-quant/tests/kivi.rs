//! KIVI against a direct per-group computation, streaming fills, scoring on codes, rollback
//! across group boundaries and saved batches (round trip and tampering).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;

use half::f16;
use tq_core::{SeededRng, bitpack, rng::stream};
use tq_quant::{AnyBatch, EncodedVectors, Error, KiviAxis, KiviBatch, KiviConfig, KiviQuantizer};

/// Rows with per-channel offsets that drift over tokens (what post-RoPE keys look like).
fn keys(n: usize, d: usize, seed: u64) -> Vec<f32> {
    let mut r = SeededRng::new(seed, stream::DATA);
    let offsets: Vec<f32> = (0..d).map(|c| if c % 7 == 0 { 8.0 } else { 0.5 }).collect();
    (0..n)
        .flat_map(|t| {
            let o = offsets.clone();
            let g: Vec<f32> = (0..d).map(|_| r.gaussian() as f32).collect();
            (0..d).map(move |c| o[c] * ((t as f32) * 0.01 + c as f32).sin() + g[c])
        })
        .collect()
}

fn batch(d: usize, bits: u32, group: usize, axis: KiviAxis) -> KiviBatch {
    KiviBatch::new(Arc::new(
        KiviQuantizer::new(KiviConfig {
            dim: d,
            bits,
            group,
            axis,
        })
        .unwrap(),
    ))
}

/// The nearest f16 at or below (`down`) or at or above `x`, by stepping through every f16.
fn f16_toward(x: f32, down: bool) -> f32 {
    (0..=u16::MAX)
        .map(|b| f16::from_bits(b).to_f32())
        .filter(|v| v.is_finite() && if down { *v <= x } else { *v >= x })
        .min_by(|a, b| (a - x).abs().total_cmp(&(b - x).abs()))
        .unwrap()
}

/// The codes and decoded values of one group of values, computed directly from the definition:
/// the zero is `lo` rounded down to f16, the scale `(hi - z)/(2^b - 1)` rounded up.
fn direct(values: &[f32], bits: u32) -> (Vec<u8>, Vec<f32>) {
    let lo = values.iter().copied().fold(f32::INFINITY, f32::min);
    let hi = values.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let max = ((1u32 << bits) - 1) as f32;
    let z = f16_toward(lo, true);
    let s = f16_toward(((hi - z) / max).max(0.0), false);
    let codes: Vec<u8> = values
        .iter()
        .map(|&x| {
            if s > 0.0 {
                ((x - z) / s).round().clamp(0.0, max) as u8
            } else {
                0
            }
        })
        .collect();
    let back = codes.iter().map(|&k| z + s * k as f32).collect();
    (codes, back)
}

fn codes_of(b: &KiviBatch, i: usize) -> Vec<u8> {
    let c = b.quantizer().config();
    let mut packed = vec![0u8; b.quantizer().row_bytes()];
    b.codes().read_row(i, &mut packed);
    let mut codes = vec![0u8; c.dim];
    bitpack::unpack(&packed, c.bits, &mut codes).unwrap();
    codes
}

#[test]
fn codes_follow_the_per_group_definition_on_both_axes() {
    let (d, n, g) = (48, 70, 32);
    let xs = keys(n, d, 1);
    for bits in [2, 3, 4, 8] {
        // Channel axis: each channel of each complete group of 32 rows.
        let mut b = batch(d, bits, g, KiviAxis::Channel);
        b.extend(&xs).unwrap();
        assert_eq!((b.quantized_len(), b.residual_len()), (64, 6));
        // Rows are held at model precision (f16) until their group fills.
        let half: Vec<f32> = xs.iter().map(|&x| f16::from_f32(x).to_f32()).collect();
        let bits16: Vec<u16> = xs[64 * d..]
            .iter()
            .map(|&x| f16::from_f32(x).to_bits())
            .collect();
        assert_eq!(b.residual(), &bits16[..]);
        let mut row = vec![0.0; d];
        b.dequantize_row(65, &mut row).unwrap();
        assert_eq!(row, &half[65 * d..66 * d]);
        for group in 0..2 {
            for c in 0..d {
                let vals: Vec<f32> = (0..g).map(|t| half[(group * g + t) * d + c]).collect();
                let (codes, back) = direct(&vals, bits);
                for t in 0..g {
                    let i = group * g + t;
                    assert_eq!(codes_of(&b, i)[c], codes[t], "bits {bits} row {i} ch {c}");
                    b.dequantize_row(i, &mut row).unwrap();
                    assert_eq!(row[c], back[t]);
                }
            }
        }
        // Token axis: each row in groups of 32 channels (the last one 16 wide).
        let mut v = batch(d, bits, g, KiviAxis::Token);
        v.extend(&xs).unwrap();
        assert_eq!((v.quantized_len(), v.residual_len()), (n, 0));
        for i in [0, 33, n - 1] {
            let r = &xs[i * d..(i + 1) * d];
            let (mut codes, mut back) = direct(&r[..32], bits);
            let (c2, b2) = direct(&r[32..], bits);
            codes.extend(c2);
            back.extend(b2);
            assert_eq!(codes_of(&v, i), codes, "bits {bits} row {i}");
            v.dequantize_row(i, &mut row).unwrap();
            assert_eq!(row, back);
        }
        // Stored bytes: codes, f16 scale and zero per channel and group, the f16 residual.
        let rb = bitpack::packed_len(d, bits);
        assert_eq!(b.stored_bytes(), 64 * rb + 2 * 2 * 2 * d + 6 * d * 2);
        assert_eq!(v.stored_bytes(), n * (rb + 2 * 2 * 2));
    }
}

#[test]
fn any_fill_order_gives_the_same_codes() {
    let (d, n) = (32, 150);
    let xs = keys(n, d, 2);
    for axis in [KiviAxis::Channel, KiviAxis::Token] {
        let mut whole = batch(d, 3, 16, axis);
        whole.extend(&xs).unwrap();
        let mut single = batch(d, 3, 16, axis);
        for row in xs.chunks_exact(d) {
            single.extend(row).unwrap();
        }
        let mut mixed = batch(d, 3, 16, axis);
        let mut at = 0;
        for (k, step) in [1usize, 5, 16, 17, 40, 3, 68].iter().cycle().enumerate() {
            if at == n || k > 100 {
                break;
            }
            let take = (*step).min(n - at);
            mixed.extend(&xs[at * d..(at + take) * d]).unwrap();
            at += take;
        }
        assert_eq!(at, n);
        let bytes = whole.to_safetensors().unwrap();
        for other in [&single, &mixed] {
            assert_eq!(other.len(), n);
            assert_eq!(other.dequantize_all(), whole.dequantize_all(), "{axis:?}");
            let back = AnyBatch::from_safetensors(&other.to_safetensors().unwrap()).unwrap();
            let AnyBatch::Kivi(back) = back else {
                panic!("a kivi batch loads as kivi")
            };
            assert_eq!(back.codes().to_row_major(), whole.codes().to_row_major());
            assert_eq!(back.scales(), whole.scales());
            assert_eq!(back.zeros(), whole.zeros());
            assert_eq!(back.residual(), whole.residual());
        }
        assert!(!bytes.is_empty());
    }
}

#[test]
fn scores_on_codes_equal_scores_of_the_decoded_rows() {
    let (d, n) = (64, 300);
    let xs = keys(n, d, 3);
    let mut r = SeededRng::new(9, stream::QUERIES);
    let q: Vec<f32> = (0..d).map(|_| r.gaussian() as f32).collect();
    for (bits, group, axis) in [
        (4, 32, KiviAxis::Channel),
        (2, 64, KiviAxis::Channel),
        (3, 16, KiviAxis::Channel),
        (1, 128, KiviAxis::Channel),
        (6, 32, KiviAxis::Channel),
        (4, 32, KiviAxis::Token),
    ] {
        let mut b = batch(d, bits, group, axis);
        b.extend(&xs).unwrap();
        let rows = b.dequantize_all();
        let want: Vec<f32> = rows
            .chunks_exact(d)
            .map(|row| row.iter().zip(&q).map(|(a, b)| a * b).sum())
            .collect();
        let scale = want.iter().map(|v| v.abs()).fold(0.0f32, f32::max);
        let query = b.encode_query(&q).unwrap();
        let (mut exact, mut fast) = (vec![0.0; n], vec![0.0; n]);
        b.score_exact_into(&query, &mut exact).unwrap();
        b.score_into(&query, &mut fast).unwrap();
        for i in 0..n {
            assert!(
                (exact[i] - want[i]).abs() <= 1e-4 * scale,
                "{bits} bits, G = {group}, {axis:?}, row {i}: {} vs {}",
                exact[i],
                want[i]
            );
            // The u8 tables add at most half a step per table: well under 2% of the range.
            assert!(
                (fast[i] - want[i]).abs() <= 0.02 * scale,
                "fast {bits} bits G = {group} row {i}: {} vs {}",
                fast[i],
                want[i]
            );
        }
    }
}

/// The fast 4-bit path rounds each group's weights `q_c s_c` to `i8` with step
/// `max_c |q_c s_c| / 127`: a row's fast score differs from its exact score by at most
/// `step / 2 · Σ_c code_c` (plus float rounding of the two sums). Scoring several queries at
/// once gives each query's one-at-a-time scores bit for bit, on the residual rows too.
#[test]
fn fast_four_bit_scores_stay_within_the_weight_rounding_bound() {
    for (d, group, n) in [(64usize, 32usize, 300usize), (128, 64, 200), (7, 16, 40)] {
        let xs = keys(n, d, 11);
        let mut b = batch(d, 4, group, KiviAxis::Channel);
        b.extend(&xs).unwrap();
        let mut r = SeededRng::new(12, stream::QUERIES);
        let qs: Vec<Vec<f32>> = (0..4)
            .map(|_| (0..d).map(|_| r.gaussian() as f32).collect())
            .collect();
        let queries: Vec<_> = qs
            .iter()
            .map(|q| b.quantizer().prepare_query(q).unwrap())
            .collect();
        let mut alone = vec![vec![0.0f32; n]; qs.len()];
        for (q, (query, fast)) in qs.iter().zip(queries.iter().zip(alone.iter_mut())) {
            let mut exact = vec![0.0; n];
            b.score_exact_into(query, &mut exact).unwrap();
            b.score_into(query, fast).unwrap();
            for i in 0..b.quantized_len() {
                let g = i / group;
                let scales: Vec<f32> = b.scales()[g * d..(g + 1) * d]
                    .iter()
                    .map(|&s| f16::from_bits(s).to_f32())
                    .collect();
                let maxw = q
                    .iter()
                    .zip(&scales)
                    .fold(0.0f32, |m, (a, s)| m.max((a * s).abs()));
                let codes: f32 = codes_of(&b, i).iter().map(|&k| k as f32).sum();
                let size: f32 = exact[i].abs()
                    + q.iter()
                        .zip(&scales)
                        .map(|(a, s)| (a * s).abs())
                        .sum::<f32>()
                        * 15.0;
                let bound = maxw / 127.0 / 2.0 * codes + 1e-5 * size;
                assert!(
                    (fast[i] - exact[i]).abs() <= bound,
                    "d {d} G {group} row {i}: {} vs {} (bound {bound})",
                    fast[i],
                    exact[i]
                );
            }
            for i in b.quantized_len()..n {
                assert!((fast[i] - exact[i]).abs() <= 1e-5 * exact[i].abs().max(1.0));
            }
        }
        let refs: Vec<_> = queries.iter().collect();
        let mut many = vec![vec![0.0f32; n]; qs.len()];
        let mut outs: Vec<&mut [f32]> = many.iter_mut().map(|o| &mut o[..]).collect();
        b.score_many_into(&refs, &mut outs).unwrap();
        assert_eq!(many, alone, "d {d} G {group}");
        // Long batches split their groups across threads: the same scores as one thread.
        if d == 7 {
            let n = 16_400;
            let mut long = batch(d, 4, group, KiviAxis::Channel);
            long.extend(&keys(n, d, 13)).unwrap();
            let pool = |t| {
                rayon::ThreadPoolBuilder::new()
                    .num_threads(t)
                    .build()
                    .unwrap()
            };
            let two: Vec<_> = queries.iter().take(2).collect();
            let run = |threads| {
                let mut outs = vec![vec![0.0f32; n]; 2];
                let mut refs: Vec<&mut [f32]> = outs.iter_mut().map(|o| &mut o[..]).collect();
                pool(threads)
                    .install(|| long.score_many_into(&two, &mut refs))
                    .unwrap();
                outs
            };
            assert_eq!(run(1), run(2));
        }
        // Mismatched outputs are typed errors.
        let mut short = vec![0.0f32; n - 1];
        assert!(
            b.score_many_into(&refs[..1], &mut [&mut short[..]])
                .is_err()
        );
        assert!(
            b.score_many_into(&refs[..2], &mut [&mut many[0][..]])
                .is_err()
        );
    }
}

#[test]
fn rollback_across_group_boundaries_keeps_what_was_kept() {
    let (d, g) = (32, 16);
    let xs = keys(100, d, 4);
    for n in [0, 5, 16, 17, 40, 47, 48, 63, 64, 90] {
        let mut b = batch(d, 4, g, KiviAxis::Channel);
        b.extend(&xs).unwrap();
        let before = b.dequantize_all();
        b.truncate(n);
        assert_eq!(b.len(), n);
        assert_eq!(b.quantized_len(), n / g * g, "cut at {n}");
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
        // Refilling completes the group and quantizes it again.
        b.extend(&xs[n * d..]).unwrap();
        assert_eq!(b.len(), 100);
        assert_eq!(b.quantized_len(), 96);
        let after = b.dequantize_all();
        let err: f32 = after
            .iter()
            .zip(&xs)
            .map(|(a, x)| (a - x).abs())
            .fold(0.0, f32::max);
        let range = xs.iter().map(|v| v.abs()).fold(0.0f32, f32::max);
        assert!(err < 0.2 * range, "cut at {n}: max error {err}");
    }
    let mut v = batch(d, 4, g, KiviAxis::Token);
    v.extend(&xs).unwrap();
    let before = v.dequantize_all();
    v.truncate(37);
    assert_eq!(v.dequantize_all(), before[..37 * d].to_vec());
}

/// Wide ranges at 1 bit (a scale beyond f16's largest value) and narrow ranges far from zero (a
/// zero that rounding to f16 would lift above the group's minimum) still decode to finite values
/// inside the group's range.
#[test]
fn extreme_groups_stay_finite_and_covered() {
    let d = 2;
    let mut wide = batch(d, 1, 16, KiviAxis::Channel);
    let rows: Vec<f32> = (0..16)
        .flat_map(|t| [if t % 2 == 0 { -60000.0 } else { 60000.0 }, 1.0])
        .collect();
    wide.extend(&rows).unwrap();
    assert!(wide.dequantize_all().iter().all(|v| v.is_finite()));
    let back = AnyBatch::from_safetensors(&wide.to_safetensors().unwrap()).unwrap();
    assert_eq!(back.len(), 16);
    // 300.06..300.1 (f16 step 0.25 there): every value decodes within one f16 step of itself.
    let mut narrow = batch(d, 4, 16, KiviAxis::Channel);
    let rows: Vec<f32> = (0..16)
        .flat_map(|t| [300.06 + t as f32 * 0.002, 0.0])
        .collect();
    narrow.extend(&rows).unwrap();
    for (a, b) in narrow.dequantize_all().iter().zip(&rows) {
        assert!((a - b).abs() <= 0.25, "{a} vs {b}");
    }
}

#[test]
fn bad_configurations_and_inputs_are_typed_errors() {
    for group in [8, 24, 256] {
        let e = KiviQuantizer::new(KiviConfig {
            dim: 64,
            bits: 4,
            group,
            axis: KiviAxis::Channel,
        })
        .unwrap_err();
        assert!(matches!(e, Error::ConfigMismatch(_)), "{e}");
    }
    assert!(matches!(
        KiviQuantizer::new(KiviConfig {
            dim: 64,
            bits: 9,
            group: 32,
            axis: KiviAxis::Token,
        }),
        Err(Error::BitsOutOfRange { .. })
    ));
    let mut b = batch(4, 4, 16, KiviAxis::Channel);
    let e = b.extend(&[1.0, 2.0, 70000.0, 0.0]).unwrap_err();
    assert!(matches!(e, Error::ValueOutOfRange { .. }), "{e}");
    assert!(e.to_string().contains("70000"), "{e}");
    assert!(b.is_empty());
    // A query of another dimension is an error, not a panic.
    let mut c = batch(4, 4, 16, KiviAxis::Channel);
    c.extend(&[1.0; 4 * 20]).unwrap();
    let small = batch(2, 4, 16, KiviAxis::Channel);
    let q = small.quantizer().prepare_query(&[1.0, 2.0]).unwrap();
    assert!(matches!(
        c.score_into(&q, &mut [0.0; 20]),
        Err(Error::DimMismatch { .. })
    ));
    assert!(b.extend(&[1.0, f32::NAN, 0.0, 0.0]).is_err());
    assert!(b.extend(&[1.0, 2.0, 3.0]).is_err());
    assert!(b.is_empty());
}

/// Rebuilds a saved batch with one tensor replaced.
fn tamper(bytes: &[u8], name: &str, f: impl Fn(&mut Vec<u8>, &mut Vec<usize>)) -> Vec<u8> {
    rewrite(bytes, name, |_, data, shape| f(data, shape))
}

/// The saved batch with tensor `name`'s dtype, bytes and shape passed through `f`.
fn rewrite(
    bytes: &[u8],
    name: &str,
    f: impl Fn(&mut safetensors::Dtype, &mut Vec<u8>, &mut Vec<usize>),
) -> Vec<u8> {
    use safetensors::tensor::{SafeTensors, TensorView};
    let st = SafeTensors::deserialize(bytes).unwrap();
    let (_, header) = SafeTensors::read_metadata(bytes).unwrap();
    let mut owned: Vec<(String, safetensors::Dtype, Vec<usize>, Vec<u8>)> = st
        .tensors()
        .into_iter()
        .map(|(n, t)| (n, t.dtype(), t.shape().to_vec(), t.data().to_vec()))
        .collect();
    for (n, dtype, shape, data) in &mut owned {
        if n == name {
            f(dtype, data, shape);
        }
    }
    let views: Vec<(String, TensorView<'_>)> = owned
        .iter()
        .map(|(n, dt, s, d)| (n.clone(), TensorView::new(*dt, s.clone(), d).unwrap()))
        .collect();
    safetensors::serialize(views, header.metadata().clone()).unwrap()
}

#[test]
fn saved_batches_round_trip_and_tampering_is_refused() {
    let d = 32;
    let xs = keys(40, d, 5);
    let mut b = batch(d, 4, 16, KiviAxis::Channel);
    b.extend(&xs).unwrap();
    let bytes = b.to_safetensors().unwrap();
    let AnyBatch::Kivi(back) = AnyBatch::from_safetensors(&bytes).unwrap() else {
        panic!("kivi")
    };
    assert_eq!(back.dequantize_all(), b.dequantize_all());
    assert_eq!(back.residual_len(), 8);
    // A negative scale, an infinite zero, a residual of a whole group, a wrong shape, an
    // infinite residual value.
    let cases: Vec<(&str, Vec<u8>)> = vec![
        (
            "scale",
            tamper(&bytes, "scales", |data, _| {
                data[1] |= 0x80;
                data[0] |= 1;
            }),
        ),
        (
            "zero",
            tamper(&bytes, "zeros", |data, _| {
                data[0] = 0x00;
                data[1] = 0x7c;
            }),
        ),
        (
            "residual",
            tamper(&bytes, "residual", |data, shape| {
                data.extend(vec![0u8; 8 * d * 2]);
                shape[0] = 16;
            }),
        ),
        (
            "shape",
            tamper(&bytes, "scales", |data, shape| {
                data.truncate(data.len() - 2 * d);
                shape[0] -= 1;
            }),
        ),
        (
            "residual value",
            tamper(&bytes, "residual", |data, _| {
                data[..2].copy_from_slice(&0x7c00u16.to_le_bytes());
            }),
        ),
    ];
    for (what, bad) in cases {
        let e = AnyBatch::from_safetensors(&bad).unwrap_err();
        assert!(matches!(e, Error::InvalidFormat { .. }), "{what}: {e}");
    }
    for cut in (0..bytes.len()).step_by(97) {
        assert!(AnyBatch::from_safetensors(&bytes[..cut]).is_err());
    }
}

/// The same batch with its `residual` tensor rewritten as F32 `values` (as earlier builds wrote).
fn with_f32_residual(bytes: &[u8], values: &[f32]) -> Vec<u8> {
    rewrite(bytes, "residual", |dtype, data, _| {
        *dtype = safetensors::Dtype::F32;
        *data = values.iter().flat_map(|v| v.to_le_bytes()).collect();
    })
}

#[test]
fn an_f32_residual_of_earlier_builds_loads_rounded_to_f16() {
    let d = 32;
    let xs = keys(40, d, 6);
    let mut b = batch(d, 4, 16, KiviAxis::Channel);
    b.extend(&xs).unwrap();
    let old = with_f32_residual(&b.to_safetensors().unwrap(), &xs[32 * d..]);
    let AnyBatch::Kivi(back) = AnyBatch::from_safetensors(&old).unwrap() else {
        panic!("kivi")
    };
    assert_eq!(back.residual(), b.residual());
    assert_eq!(back.dequantize_all(), b.dequantize_all());
    // An F32 value beyond f16's range is refused, not rounded to infinity.
    let mut big = xs[32 * d..].to_vec();
    big[3] = 1e10;
    let e = AnyBatch::from_safetensors(&with_f32_residual(&b.to_safetensors().unwrap(), &big))
        .unwrap_err();
    assert!(matches!(e, Error::InvalidFormat { .. }), "{e}");
}
