//! `keelctl extensions`: the engine extensions of the running OS version (`/v1/extensions`).

use std::io::Write;

use anyhow::Result;
use keelson_common::api::extensions::ExtensionsView;

use crate::http::Client;
use crate::render;

pub fn run(client: &Client, json: bool, out: &mut impl Write) -> Result<()> {
    let body = client.get("/v1/extensions")?;
    if json {
        return crate::print_raw(out, &body);
    }
    let v: ExtensionsView = crate::parse(&body)?;
    write!(out, "{}", render_view(&v))?;
    Ok(())
}

fn render_view(v: &ExtensionsView) -> String {
    let mut s = String::new();
    if v.extensions.is_empty() {
        s.push_str(&format!("no extensions for version {}\n", v.os_version));
    } else {
        let rows: Vec<Vec<String>> = v
            .extensions
            .iter()
            .map(|x| {
                vec![
                    x.name.clone(),
                    x.version.clone(),
                    x.state.clone(),
                    x.built_for.clone(),
                    x.roothash.clone(),
                    x.source.clone(),
                ]
            })
            .collect();
        s.push_str(&render::table(
            &[
                "NAME",
                "VERSION",
                "STATE",
                "BUILT FOR",
                "ROOT HASH",
                "SOURCE",
            ],
            &rows,
        ));
        for x in &v.extensions {
            if let Some(e) = &x.error {
                s.push_str(&format!("{}: {e}\n", x.name));
            }
        }
    }
    if let Some(e) = &v.last_error {
        s.push_str(&format!("last error: {e}\n"));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use keelson_common::api::extensions::ExtensionStatus;

    #[test]
    fn lists_states_and_errors() {
        let v = ExtensionsView {
            os_version: "0.2.0".into(),
            enabled: vec!["etcd".into(), "docker".into()],
            extensions: vec![
                ExtensionStatus {
                    name: "etcd".into(),
                    version: "3.4.23-1".into(),
                    state: "active".into(),
                    roothash: "ab".repeat(32),
                    built_for: "0.2.0".into(),
                    source: "http://repo/targets/ext-etcd.raw.gz".into(),
                    error: None,
                },
                ExtensionStatus {
                    name: "docker".into(),
                    version: String::new(),
                    state: "pending".into(),
                    roothash: String::new(),
                    built_for: String::new(),
                    source: String::new(),
                    error: Some("the update repository lists no extension `docker` for version 0.2.0 (it lists: etcd)".into()),
                },
            ],
            last_error: None,
        };
        let text = render_view(&v);
        assert!(text.starts_with("NAME"), "{text}");
        assert!(text.contains("etcd    3.4.23-1  active   0.2.0"), "{text}");
        assert!(
            text.contains("docker: the update repository lists no extension"),
            "{text}"
        );
        let empty = ExtensionsView {
            extensions: vec![],
            ..v
        };
        assert_eq!(render_view(&empty), "no extensions for version 0.2.0\n");
    }
}
