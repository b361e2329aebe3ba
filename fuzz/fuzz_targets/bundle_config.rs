//! libFuzzer entry of the `bundle-config` target (see crates/tq-fuzz).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    if let Some(t) = tq_fuzz::target("bundle-config") {
        (t.run)(data);
    }
});
