//! The update repository's `manifest.json` (a signed TUF target, still checked): parsed,
//! its versions and extension names checked, sorted, and a version chosen for a node.
#![no_main]

use keelson_spec::update::UpdateSpec;
use keelson_update::install::{self, Node};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(manifest) = install::parse_manifest(data) else {
        return;
    };
    let spec = UpdateSpec::default();
    for seed in [0, 50, 99] {
        let node = Node {
            version: "1.0.0".into(),
            variant: "vm".into(),
            seed,
            target_slot: "b".into(),
        };
        let now = jiff::Timestamp::UNIX_EPOCH;
        let (_offered, chosen) = install::select(&manifest, &node, &spec, None, false, now);
        if let Ok(p) = chosen {
            let _ = p.uki_for("b");
        }
        let _ = install::select(&manifest, &node, &spec, Some("2.0.0"), true, now);
    }
});
