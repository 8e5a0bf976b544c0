//! Bytes a client could send as a `HostedRun`: decoding and validation must never panic.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    fal_server::fuzzing::validate_run(data);
});
