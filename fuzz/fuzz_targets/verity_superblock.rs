//! The veritysetup superblock at the start of a slot's verity partition, as stage 1 decodes
//! it and builds the dm-verity table line from it.
#![no_main]

use keelson_common::verity::Superblock;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(sb) = Superblock::decode(data) else {
        return;
    };
    let (_sectors, params) = sb.dm_table("254:1", "254:2", &"0".repeat(64));
    assert!(params.starts_with("1 254:1 254:2 4096 4096 "));
    assert_eq!(Superblock::decode(&sb.encode()).ok(), Some(sb));
});
