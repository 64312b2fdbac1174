//! cloud-init network-config, version 1 and 2, mapped onto `[network]` (the `user_data`
//! target also validates the mapped table as part of the user-data layer).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = keelson_firstboot::netconfig::to_keelson(data, "fuzz: network-config");
});
