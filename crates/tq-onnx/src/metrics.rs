//! Next-token metrics of a quantized run against the exact one (docs/DESIGN.md, Metrics): logit RMSE, top-1
//! agreement, top-k overlap, KL divergence and the cross-entropy of given target tokens.

use serde::Serialize;

/// `log softmax(logits)` in f64 (max-subtracted).
pub fn log_softmax(logits: &[f32]) -> Vec<f64> {
    let m = logits.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b)) as f64;
    let z: f64 = logits.iter().map(|&x| (x as f64 - m).exp()).sum();
    let lz = m + z.ln();
    logits.iter().map(|&x| x as f64 - lz).collect()
}

/// Indices of the `k` largest logits, largest first (ties by index).
pub fn top_k(logits: &[f32], k: usize) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..logits.len()).collect();
    let k = k.min(idx.len());
    if k == 0 {
        return Vec::new();
    }
    let cmp = |a: &usize, b: &usize| logits[*b].total_cmp(&logits[*a]).then(a.cmp(b));
    idx.select_nth_unstable_by(k - 1, cmp);
    idx.truncate(k);
    idx.sort_by(cmp);
    idx
}

/// Index of the largest logit (the greedy token).
pub fn argmax(logits: &[f32]) -> usize {
    top_k(logits, 1).first().copied().unwrap_or(0)
}

/// Accumulates per-step comparisons of exact and quantized logits.
#[derive(Debug, Clone, Default)]
pub struct LogitComparison {
    k: usize,
    steps: usize,
    sq_err: f64,
    elems: usize,
    top1: usize,
    topk: f64,
    kl: f64,
    targets: usize,
    nll_exact: f64,
    nll_quant: f64,
}

/// The summary of a [`LogitComparison`].
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct LogitMetrics {
    /// Steps compared.
    pub steps: usize,
    /// Root mean square difference of the logits.
    pub logit_rmse: f64,
    /// Fraction of steps whose argmax token is the same.
    pub top1_agreement: f64,
    /// Mean `|top-k(exact) ∩ top-k(quantized)| / k`.
    pub topk_overlap: f64,
    /// Mean `KL(p_exact ‖ p_quantized)` of the next-token distributions (nats).
    pub kl_divergence: f64,
    /// Steps with a target token.
    pub targets: usize,
    /// `exp(mean −log p_exact(target))`; 0 without targets.
    pub perplexity_exact: f64,
    /// `exp(mean −log p_quantized(target))`; 0 without targets.
    pub perplexity_quantized: f64,
}

impl LogitComparison {
    /// A comparison with top-`k` overlap (k ≥ 1).
    pub fn new(k: usize) -> Self {
        Self {
            k: k.max(1),
            ..Self::default()
        }
    }

    /// Adds one step: both logit vectors (same length) and the token that followed, if any.
    /// O(V log k).
    pub fn add(&mut self, exact: &[f32], quant: &[f32], target: Option<u32>) {
        let (le, lq) = (log_softmax(exact), log_softmax(quant));
        self.steps += 1;
        self.elems += exact.len();
        self.sq_err += exact
            .iter()
            .zip(quant)
            .map(|(a, b)| ((a - b) as f64).powi(2))
            .sum::<f64>();
        let (te, tq) = (top_k(exact, self.k), top_k(quant, self.k));
        self.top1 += (te.first() == tq.first()) as usize;
        self.topk += te.iter().filter(|i| tq.contains(i)).count() as f64 / te.len().max(1) as f64;
        self.kl += le
            .iter()
            .zip(&lq)
            .map(|(a, b)| a.exp() * (a - b))
            .sum::<f64>()
            .max(0.0);
        if let Some(t) = target
            && let (Some(a), Some(b)) = (le.get(t as usize), lq.get(t as usize))
        {
            self.targets += 1;
            self.nll_exact -= a;
            self.nll_quant -= b;
        }
    }

    /// The metrics so far (zeros before the first step).
    pub fn summary(&self) -> LogitMetrics {
        let n = self.steps.max(1) as f64;
        let ppl = |nll: f64| {
            if self.targets == 0 {
                0.0
            } else {
                (nll / self.targets as f64).exp()
            }
        };
        LogitMetrics {
            steps: self.steps,
            logit_rmse: (self.sq_err / self.elems.max(1) as f64).sqrt(),
            top1_agreement: self.top1 as f64 / n,
            topk_overlap: self.topk / n,
            kl_divergence: self.kl / n,
            targets: self.targets,
            perplexity_exact: ppl(self.nll_exact),
            perplexity_quantized: ppl(self.nll_quant),
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn identical_logits_have_zero_drift() {
        let l = [1.0f32, 3.0, -2.0, 0.5];
        let mut c = LogitComparison::new(2);
        c.add(&l, &l, Some(1));
        let m = c.summary();
        assert_eq!(
            (m.logit_rmse, m.top1_agreement, m.topk_overlap),
            (0.0, 1.0, 1.0)
        );
        assert!(m.kl_divergence.abs() < 1e-15);
        assert_eq!(m.perplexity_exact, m.perplexity_quantized);
    }

    #[test]
    fn uniform_logits_have_perplexity_v_and_known_kl() {
        let v = 8;
        let flat = vec![0.0f32; v];
        let mut peaked = flat.clone();
        peaked[3] = 2.0f32.ln(); // p = 2/9 on token 3, 1/9 elsewhere
        let mut c = LogitComparison::new(1);
        c.add(&flat, &peaked, Some(3));
        let m = c.summary();
        assert!((m.perplexity_exact - v as f64).abs() < 1e-9);
        assert!((m.perplexity_quantized - 4.5).abs() < 1e-6);
        // KL(uniform ‖ q) = Σ 1/8 ln((1/8)/q_i) = ln(9/8) - ln(2)/8
        let kl = (9.0f64 / 8.0).ln() - 2.0f64.ln() / 8.0;
        assert!((m.kl_divergence - kl).abs() < 1e-7);
        assert_eq!(m.top1_agreement, 0.0, "ties go to the lowest index: 0 vs 3");
        assert!((m.logit_rmse - (2.0f64.ln().powi(2) / 8.0).sqrt()).abs() < 1e-6);
    }

    #[test]
    fn top_k_orders_by_value_then_index() {
        let l = [0.5f32, 2.0, 2.0, -1.0, 3.0];
        assert_eq!(top_k(&l, 3), vec![4, 1, 2]);
        assert_eq!(top_k(&l, 10).len(), 5);
        assert!(top_k(&l, 0).is_empty());
        assert_eq!(argmax(&l), 4);
        let ls = log_softmax(&[1000.0, 1000.0]);
        assert!(
            (ls[0] - 0.5f64.ln()).abs() < 1e-12,
            "max-subtracted: no overflow"
        );
    }
}
