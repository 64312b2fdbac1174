//! A NoCloud seed volume (ISO 9660 with Joliet or Rock Ridge, FAT12/16/32) read in process:
//! identified, then its root files read within the limits, as any block device labelled
//! CIDATA is at every boot. A volume that makes the reader loop is a timeout here.
#![no_main]

use std::io::Cursor;

use keelson_firstboot::seedfs;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut dev = Cursor::new(data);
    let Ok(Some(volume)) = seedfs::identify(&mut dev) else {
        return;
    };
    let _ = volume.label();
    let names = ["user-data", "meta-data", "network-config", "vendor-data"];
    if let Ok(files) = seedfs::read_root_files(&mut dev, &volume, &names, 4096) {
        assert_eq!(files.len(), names.len());
        assert!(files.iter().flatten().all(|f| f.len() <= 4096));
    }
});
