//! Bytes a worker (user code) could write on its frame socket: the reader must never panic or over-allocate.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // A small payload limit: headers claiming more are refused before anything is allocated for them.
    fal_engine::fuzzing::read_worker_frames(data, 1 << 20);
});
