//! A `LaunchRequest` as the wire brings it: protobuf bytes, decoded with
//! prost as the server does, converted as the service does, validated.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    gpuwarden_fuzz::check_launch_bytes(data);
});
