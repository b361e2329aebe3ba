//! A quantized KV cache inside a decode loop: each step appends the new token's keys and values
//! for every kv head, then every query head attends over the packed codes.
//!
//! ```sh
//! cargo run --release -p tq-kv --example decode_loop
//! ```
//! The "model" here is a seeded stand-in that emits random K/V/Q of the right shapes; replace
//! `project` with your model's projections. Prints memory against an f16 cache and the attention
//! output error against exact f32 attention at the last step.

use tq_kv::{HeadConfig, KeyStrategy, MultiHeadCache, Precision};

const Q_HEADS: usize = 8;
const KV_HEADS: usize = 2;
const D: usize = 128;

/// Stand-in projections: deterministic pseudo-random rows for token `t`.
fn project(t: usize, heads: usize, salt: u64) -> Vec<f32> {
    (0..heads * D)
        .map(|i| {
            let mut x = (t as u64) << 20 ^ (i as u64) ^ salt.wrapping_mul(0x9e37_79b9_7f4a_7c15);
            x ^= x >> 33;
            x = x.wrapping_mul(0xff51_afd7_ed55_8ccd);
            x ^= x >> 29;
            ((x >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect()
}

fn main() -> Result<(), tq_kv::Error> {
    let config = HeadConfig {
        key_strategy: KeyStrategy::Mse,
        ..HeadConfig::new(D, Precision::Uniform(4), Precision::Uniform(4))
    };
    let mut cache = MultiHeadCache::new(Q_HEADS, KV_HEADS, &config, &[])?;
    let (mut all_k, mut all_v) = (vec![Vec::new(); KV_HEADS], vec![Vec::new(); KV_HEADS]);
    let mut out = vec![0.0f32; Q_HEADS * D];
    let steps = 512;
    for t in 0..steps {
        let (k, v) = (project(t, KV_HEADS, 1), project(t, KV_HEADS, 2));
        cache.append(&k, &v)?; // [kv_heads, 1 token, d]
        for h in 0..KV_HEADS {
            all_k[h].extend_from_slice(&k[h * D..(h + 1) * D]);
            all_v[h].extend_from_slice(&v[h * D..(h + 1) * D]);
        }
        let q = project(t, Q_HEADS, 3);
        cache.attend(&q, &mut out)?; // [q_heads, d]: softmax(q K^T / sqrt(d)) V on the codes
    }
    // Exact f32 attention of the last step's queries, for comparison.
    let q = project(steps - 1, Q_HEADS, 3);
    let (mut num, mut den) = (0.0f64, 0.0f64);
    for h in 0..Q_HEADS {
        let kv = h / (Q_HEADS / KV_HEADS);
        let qh = &q[h * D..(h + 1) * D];
        let s: Vec<f64> = all_k[kv]
            .chunks_exact(D)
            .map(|k| k.iter().zip(qh).map(|(a, b)| (a * b) as f64).sum::<f64>() / (D as f64).sqrt())
            .collect();
        let m = s.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let w: Vec<f64> = s.iter().map(|x| (x - m).exp()).collect();
        let z: f64 = w.iter().sum();
        for c in 0..D {
            let exact: f64 = w
                .iter()
                .zip(all_v[kv].chunks_exact(D))
                .map(|(w, v)| w * v[c] as f64)
                .sum::<f64>()
                / z;
            num += (exact - out[h * D + c] as f64).powi(2);
            den += exact * exact;
        }
    }
    println!(
        "{steps} tokens x {KV_HEADS} kv heads (d = {D}): {} bytes, {:.2}x smaller than f16; last-step attention output error {:.3}",
        cache.memory_bytes(),
        cache.f16_bytes() as f64 / cache.memory_bytes() as f64,
        (num / den).sqrt()
    );
    Ok(())
}
