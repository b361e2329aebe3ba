//! The library side of tq-bench: the readers of outside input that the `tq-bench` binary
//! (`src/main.rs`) and the fuzz targets share ([`data`]: `.npy`, `.fvecs` and `.safetensors`
//! vector sets; [`lists`]: the values of comma-separated options), and the README's examples,
//! compiled and run as doctests here because this crate sees every tq crate.

pub mod data;
pub mod lists;

/// `n` and the noun in the number it calls for: `count(1, "layer")` is "1 layer",
/// `count(3, "layer")` is "3 layers", `count(2, "query")` is "2 queries".
pub fn count(n: usize, noun: &str) -> String {
    if n == 1 {
        return format!("1 {noun}");
    }
    match noun.strip_suffix('y') {
        Some(stem) if !stem.ends_with(['a', 'e', 'o', 'u']) => format!("{n} {stem}ies"),
        _ => format!("{n} {noun}s"),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn counts_agree_with_their_nouns() {
        assert_eq!(super::count(1, "query"), "1 query");
        assert_eq!(super::count(2, "query"), "2 queries");
        assert_eq!(super::count(0, "layer"), "0 layers");
        assert_eq!(super::count(3, "key"), "3 keys");
    }
}

/// The README's examples.
#[doc = include_str!("../../../README.md")]
#[cfg(doctest)]
pub struct ReadmeDoctests;
