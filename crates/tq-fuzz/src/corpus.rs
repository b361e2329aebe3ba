//! The seed corpus: small valid inputs of every target, generated from code so they follow the
//! formats as this build writes them (`tq-fuzz --write-corpus fixtures/fuzz` regenerates them).

use std::sync::Arc;

use anyhow::Result;
use tq_bench::data::npy_bytes as npy;
use tq_core::{RotationKind, SeededRng, rng::stream};
use tq_kv::{HeadCalibration, HeadConfig, KeyStrategy, ModelCache, MultiHeadCache, Precision};
use tq_quant::{
    EncodedVectors, KiviAxis, MseBatch, MseConfig, MseQuantizer, PolarBatch, PolarConfig,
    PolarQuantizer, ProdBatch, ProdConfig, ProdQuantizer, QuantizerKind, QuantizerSpec, SketchKind,
};

fn gaussian(n: usize, seed: u64) -> Vec<f32> {
    let mut r = SeededRng::new(seed, stream::DATA);
    (0..n).map(|_| r.gaussian() as f32).collect()
}

/// `(file name, bytes)` seeds of the target called `name` (empty for an unknown name).
///
/// # Errors
/// Only if a quantizer or cache cannot be built (not expected).
pub fn seeds(name: &str) -> Result<Vec<(String, Vec<u8>)>> {
    let v = gaussian(12, 1);
    let le4: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
    Ok(match name {
        "npy" => vec![
            ("f4-c.npy".into(), npy("<f4", false, "(3, 4)", &le4)),
            ("f4-fortran.npy".into(), npy("<f4", true, "(4, 3)", &le4)),
            (
                "f8.npy".into(),
                npy(
                    "<f8",
                    false,
                    "(2, 6)",
                    &v.iter()
                        .flat_map(|&x| (x as f64).to_le_bytes())
                        .collect::<Vec<_>>(),
                ),
            ),
            (
                "f4-big-endian.npy".into(),
                npy(
                    ">f4",
                    false,
                    "(6, 2)",
                    &v.iter().flat_map(|x| x.to_be_bytes()).collect::<Vec<_>>(),
                ),
            ),
        ],
        "fvecs" => {
            let mut b = Vec::new();
            for row in v.chunks(4) {
                b.extend(4i32.to_le_bytes());
                b.extend(row.iter().flat_map(|x| x.to_le_bytes()));
            }
            vec![("three.fvecs".into(), b)]
        }
        "vectors-safetensors" => {
            let view = safetensors_view(&le4, vec![3, 4])?;
            vec![(
                "vectors.safetensors".into(),
                safetensors::serialize(vec![("vectors", view)], None)?,
            )]
        }
        "batch" => batches()?,
        "kv-cache" => caches()?,
        "kv-trace" => {
            let t = tq_kv::SyntheticTrace {
                layers: 1,
                kv_heads: 1,
                q_heads: 2,
                tokens: 6,
                head_dim: 8,
                queries: 2,
                outlier_channels: 1,
                seed: 3,
            }
            .generate()?;
            vec![("trace.safetensors".into(), t.to_safetensors()?)]
        }
        "bundle-config" => vec![
            (
                "llama.json".into(),
                br#"{"model_type": "llama", "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "hidden_size": 64, "vocab_size": 384, "eos_token_id": 2}"#.to_vec(),
            ),
            (
                "eos-list-head-dim.json".into(),
                br#"{"_name_or_path": "m", "num_hidden_layers": 1, "num_attention_heads": 2, "head_dim": 16, "hidden_size": 32, "vocab_size": 10, "eos_token_id": [1, 2], "chat_template": "{{ messages }}"}"#.to_vec(),
            ),
            (
                "encoder-decoder.json".into(),
                br#"{"is_encoder_decoder": true, "num_hidden_layers": 2}"#.to_vec(),
            ),
        ],
        "cli-lists" => ["4,3.5", "2.5,4x32+2", "mse,prod,polar", "norm,least-squares", "auto", "1,5,9", "hadamard,haar", "gaussian,orthogonal"]
            .iter()
            .enumerate()
            .map(|(i, s)| (format!("list-{i}.txt"), s.as_bytes().to_vec()))
            .collect(),
        _ => Vec::new(),
    })
}

fn safetensors_view(data: &[u8], shape: Vec<usize>) -> Result<safetensors::tensor::TensorView<'_>> {
    Ok(safetensors::tensor::TensorView::new(
        safetensors::Dtype::F32,
        shape,
        data,
    )?)
}

fn batches() -> Result<Vec<(String, Vec<u8>)>> {
    let d = 16;
    let xs = gaussian(5 * d, 2);
    let mut out = Vec::new();
    let mut mse = MseBatch::new(Arc::new(MseQuantizer::new(MseConfig::new(
        d,
        3,
        RotationKind::Hadamard,
        4,
    ))?));
    mse.extend(&xs)?;
    out.push(("mse.safetensors".into(), mse.to_safetensors()?));
    let mean = gaussian(d, 5);
    let centred = MseQuantizer::with_mean(
        MseConfig {
            centered: true,
            ..MseConfig::new(d, 2, RotationKind::Haar, 6)
        },
        mean,
    )?;
    let mut c = MseBatch::new(Arc::new(centred));
    c.extend(&xs)?;
    out.push(("mse-centred.safetensors".into(), c.to_safetensors()?));
    for bits in [1, 3] {
        let mut p = ProdBatch::new(Arc::new(ProdQuantizer::new(ProdConfig {
            dim: d,
            bits,
            rotation: RotationKind::Hadamard,
            sketch: SketchKind::Gaussian,
            seed: 7,
        })?));
        p.extend(&xs)?;
        out.push((format!("prod-{bits}.safetensors"), p.to_safetensors()?));
    }
    let mut polar = PolarBatch::new(Arc::new(PolarQuantizer::new(PolarConfig {
        dim: d,
        level_bits: vec![3, 2, 1],
        rotation: RotationKind::Hadamard,
        seed: 8,
    })?));
    polar.extend(&xs)?;
    out.push(("polar.safetensors".into(), polar.to_safetensors()?));
    // Grouped kinds: 20 rows fill one group of 16 and leave a residual of 4.
    let rows = gaussian(20 * d, 11);
    for (name, spec) in [
        (
            "kivi-keys",
            QuantizerSpec::new(QuantizerKind::Kivi, d, 3, RotationKind::Hadamard, 9)
                .with_kivi(16, KiviAxis::Channel),
        ),
        (
            "kivi-values",
            QuantizerSpec::new(QuantizerKind::Kivi, d, 2, RotationKind::Hadamard, 9)
                .with_kivi(16, KiviAxis::Token),
        ),
        (
            "gmse",
            QuantizerSpec::new(QuantizerKind::Gmse, d, 3, RotationKind::Hadamard, 10)
                .with_kivi(16, KiviAxis::Channel),
        ),
    ] {
        let mut b = spec.build()?.new_batch();
        b.extend(&rows)?;
        out.push((format!("{name}.safetensors"), b.to_safetensors()?));
    }
    Ok(out)
}

fn caches() -> Result<Vec<(String, Vec<u8>)>> {
    let d = 16;
    let plain = HeadConfig {
        window: 2,
        seed: 3,
        ..HeadConfig::new(d, Precision::Uniform(3), Precision::Uniform(2))
    };
    let split = HeadConfig {
        key_strategy: KeyStrategy::Prod,
        seed: 4,
        ..HeadConfig::new(d, Precision::parse("4x4+2", d)?, Precision::Uniform(3))
    };
    let mut out = Vec::new();
    let kivi = HeadConfig {
        key_strategy: KeyStrategy::Kivi,
        value_strategy: tq_kv::ValueStrategy::Gmse,
        group: 16,
        ..HeadConfig::new(d, Precision::Uniform(2), Precision::Uniform(3))
    };
    for (name, cfg, outliers) in [
        ("plain", &plain, vec![]),
        ("kivi-gmse", &kivi, vec![]),
        (
            "split-prod",
            &split,
            vec![HeadCalibration {
                keys: Some(vec![1, 5, 9, 12]),
                ..Default::default()
            }],
        ),
    ] {
        let mut layer = MultiHeadCache::new(2, 1, cfg, &outliers)?;
        layer.append(&gaussian(6 * d, 9), &gaussian(6 * d, 10))?;
        let m = ModelCache::from_layers(vec![layer]);
        out.push((format!("{name}.safetensors"), m.to_safetensors()?));
    }
    Ok(out)
}
