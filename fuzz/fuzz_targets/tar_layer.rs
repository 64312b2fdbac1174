//! An image layer (tar, gzip or zstd) applied onto a scratch root as an unpack applies it:
//! whiteouts, links, owners, xattrs, within an entry and byte budget. Whatever the layer says,
//! nothing may appear beside the root.
#![no_main]

use keelson_images::oci_layout;
use libfuzzer_sys::fuzz_target;
use oci_spec::image::MediaType;

fuzz_target!(|data: &[u8]| {
    let Some((&kind, blob)) = data.split_first() else {
        return;
    };
    let media_type = match kind % 3 {
        0 => MediaType::ImageLayer,
        1 => MediaType::ImageLayerGzip,
        _ => MediaType::ImageLayerZstd,
    };
    let dir = keelson_fuzz::scratch("tar_layer");
    let root = dir.join("rootfs");
    std::fs::create_dir(&root).expect("creating the root");
    let mut blob = blob;
    let _ = oci_layout::unpack_layer(&mut blob, &media_type, &root, 1000, 8 << 20);
    let beside: Vec<_> = std::fs::read_dir(&dir)
        .expect("reading the scratch directory")
        .map(|e| e.expect("entry").file_name())
        .filter(|n| n != "rootfs")
        .collect();
    assert!(
        beside.is_empty(),
        "the layer wrote {beside:?} outside its root"
    );
});
