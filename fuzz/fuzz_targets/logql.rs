#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| dashboard::loki::fuzzing::query(data));
