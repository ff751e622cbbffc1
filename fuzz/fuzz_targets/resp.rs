#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| stateful_faas_core::fuzzing::resp(data));
