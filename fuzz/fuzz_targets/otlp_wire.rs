#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| collector::fuzzing::otlp_wire(data));
