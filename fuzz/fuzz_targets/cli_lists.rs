//! libFuzzer entry of the `cli-lists` target (see crates/tq-fuzz).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    if let Some(t) = tq_fuzz::target("cli-lists") {
        (t.run)(data);
    }
});
