//! NoCloud meta-data (YAML: instance-id, local-hostname) and the EC2-style metadata service's
//! HTTP answers, as first boot reads them.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = keelson_firstboot::datasource::parse_meta(data, "fuzz: meta-data");
    if let Ok(response) = keelson_firstboot::imds::parse(data, 16 * 1024) {
        assert!(response.body.len() <= 16 * 1024);
        let _ = keelson_firstboot::datasource::parse_meta(&response.body, "fuzz: imds meta-data");
    }
});
