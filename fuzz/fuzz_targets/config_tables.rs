//! The whole-table settings of a config file as each layer loads them: `[network]`/`[host]`,
//! `[update]` (with `[update.coordination]`), `[extensions]`, `[api]`, `[metrics]`,
//! `[logging]` and `[registries]`.
#![no_main]

use std::path::Path;

use keelson_spec::Sources;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let path = Path::new("services.toml");
    let _ = keelson_spec::parse_net(path, text);
    let _ = keelson_spec::parse_registries(path, text);
    // The table loaders read their layers from files: the input is the user's file.
    let dir = keelson_fuzz::scratch("config_tables");
    let sources = Sources {
        system_dir: dir.join("services.d"),
        userdata_file: dir.join("user-data.toml"),
        user_file: dir.join("services.toml"),
    };
    std::fs::write(&sources.user_file, text).expect("writing the layer");
    if let Ok(update) = keelson_spec::update::load(&sources) {
        if let Some(w) = &update.window {
            let _ = keelson_spec::update::parse_window(w);
        }
    }
    let _ = keelson_spec::extensions::load(&sources);
    if let Ok(api) = keelson_spec::api::load(&sources) {
        if let Some(remote) = &api.remote {
            let _ = remote.address();
        }
    }
    let _ = keelson_spec::observe::load(&sources);
});
