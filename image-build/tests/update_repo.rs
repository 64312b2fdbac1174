//! `image-build update`: keys, root metadata and repositories, and the errors a release
//! engineer gets for bad input (each names what is wrong; nothing is half-written).

use std::path::Path;
use std::process::{Command, Output};

fn ib(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_image-build"))
        .args(args)
        .output()
        .unwrap()
}

fn ok(args: &[&str]) {
    let o = ib(args);
    assert!(
        o.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
}

fn err(args: &[&str]) -> String {
    let o = ib(args);
    assert!(!o.status.success(), "{args:?} should fail");
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// A build output directory as far as `update add` reads it.
fn image(dir: &Path, version: &str) -> String {
    let d = dir.join(format!("img-{version}"));
    std::fs::create_dir_all(&d).unwrap();
    std::fs::write(d.join("root.erofs"), vec![7u8; 8192]).unwrap();
    std::fs::write(d.join("root.verity"), vec![1u8; 4096]).unwrap();
    let uki = format!("keelson_{version}+3.efi");
    std::fs::write(d.join(&uki), b"MZ uki a").unwrap();
    std::fs::write(d.join("uki-slot-b.efi"), b"MZ uki b").unwrap();
    let m = format!(
        r#"{{"image": {{"name": "t", "version": "{version}", "roothash_a": "ab", "uki": "{uki}"}}}}"#
    );
    std::fs::write(d.join("manifest.json"), m).unwrap();
    d.to_str().unwrap().to_owned()
}

#[test]
fn repository_lifecycle_and_refusals() {
    let t = tempfile::tempdir().unwrap();
    let p = |n: &str| t.path().join(n).to_str().unwrap().to_owned();
    ok(&["update", "keygen", &p("k1.pk8")]);
    ok(&["update", "keygen", &p("k2.pk8")]);
    // Keys are never overwritten.
    assert!(err(&["update", "keygen", &p("k1.pk8")]).contains("k1.pk8"));
    ok(&[
        "update",
        "root",
        "--key",
        &p("k1.pk8"),
        "--out",
        &p("root.json"),
    ]);
    let root: serde_json::Value =
        serde_json::from_slice(&std::fs::read(p("root.json")).unwrap()).unwrap();
    assert_eq!(root["signed"]["_type"], "root");
    assert_eq!(root["signatures"].as_array().unwrap().len(), 1);

    let v1 = image(t.path(), "1.0");
    let v2 = image(t.path(), "1.1");
    let add = |key: &str, img: &str, extra: &[&str]| {
        let mut a: Vec<String> = ["update", "add", "--repo"].map(str::to_owned).to_vec();
        a.extend([
            p("repo"),
            "--root".into(),
            p("root.json"),
            "--key".into(),
            key.into(),
        ]);
        a.extend(extra.iter().map(|s| s.to_string()));
        a.push(img.into());
        a
    };
    let run = |a: Vec<String>| ib(&a.iter().map(String::as_str).collect::<Vec<_>>());
    let o = run(add(&p("k1.pk8"), &v1, &[]));
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    // A key the root does not trust cannot sign.
    let o = run(add(&p("k2.pk8"), &v2, &[]));
    assert!(!o.status.success());
    // Bad waves name the problem.
    let o = run(add(
        &p("k1.pk8"),
        &v2,
        &["--wave", "24:50", "--wave", "48:40"],
    ));
    assert!(String::from_utf8_lossy(&o.stderr).contains("percentages must increase"));
    let o = run(add(&p("k1.pk8"), &v2, &["--wave", "soon"]));
    assert!(String::from_utf8_lossy(&o.stderr).contains("HOURS:PERCENT"));
    // Versions are immutable.
    let o = run(add(&p("k1.pk8"), &v1, &[]));
    assert!(String::from_utf8_lossy(&o.stderr).contains("already in the repository"));
    // The refused attempts left the repository at its first version.
    let ts: serde_json::Value = serde_json::from_slice(
        &std::fs::read(t.path().join("repo/metadata/timestamp.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(ts["signed"]["version"], 1);
    // A second version: metadata versions move on, the manifest lists both, newest first.
    let o = run(add(
        &p("k1.pk8"),
        &v2,
        &["--wave", "0:10", "--wave", "24:100"],
    ));
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let ts: serde_json::Value = serde_json::from_slice(
        &std::fs::read(t.path().join("repo/metadata/timestamp.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(ts["signed"]["version"], 2);
    let manifest = std::fs::read_dir(t.path().join("repo/targets"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.to_string_lossy().ends_with(".manifest.json"))
        .map(|p| serde_json::from_slice::<serde_json::Value>(&std::fs::read(p).unwrap()).unwrap())
        .find(|m| m["updates"].as_array().unwrap().len() == 2)
        .expect("a manifest with both versions");
    assert_eq!(manifest["updates"][0]["version"], "1.1");
    assert_eq!(manifest["updates"][0]["waves"][1]["percent"], 100);
    assert_eq!(manifest["updates"][0]["uki_b"], "t-1.1-uki-b.efi");
}
