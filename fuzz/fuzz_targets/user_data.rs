//! First boot from end to end on what a datasource delivered: user data (size limit, gzip,
//! encodings, `#cloud-config` / TOML / refused kinds) and a network-config, decoded, validated
//! as the user-data layer and applied (write_files, the config layer, the instance id) into a
//! scratch root, as sysd does at its first start.
#![no_main]

use std::path::Path;
use std::time::Instant;

use keelson_firstboot::datasource::{Found, MetaData};
use keelson_firstboot::Paths;
use keelson_spec::{ConfigError, Source};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let (user_data, network_config) = keelson_fuzz::two_parts(data);
    let dir = keelson_fuzz::scratch("user_data");
    let paths = Paths {
        state_dir: dir.join("var/lib/keelson/firstboot"),
        config_file: dir.join("var/lib/keelson/user-data.toml"),
        root: dir.join("root"),
    };
    std::fs::create_dir_all(&paths.root).expect("creating the root");
    // sysd's validation: the layer over the image's system services (none here).
    let validate = |text: &str, origin: &str| -> Result<(), ConfigError> {
        let doc = keelson_spec::parse_document(Path::new(origin), text, Source::UserData)?;
        keelson_spec::Config::from_layers(Vec::new(), vec![doc]).map(drop)
    };
    let found = Found {
        source: "fuzz".into(),
        user_data: user_data.to_vec(),
        meta: MetaData {
            instance_id: "iid-fuzz".into(),
            local_hostname: None,
        },
        network_config: (!network_config.is_empty()).then(|| network_config.to_vec()),
    };
    let _ = keelson_firstboot::process(
        Ok(Some(found)),
        Vec::new(),
        &paths,
        &validate,
        Instant::now(),
    );
    // Nothing may land outside the scratch root and the state paths.
    for entry in std::fs::read_dir(&dir).expect("reading the scratch directory") {
        let name = entry.expect("entry").file_name();
        assert!(
            name == "root" || name == "var",
            "first boot wrote {name:?} outside its root"
        );
    }
});
