//! The library side of tq-bench holds only the README's examples, compiled and run as doctests
//! here because this crate sees every tq crate (the `tq-bench` binary is `src/main.rs`).

/// The README's examples.
#[doc = include_str!("../../../README.md")]
#[cfg(doctest)]
pub struct ReadmeDoctests;
