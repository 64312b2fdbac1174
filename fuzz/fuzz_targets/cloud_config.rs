//! `#cloud-config` YAML: the strictly typed subset (users, keys, write_files with base64 and
//! gzip, hostname, ...), unsupported keys listed.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = keelson_firstboot::cloudconfig::parse(text, "fuzz: user-data");
    }
});
