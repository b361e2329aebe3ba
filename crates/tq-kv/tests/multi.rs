//! Grouped-query multi-head caches.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use tq_core::{SeededRng, rng::stream};
use tq_kv::{Error, HeadConfig, ModelCache, MultiHeadCache, Precision};

fn rows(n: usize, seed: u64) -> Vec<f32> {
    let mut r = SeededRng::new(seed, stream::DATA);
    (0..n).map(|_| r.gaussian() as f32).collect()
}

#[test]
fn gqa_maps_query_heads_to_their_kv_head_and_parallel_equals_serial() {
    let (d, nq, nkv, t) = (64, 6, 2, 400);
    let cfg = HeadConfig::new(d, Precision::Uniform(3), Precision::Uniform(3));
    let mut cache = MultiHeadCache::new(nq, nkv, &cfg, &[]).unwrap();
    let (k, v) = (rows(nkv * t * d, 1), rows(nkv * t * d, 2));
    // append in two steps: [n_kv, 150, d] then [n_kv, 250, d]
    let split = |x: &[f32], a: usize, b: usize| -> Vec<f32> {
        (0..nkv)
            .flat_map(|h| x[(h * t + a) * d..(h * t + b) * d].to_vec())
            .collect()
    };
    cache
        .append(&split(&k, 0, 150), &split(&v, 0, 150))
        .unwrap();
    cache
        .append(&split(&k, 150, t), &split(&v, 150, t))
        .unwrap();
    assert_eq!(cache.len(), t);
    let q = rows(nq * d, 3);
    let mut out = vec![0.0; nq * d];
    cache.attend(&q, &mut out).unwrap();
    for h in 0..nq {
        let mut want = vec![0.0; d];
        cache
            .head(h / 3)
            .unwrap()
            .attend(&q[h * d..(h + 1) * d], &mut want)
            .unwrap();
        assert_eq!(&out[h * d..(h + 1) * d], &want[..]);
    }
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(1)
        .build()
        .unwrap();
    let mut serial = vec![0.0; nq * d];
    pool.install(|| cache.attend(&q, &mut serial)).unwrap();
    assert_eq!(out, serial);
    // block with causal limits
    let qb = rows(nq * 2 * d, 4);
    let mut ob = vec![0.0; nq * 2 * d];
    cache.attend_block(&qb, &[10, 400], &mut ob).unwrap();
    let mut one = vec![0.0; 2 * d];
    cache
        .head(1)
        .unwrap()
        .attend_block(&qb[4 * 2 * d..5 * 2 * d], &[10, 400], &mut one)
        .unwrap();
    assert_eq!(&ob[4 * 2 * d..5 * 2 * d], &one[..]);
}

/// Long caches (rows past `tq_quant::score::PARALLEL_MIN_ROWS`, where one head's scans would
/// split over the pool) attended by as many threads as kv heads, each head's scans on its own
/// thread, give the one-thread outputs bit for bit, for `attend` and for `append_attend`.
#[test]
fn long_caches_on_as_many_threads_as_kv_heads_equal_one_thread() {
    let (d, nq, nkv) = (16, 4, 2);
    let t = tq_quant::score::PARALLEL_MIN_ROWS + 40;
    let cfg = HeadConfig::new(d, Precision::Uniform(4), Precision::Uniform(4));
    let mut cache = MultiHeadCache::new(nq, nkv, &cfg, &[]).unwrap();
    cache
        .append(&rows(nkv * t * d, 7), &rows(nkv * t * d, 8))
        .unwrap();
    let q = rows(nq * d, 9);
    let pool = |n| {
        rayon::ThreadPoolBuilder::new()
            .num_threads(n)
            .build()
            .unwrap()
    };
    let (one, two) = (pool(1), pool(nkv));
    let mut want = vec![0.0; nq * d];
    one.install(|| cache.attend(&q, &mut want)).unwrap();
    let mut got = vec![0.0; nq * d];
    two.install(|| cache.attend(&q, &mut got)).unwrap();
    assert_eq!(got, want);
    let (k, v) = (rows(nkv * d, 10), rows(nkv * d, 11));
    let mut again = cache.clone();
    one.install(|| cache.append_attend(&k, &v, &q, &[t + 1], &mut want))
        .unwrap();
    two.install(|| again.append_attend(&k, &v, &q, &[t + 1], &mut got))
        .unwrap();
    assert_eq!(got, want);
}

#[test]
fn model_cache_and_errors() {
    let cfg = HeadConfig::new(32, Precision::Uniform(4), Precision::Uniform(2));
    assert!(matches!(
        MultiHeadCache::new(6, 4, &cfg, &[]),
        Err(Error::HeadCounts { .. })
    ));
    assert!(matches!(
        MultiHeadCache::new(0, 0, &cfg, &[]),
        Err(Error::HeadCounts { .. })
    ));
    let mut m = ModelCache::new(3, 4, 2, &cfg).unwrap();
    let l = m.layer_mut(1).unwrap();
    assert!(matches!(
        l.append(&[0.0; 63], &[0.0; 63]),
        Err(Error::Shape { .. })
    ));
    l.append(&rows(2 * 5 * 32, 5), &rows(2 * 5 * 32, 6))
        .unwrap();
    assert_eq!(m.layer(1).unwrap().len(), 5);
    assert_eq!(m.memory_bytes(), 2 * 5 * ((16 + 4) + (8 + 4)));
    assert_eq!(m.f16_bytes(), 2 * 5 * 2 * 2 * 32);
    m.truncate(2);
    assert_eq!(m.layer(1).unwrap().len(), 2);
    let empty = m.layer(0).unwrap();
    let mut out = vec![1.0; 4 * 32];
    empty.attend(&rows(4 * 32, 7), &mut out).unwrap();
    assert!(out.iter().all(|&x| x == 0.0));
}

/// The layer's step equals each kv head's step with its group of query heads.
#[test]
fn multi_head_append_attend_is_each_heads_step() {
    use tq_kv::{HeadCache, HeadCalibration};
    let (d, kv, q_heads, old, new) = (32, 2, 6, 20, 3);
    let cfg = HeadConfig::new(d, Precision::Uniform(4), Precision::Uniform(4));
    let data = |n: usize, seed: u64| {
        let mut r = tq_core::SeededRng::new(seed, tq_core::rng::stream::DATA);
        (0..n).map(|_| r.gaussian() as f32).collect::<Vec<f32>>()
    };
    let mut layer = MultiHeadCache::new(q_heads, kv, &cfg, &[]).unwrap();
    let (k0, v0) = (data(kv * old * d, 1), data(kv * old * d, 2));
    layer.append(&k0, &v0).unwrap();
    let (k1, v1) = (data(kv * new * d, 3), data(kv * new * d, 4));
    let q = data(q_heads * new * d, 5);
    let limits: Vec<usize> = (old + 1..=old + new).collect();
    let mut out = vec![0.0; q.len()];
    layer
        .append_attend(&k1, &v1, &q, &limits, &mut out)
        .unwrap();
    let group = q_heads / kv;
    let reps: Vec<usize> = (0..group).flat_map(|_| limits.iter().copied()).collect();
    for h in 0..kv {
        let mut head = HeadCache::new(cfg.clone(), &HeadCalibration::default()).unwrap();
        head.append(
            &k0[h * old * d..(h + 1) * old * d],
            &v0[h * old * d..(h + 1) * old * d],
        )
        .unwrap();
        let r = h * group * new * d..(h + 1) * group * new * d;
        let mut want = vec![0.0; r.len()];
        head.append_attend(
            &k1[h * new * d..(h + 1) * new * d],
            &v1[h * new * d..(h + 1) * new * d],
            &q[r.clone()],
            &reps,
            &mut want,
        )
        .unwrap();
        assert_eq!(&out[r], &want[..]);
    }
    assert_eq!(layer.len(), old + new);
}
