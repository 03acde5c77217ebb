//! The simulated host's fixture: `parse_fixture`, then the inventory the
//! API shows from it.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        gpuwarden_fuzz::check_fixture(text);
    }
});
