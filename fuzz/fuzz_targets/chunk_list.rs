//! A version's delta chunk list (a signed target whose content the repository chose): parsed
//! as the update agent parses it, then checked against the signed root size, a size it does not
//! match and the largest; the stored-size bound is taken, as the agent does, only for a list
//! that passed its check.
#![no_main]

use keelson_common::update::{chunk_list_max_bytes, chunk_stored_max, ChunkList};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(list) = serde_json::from_slice::<ChunkList>(data) else {
        return;
    };
    for root_size in [list.size, 0, 28 << 20, u64::MAX] {
        let _ = chunk_list_max_bytes(root_size);
        if list.check(root_size).is_ok() {
            for c in &list.chunks {
                let _ = chunk_stored_max(c.length);
            }
        }
    }
});
