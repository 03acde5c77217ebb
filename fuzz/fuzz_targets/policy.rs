//! The policy file: `Policy::parse`, then every question the agent asks it.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        gpuwarden_fuzz::check_policy(text);
    }
});
