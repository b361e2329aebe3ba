//! libFuzzer entry of the `batch` target (see crates/tq-fuzz).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    if let Some(t) = tq_fuzz::target("batch") {
        (t.run)(data);
    }
});
