//! Per-head calibration from sample key-values: the outlier channels of split precisions
//! (docs/DESIGN.md, Algorithms: mixed precision) and the means of centred caches. One place for
//! every consumer: tq-onnx calibrates on a prompt's exact key-values, tq-bench on a trace's.

use serde::{Deserialize, Serialize};

use crate::head::HeadConfig;
use crate::precision::{Precision, calibrate_outliers, calibrate_outliers_grouped};
use crate::store::KeyStrategy;
use crate::{Error, Result};

/// What a head's cache is calibrated with: outlier channels for split precisions (ascending
/// channel indices) and, for centred caches, the key and value means (`head_dim` values each).
/// The default (nothing) suits uniform precisions without centring.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct HeadCalibration {
    /// Key outlier channels (needed when the key precision is a split).
    pub keys: Option<Vec<usize>>,
    /// Value outlier channels (needed when the value precision is a split).
    pub values: Option<Vec<usize>>,
    /// Key mean (needed when `HeadConfig::center` is set).
    #[serde(default)]
    pub key_mean: Option<Vec<f32>>,
    /// Value mean (needed when `HeadConfig::center` is set).
    #[serde(default)]
    pub value_mean: Option<Vec<f32>>,
}

/// How the outlier channels of split precisions are chosen.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum OutlierChoice {
    /// Per head, the channels of largest RMS over the samples ([`calibrate_outliers`]); for
    /// keys of the per-group strategies (kivi, gmse), the channels of largest spread inside
    /// groups of `G` tokens ([`calibrate_outliers_grouped`]).
    #[default]
    Auto,
    /// No outlier channels: a split precision is an error.
    None,
    /// The same channels for every head (ascending; checked against the head dimension when the
    /// cache is built).
    Channels(Vec<usize>),
}

impl std::fmt::Display for OutlierChoice {
    /// As parsed: `auto`, `none` or the comma-separated channels.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            OutlierChoice::Auto => f.write_str("auto"),
            OutlierChoice::None => f.write_str("none"),
            OutlierChoice::Channels(c) => {
                let list: Vec<String> = c.iter().map(usize::to_string).collect();
                f.write_str(&list.join(","))
            }
        }
    }
}

impl std::str::FromStr for OutlierChoice {
    type Err = String;
    /// `auto`, `none`, or a comma-separated channel list (sorted on parse).
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "auto" => Ok(Self::Auto),
            "none" => Ok(Self::None),
            list => {
                let mut v: Vec<usize> = list
                    .split(',')
                    .map(|c| {
                        c.trim().parse::<usize>().map_err(|_| {
                            format!(
                                "'{c}' is not a channel index (expected auto, none or a comma-separated list)"
                            )
                        })
                    })
                    .collect::<std::result::Result<_, _>>()?;
                v.sort_unstable();
                Ok(Self::Channels(v))
            }
        }
    }
}

impl HeadCalibration {
    /// `true` when a cache of `config` needs a calibration (a split precision or centring).
    pub fn needed(config: &HeadConfig) -> bool {
        config.center
            || matches!(config.key_precision, Precision::Split { .. })
            || matches!(config.value_precision, Precision::Split { .. })
    }

    /// Calibrates one head of `config` from sample `keys` and `values` (row-major,
    /// `head_dim` wide, finite): outlier channels of split precisions by `choice`, means when the
    /// config centres. O(n·d + d log d).
    ///
    /// # Errors
    /// [`Error::InvalidChannels`] for a split precision with [`OutlierChoice::None`];
    /// [`Error::Shape`] for samples that are empty or not whole rows; [`Error::NonFinite`].
    pub fn from_samples(
        config: &HeadConfig,
        keys: &[f32],
        values: &[f32],
        choice: &OutlierChoice,
    ) -> Result<Self> {
        let d = config.head_dim;
        // Per-channel, per-group key quantizers remove each group's offset: rank their channels
        // by the spread inside groups, the others by RMS.
        let grouped_keys = matches!(config.key_strategy, KeyStrategy::Kivi | KeyStrategy::Gmse);
        let pick = |p: Precision, xs: &[f32], grouped: bool| -> Result<Option<Vec<usize>>> {
            match (p, choice) {
                (Precision::Uniform(_), _) => Ok(None),
                (Precision::Split { .. }, OutlierChoice::None) => Err(Error::InvalidChannels {
                    reason: format!(
                        "precision {p} needs outlier channels, but the outlier choice is none"
                    ),
                }),
                (
                    Precision::Split {
                        outlier_channels, ..
                    },
                    OutlierChoice::Auto,
                ) if grouped => Ok(Some(calibrate_outliers_grouped(
                    xs,
                    d,
                    outlier_channels,
                    config.group,
                )?)),
                (
                    Precision::Split {
                        outlier_channels, ..
                    },
                    OutlierChoice::Auto,
                ) => Ok(Some(calibrate_outliers(xs, d, outlier_channels)?)),
                (Precision::Split { .. }, OutlierChoice::Channels(c)) => Ok(Some(c.clone())),
            }
        };
        let mean = |xs: &[f32]| -> Result<Option<Vec<f32>>> {
            Ok(if config.center {
                Some(tq_quant::MseQuantizer::calibrate_mean(xs, d)?)
            } else {
                None
            })
        };
        Ok(Self {
            keys: pick(config.key_precision, keys, grouped_keys)?,
            values: pick(config.value_precision, values, false)?,
            key_mean: mean(keys)?,
            value_mean: mean(values)?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn choices_parse_and_sort() {
        assert_eq!("auto".parse::<OutlierChoice>(), Ok(OutlierChoice::Auto));
        assert_eq!("none".parse::<OutlierChoice>(), Ok(OutlierChoice::None));
        assert_eq!(
            "3,1,2".parse::<OutlierChoice>(),
            Ok(OutlierChoice::Channels(vec![1, 2, 3]))
        );
        let e = "1,,2".parse::<OutlierChoice>().unwrap_err();
        assert!(e.contains("''"), "{e}");
        for text in ["auto", "none", "1,2,3"] {
            assert_eq!(text.parse::<OutlierChoice>().unwrap().to_string(), text);
        }
    }

    #[test]
    fn a_split_without_channels_is_an_error_and_uniform_needs_nothing() {
        let d = 16;
        let rows: Vec<f32> = (0..4 * d).map(|i| (i % 7) as f32 - 3.0).collect();
        let split = HeadConfig::new(
            d,
            Precision::parse("3.5", d).unwrap(),
            Precision::Uniform(4),
        );
        assert!(HeadCalibration::needed(&split));
        let e = HeadCalibration::from_samples(&split, &rows, &rows, &OutlierChoice::None);
        assert!(matches!(e, Err(Error::InvalidChannels { .. })), "{e:?}");
        let auto =
            HeadCalibration::from_samples(&split, &rows, &rows, &OutlierChoice::Auto).unwrap();
        assert_eq!(auto.keys.as_ref().map(Vec::len), Some(d / 2));
        assert_eq!(auto.values, None);
        assert_eq!(auto.key_mean, None);

        let uniform = HeadConfig::new(d, Precision::Uniform(4), Precision::Uniform(4));
        assert!(!HeadCalibration::needed(&uniform));
        let none =
            HeadCalibration::from_samples(&uniform, &rows, &rows, &OutlierChoice::None).unwrap();
        assert_eq!(none, HeadCalibration::default());

        let centred = HeadConfig {
            center: true,
            ..uniform
        };
        let c =
            HeadCalibration::from_samples(&centred, &rows, &rows, &OutlierChoice::None).unwrap();
        assert_eq!(c.key_mean.as_ref().map(Vec::len), Some(d));
    }
}
