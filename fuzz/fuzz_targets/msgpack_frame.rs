//! A WebSocket binary frame from a MessagePack client.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|bytes: &[u8]| crier::fuzzing::msgpack_frame(bytes));
