//! An HTTP publish or batch body, in both encodings.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|bytes: &[u8]| crier::fuzzing::http_body(bytes));
