//! Values of the CLI's options that a user types as text: comma-separated lists of precisions,
//! strategies, scales, rotations and sizes, and outlier channel choices. Every parser returns an error
//! message for any input, never panics (fuzzed by `tq-fuzz`'s `cli-lists`).

use tq_core::RotationKind;
use tq_kv::{KeyStrategy, OutlierChoice, Precision};
use tq_quant::{ScaleMode, SketchKind};

/// Splits `text` at commas as the CLI does and parses every item as `T`.
///
/// # Errors
/// The first item's parse error.
pub fn parse_list<T: std::str::FromStr>(text: &str) -> Result<Vec<T>, String>
where
    T::Err: std::fmt::Display,
{
    text.split(',')
        .map(|item| item.parse::<T>().map_err(|e| format!("'{item}': {e}")))
        .collect()
}

/// Parses `text` as every kind of list the CLI accepts (widths, sizes, precisions, strategies,
/// scales, rotations, sketches, channel choices) and returns how many kinds accepted it. The
/// fuzz target's entry point: it must return for every input.
pub fn parse_every_list(text: &str) -> usize {
    [
        parse_list::<u32>(text).is_ok(),
        parse_list::<usize>(text).is_ok(),
        parse_list::<f64>(text).is_ok(),
        text.split(',').all(|item| {
            [64, 80, 128]
                .iter()
                .all(|&d| Precision::parse(item, d).is_ok())
        }),
        parse_list::<KeyStrategy>(text).is_ok(),
        parse_list::<ScaleMode>(text).is_ok(),
        parse_list::<RotationKind>(text).is_ok(),
        parse_list::<SketchKind>(text).is_ok(),
        text.parse::<OutlierChoice>().is_ok(),
    ]
    .into_iter()
    .filter(|&ok| ok)
    .count()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lists_parse_every_item_or_name_the_bad_one() {
        assert_eq!(parse_list::<u32>("1,2,4").unwrap(), vec![1, 2, 4]);
        let e = parse_list::<u32>("1,x,4").unwrap_err();
        assert!(e.contains("'x'"), "{e}");
        assert_eq!(
            "3,1,2".parse::<OutlierChoice>().unwrap(),
            OutlierChoice::Channels(vec![1, 2, 3])
        );
        assert!("1,,2".parse::<OutlierChoice>().is_err());
        assert_eq!(parse_every_list("4"), 5); // u32, usize, f64, precision, channel list
        assert_eq!(parse_every_list("mse,prod"), 1);
        assert_eq!(parse_every_list(""), 0);
    }
}
