//! Host-side checks of a built image: other tools recognise it as what it claims to be.

use std::process::Command;

use qemu_tests::image;

/// systemd-dissect (Discoverable Partitions Specification) finds the root, its verity partition,
/// the ESP and /var, and reads the image's os-release.
#[test]
fn systemd_dissect_recognises_the_partitions() {
    let disk = image("vm").unwrap().join("disk.raw");
    let out = Command::new("systemd-dissect")
        .args(["--json=short"])
        .arg(&disk)
        .output()
        .expect("systemd-dissect (apt-get install systemd-container)");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let designators: Vec<&str> = v["mounts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["designator"].as_str().unwrap())
        .collect();
    for d in ["root", "root-verity", "esp", "var"] {
        assert!(designators.contains(&d), "{d} missing from {designators:?}");
    }
    let root = v["mounts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["designator"] == "root")
        .unwrap();
    assert_eq!(root["partition_label"], "root-a");
    assert_eq!(root["fstype"], "erofs");
    assert!(v["osRelease"].to_string().contains("ID=keelson"));
}

/// The dm-verity tree image-build computed verifies with cryptsetup's own implementation.
#[test]
fn veritysetup_verifies_the_root_hash_tree() {
    let dir = image("vm").unwrap();
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("manifest.json")).unwrap()).unwrap();
    let roothash = manifest["image"]["roothash_a"].as_str().unwrap();
    let out = Command::new("veritysetup")
        .arg("verify")
        .arg(dir.join("root.erofs"))
        .arg(dir.join("root.verity"))
        .arg(roothash)
        .output()
        .expect("veritysetup (apt-get install cryptsetup-bin)");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // A different root hash must not verify.
    let wrong = format!(
        "{}{}",
        if roothash.starts_with('0') { "1" } else { "0" },
        &roothash[1..]
    );
    let out = Command::new("veritysetup")
        .arg("verify")
        .arg(dir.join("root.erofs"))
        .arg(dir.join("root.verity"))
        .arg(&wrong)
        .output()
        .unwrap();
    assert!(!out.status.success());
}

/// The SBOM lists every input with its hash, every output, and the root fs files.
#[test]
fn manifest_lists_inputs_outputs_and_files() {
    let dir = image("vm").unwrap();
    let m: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("manifest.json")).unwrap()).unwrap();
    let inputs = m["inputs"].as_array().unwrap();
    assert!(inputs
        .iter()
        .any(|i| i["name"].as_str().unwrap().starts_with("linux-image-")));
    assert!(inputs
        .iter()
        .all(|i| i["sha256"].as_str().unwrap().len() == 64));
    let outputs = m["outputs"].as_array().unwrap();
    let disk = outputs.iter().find(|o| o["path"] == "disk.raw").unwrap();
    let actual = Command::new("sha256sum")
        .arg(dir.join("disk.raw"))
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&actual.stdout).starts_with(disk["sha256"].as_str().unwrap()));
    let files = m["rootfs"].as_array().unwrap();
    let init = files
        .iter()
        .find(|f| f["path"] == "/usr/sbin/init")
        .unwrap();
    assert_eq!(init["mode"], "100755");
    assert_eq!(init["sha256"].as_str().unwrap().len(), 64);
}
