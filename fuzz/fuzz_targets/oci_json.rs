//! The JSON documents of an image, from a registry or a layout: an image index (`index.json`
//! with its tags, or a multi-arch index resolved to this platform), an image manifest (its
//! layers' media types and digests) and an image config (platform and defaults).
#![no_main]

use keelson_images::oci_layout::{self, Document};
use libfuzzer_sys::fuzz_target;
use oci_spec::image::{Descriptor, Digest, ImageIndex, MediaType};
use sha2::{Digest as _, Sha256};

fuzz_target!(|data: &[u8]| {
    // The descriptor that named the document (digest and size verified before parsing), with
    // each media type the reader meets: typed as an index, as a manifest, or untyped.
    let Ok(digest) = format!("sha256:{:x}", Sha256::digest(data)).parse::<Digest>() else {
        return;
    };
    for media_type in [
        MediaType::ImageIndex,
        MediaType::ImageManifest,
        MediaType::Other(String::new()),
    ] {
        let desc = Descriptor::new(media_type, data.len() as u64, digest.clone());
        if let Ok(Document::Manifest(manifest)) = oci_layout::parse_document(&desc, data) {
            for layer in manifest.layers() {
                let _ = oci_layout::sha256_hex(layer);
            }
            let _ = oci_layout::parse_config(&desc, manifest.config(), data);
        }
    }
    if let Ok(index) = ImageIndex::from_reader(data) {
        let _ = oci_layout::select(&index, None);
        let _ = oci_layout::select(&index, Some("latest"));
    }
    let desc = Descriptor::new(MediaType::ImageConfig, data.len() as u64, digest);
    let _ = oci_layout::parse_config(&desc, &desc, data);
});
