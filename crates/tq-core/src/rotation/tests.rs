//! Tests of the rotations: orthogonality, determinism, batch and lane parity, mixing.

use super::*;

fn gaussian_vec(d: usize, seed: u64) -> Vec<f32> {
    let mut r = SeededRng::new(seed, stream::DATA);
    (0..d).map(|_| r.gaussian() as f32).collect()
}

fn norm(x: &[f32]) -> f32 {
    x.iter().map(|v| v * v).sum::<f32>().sqrt()
}

#[test]
fn rotations_are_orthogonal_for_awkward_dims() {
    for kind in [RotationKind::Haar, RotationKind::Hadamard] {
        for d in [2usize, 3, 5, 7, 8, 80, 96, 128, 200, 576] {
            let rot = Rotation::new(kind, d, 11).unwrap();
            let x = gaussian_vec(d, d as u64);
            let mut y = vec![0.0; d];
            let mut back = vec![0.0; d];
            rot.apply(&x, &mut y).unwrap();
            rot.apply_inverse(&y, &mut back).unwrap();
            let (nx, ny) = (norm(&x), norm(&y));
            assert!(
                (nx - ny).abs() < 1e-5 * nx,
                "{kind:?} d={d} norm {nx} vs {ny}"
            );
            for (a, b) in x.iter().zip(&back) {
                assert!((a - b).abs() < 1e-5 * nx, "{kind:?} d={d}");
            }
        }
    }
}

#[test]
fn haar_rows_are_orthonormal() {
    let d = 64;
    let rot = Rotation::new(RotationKind::Haar, d, 5).unwrap();
    let m = rot.dense_matrix().unwrap();
    for i in 0..d {
        for j in 0..d {
            let v = simd::dot_scalar(&m[i * d..(i + 1) * d], &m[j * d..(j + 1) * d]);
            let want = if i == j { 1.0 } else { 0.0 };
            assert!((v - want).abs() < 1e-5);
        }
    }
}

#[test]
fn batch_matches_single() {
    for kind in [RotationKind::Haar, RotationKind::Hadamard] {
        for d in [7usize, 96, 128] {
            let rot = Rotation::new(kind, d, 3).unwrap();
            let n = 13;
            let xs: Vec<f32> = (0..n)
                .flat_map(|i| gaussian_vec(d, 100 + i as u64))
                .collect();
            let mut ys = vec![0.0; n * d];
            rot.apply_batch(&xs, &mut ys).unwrap();
            let mut back = vec![0.0; n * d];
            rot.apply_inverse_batch(&ys, &mut back).unwrap();
            for i in 0..n {
                let mut y = vec![0.0; d];
                rot.apply(&xs[i * d..(i + 1) * d], &mut y).unwrap();
                for (a, b) in y.iter().zip(&ys[i * d..(i + 1) * d]) {
                    assert!((a - b).abs() < 1e-5, "{kind:?} d={d}");
                }
            }
            for (a, b) in xs.iter().zip(&back) {
                assert!((a - b).abs() < 1e-4);
            }
        }
    }
}

/// Batched (transposed) and single-row Hadamard paths must agree bit for bit.
#[test]
fn hadamard_batch_is_bitwise_equal_to_single_rows() {
    for d in [
        2usize, 3, 4, 8, 16, 32, 64, 80, 128, 200, 256, 512, 576, 1024,
    ] {
        let rot = Rotation::new(RotationKind::Hadamard, d, 4).unwrap();
        let n = 13;
        let xs: Vec<f32> = (0..n)
            .flat_map(|i| gaussian_vec(d, 50 + i as u64))
            .collect();
        let mut ys = vec![0.0; n * d];
        rot.apply_batch(&xs, &mut ys).unwrap();
        let mut back = vec![0.0; n * d];
        rot.apply_inverse_batch(&ys, &mut back).unwrap();
        for i in 0..n {
            let mut y = vec![0.0; d];
            rot.apply(&xs[i * d..(i + 1) * d], &mut y).unwrap();
            assert_eq!(y, ys[i * d..(i + 1) * d], "d={d} row {i}");
            let mut x = vec![0.0; d];
            rot.apply_inverse(&y, &mut x).unwrap();
            assert_eq!(x, back[i * d..(i + 1) * d], "d={d} row {i}");
        }
    }
}

#[test]
fn same_seed_same_rotation_different_seed_different() {
    for kind in [RotationKind::Haar, RotationKind::Hadamard] {
        let a = Rotation::new(kind, 96, 1).unwrap();
        let b = Rotation::new(kind, 96, 1).unwrap();
        let c = Rotation::new(kind, 96, 2).unwrap();
        let x = gaussian_vec(96, 9);
        let (mut ya, mut yb, mut yc) = (vec![0.0; 96], vec![0.0; 96], vec![0.0; 96]);
        a.apply(&x, &mut ya).unwrap();
        b.apply(&x, &mut yb).unwrap();
        c.apply(&x, &mut yc).unwrap();
        assert_eq!(ya, yb);
        assert_ne!(ya, yc);
    }
}

#[test]
fn errors() {
    assert!(matches!(
        Rotation::new(RotationKind::Haar, 1, 0),
        Err(Error::DimTooSmall { .. })
    ));
    let r = Rotation::new(RotationKind::Hadamard, 8, 0).unwrap();
    let mut out = vec![0.0; 8];
    assert!(matches!(
        r.apply(&[0.0; 7], &mut out),
        Err(Error::DimMismatch { .. })
    ));
    let mut out = vec![0.0; 15];
    assert!(matches!(
        r.apply_batch(&[0.0; 15], &mut out),
        Err(Error::LengthMismatch { .. })
    ));
}
