//! UEFI Secure Boot, end to end on one guest: OVMF's Secure Boot build (q35, SMM) with a pristine
//! variable store (setup mode) boots the test image built with `--secure-boot-keys` (keys made
//! here with openssl); systemd-boot enrolls the ESP's PK/KEK/db and resets into Secure Boot; the
//! signed UKI boots; an update whose UKI is unsigned is refused by the agent before it touches
//! the ESP; then one byte of the running UKI's `.cmdline` is changed on the ESP and the firmware
//! refuses to load it (systemd-boot: `Error loading \EFI\Linux\keelson_0.1.0.efi: Access
//! Denied`).

use std::net::{Ipv4Addr, SocketAddr};
use std::process::Command;
use std::time::Duration;

use qemu_tests::scenario::{image_build, run, test_guest_uefi, Httpd};
use qemu_tests::{create_overlay, workspace_root};

const BOOT: Duration = Duration::from_secs(420);
const REPO_PORT: u16 = 8000;

/// File offset of a PE image's section `name`.
fn section_offset(pe: &[u8], name: &str) -> usize {
    let u16_at = |o: usize| u16::from_le_bytes([pe[o], pe[o + 1]]) as usize;
    let u32_at = |o: usize| u32::from_le_bytes([pe[o], pe[o + 1], pe[o + 2], pe[o + 3]]) as usize;
    let off = u32_at(0x3c);
    let table = off + 24 + u16_at(off + 20);
    (0..u16_at(off + 6))
        .map(|i| table + 40 * i)
        .find(|&s| pe[s..s + 8].starts_with(name.as_bytes()))
        .map(|s| u32_at(s + 20))
        .unwrap_or_else(|| panic!("no {name} section"))
}

#[test]
fn signed_uki_boots_under_secure_boot_and_unsigned_or_tampered_ones_are_refused() {
    let ws = workspace_root();
    let dir = ws.join("target/qemu-secure-boot");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let keys = dir.join("keys");
    keelson_testkit::secure_boot::key_dir(&keys);
    let ib = image_build().unwrap();
    let tuf_key = dir.join("tuf.pk8");
    let root = dir.join("root.json");
    run(Command::new(&ib).args(["update", "keygen"]).arg(&tuf_key));
    run(Command::new(&ib)
        .args(["update", "root", "--key"])
        .arg(&tuf_key)
        .arg("--out")
        .arg(&root));
    // N signed with the user's keys; N+1 built without them (its UKIs unsigned).
    let build = |version: &str, signed: bool| {
        let out = dir.join(version);
        let mut c = Command::new(&ib);
        c.current_dir(&ws)
            .args(["-q", "build", "configs/test.toml", "--version", version])
            .arg("--trusted-root")
            .arg(&root)
            .arg("--out")
            .arg(&out)
            .env_remove("KEELSON_SECURE_BOOT_KEYS");
        if signed {
            c.arg("--secure-boot-keys").arg(&keys);
        }
        run(&mut c);
        out
    };
    let n = build("0.1.0", true);
    let unsigned = build("0.2.0", false);
    let repo = dir.join("repo");
    for img in [&n, &unsigned] {
        run(Command::new(&ib)
            .args(["-q", "update", "add", "--repo"])
            .arg(&repo)
            .arg("--root")
            .arg(&root)
            .arg("--key")
            .arg(&tuf_key)
            .arg(img));
    }
    let disk = dir.join("disk.qcow2");
    create_overlay(&n.join("disk.raw"), &disk, Some(2 << 30)).unwrap();

    let g = test_guest_uefi(&disk).secure_boot().spawn().unwrap();
    // Setup mode: systemd-boot enrolls the ESP's keys, then the firmware resets.
    g.expect("Enrolling secure boot keys from directory", BOOT);
    g.expect("sysd: testshell: ready", BOOT);
    let dmesg = g.sh("dmesg | grep -i 'secure boot'");
    assert!(dmesg.contains("Secure boot enabled"), "{dmesg}");

    // The unsigned update: refused before the ESP is touched, and the status says why.
    let _httpd = Httpd::serve(
        g.netns(),
        SocketAddr::from((Ipv4Addr::LOCALHOST, REPO_PORT)),
        &repo,
    )
    .unwrap();
    let out = g.sh(&format!(
        "cat > /tmp/update.toml <<'EOF'\nversion = 1\n[update]\nrepository = \"http://10.0.2.2:{REPO_PORT}/\"\nEOF\nkeelctl apply /tmp/update.toml"
    ));
    assert!(!out.contains("error"), "{out}");
    let esp = "/proc/1/root/run/keelson/esp/EFI/Linux";
    let before = g.sh(&format!("ls {esp}"));
    let out = g.sh("keelctl update apply 2>&1");
    let status = g.sh("keelctl update status");
    let why = "would not boot under Secure Boot: unsigned (no Authenticode signature)";
    assert!(out.contains(why) || status.contains(why), "{out}\n{status}");
    assert_eq!(g.sh(&format!("ls {esp}")), before, "the ESP changed");

    // One byte of the running UKI's .cmdline changed: the firmware refuses it.
    let uki = std::fs::read(n.join("keelson_0.1.0+3.efi")).unwrap();
    let at = section_offset(&uki, ".cmdline");
    let byte = if uki[at] == b'X' { 'Y' } else { 'X' };
    let out = g.sh(&format!(
        "f=$(ls {esp}/keelson_0.1.0*.efi) && printf {byte} | dd of=$f bs=1 seek={at} conv=notrunc 2>&1 && sync && echo TAMPERED"
    ));
    assert!(out.contains("TAMPERED"), "{out}");
    g.sh("(sleep 1; kill -TERM 1) >/dev/null 2>&1 &");
    // EDK2 answers LoadImage of an image that fails verification with EFI_ACCESS_DENIED.
    let refused = g.expect("Error loading \\EFI\\Linux\\keelson_0.1.0", BOOT);
    assert!(refused.contains("Access Denied"), "{refused}");
    assert!(
        g.wait_for("keelson-init: stage1: start", Duration::from_secs(30))
            .is_err(),
        "the tampered UKI booted:\n{}",
        g.serial_tail(60)
    );
}
