//! A service config file (`services.toml`, the body of `POST /v1/apply`, a user-data layer, a
//! system service file): parsed, checked and combined as sysd does.
#![no_main]

use std::path::Path;

use keelson_spec::{Config, Source, Sources};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    // As a system service file (its own rules: no [registries], no [overrides]).
    if let Ok(system) = keelson_spec::parse_file(Path::new("system.toml"), text, Source::System) {
        let _ = Config::from_services(system);
    }
    // As the user's config over no system services (what apply validates).
    let sources = Sources {
        system_dir: "/nonexistent/services.d".into(),
        userdata_file: "/nonexistent/user-data.toml".into(),
        user_file: "/nonexistent/services.toml".into(),
    };
    if let Ok(config) = sources.combine(Vec::new(), None, Some(text)) {
        let _ = config.render();
    }
});
