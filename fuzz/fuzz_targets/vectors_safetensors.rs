//! libFuzzer entry of the `vectors-safetensors` target (see crates/tq-fuzz).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    if let Some(t) = tq_fuzz::target("vectors-safetensors") {
        (t.run)(data);
    }
});
