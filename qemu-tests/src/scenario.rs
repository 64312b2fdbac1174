//! What the scenarios under `tests/` (and the benchmarks) share beyond the guest harness: the
//! test image, fresh disks of it, a guest of it with its shell forwarded, host commands, HTTP
//! from the test's namespace, and an HTTP server there.
//!
//! A scenario on the test image reads:
//!
//! ```no_run
//! use std::time::Duration;
//! use qemu_tests::scenario::{fresh_disk, test_guest};
//!
//! let dir = tempfile::tempdir().unwrap();
//! let disk = fresh_disk(dir.path());
//! let g = test_guest(&disk).forward(18080, 8080).spawn().unwrap();
//! g.expect("sysd: testshell: ready", Duration::from_secs(240));
//! assert!(g.sh("keelctl ps").contains("web"));
//! ```

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};

use crate::{create_overlay, image, workspace_root, DiskFormat, Guest, GuestBuilder, NetNs};

/// The port in a test guest's namespace forwarded to its shell ([`crate::TEST_SHELL_PORT`]).
pub const SHELL_PORT: u16 = 17000;
/// How long [`http_get_until`] retries.
const HTTP_RETRY: Duration = Duration::from_secs(60);

/// The test image (`out/test/`); panics naming the command that builds it.
pub fn test_image() -> PathBuf {
    image("test").expect("the test image (./dev image configs/test.toml)")
}

/// `dir/disk.qcow2`: a fresh 2 GiB overlay of the test image's disk (a first boot).
pub fn fresh_disk(dir: &Path) -> PathBuf {
    let disk = dir.join("disk.qcow2");
    create_overlay(&test_image().join("disk.raw"), &disk, Some(2 << 30)).unwrap();
    disk
}

/// The test image booted directly (its kernel, initramfs and command line) from `disk`, a qcow2
/// the test owns (see [`fresh_disk`]; it survives the guest, for reboots), with 1 GiB and the
/// test shell forwarded to [`SHELL_PORT`] (so [`Guest::sh`] works).
pub fn test_guest(disk: &Path) -> GuestBuilder {
    with_test_shell(
        GuestBuilder::from_image_dir(&test_image()).expect("the test image's boot files"),
        disk,
    )
}

/// Like [`test_guest`], booting `disk` through UEFI (OVMF, systemd-boot and the UKIs on its
/// ESP: what A/B updates need). The disk may be of any image built from `configs/test.toml`.
pub fn test_guest_uefi(disk: &Path) -> GuestBuilder {
    with_test_shell(GuestBuilder::uefi(disk), disk)
}

fn with_test_shell(builder: GuestBuilder, disk: &Path) -> GuestBuilder {
    builder
        .disk_no_copy(disk, DiskFormat::Qcow2)
        .memory_mib(1024)
        .forward_test_shell(SHELL_PORT)
}

/// Runs a host command to completion; fails the test with its stdout and stderr if it fails.
pub fn run(cmd: &mut Command) {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Builds `image-build` (release, quietly) and returns the binary, in cargo's target directory
/// (`$CARGO_TARGET_DIR`, else the workspace's `target/`): for scenarios and benchmarks that
/// build images of their own.
pub fn image_build() -> Result<PathBuf> {
    let ws = workspace_root();
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let status = Command::new(&cargo)
        .args(["build", "--release", "-q", "-p", "image-build"])
        .current_dir(&ws)
        .status()
        .with_context(|| format!("running {}", Path::new(&cargo).display()))?;
    if !status.success() {
        anyhow::bail!("building image-build failed ({status})");
    }
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .filter(|dir| !dir.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| ws.join("target"));
    // A relative target directory is relative to the workspace, where cargo ran.
    Ok(ws.join(target).join("release/image-build"))
}

/// One `GET path` (HTTP/1.0) to `addr` from the calling thread's namespace; the whole response.
pub fn http_get(addr: SocketAddr, path: &str) -> std::io::Result<String> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    s.set_read_timeout(Some(Duration::from_secs(30)))?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: x\r\n\r\n")?;
    let mut out = String::new();
    s.read_to_string(&mut out)?;
    Ok(out)
}

/// [`http_get`] from `g`'s namespace, retried for a minute until the response contains
/// `needle` (a service coming up, a forward whose guest side is not listening yet); fails the
/// test with the last attempt and `g`'s console tail.
pub fn http_get_until(g: &Guest, addr: SocketAddr, path: &str, needle: &str) -> String {
    let deadline = Instant::now() + HTTP_RETRY;
    loop {
        match g.run_in_netns(|| http_get(addr, path)) {
            Ok(body) if body.contains(needle) => return body,
            _ if Instant::now() < deadline => std::thread::sleep(Duration::from_secs(1)),
            other => panic!(
                "GET http://{addr}{path} never answered {needle:?}: {other:?}\n{}",
                g.serial_tail(60)
            ),
        }
    }
}

/// busybox httpd serving a directory at an address of a namespace; killed on drop.
#[derive(Debug)]
pub struct Httpd(Child);

impl Httpd {
    /// Serves `dir` at `addr` (`127.0.0.1:8000` in a guest's namespace is `10.0.2.2:8000` for
    /// the guest; on a cluster's LAN, `10.77.0.1:PORT`).
    pub fn serve(netns: &NetNs, addr: SocketAddr, dir: &Path) -> Result<Httpd> {
        let child = netns
            .command("busybox")
            .args(["httpd", "-f", "-p", &addr.to_string(), "-h"])
            .arg(dir)
            .stdin(Stdio::null())
            .spawn()
            .context("busybox httpd (package busybox-static)")?;
        Ok(Httpd(child))
    }
}

impl Drop for Httpd {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A scenario's fixture directory, `target/qemu-NAME`, made empty and filled by `build` once
/// per test process; with `KEELSON_<NAME>_REUSE=1` and a complete earlier build there, `build`
/// does not run (a developer's shortcut while iterating on a scenario).
pub fn fixture_dir(name: &str, build: impl FnOnce(&Path)) -> PathBuf {
    let dir = workspace_root().join(format!("target/qemu-{name}"));
    let done = dir.join("fixture-complete");
    let var = format!("KEELSON_{}_REUSE", name.to_uppercase().replace('-', "_"));
    let reuse = std::env::var(&var).is_ok_and(|v| v == "1");
    if !(reuse && done.exists()) {
        let started = Instant::now();
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("creating {}: {e}", dir.display()));
        build(&dir);
        std::fs::write(&done, "").unwrap();
        eprintln!(
            "{name} fixture built in {:.0} s",
            started.elapsed().as_secs_f64()
        );
    }
    dir
}
