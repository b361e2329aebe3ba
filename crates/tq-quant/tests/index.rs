//! The faiss-shaped index: search against brute force over the decoded rows, faiss's conventions
//! for empty slots, L2 norms of grouped kinds after their pending group fills, save / load.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use tq_core::{RotationKind, SeededRng, rng::stream};
use tq_quant::{
    AnyBatch, EncodedVectors, Error, Index, KiviAxis, Metric, QuantizerKind, QuantizerSpec,
};

fn rows(n: usize, d: usize, seed: u64) -> Vec<f32> {
    let mut r = SeededRng::new(seed, stream::DATA);
    (0..n * d).map(|_| r.gaussian() as f32).collect()
}

fn index(kind: QuantizerKind, bits: u32, metric: Metric, d: usize) -> Index {
    let spec = QuantizerSpec::new(kind, d, bits, RotationKind::Hadamard, 5)
        .with_kivi(16, KiviAxis::Channel);
    Index::new(&spec.build().unwrap(), metric)
}

/// Squared distances from `q` to every decoded row.
fn decoded_l2(index: &Index, q: &[f32]) -> Vec<f32> {
    let d = index.dim();
    let mut row = vec![0.0; d];
    (0..index.len())
        .map(|i| {
            index.batch().dequantize_row(i, &mut row).unwrap();
            q.iter().zip(&row).map(|(a, b)| (a - b) * (a - b)).sum()
        })
        .collect()
}

/// Queries searched in groups (each chunk of codes scanned once per pair of the group's queries,
/// or per three with AVX-512 VL, 1-, 2- and 4-bit codes) give each query exactly its own top-k;
/// groups that do not divide evenly leave a query or two in a last pass, 3-bit codes go one by one.
#[test]
fn inner_product_search_is_the_batch_top_k_of_every_query() {
    let (d, n, nq, k) = (64, 500, 21, 7);
    // Two threads: 21 queries make tasks of 6, 6, 6 and 3 (pairs, and a query alone in the
    // last) on any machine.
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(2)
        .build()
        .unwrap();
    for bits in [2, 3, 4] {
        let mut idx = index(QuantizerKind::Mse, bits, Metric::InnerProduct, d);
        idx.add(&rows(n, d, 1)).unwrap();
        let queries = rows(nq, d, 2);
        let res = pool.install(|| idx.search(&queries, k)).unwrap();
        assert_eq!(
            (res.k, res.labels.len(), res.distances.len()),
            (k, nq * k, nq * k)
        );
        for (qi, q) in queries.chunks_exact(d).enumerate() {
            let prepared = idx.batch().encode_query(q).unwrap();
            let hits = idx.batch().top_k(&prepared, k).unwrap();
            let labels: Vec<i64> = hits.iter().map(|h| h.index as i64).collect();
            let scores: Vec<f32> = hits.iter().map(|h| h.score).collect();
            assert_eq!(
                &res.labels[qi * k..(qi + 1) * k],
                &labels[..],
                "bits {bits}"
            );
            assert_eq!(
                &res.distances[qi * k..(qi + 1) * k],
                &scores[..],
                "bits {bits}"
            );
        }
    }
}

#[test]
fn l2_search_matches_brute_force_over_the_decoded_rows() {
    let (d, n, nq, k) = (128, 400, 30, 5);
    for kind in [QuantizerKind::Mse, QuantizerKind::Prod, QuantizerKind::Kivi] {
        let mut idx = index(kind, 4, Metric::L2, d);
        // Uneven chunks: KIVI's pending group fills between adds, so earlier rows' decoded
        // values (and norms) change.
        let data = rows(n, d, 3);
        for chunk in [&data[..7 * d], &data[7 * d..100 * d], &data[100 * d..]] {
            idx.add(chunk).unwrap();
        }
        let queries = rows(nq, d, 4);
        let res = idx.search(&queries, k).unwrap();
        let all = idx.scores(&queries).unwrap();
        let mut agree = 0;
        for (qi, q) in queries.chunks_exact(d).enumerate() {
            let truth = decoded_l2(&idx, q);
            let qq: f32 = q.iter().map(|v| v * v).sum();
            for (i, (&t, &s)) in truth.iter().zip(&all[qi * n..(qi + 1) * n]).enumerate() {
                // The fast u8 tables round each of d/2 (or d) table entries by at most half a
                // step of range/255; 1% of ‖q‖² + ‖x‖² bounds that with a wide margin at d = 128.
                let tol = 0.01 * (qq + truth[i].max(1.0));
                assert!((t - s).abs() <= tol, "{kind} row {i}: {s} vs {t}");
            }
            let got = &res.labels[qi * k..(qi + 1) * k];
            let dist = &res.distances[qi * k..(qi + 1) * k];
            assert!(dist.windows(2).all(|w| w[0] <= w[1]), "{kind}: ascending");
            let best = (0..n)
                .min_by(|&a, &b| truth[a].total_cmp(&truth[b]))
                .unwrap();
            agree += usize::from(got.contains(&(best as i64)));
        }
        // The decoded nearest row is among the 5 returned for nearly every query (only u8
        // rounding can move it).
        assert!(agree >= nq - 1, "{kind}: {agree}/{nq}");
    }
}

#[test]
fn empty_slots_follow_faiss() {
    let d = 32;
    for (metric, empty) in [(Metric::InnerProduct, -f32::MAX), (Metric::L2, f32::MAX)] {
        let mut idx = index(QuantizerKind::Mse, 2, metric, d);
        let res = idx.search(&rows(2, d, 1), 3).unwrap();
        assert!(res.labels.iter().all(|&l| l == -1));
        assert!(res.distances.iter().all(|&v| v == empty));
        idx.add(&rows(2, d, 1)).unwrap();
        let res = idx.search(&rows(1, d, 2), 4).unwrap();
        assert_eq!(&res.labels[2..], &[-1, -1]);
        assert!(res.labels[..2].iter().all(|&l| l >= 0));
        assert_eq!(&res.distances[2..], &[empty, empty]);
        idx.reset();
        assert!(idx.is_empty());
        assert_eq!(idx.stored_bytes(), 0);
    }
}

#[test]
fn bad_queries_are_typed_errors() {
    let d = 32;
    let mut idx = index(QuantizerKind::Mse, 4, Metric::L2, d);
    idx.add(&rows(10, d, 1)).unwrap();
    assert!(matches!(
        idx.search(&rows(1, d, 1)[..d - 1], 1),
        Err(Error::DimMismatch { .. })
    ));
    let mut q = rows(2, d, 2);
    q[d + 3] = f32::NAN;
    assert!(matches!(idx.search(&q, 1), Err(Error::NonFinite { .. })));
    assert!(matches!(idx.scores(&q), Err(Error::NonFinite { .. })));
    let mut x = rows(2, d, 2);
    x[5] = f32::INFINITY;
    assert!(idx.add(&x).is_err());
    assert_eq!(idx.len(), 10, "a refused add appends nothing");
    assert!("cosine".parse::<Metric>().is_err());
}

#[test]
fn an_index_saves_and_loads_with_its_metric() {
    let d = 64;
    let dir = std::env::temp_dir().join(format!("tq-index-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    for metric in [Metric::InnerProduct, Metric::L2] {
        let mut idx = index(QuantizerKind::Mse, 3, metric, d);
        idx.add(&rows(300, d, 1)).unwrap();
        let path = dir.join(format!("{metric}.tq"));
        idx.save(&path).unwrap();
        let back = Index::load(&path).unwrap();
        assert_eq!(back.metric(), metric);
        assert_eq!(back.stored_bytes(), idx.stored_bytes());
        let q = rows(5, d, 9);
        assert_eq!(back.search(&q, 4).unwrap(), idx.search(&q, 4).unwrap());
        // An index file is a batch file with one more metadata key.
        let batch = AnyBatch::load(&path).unwrap();
        assert_eq!(batch.len(), 300);
        // A plain batch file is not an index.
        let plain = idx.batch().to_safetensors().unwrap();
        let err = Index::from_safetensors(&plain).unwrap_err();
        assert!(err.to_string().contains("not an index"), "{err}");
    }
    std::fs::remove_dir_all(&dir).ok();
}
