//! libFuzzer entry of the `kv-trace` target (see crates/tq-fuzz).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    if let Some(t) = tq_fuzz::target("kv-trace") {
        (t.run)(data);
    }
});
