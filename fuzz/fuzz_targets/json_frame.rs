//! A WebSocket text frame from a JSON client.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|bytes: &[u8]| crier::fuzzing::json_frame(bytes));
