//! b
#![allow(clippy::expect_used)]
fn main() {}
