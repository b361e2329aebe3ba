//! Generate with a real decoder model twice: with the exact KV cache, then replaying the same
//! tokens with a 4-bit TurboQuant cache, and print how far the quantized run drifts.
//!
//! ```sh
//! ./scripts/setup-real-model.sh
//! cargo run --release -p tq-onnx --example real_model_compare -- artifacts/smollm2-135m-instruct "Why is the sky blue?"
//! ```
//! Without arguments it runs the bundled tiny random model (plumbing only: its text is noise).

use tq_kv::{HeadConfig, Precision};
use tq_onnx::{CacheSpec, Decoder, Keep, Sampling, generate, replay};

fn main() -> Result<(), tq_onnx::Error> {
    let mut args = std::env::args().skip(1);
    let dir = args.next().unwrap_or_else(|| {
        concat!(env!("CARGO_MANIFEST_DIR"), "/../../fixtures/tiny-llama").to_string()
    });
    let question = args
        .next()
        .unwrap_or_else(|| "What is the capital of France?".into());
    let decoder = Decoder::open(&dir)?;
    let bundle = decoder.bundle();
    let prompt = bundle.encode(&bundle.chat_prompt(&question)?)?;
    let keep = Keep {
        logits: true,
        trace: false,
    };
    let exact = generate(
        &decoder,
        &CacheSpec::Exact,
        &prompt,
        48,
        Sampling::Greedy,
        keep,
        &mut || {},
    )?;
    println!("exact: {}", bundle.decode(&exact.tokens)?);
    let d = decoder.head_dim();
    let spec = CacheSpec::Quantized {
        config: HeadConfig::new(d, Precision::Uniform(4), Precision::Uniform(4)),
        calibration: Vec::new(),
    };
    let (run, cmp) = replay(
        &decoder,
        &spec,
        &prompt,
        &exact.tokens,
        &exact.logits,
        5,
        &mut || {},
    )?;
    let m = cmp.summary();
    println!(
        "4-bit cache: top-1 agreement {:.3}, KL {:.2e}, perplexity {:.3} vs {:.3} exact, cache {:.2}x smaller than f16, {:.1} vs {:.1} tokens/s",
        m.top1_agreement,
        m.kl_divergence,
        m.perplexity_quantized,
        m.perplexity_exact,
        run.f16_bytes as f64 / run.kv_bytes as f64,
        run.timing.decode_tokens_per_s(),
        exact.timing.decode_tokens_per_s()
    );
    Ok(())
}
