//! Bit widths per tensor, including the paper's fractional widths by outlier-channel splitting.
//!
//! A [`Precision`] is either uniform (`b` bits on every channel) or a split: `outlier_channels`
//! channels at `outlier_bits` and the rest at `regular_bits`, each set quantized by its own
//! TurboQuant instance (docs/DESIGN.md, Algorithms). Average bits per coordinate:
//! `(k·b_out + (d - k)·b_reg) / d`, e.g. 32 × 4 + 96 × 2 over 128 = 2.5 and 64 × 4 + 64 × 3 = 3.5.
//! Which channels are outliers is chosen by [`calibrate_outliers`] (largest per-channel RMS over
//! sample vectors) or given explicitly, and stored with the cache.

use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// Bits per coordinate for one tensor (keys or values).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Precision {
    /// Every channel at `bits` bits (`1..=8`).
    Uniform(u32),
    /// `outlier_channels` channels at `outlier_bits`, the others at `regular_bits`.
    Split {
        /// Bits of the outlier channels.
        outlier_bits: u32,
        /// How many channels are outliers (`1..d`, and `d - count >= 2`, `count >= 2`).
        outlier_channels: usize,
        /// Bits of the remaining channels.
        regular_bits: u32,
    },
}

impl Precision {
    /// Parses a specification for head dimension `dim`:
    /// - `"4"`: uniform;
    /// - `"2.5"`: the paper's split, `d/4` channels at 4 bits and the rest at 2;
    /// - `"3.5"`: `d/2` channels at 4 bits and the rest at 3;
    /// - any other fractional `b` with `(b - ⌊b⌋)·d` a whole number `k`: `k` channels at `⌊b⌋ + 1`
    ///   bits, the rest at `⌊b⌋` (a `b` that no split of `d` channels gives exactly, such as 3.7 at
    ///   `d = 128`, is refused, naming the nearest explicit split);
    /// - `"4x32+2"`: explicit, 32 channels at 4 bits and the rest at 2.
    ///
    /// # Errors
    /// [`Error::InvalidPrecision`] for anything else, bits outside `1..=8`, or a split whose parts
    /// have fewer than 2 channels.
    pub fn parse(spec: &str, dim: usize) -> Result<Self> {
        let bad = |reason: &str| Error::InvalidPrecision {
            spec: spec.to_string(),
            reason: reason.to_string(),
        };
        let p = if let Some((hi, reg)) = spec.split_once('+') {
            let (ob, count) = hi
                .split_once('x')
                .ok_or_else(|| bad("expected OUTLIER_BITSxCOUNT+REGULAR_BITS"))?;
            Precision::Split {
                outlier_bits: ob
                    .trim()
                    .parse()
                    .map_err(|_| bad("outlier bits are not an integer"))?,
                outlier_channels: count
                    .trim()
                    .parse()
                    .map_err(|_| bad("outlier count is not an integer"))?,
                regular_bits: reg
                    .trim()
                    .parse()
                    .map_err(|_| bad("regular bits are not an integer"))?,
            }
        } else {
            let b: f64 = spec.trim().parse().map_err(|_| bad("not a number"))?;
            if !b.is_finite() || !(1.0..=8.0).contains(&b) {
                return Err(bad("bits must lie in 1..=8"));
            }
            let lo = b.floor();
            if b == lo {
                Precision::Uniform(lo as u32)
            } else {
                // The paper's 2.5 and 3.5 put d/4 and d/2 channels at 4 bits; any other fraction
                // puts that share of the channels one bit above the floor.
                let (ob, k, rb) = if (b - 2.5).abs() < 1e-9 {
                    (4, dim / 4, 2)
                } else if (b - 3.5).abs() < 1e-9 {
                    (4, dim / 2, 3)
                } else {
                    let k = ((b - lo) * dim as f64).round() as usize;
                    (lo as u32 + 1, k, lo as u32)
                };
                let split = Precision::Split {
                    outlier_bits: ob,
                    outlier_channels: k,
                    regular_bits: rb,
                };
                let avg = split.bits_per_coordinate(dim);
                if (avg - b).abs() > 1e-9 {
                    let hint = if split.validate(dim).is_ok() {
                        format!("; write {ob}x{k}+{rb} to run the {avg:.4}-bit split")
                    } else {
                        String::new()
                    };
                    return Err(bad(&format!(
                        "no split of {dim} channels gives exactly {b} bits{hint}"
                    )));
                }
                split
            }
        };
        p.validate(dim).map_err(|e| match e {
            Error::InvalidPrecision { reason, .. } => bad(&reason),
            other => other,
        })?;
        Ok(p)
    }

    /// Checks bit widths and part sizes for dimension `dim`.
    ///
    /// # Errors
    /// [`Error::InvalidPrecision`].
    pub fn validate(&self, dim: usize) -> Result<()> {
        let bad = |reason: String| Error::InvalidPrecision {
            spec: self.to_string(),
            reason,
        };
        let ok_bits = |b: u32| (1..=8).contains(&b);
        match *self {
            Precision::Uniform(b) if !ok_bits(b) => Err(bad(format!("{b} bits is outside 1..=8"))),
            Precision::Uniform(_) => Ok(()),
            Precision::Split {
                outlier_bits,
                outlier_channels,
                regular_bits,
            } => {
                if !ok_bits(outlier_bits) || !ok_bits(regular_bits) {
                    return Err(bad("bits must lie in 1..=8".into()));
                }
                // `dim - 2` without overflow: a count near usize::MAX is refused, not wrapped.
                if outlier_channels < 2 || outlier_channels > dim.saturating_sub(2) {
                    return Err(bad(format!(
                        "{outlier_channels} outlier channels leave a part under 2 channels at dimension {dim}"
                    )));
                }
                Ok(())
            }
        }
    }

    /// Average bits per coordinate at dimension `dim` (codes only, scalars excluded).
    pub fn bits_per_coordinate(&self, dim: usize) -> f64 {
        match *self {
            Precision::Uniform(b) => b as f64,
            Precision::Split {
                outlier_bits,
                outlier_channels,
                regular_bits,
            } => {
                (outlier_channels as f64 * outlier_bits as f64
                    + dim.saturating_sub(outlier_channels) as f64 * regular_bits as f64)
                    / dim as f64
            }
        }
    }
}

impl std::fmt::Display for Precision {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Precision::Uniform(b) => write!(f, "{b}"),
            Precision::Split {
                outlier_bits,
                outlier_channels,
                regular_bits,
            } => write!(f, "{outlier_bits}x{outlier_channels}+{regular_bits}"),
        }
    }
}

/// The `count` channels of largest `score` (ties to the lower channel), ascending.
fn top_channels(score: &[f64], count: usize) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..score.len()).collect();
    idx.sort_by(|&a, &b| score[b].total_cmp(&score[a]).then(a.cmp(&b)));
    let mut out = idx[..count].to_vec();
    out.sort_unstable();
    out
}

/// The checks both rankings make: whole rows of `dim`, at least one, `count <= dim`, finite.
fn check_samples(samples: &[f32], dim: usize, count: usize) -> Result<()> {
    if dim == 0 || samples.is_empty() || !samples.len().is_multiple_of(dim) {
        return Err(Error::Shape {
            what: "calibration samples",
            expected: dim.max(1) * (samples.len() / dim.max(1)).max(1),
            got: samples.len(),
        });
    }
    if count > dim {
        return Err(Error::InvalidChannels {
            reason: format!("{count} outliers requested from {dim} channels"),
        });
    }
    crate::error::check_finite("calibration samples", samples)?;
    Ok(())
}

/// The `count` channels with the largest root mean square over `samples` (row-major, `dim` wide),
/// sorted ascending. Ties go to the lower channel. O(n·d + d log d).
///
/// # Errors
/// [`Error::Shape`] if `samples` is empty or not a multiple of `dim`, [`Error::InvalidChannels`] if
/// `count > dim`, [`Error::NonFinite`].
pub fn calibrate_outliers(samples: &[f32], dim: usize, count: usize) -> Result<Vec<usize>> {
    check_samples(samples, dim, count)?;
    let mut ms = vec![0.0f64; dim];
    for row in samples.chunks_exact(dim) {
        for (m, &v) in ms.iter_mut().zip(row) {
            *m += (v as f64) * (v as f64);
        }
    }
    Ok(top_channels(&ms, count))
}

/// The `count` channels whose values spread most within groups of `group` consecutive rows
/// (the mean over complete groups of the squared range `(max - min)²`; the whole sample is one
/// group when it has fewer rows), sorted ascending, ties to the lower channel. This is the error
/// scale of a per-channel, per-group quantizer (KIVI's keys): a channel with a large but steady
/// offset is loud by RMS yet costs such a quantizer nothing, while a channel that swings inside
/// each group is where extra bits pay. O(n·d + d log d).
///
/// # Errors
/// As [`calibrate_outliers`].
pub fn calibrate_outliers_grouped(
    samples: &[f32],
    dim: usize,
    count: usize,
    group: usize,
) -> Result<Vec<usize>> {
    check_samples(samples, dim, count)?;
    let rows = samples.len() / dim;
    let g = group.clamp(1, rows);
    let mut spread = vec![0.0f64; dim];
    for block in samples.chunks_exact(g * dim) {
        for (c, s) in spread.iter_mut().enumerate() {
            let (lo, hi) = block
                .iter()
                .skip(c)
                .step_by(dim)
                .fold((f32::INFINITY, f32::NEG_INFINITY), |(a, b), &v| {
                    (a.min(v), b.max(v))
                });
            *s += ((hi - lo) as f64).powi(2);
        }
    }
    Ok(top_channels(&spread, count))
}

/// Checks an explicit outlier list: sorted ascending, unique, each `< dim`, of length `count`.
pub(crate) fn check_channels(channels: &[usize], dim: usize, count: usize) -> Result<()> {
    // Range first: a channel past the dimension is the mistake worth naming.
    if let Some(&c) = channels.iter().find(|&&c| c >= dim) {
        return Err(Error::InvalidChannels {
            reason: format!("channel {c} is out of range for d = {dim} (channels are 0..{dim})"),
        });
    }
    if !channels.windows(2).all(|w| w[0] < w[1]) {
        return Err(Error::InvalidChannels {
            reason: "channels must be sorted ascending without repeats".into(),
        });
    }
    if channels.len() != count {
        return Err(Error::InvalidChannels {
            reason: format!(
                "{} channel{} given for a split of {count} outlier channels",
                channels.len(),
                if channels.len() == 1 { "" } else { "s" }
            ),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_papers_and_explicit_specs() {
        assert_eq!(Precision::parse("4", 128).unwrap(), Precision::Uniform(4));
        let p = Precision::parse("2.5", 128).unwrap();
        assert_eq!(
            p,
            Precision::Split {
                outlier_bits: 4,
                outlier_channels: 32,
                regular_bits: 2
            }
        );
        assert_eq!(p.bits_per_coordinate(128), 2.5);
        let p = Precision::parse("3.5", 128).unwrap();
        assert_eq!(
            p,
            Precision::Split {
                outlier_bits: 4,
                outlier_channels: 64,
                regular_bits: 3
            }
        );
        assert_eq!(p.bits_per_coordinate(128), 3.5);
        assert_eq!(
            Precision::parse("4x16+2", 128)
                .unwrap()
                .bits_per_coordinate(128),
            2.25
        );
        assert_eq!(
            Precision::parse("2.25", 128)
                .unwrap()
                .bits_per_coordinate(128),
            2.25
        );
        // A fraction no split of d channels gives exactly is refused, naming the nearest split.
        match Precision::parse("3.7", 128) {
            Err(Error::InvalidPrecision { reason, .. }) => {
                assert!(
                    reason.contains("4x90+3") && reason.contains("3.7031"),
                    "{reason}"
                )
            }
            other => panic!("3.7 bits at d = 128 accepted: {other:?}"),
        }
        assert_eq!(
            Precision::parse("3.75", 128)
                .unwrap()
                .bits_per_coordinate(128),
            3.75
        );
        for bad in [
            "0", "9", "x", "2.5.1", "4x200+2", "4x1+2", "nan", "4x+2", "3.7",
        ] {
            assert!(
                matches!(
                    Precision::parse(bad, 128),
                    Err(Error::InvalidPrecision { .. })
                ),
                "{bad}"
            );
        }
    }

    #[test]
    fn calibration_picks_the_loud_channels() {
        let dim = 8;
        let samples: Vec<f32> = (0..100)
            .flat_map(|i| {
                (0..dim).map(move |j| {
                    if j == 2 || j == 6 {
                        10.0
                    } else {
                        (i % 3) as f32 * 0.1
                    }
                })
            })
            .collect();
        assert_eq!(calibrate_outliers(&samples, dim, 2).unwrap(), vec![2, 6]);
        // A channel count near usize::MAX is an error, not an overflow (found by fuzzing).
        let e = Precision::parse("4x18446744073709551615+2", 64).unwrap_err();
        assert!(matches!(e, Error::InvalidPrecision { .. }), "{e}");
        assert!(calibrate_outliers(&samples[..5], dim, 2).is_err());
        assert!(calibrate_outliers(&samples, dim, 9).is_err());
        assert!(check_channels(&[3, 1], 8, 2).is_err());
        assert!(check_channels(&[1, 8], 8, 2).is_err());
        assert!(check_channels(&[1, 3], 8, 2).is_ok());
    }

    /// A channel with a large steady offset is loud by RMS, but a per-group quantizer removes
    /// the offset: the grouped ranking picks the channels that swing inside each group.
    #[test]
    fn grouped_calibration_picks_the_swinging_channels() {
        let dim = 6;
        let samples: Vec<f32> = (0..64)
            .flat_map(|i| {
                (0..dim).map(move |j| match j {
                    0 => 50.0 + (i % 2) as f32 * 0.01,
                    3 | 4 => ((i * 7 % 11) as f32 - 5.0) * j as f32,
                    _ => (i % 3) as f32 * 0.1,
                })
            })
            .collect();
        assert!(calibrate_outliers(&samples, dim, 2).unwrap().contains(&0));
        assert_eq!(
            calibrate_outliers_grouped(&samples, dim, 2, 16).unwrap(),
            vec![3, 4]
        );
        // Fewer rows than a group: the whole sample is one group.
        assert_eq!(
            calibrate_outliers_grouped(&samples[..5 * dim], dim, 2, 16).unwrap(),
            vec![3, 4]
        );
        assert!(calibrate_outliers_grouped(&samples[..5], dim, 2, 16).is_err());
    }
}
