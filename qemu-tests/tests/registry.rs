//! The image store scenario: a service whose image comes from a registry. The reference
//! registry (Debian's `docker-registry`) runs on the loopback of the guest's network namespace,
//! which QEMU's user networking shows the guest as 10.0.2.2; the test pushes the pipeline's own
//! OCI layout of the `base` image there with skopeo (digests preserved), applies a config naming
//! it with keelctl, checks the pulled manifest is the one in image-build's `manifest.json`, and
//! reaches the service through a forwarded port. After a power-off and a boot in a new namespace (no registry at all) the
//! service starts again from the image kept on /var.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::Path;
use std::time::Duration;

use qemu_tests::scenario::{fresh_disk, http_get_until, test_guest, test_image};
use qemu_tests::Guest;

use keelson_testkit::registry::{Layout, Registry, RegistryOptions};

const BOOT: Duration = Duration::from_secs(240);
const APP_PORT: u16 = 18081;

/// The test image with the registry service's port forwarded too.
fn boot(disk: &Path) -> Guest {
    test_guest(disk).forward(APP_PORT, 8090).spawn().unwrap()
}

/// `GET /` through the forwarded port, retried while the service comes up.
fn get(g: &Guest) -> String {
    http_get_until(
        g,
        SocketAddr::from((Ipv4Addr::LOCALHOST, APP_PORT)),
        "/",
        "200 OK",
    )
}

/// `GET /` until it holds `want`.
fn get_until(g: &Guest, want: &str) -> String {
    http_get_until(
        g,
        SocketAddr::from((Ipv4Addr::LOCALHOST, APP_PORT)),
        "/",
        want,
    )
}

/// An OCI layout at `dir` tagged `layered`: the `base` image's own layer (from the pipeline's
/// layout at `base`), a layer with /srv/www/{index,kept,gone}.html, and a top layer that
/// replaces index.html and whites out gone.html.
fn layered(base: &Path, dir: &Path) -> Layout {
    use keelson_testkit::oci::{tar, E, TAR};
    let json = |p: &Path| -> serde_json::Value {
        serde_json::from_slice(&std::fs::read(p).unwrap()).unwrap()
    };
    let blob = |digest: &str| base.join("blobs/sha256").join(&digest[7..]);
    let index = json(&base.join("index.json"));
    let manifest = json(&blob(index["manifests"][0]["digest"].as_str().unwrap()));
    let layer = &manifest["layers"][0];
    let base_layer = std::fs::read(blob(layer["digest"].as_str().unwrap())).unwrap();
    let middle = tar(&[
        E::File("srv/www/index.html", b"from the middle layer\n", 0o644),
        E::File("srv/www/kept.html", b"from the middle layer\n", 0o644),
        E::File("srv/www/gone.html", b"whited out above\n", 0o644),
    ]);
    let top = tar(&[
        E::File("srv/www/index.html", b"served from the top layer\n", 0o644),
        E::File("srv/www/.wh.gone.html", b"", 0o644),
    ]);
    let mut out = Layout::new(dir);
    let m = out.image(
        "amd64",
        &[
            (layer["mediaType"].as_str().unwrap(), base_layer),
            (TAR, middle),
            (TAR, top),
        ],
        &["sh"],
    );
    out.tag(&m, "layered");
    out
}

#[test]
fn service_from_a_registry_image_survives_a_reboot_without_the_registry() {
    let dir = tempfile::tempdir().unwrap();
    let disk = fresh_disk(dir.path());
    let img = test_image();

    let g = boot(&disk);
    // The registry and the push happen inside the guest's namespace. The image is the
    // pipeline's own OCI layout of the `base` service image (busybox, toybox), pushed with its
    // digests preserved: what runs is what image-build made.
    let work = dir.path().to_path_buf();
    let layout_dir = img.join("oci/base");
    let registry = g.run_in_netns(move || {
        let reg = Registry::start(&work.join("reg"), 5000, RegistryOptions::default());
        Layout::new(&layout_dir).push("base", &format!("{}/keelson/base:v1", reg.addr), None);
        layered(&layout_dir, &work.join("layered")).push(
            "layered",
            &format!("{}/keelson/layered:v1", reg.addr),
            None,
        );
        reg
    });
    let sbom: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(img.join("manifest.json")).unwrap()).unwrap();
    let digest = sbom["oci_images"]
        .as_array()
        .unwrap()
        .iter()
        .find(|i| i["name"] == "base")
        .expect("oci_images.base in manifest.json")["manifest"]
        .as_str()
        .unwrap()
        .to_string();

    g.expect("sysd: testshell: ready", BOOT);
    let out = g.sh(r#"cat > /tmp/user.toml <<'EOF'
version = 1
[registries."10.0.2.2:5000"]
insecure = true

[services.site]
image = "10.0.2.2:5000/keelson/base:v1"
command = ["sh", "-c", "mkdir -p /tmp/www && echo served from a pulled image > /tmp/www/index.html && exec httpd -f -v -p 8090 -h /tmp/www"]
ready = { http = "http://127.0.0.1:8090/", interval = "1s" }
stop_timeout = "2s"
EOF
keelctl apply /tmp/user.toml"#,
    );
    assert!(out.contains("site"), "{out}");
    g.expect("sysd: site: image-pulled", BOOT);
    g.expect("sysd: site: ready", BOOT);
    assert!(get(&g).contains("served from a pulled image"));
    let listed = g.sh("keelctl -o json images");
    assert!(
        listed.contains("10.0.2.2:5000/keelson/base:v1")
            && listed.contains(&digest)
            && listed.contains("\"site\""),
        "the pulled manifest is image-build's ({digest}): {listed}"
    );

    // A three-layer image on the same base: each layer unpacked once, stacked by overlayfs in
    // the guest's kernel; the top layer's whiteout hides a file the middle one made, and the
    // base layer is the one the first image already unpacked.
    let count = "ls /proc/1/root/var/lib/keelson/images/layers | wc -l";
    let before: u32 = g.sh(count).trim().parse().unwrap();
    let out = g.sh(r#"sed -i 's|keelson/base:v1|keelson/layered:v1|; s|mkdir -p /tmp/www.*exec httpd|exec httpd|; s|-h /tmp/www|-h /srv/www|' /tmp/user.toml && keelctl apply /tmp/user.toml"#);
    assert!(out.contains("site"), "{out}");
    g.expect("sysd: site: image-pulled", BOOT);
    assert!(get_until(&g, "served from the top layer").contains("served from the top layer"));
    let gone = g.sh("wget -q -O- http://127.0.0.1:8090/gone.html 2>&1; echo rc=$?");
    assert!(gone.contains("404") && !gone.contains("rc=0"), "{gone}");
    let kept = g.sh("wget -q -O- http://127.0.0.1:8090/kept.html");
    assert!(kept.contains("from the middle layer"), "{kept}");
    let after: u32 = g.sh(count).trim().parse().unwrap();
    assert_eq!(after, before + 2, "the base layer is stored once");

    // Power off, drop the registry (and its namespace), boot again: no registry anywhere.
    drop(registry);
    g.powerdown().unwrap();
    g.expect("shutdown: /var unmounted cleanly", BOOT);
    g.wait_exit(BOOT).unwrap();
    drop(g);

    let g = boot(&disk);
    g.expect("sysd: site: ready", BOOT);
    // The layers' view is mounted again on this boot.
    assert!(get_until(&g, "served from the top layer").contains("served from the top layer"));
    let console = g.serial_log();
    assert!(
        !console.contains("sysd: site: image-pull"),
        "the second boot must not pull: {console}"
    );
}
