//! The kernel command line as PID 1 and sysd read it: the tokenizer, the boot arguments stage
//! 1 needs, the fatal-error action, the watchdog timeout, and first boot's datasource switch.
#![no_main]

use keelson_common::cmdline::Cmdline;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let c = Cmdline::parse(text);
    let _ = keelson_init::bootargs::fatal_action(&c);
    if let Ok(args) = keelson_init::bootargs::parse(&c) {
        assert_eq!(args.roothash.len(), 64);
    }
    let _ = keelson_init::watchdog::configured(&c);
    let _ = keelson_firstboot::imds::enabled(std::path::Path::new("/nonexistent"), text);
});
