//! The image store scenario: a service whose image comes from a registry. The reference
//! registry (Debian's `docker-registry`) runs on the loopback of the guest's network namespace,
//! which QEMU's user networking shows the guest as 10.0.2.2; the test pushes the pipeline's own
//! OCI layout of the `base` image there with skopeo (digests preserved), applies a config naming
//! it with keelctl, checks the pulled manifest is the one in image-build's `manifest.json`, and
//! reaches the service through a forwarded port. After a power-off and a boot in a new namespace (no registry at all) the
//! service starts again from the image kept on /var.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use qemu_tests::{create_overlay, image, DiskFormat, Guest, GuestBuilder};

use keelson_testkit::registry::{Layout, Registry, RegistryOptions};

const BOOT: Duration = Duration::from_secs(240);
const SHELL_PORT: u16 = 17000;
const APP_PORT: u16 = 18081;

fn boot(disk: &std::path::Path) -> Guest {
    let dir = image("test").expect("the test image (./dev image configs/test.toml)");
    GuestBuilder::from_image_dir(&dir)
        .unwrap()
        .disk_no_copy(disk, DiskFormat::Qcow2)
        .memory_mib(1024)
        .forward(SHELL_PORT, 7000)
        .forward(APP_PORT, 8090)
        .spawn()
        .unwrap()
}

fn wait(g: &Guest, pattern: &str, timeout: Duration) -> String {
    g.expect(pattern, timeout)
}

/// Runs `script` in the guest's test shell; returns its output.
fn sh(g: &Guest, script: &str) -> String {
    g.shell(SHELL_PORT, script)
}

/// `GET /` through the forwarded port, retried while the service comes up.
fn get(g: &Guest) -> String {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let r = g.run_in_netns(|| -> std::io::Result<String> {
            let mut s = TcpStream::connect(("127.0.0.1", APP_PORT))?;
            s.set_read_timeout(Some(Duration::from_secs(30)))?;
            write!(s, "GET / HTTP/1.0\r\nHost: x\r\n\r\n")?;
            let mut out = String::new();
            s.read_to_string(&mut out)?;
            Ok(out)
        });
        match r {
            Ok(out) if out.contains("200 OK") => return out,
            _ if Instant::now() < deadline => std::thread::sleep(Duration::from_secs(1)),
            other => panic!("GET through the forward: {other:?}\n{}", g.serial_tail(60)),
        }
    }
}

#[test]
fn service_from_a_registry_image_survives_a_reboot_without_the_registry() {
    let dir = tempfile::tempdir().unwrap();
    let disk: PathBuf = dir.path().join("disk.qcow2");
    let img = image("test").expect("the test image");
    create_overlay(&img.join("disk.raw"), &disk, Some(2 << 30)).unwrap();

    let g = boot(&disk);
    // The registry and the push happen inside the guest's namespace. The image is the
    // pipeline's own OCI layout of the `base` service image (busybox, toybox), pushed with its
    // digests preserved: what runs is what image-build made.
    let work = dir.path().to_path_buf();
    let layout_dir = img.join("oci/base");
    let registry = g.run_in_netns(move || {
        let reg = Registry::start(&work.join("reg"), 5000, RegistryOptions::default());
        Layout::new(&layout_dir).push("base", &format!("{}/keelson/base:v1", reg.addr), None);
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

    wait(&g, "sysd: testshell: ready", BOOT);
    let out = sh(
        &g,
        r#"cat > /tmp/user.toml <<'EOF'
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
    wait(&g, "sysd: site: image-pulled", BOOT);
    wait(&g, "sysd: site: ready", BOOT);
    assert!(get(&g).contains("served from a pulled image"));
    let listed = sh(&g, "keelctl -o json images");
    assert!(
        listed.contains("10.0.2.2:5000/keelson/base:v1")
            && listed.contains(&digest)
            && listed.contains("\"site\""),
        "the pulled manifest is image-build's ({digest}): {listed}"
    );

    // Power off, drop the registry (and its namespace), boot again: no registry anywhere.
    drop(registry);
    g.powerdown().unwrap();
    wait(&g, "shutdown: /var unmounted cleanly", BOOT);
    g.wait_exit(BOOT).unwrap();
    drop(g);

    let g = boot(&disk);
    wait(&g, "sysd: site: ready", BOOT);
    assert!(get(&g).contains("served from a pulled image"));
    let console = g.serial_log();
    assert!(
        !console.contains("sysd: site: image-pull"),
        "the second boot must not pull: {console}"
    );
}
