//! The library side of tq-bench: the readers of outside input that the `tq-bench` binary
//! (`src/main.rs`) and the fuzz targets share ([`data`]: `.npy`, `.fvecs` and `.safetensors`
//! vector sets; [`lists`]: the values of comma-separated options), and the README's examples,
//! compiled and run as doctests here because this crate sees every tq crate.

pub mod data;
pub mod lists;

/// `n` and the noun in the number it calls for: `count(1, "layer")` is "1 layer",
/// `count(3, "layer")` is "3 layers".
pub fn count(n: usize, noun: &str) -> String {
    if n == 1 {
        format!("1 {noun}")
    } else {
        format!("{n} {noun}s")
    }
}

/// The README's examples.
#[doc = include_str!("../../../README.md")]
#[cfg(doctest)]
pub struct ReadmeDoctests;
