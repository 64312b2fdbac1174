//! Self-tests of the harness that boot something real without a Keelson image: Debian's cloud
//! kernel with a busybox initramfs built on the fly.
//!
//! The kernel is the cloud kernel the vm image pins, unpacked from image-build's package cache
//! (`KEELSON_TEST_KERNEL_ROOT` points at another unpacked `linux-image-*-cloud-amd64`). Needs
//! root, QEMU and OVMF, all installed by `./dev test`.

use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::time::Duration;

use keelson_common::cpio::{Entry, Writer};
use qemu_tests::scenario::http_get_until;
use qemu_tests::{Cluster, Guest, GuestBuilder, NetNs, NicModel, NodeConfig, TEST_SHELL_PORT};

const BUSYBOX: &str = "/bin/busybox";

/// The root of the unpacked kernel package (`boot/vmlinuz-*`, `lib/modules/*`): the cloud
/// kernel the vm image pins, unpacked once from image-build's package cache.
fn kernel_root() -> PathBuf {
    static ROOT: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    ROOT.get_or_init(|| {
        if let Some(root) = std::env::var_os("KEELSON_TEST_KERNEL_ROOT") {
            return PathBuf::from(root);
        }
        let cache = qemu_tests::workspace_root().join("cache/debs");
        let deb = std::fs::read_dir(&cache)
            .unwrap_or_else(|e| {
                panic!(
                    "{}: {e} (build the vm image first: ./dev image)",
                    cache.display()
                )
            })
            .filter_map(|e| e.ok().map(|e| e.path()))
            .find(|p| {
                let name = p.file_name().unwrap().to_string_lossy().into_owned();
                name.starts_with("linux-image-") && name.contains("-cloud-amd64_")
            })
            .unwrap_or_else(|| panic!("no cloud kernel package in {}", cache.display()));
        let root = std::env::temp_dir().join(format!("keelson-test-kernel-{}", std::process::id()));
        let status = std::process::Command::new("dpkg-deb")
            .arg("-x")
            .arg(&deb)
            .arg(&root)
            .status()
            .unwrap();
        assert!(status.success(), "dpkg-deb -x {}", deb.display());
        root
    })
    .clone()
}

/// The kernel release (`6.1.0-56-cloud-amd64`), the one directory under `lib/modules`.
fn release() -> String {
    let dir = kernel_root().join("lib/modules");
    let entry = std::fs::read_dir(&dir).unwrap().next().unwrap().unwrap();
    entry.file_name().to_string_lossy().into_owned()
}

fn kernel() -> PathBuf {
    let path = kernel_root().join(format!("boot/vmlinuz-{}", release()));
    assert!(
        path.is_file(),
        "{} missing from the unpacked kernel in {}",
        path.display(),
        kernel_root().display()
    );
    path
}

fn is_root() -> bool {
    nix::unistd::Uid::effective().is_root()
}

/// Writes an initramfs with static busybox, `/init` = `script`, and the given kernel modules
/// (paths relative to the kernel package's `lib/modules/VERSION/kernel`) in `/modules`.
fn initramfs(dir: &Path, script: &str, modules: &[&str]) -> PathBuf {
    let busybox = std::fs::read(BUSYBOX)
        .unwrap_or_else(|e| panic!("{BUSYBOX}: {e} (install the Debian package busybox-static)"));
    let mut cpio = Writer::new(Vec::new(), 0);
    for d in ["bin", "dev", "proc", "sys", "modules", "www"] {
        cpio.add(&Entry::Dir {
            path: d,
            mode: 0o755,
        })
        .unwrap();
    }
    // The kernel opens /dev/console for init's stdio before anything could mount devtmpfs.
    cpio.add(&Entry::CharDev {
        path: "dev/console",
        mode: 0o600,
        major: 5,
        minor: 1,
    })
    .unwrap();
    cpio.add(&Entry::File {
        path: "bin/busybox",
        mode: 0o755,
        data: &busybox,
    })
    .unwrap();
    cpio.add(&Entry::File {
        path: "init",
        mode: 0o755,
        data: script.as_bytes(),
    })
    .unwrap();
    cpio.add(&Entry::File {
        path: "www/hello.txt",
        mode: 0o644,
        data: b"PONG from the guest\n",
    })
    .unwrap();
    let module_dir = kernel_root().join(format!("lib/modules/{}/kernel", release()));
    for module in modules {
        let path = module_dir.join(module);
        let data = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let name = Path::new(module).file_name().unwrap().to_string_lossy();
        let path = format!("modules/{name}");
        cpio.add(&Entry::File {
            path: &path,
            mode: 0o644,
            data: &data,
        })
        .unwrap();
    }
    let path = dir.join("initramfs.cpio");
    std::fs::write(&path, cpio.finish().unwrap()).unwrap();
    path
}

#[test]
fn busybox_guest_says_hello_and_powers_off() {
    let dir = tempfile::tempdir().unwrap();
    let initrd = initramfs(
        dir.path(),
        "#!/bin/busybox sh\necho HELLO\n/bin/busybox poweroff -f\n",
        &[],
    );
    let guest = GuestBuilder::direct(kernel(), initrd, "console=ttyS0", None)
        .spawn()
        .unwrap();
    let line = guest.wait_for("HELLO", Duration::from_secs(60)).unwrap();
    assert_eq!(line.trim(), "HELLO");
    let status = guest.wait_exit(Duration::from_secs(30)).unwrap();
    assert!(status.success(), "QEMU exited with {status}");

    // The kernel's own output precedes HELLO, all stamped relative to the spawn.
    let lines = guest.lines_with_times();
    let hello = lines.iter().position(|(_, l)| l.trim() == "HELLO").unwrap();
    assert!(hello > 0, "kernel messages expected before HELLO");
    assert!(
        lines.windows(2).all(|w| w[0].0 <= w[1].0),
        "timestamps go forward"
    );
    assert!(lines[hello].0 > Duration::ZERO);
    eprintln!(
        "first serial line at {:?}, HELLO at {:?}",
        lines[0].0, lines[hello].0
    );
    // Consumed: HELLO is not found again, but is from the start.
    assert!(guest.wait_for("HELLO", Duration::from_millis(50)).is_err());
    guest
        .wait_for_from_start("HELLO", Duration::from_millis(50))
        .unwrap();
}

/// The kernel modules of a virtio-net card, in load order.
const VIRTIO_NET: [&str; 8] = [
    "drivers/virtio/virtio_ring.ko",
    "drivers/virtio/virtio.ko",
    "drivers/virtio/virtio_pci_legacy_dev.ko",
    "drivers/virtio/virtio_pci_modern_dev.ko",
    "drivers/virtio/virtio_pci.ko",
    "net/core/failover.ko",
    "drivers/net/net_failover.ko",
    "drivers/net/virtio_net.ko",
];

/// The start of an init script that loads [`VIRTIO_NET`] and brings `lo` and `eth0` up.
fn virtio_net_script() -> String {
    let mut script = String::from("#!/bin/busybox sh\nB=/bin/busybox\n");
    for m in &VIRTIO_NET {
        let name = Path::new(m).file_name().unwrap().to_string_lossy();
        script.push_str(&format!("$B insmod /modules/{name}\n"));
    }
    script.push_str("$B ip link set lo up\n$B ip link set eth0 up\n");
    script
}

/// Loads virtio-net, serves a file with busybox httpd, and reaches it through a port forward
/// inside the guest's namespace; also drives the monitor and checks the error paths.
#[test]
fn busybox_guest_serves_http_through_forward_in_netns() {
    let mut script = virtio_net_script();
    script.push_str(
        "$B ip addr add 10.0.2.15/24 dev eth0\n\
         $B httpd -p 80 -h /www\n\
         echo READY one\n\
         echo READY two\n\
         while true; do $B sleep 1; done\n",
    );
    let dir = tempfile::tempdir().unwrap();
    let initrd = initramfs(dir.path(), &script, &VIRTIO_NET);
    let guest = GuestBuilder::direct(kernel(), initrd, "console=ttyS0", None)
        .nic(NicModel::VirtioNet)
        .forward(18080, 80)
        .spawn()
        .unwrap();

    // Consume semantics: the two READY lines are matched in order.
    let timeout = Duration::from_secs(60);
    assert_eq!(guest.wait_for("READY", timeout).unwrap(), "READY one");
    assert_eq!(guest.wait_for("READY", timeout).unwrap(), "READY two");

    let status = guest.monitor("info status").unwrap();
    assert!(status.contains("running"), "info status: {status:?}");

    // slirp accepts the connection at once and may only then find the guest's server.
    let forward = SocketAddr::from((Ipv4Addr::LOCALHOST, 18080));
    http_get_until(&guest, forward, "/hello.txt", "PONG from the guest");
    // The forward exists only in the guest's namespace.
    assert!(
        TcpStream::connect_timeout(&"127.0.0.1:18080".parse().unwrap(), Duration::from_secs(1))
            .is_err(),
        "port 18080 reachable outside the guest's namespace"
    );

    let err = guest
        .wait_for("NEVER PRINTED", Duration::from_millis(200))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("timed out") && err.contains("READY two"),
        "{err}"
    );

    guest.quit().unwrap();
    guest.wait_exit(Duration::from_secs(10)).unwrap();
    let err = guest
        .wait_for("NEVER PRINTED", Duration::from_secs(5))
        .unwrap_err()
        .to_string();
    assert!(err.contains("QEMU exited"), "{err}");
}

#[test]
fn early_qemu_exit_is_reported_with_stderr() {
    assert!(
        is_root(),
        "this test needs root for the network namespace (run the suite as root, as .ci/run does)"
    );
    qemu_tests::qemu_system().expect("qemu-system-x86_64 is required (installed by .ci/run)");
    let guest: Guest =
        GuestBuilder::direct("/nonexistent/vmlinuz", "/nonexistent/initrd", "", None)
            .spawn()
            .unwrap();
    let err = guest
        .wait_for("anything", Duration::from_secs(30))
        .unwrap_err()
        .to_string();
    assert!(err.contains("QEMU exited"), "{err}");
    assert!(
        err.contains("/nonexistent/vmlinuz"),
        "stderr expected: {err}"
    );
}

#[test]
fn netns_is_isolated_and_cleaned_up() {
    assert!(
        is_root(),
        "this test needs root for network namespaces (run the suite as root, as .ci/run does)"
    );
    let ns = NetNs::new().unwrap();
    let name = ns.name().to_string();
    assert!(ns.path().exists());

    // Only `lo`, and it is up.
    let out = ns.output("ip", &["-o", "link"]).unwrap();
    let links = String::from_utf8_lossy(&out.stdout);
    assert_eq!(links.lines().count(), 1, "{links}");
    assert!(links.contains("lo:") && links.contains("UP"), "{links}");

    // A listener inside is reachable inside, not from the host namespace.
    let listener = ns.run_in(|| {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        std::thread::scope(|s| {
            s.spawn(|| listener.accept().unwrap());
            TcpStream::connect(("127.0.0.1", port)).unwrap();
        });
        listener
    });
    let port = listener.local_addr().unwrap().port();
    assert!(
        TcpStream::connect(("127.0.0.1", port)).is_err(),
        "a listener in the namespace answered in the host namespace"
    );
    drop(listener);
    // Panics inside propagate.
    let caught = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        ns.run_in(|| panic!("inside"));
    }));
    assert!(caught.is_err());

    drop(ns);
    assert!(!Path::new("/run/netns").join(&name).exists());
}

/// OVMF under TCG: an empty disk gets as far as the boot manager giving up on it, which shows the
/// pflash setup (read-only code, private variable store) works. Reports firmware timings.
#[test]
fn ovmf_boots_to_the_boot_manager() {
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("empty.img");
    std::fs::File::create(&disk)
        .unwrap()
        .set_len(64 << 20)
        .unwrap();
    let guest = GuestBuilder::uefi(&disk)
        .nic(NicModel::None)
        .spawn()
        .unwrap();
    let line = guest
        .wait_for("BdsDxe: failed to load", Duration::from_secs(120))
        .unwrap();
    assert!(line.contains("UEFI Misc Device"), "{line}");
    for (at, line) in guest.lines_with_times().iter().take(5) {
        eprintln!("{at:>12.3?} {line:?}");
    }
    // The system's template stays pristine; the guest wrote to its own copy.
    assert!(guest.dir().join("OVMF_VARS.fd").is_file());
    let overlay = guest.disk_path().unwrap();
    assert_eq!(overlay.extension().unwrap(), "qcow2");
}

#[test]
fn overlay_grows_and_copy_stays_sparse() {
    qemu_tests::qemu_img().expect("qemu-img is required (installed by .ci/run)");
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.img");
    let file = std::fs::File::create(&base).unwrap();
    file.set_len(8 << 20).unwrap();
    drop(file);
    let overlay = dir.path().join("o.qcow2");
    qemu_tests::create_overlay(&base, &overlay, Some(32 << 20)).unwrap();
    let info = std::process::Command::new("qemu-img")
        .args(["info", "--output=json"])
        .arg(&overlay)
        .output()
        .unwrap();
    let info: serde_json::Value = serde_json::from_slice(&info.stdout).unwrap();
    assert_eq!(info["virtual-size"], 32 << 20);
    assert_eq!(info["backing-filename-format"], "raw");
    // Smaller than the image is refused rather than silently truncating the guest's disk.
    assert!(qemu_tests::create_overlay(&base, &overlay, Some(1 << 20)).is_err());

    let copy = dir.path().join("copy.img");
    qemu_tests::copy_disk(&base, &copy).unwrap();
    let meta = std::fs::metadata(&copy).unwrap();
    assert_eq!(meta.len(), 8 << 20);
    use std::os::unix::fs::MetadataExt;
    assert!(meta.blocks() * 512 < 8 << 20, "copy is not sparse");
}

/// Two busybox guests on a cluster's LAN, without any Keelson image: dnsmasq's reservations
/// (address and host name) reach busybox udhcpc, the namespace reaches each guest's shell
/// (busybox `nc -e sh` on the test shell's port), the guests reach each other, a cut guest is
/// unreachable until healed, and a killed guest restarted gets its address again.
#[test]
fn busybox_cluster_leases_cut_heal_and_restart() {
    let mut script = virtio_net_script();
    script.push_str(&format!(
        "$B --install -s /bin\n\
         mount -t devtmpfs dev /dev\n\
         mount -t proc proc /proc\n\
         cat > /lease.sh <<'EOF'\n\
         #!/bin/sh\n\
         [ \"$1\" = bound ] && ip addr add $ip/$mask dev $interface && echo \"LEASE $ip $hostname\"\n\
         exit 0\n\
         EOF\n\
         chmod +x /lease.sh\n\
         udhcpc -i eth0 -s /lease.sh -q -t 60 -T 1\n\
         nc -ll -p {TEST_SHELL_PORT} -e /bin/sh &\n\
         echo SHELL UP\n\
         while true; do sleep 1; done\n"
    ));
    let dir = tempfile::tempdir().unwrap();
    let initrd = initramfs(dir.path(), &script, &VIRTIO_NET);
    let template = GuestBuilder::direct(kernel(), initrd, "console=ttyS0", None).memory_mib(256);
    let mut c = Cluster::builder(template)
        .node(NodeConfig::new("alpha"))
        .node(NodeConfig::new("beta"))
        .spawn()
        .unwrap();
    let timeout = Duration::from_secs(120);
    for i in 0..c.len() {
        let lease = c.guest(i).expect("LEASE", timeout);
        assert_eq!(lease, format!("LEASE {} {}", c.addr(i), c.name(i)));
    }
    c.expect_all("SHELL UP", timeout);
    fn ping(c: &Cluster, from: usize, to: usize) -> bool {
        c.guest(from)
            .sh(&format!(
                "ping -c 1 -W 2 {} >/dev/null && echo up",
                c.addr(to)
            ))
            .contains("up")
    }
    fn reachable(c: &Cluster, i: usize) -> bool {
        let addr = SocketAddr::from((c.addr(i), TEST_SHELL_PORT));
        c.run_in(|| TcpStream::connect_timeout(&addr, Duration::from_secs(2)).is_ok())
    }
    assert!(
        ping(&c, 0, 1) && ping(&c, 1, 0),
        "the guests do not reach each other"
    );

    c.cut(1).unwrap();
    assert!(!ping(&c, 0, 1), "alpha reached beta while beta was cut off");
    assert!(
        !reachable(&c, 1),
        "the namespace reached beta while it was cut off"
    );
    assert!(reachable(&c, 0));
    c.heal(1).unwrap();
    assert!(
        (0..10).any(|_| ping(&c, 0, 1)),
        "alpha does not reach beta after the heal"
    );

    c.kill(1).unwrap();
    assert!(!reachable(&c, 1), "beta answered after its kill");
    c.restart(1).unwrap();
    let lease = c.guest(1).expect("LEASE", timeout);
    assert_eq!(lease, format!("LEASE {} beta", c.addr(1)));
    c.guest(1).expect("SHELL UP", timeout);
    assert!(ping(&c, 0, 1), "alpha does not reach the restarted beta");
}
