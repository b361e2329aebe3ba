//! Quantize an embedding set to 4 bits per coordinate and search it by inner product.
//!
//! ```sh
//! cargo run --release -p tq-quant --example search_embeddings -- [FILE.f32 DIM]
//! ```
//! With no arguments it uses 20 000 seeded random 128-d vectors; with a raw little-endian f32 file
//! and its dimension it uses your embeddings. Prints recall of the exact top-1 and the memory used.

use std::sync::Arc;

use tq_quant::{MseBatch, MseConfig, MseQuantizer, RotationKind, ScaleMode};

fn load() -> Result<(Vec<f32>, usize), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if let [path, dim] = args.as_slice() {
        let dim: usize = dim.parse()?;
        let bytes = std::fs::read(path)?;
        if bytes.len() % (4 * dim) != 0 {
            return Err(format!(
                "{path}: {} bytes is not a whole number of {dim}-d f32 rows",
                bytes.len()
            )
            .into());
        }
        let v = bytes
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect();
        return Ok((v, dim));
    }
    // A deterministic stand-in: a simple linear congruential stream mapped to [-1, 1).
    let (n, dim) = (20_000, 128);
    let mut s = 0x2545_f491_4f6c_dd1du64;
    let v = (0..n * dim)
        .map(|_| {
            s = s
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect();
    Ok((v, dim))
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let (vectors, dim) = load()?;
    let n = vectors.len() / dim;
    let cfg = MseConfig::new(dim, 4, RotationKind::Hadamard, 42).with_scale(ScaleMode::Unbiased);
    let quantizer = Arc::new(MseQuantizer::new(cfg)?);
    let mut batch = MseBatch::new(quantizer.clone());
    batch.extend(&vectors)?;
    let queries = 100.min(n);
    let mut hits = 0;
    for qi in 0..queries {
        let q = &vectors[qi * dim..(qi + 1) * dim];
        // The exact maximum-inner-product neighbour other than the query itself.
        let exact = (0..n)
            .filter(|&i| i != qi)
            .map(|i| {
                (
                    i,
                    vectors[i * dim..(i + 1) * dim]
                        .iter()
                        .zip(q)
                        .map(|(a, b)| a * b)
                        .sum::<f32>(),
                )
            })
            .max_by(|a, b| a.1.total_cmp(&b.1))
            .map(|(i, _)| i);
        let prepared = quantizer.prepare_query(q)?;
        let found = batch.top_k(&prepared, 11);
        hits += found.iter().any(|h| Some(h.index) == exact) as usize;
    }
    println!(
        "{n} vectors, d = {dim}: exact top-1 within the top-10 (+ the query) for {hits}/{queries} queries; {} bytes ({:.1}x smaller than f32)",
        batch.memory_bytes(),
        (n * dim * 4) as f64 / batch.memory_bytes() as f64
    );
    Ok(())
}
