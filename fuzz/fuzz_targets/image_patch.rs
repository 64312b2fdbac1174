//! A root or extension patch (a signed target whose content the repository chose) decoded as
//! the update agent decodes it: `keelson_update::root_patch::apply` against a reference, for the
//! size the frame declares (bounded here, as the agent bounds it by the signed size) and for
//! sizes it does not declare. Input: two bytes of reference length, the reference, the patch.
#![no_main]

use keelson_update::root_patch::apply;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if data.len() < 2 {
        return;
    }
    let split = 2 + usize::from(u16::from_le_bytes([data[0], data[1]])).min(data.len() - 2);
    let (reference, patch) = (&data[2..split], &data[split..]);
    let declared = zstd::zstd_safe::get_frame_content_size(patch)
        .ok()
        .flatten()
        .filter(|&n| n <= 1 << 20);
    for len in declared.into_iter().chain([0, 4096]) {
        if let Ok(out) = apply(reference, patch, len) {
            assert_eq!(out.len() as u64, len);
        }
    }
});
