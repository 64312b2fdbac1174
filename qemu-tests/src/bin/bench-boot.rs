//! `bench-boot`: image sizes and the boot timeline of the vm image under QEMU (TCG), side by side
//! with the floor the same kernel allows (a busybox initramfs that only prints its uptime), the
//! peer the issue names (Debian 12 minbase with systemd on the same kernel package, made once
//! with debootstrap: [`debian_peer`]), a VM's later UEFI boots beside its first
//! ([`keelson_uefi_later_boot`]), and Secure Boot on vs off (`out/vm-sb`), in one run. Prints tables; asserts nothing (these machines are shared and noisy).
//!
//! Each measured boot's timeline (init's stamped steps and the services' start-up, read from
//! the console as `keelctl analyze` reads them on the node: `keelson_common::api::boot`) is
//! printed for the median run and drawn for every run as `out/bench-boot/<mode>-<run>.svg`.
//!
//! Usage: `./dev bench` (builds the images first), or `cargo run --release -p qemu-tests --bin
//! bench-boot -- [RUNS [secure-boot]]` (`secure-boot`: only that table).

use std::path::Path;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use keelson_common::api::boot::{self as analyze, Boot};
use keelson_common::cpio::{Entry, Writer};
use keelson_testkit::history;
use qemu_tests::{create_overlay, image, DiskFormat, GuestBuilder, NicModel};

const BOOT: Duration = Duration::from_secs(240);

/// One boot's phases, in seconds.
#[derive(Default, Clone)]
struct Timeline {
    firmware: f64,
    kernel: f64,
    stage1: f64,
    stage2: f64,
    init_total: f64,
    /// Kernel start → sysd's `boot-ready` (every service ready), when it came.
    all_ready: Option<f64>,
    total: f64,
    rss_kib: f64,
    /// The boot's timeline as the console shows it.
    boot: Boot,
}

/// `[    1.472582] keelson-init: msg` → (1.472582, msg).
fn init_line(line: &str) -> Option<(f64, &str)> {
    let rest = line.trim_start().strip_prefix('[')?;
    let (ts, msg) = rest.split_once(']')?;
    let msg = msg.trim_start().strip_prefix("keelson-init: ")?;
    Some((ts.trim().parse().ok()?, msg))
}

fn timeline(lines: &[(Duration, String)]) -> Result<Timeline> {
    let find = |prefix: &str| {
        lines.iter().find_map(|(at, l)| {
            let (ts, msg) = init_line(l)?;
            msg.starts_with(prefix)
                .then_some((at.as_secs_f64(), ts, msg.to_owned()))
        })
    };
    let (arrive, start, _) = find("stage1: start").context("no stage1 start")?;
    let (_, switch, _) = find("stage1: switching root").context("no switch_root")?;
    let (_, s2, _) = find("stage2: start").context("no stage2 start")?;
    let (_, done, msg) = find("boot complete in").context("no boot complete")?;
    let rss = msg
        .split("init rss ")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .and_then(|r| r.parse().ok())
        .unwrap_or(0.0);
    let kernel_start = arrive - start;
    let console: Vec<&str> = lines.iter().map(|(_, l)| l.as_str()).collect();
    let boot = Boot::from_console(&console.join("\n"));
    Ok(Timeline {
        firmware: kernel_start,
        kernel: start,
        stage1: switch - start,
        stage2: done - s2,
        init_total: done - start,
        all_ready: boot.all_ready_us.map(|us| us as f64 / 1e6),
        total: kernel_start + done,
        rss_kib: rss,
        boot,
    })
}

/// How long a boot may take after `boot complete` until every service is ready (services
/// after `network-online` wait for its timeout on a guest without a network).
const ALL_READY: Duration = Duration::from_secs(60);

/// The boot's picture, `out/bench-boot/<name>.svg`.
fn write_svg(name: &str, t: &Timeline) -> Result<()> {
    let dir = qemu_tests::paths::images_dir().join("bench-boot");
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let path = dir.join(format!("{name}.svg"));
    std::fs::write(&path, analyze::svg(&t.boot))
        .with_context(|| format!("writing {}", path.display()))
}

/// The run whose userspace time is the median's (the lower one of an even count).
fn median_run(runs: &[Timeline]) -> Option<&Timeline> {
    let mut v: Vec<&Timeline> = runs.iter().collect();
    v.sort_by(|a, b| a.init_total.total_cmp(&b.init_total));
    v.get(v.len().saturating_sub(1) / 2).copied()
}

/// A UEFI guest of `dir` without a NIC, with OVMF's Secure Boot build (SMM) or its plain one,
/// on the given disk (kept from an earlier boot) or a fresh overlay.
fn uefi_guest(dir: &Path, secure_boot: bool, disk: Option<&Path>) -> Result<GuestBuilder> {
    let mut b = GuestBuilder::uefi_from_image_dir(dir)?.nic(NicModel::None);
    if secure_boot {
        b = b.secure_boot();
    }
    if let Some(disk) = disk {
        b = b.disk_no_copy(disk, DiskFormat::Qcow2);
    }
    Ok(b)
}

/// A UEFI boot of `dir` from a copy of the variable store `vars` (see [`uefi_guest`]).
fn uefi_boot(dir: &Path, secure_boot: bool, vars: &Path, disk: Option<&Path>) -> Result<Timeline> {
    let g = uefi_guest(dir, secure_boot, disk)?
        .uefi_vars(vars)
        .spawn()?;
    g.wait_for("boot complete in", BOOT)?;
    timeline(&g.lines_with_times())
}

/// Boots `dir` once from the pristine variable store and returns the store it left (boot
/// options written; with Secure Boot, the ESP's keys enrolled on the way).
fn warm_vars(dir: &Path, secure_boot: bool, disk: Option<&Path>, out: &Path) -> Result<()> {
    let g = uefi_guest(dir, secure_boot, disk)?.spawn()?;
    if secure_boot {
        g.wait_for("Enrolling secure boot keys", BOOT)?;
    }
    g.wait_for("boot complete in", BOOT)?;
    g.powerdown()?;
    g.wait_exit(BOOT)?;
    std::fs::copy(g.dir().join("OVMF_VARS.fd"), out)?;
    Ok(())
}

/// Secure Boot on vs off on one signed image (`out/vm-sb`, which `./dev bench` builds with
/// throwaway keys). A first boot from the pristine variable store with each firmware writes its
/// boot options (and, with Secure Boot, enrolls the ESP's keys); then each run boots the image
/// from those stores with OVMF's plain build and with its Secure Boot build (SMM).
fn secure_boot_table(runs: usize, work: &Path) -> Result<()> {
    println!(
        "\n## Secure Boot on vs off, UEFI, QEMU TCG, 1 vCPU, median of {runs} runs (seconds)\n"
    );
    let dir = match image("vm-sb") {
        Ok(d) => d,
        Err(e) => {
            println!("skipped: {e:#}");
            return Ok(());
        }
    };
    let (plain, enrolled) = (work.join("VARS.plain.fd"), work.join("VARS.enrolled.fd"));
    warm_vars(&dir, false, None, &plain)?;
    warm_vars(&dir, true, None, &enrolled)?;
    let (mut off, mut on) = (Vec::new(), Vec::new());
    for i in 0..runs {
        eprintln!("secure boot run {}/{runs}", i + 1);
        off.push(uefi_boot(&dir, false, &plain, None)?);
        on.push(uefi_boot(&dir, true, &enrolled, None)?);
    }
    println!("| phase | Secure Boot off (OVMF_CODE_4M) | Secure Boot on (OVMF_CODE_4M.secboot, SMM, keys enrolled) | on / off |");
    println!("|---|---|---|---|");
    let row = |name: &str, f: &dyn Fn(&Timeline) -> f64| {
        let (a, b) = (median(&off, f), median(&on, f));
        println!("| {name} | {a:.3} | {b:.3} | {:.2}x |", b / a);
    };
    row("QEMU start → kernel start (firmware)", &|t| t.firmware);
    row("kernel start → init (kernel)", &|t| t.kernel);
    row("init start → boot complete", &|t| t.init_total);
    row("QEMU start → boot complete", &|t| t.total);
    Ok(())
}

fn keelson_boot(dir: &Path, uefi: bool) -> Result<Timeline> {
    let builder = if uefi {
        GuestBuilder::uefi_from_image_dir(dir)?
    } else {
        GuestBuilder::from_image_dir(dir)?
    };
    let g = builder.nic(NicModel::None).spawn()?;
    g.wait_for("boot complete in", BOOT)?;
    // Not every image's services get ready without a network: then the row says so.
    let _ = g.wait_for(analyze::BOOT_READY, ALL_READY);
    timeline(&g.lines_with_times())
}

/// A later UEFI boot of one VM: a first boot that powers off cleanly, then the measured boot
/// from the variable store and disk that boot left, as a VM keeps its NVRAM and disk. A first
/// boot is OVMF's first start on a fresh store (it writes its boot entries there: pflash writes,
/// slow under TCG); every later boot of the VM only reads them.
fn keelson_uefi_later_boot(dir: &Path, work: &Path) -> Result<Timeline> {
    let disk = work.join("uefi-later.qcow2");
    let vars = work.join("uefi-later-vars.fd");
    let _ = std::fs::remove_file(&disk);
    create_overlay(&dir.join("disk.raw"), &disk, None)?;
    warm_vars(dir, false, Some(&disk), &vars)?;
    uefi_boot(dir, false, &vars, Some(&disk))
}

/// The same kernel with a busybox initramfs whose /init prints the uptime: the floor any init
/// can reach on this kernel and QEMU.
fn busybox_floor(dir: &Path, work: &Path) -> Result<Timeline> {
    let busybox =
        std::fs::read("/bin/busybox").context("/bin/busybox (apt-get install busybox-static)")?;
    let mut cpio = Writer::new(Vec::new(), 0);
    for d in ["bin", "dev", "proc"] {
        cpio.add(&Entry::Dir {
            path: d,
            mode: 0o755,
        })?;
    }
    cpio.add(&Entry::CharDev {
        path: "dev/console",
        mode: 0o600,
        major: 5,
        minor: 1,
    })?;
    cpio.add(&Entry::File {
        path: "bin/busybox",
        mode: 0o755,
        data: &busybox,
    })?;
    let script = "#!/bin/busybox sh\n/bin/busybox mount -t proc proc /proc\necho \"FLOOR $(/bin/busybox cut -d' ' -f1 /proc/uptime)\"\n/bin/busybox poweroff -f\n";
    cpio.add(&Entry::File {
        path: "init",
        mode: 0o755,
        data: script.as_bytes(),
    })?;
    let initrd = work.join("busybox.cpio");
    std::fs::write(&initrd, cpio.finish()?)?;
    let cmdline = std::fs::read_to_string(dir.join("cmdline"))?;
    let g = GuestBuilder::direct(dir.join("vmlinuz"), &initrd, cmdline.trim(), None)
        .nic(NicModel::None)
        .spawn()?;
    let line = g.wait_for("FLOOR ", BOOT)?;
    let at = g
        .lines_with_times()
        .iter()
        .find(|(_, l)| l.contains("FLOOR "))
        .map(|(at, _)| at.as_secs_f64())
        .unwrap_or(0.0);
    let uptime: f64 = line
        .trim()
        .trim_start_matches("FLOOR ")
        .parse()
        .unwrap_or(0.0);
    Ok(Timeline {
        firmware: at - uptime,
        kernel: uptime,
        total: at,
        ..Timeline::default()
    })
}

/// The peer the issue names: Debian 12 `minbase` with systemd (`systemd-sysv`), its own
/// initramfs (initramfs-tools) and the same kernel package as `image` (the lock's
/// `linux-image-*-cloud-amd64`), on an ext4 root. Made once with debootstrap from the
/// machine's Debian mirror (the kernel from bookworm-security when it is not in bookworm) and
/// cached in `out/bench-boot/debian-peer-<kernel>/` (`vmlinuz`, `initrd.img`, `root.ext4`).
fn debian_peer(lock: &Path) -> Result<std::path::PathBuf> {
    let lock = std::fs::read_to_string(lock).with_context(|| lock.display().to_string())?;
    let kernel = lock
        .split("[[package]]")
        .find(|e| e.contains("requested = \"linux-image-cloud-amd64\""))
        .and_then(|e| e.lines().find_map(|l| l.strip_prefix("name = \"")))
        .and_then(|n| n.strip_suffix('"'))
        .context("the image's lock pins no linux-image-cloud-amd64")?
        .to_owned();
    let dir = qemu_tests::paths::images_dir()
        .join("bench-boot")
        .join(format!("debian-peer-{kernel}"));
    if dir.join("complete").is_file() {
        return Ok(dir);
    }
    eprintln!("making the Debian peer ({kernel}) in {} ...", dir.display());
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    let mirror = String::from_utf8(
        std::process::Command::new(qemu_tests::workspace_root().join("dev"))
            .arg("mirror")
            .output()
            .context("./dev mirror")?
            .stdout,
    )?
    .trim()
    .trim_end_matches('/')
    .to_owned();
    let root = dir.join("root");
    let out = keelson_testkit::tools::command("debootstrap")
        .args([
            "--variant=minbase",
            "--include=systemd-sysv,initramfs-tools,zstd",
            "bookworm",
        ])
        .arg(&root)
        .arg(&mirror)
        .output()
        .context("debootstrap")?;
    if !out.status.success() {
        bail!(
            "debootstrap of the Debian peer failed ({}): {}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    // The kernel, and the root's setup, in the root (its mounts vanish with the namespace).
    let script = format!(
        r#"cp /etc/resolv.conf "$R/etc/resolv.conf"
printf 'deb {mirror} bookworm main\ndeb {mirror}-security bookworm-security main\n' > "$R/etc/apt/sources.list"
printf '#!/bin/sh\nexit 101\n' > "$R/usr/sbin/policy-rc.d"; chmod +x "$R/usr/sbin/policy-rc.d"
in_root() {{ chroot "$R" /usr/bin/env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin DEBIAN_FRONTEND=noninteractive "$@"; }}
in_root apt-get update -qq
in_root apt-get install -y -qq --no-install-recommends {kernel} >/dev/null
rm "$R/usr/sbin/policy-rc.d"
echo debian-peer > "$R/etc/hostname"
printf '/dev/vda / ext4 defaults 0 1\n' > "$R/etc/fstab"
in_root apt-get clean
"#
    );
    let out = keelson_testkit::tools::chroot_shell(&root, &script)
        .output()
        .context("unshare")?;
    if !out.status.success() {
        bail!(
            "setting up the Debian peer failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let boot = root.join("boot");
    let find = |prefix: &str| -> Result<std::path::PathBuf> {
        std::fs::read_dir(&boot)?
            .filter_map(|e| e.ok())
            .map(|e| e.path())
            .find(|p| {
                p.file_name()
                    .is_some_and(|n| n.to_string_lossy().starts_with(prefix))
            })
            .with_context(|| format!("no {prefix}* in {}", boot.display()))
    };
    std::fs::copy(find("vmlinuz-")?, dir.join("vmlinuz"))?;
    std::fs::copy(find("initrd.img-")?, dir.join("initrd.img"))?;
    let status = keelson_testkit::tools::command("mkfs.ext4")
        .args(["-q", "-F", "-L", "root", "-d"])
        .arg(&root)
        .arg(dir.join("root.ext4"))
        .arg("2G")
        .status()
        .context("mkfs.ext4")?;
    if !status.success() {
        bail!("mkfs.ext4 of the Debian peer's root failed ({status})");
    }
    std::fs::remove_dir_all(&root)?;
    std::fs::write(dir.join("complete"), "")?;
    Ok(dir)
}

/// `1min 2.345s`, `812ms`, `1.234s` (systemd's timespans) in seconds.
fn systemd_span(text: &str) -> Option<f64> {
    let mut total = 0.0;
    for word in text.split_whitespace() {
        let (num, unit) = word.split_at(word.find(|c: char| c.is_ascii_alphabetic())?);
        let n: f64 = num.parse().ok()?;
        total += n * match unit {
            "min" => 60.0,
            "s" => 1.0,
            "ms" => 1e-3,
            "us" => 1e-6,
            _ => return None,
        };
    }
    Some(total)
}

/// One boot of the Debian peer from a fresh overlay of its root: systemd's own account of it
/// (`Startup finished in K (kernel) + U (userspace) = T`, printed on the console with
/// `systemd.log_target=console`), `total` when the line arrived. systemd counts the time of
/// an initramfs-tools initramfs (no systemd in it) into K; `floor_kernel` (the busybox
/// floor's kernel start → /init on the same kernel, this run) separates it: `kernel` is the
/// floor's, `stage1` the rest of K (the initramfs), `stage2` U, and `init_total` both stages,
/// as Keelson's `init start → boot complete` counts its own initramfs.
fn debian_boot(peer: &Path, work: &Path, floor_kernel: f64) -> Result<Timeline> {
    let disk = work.join("debian-peer.qcow2");
    let _ = std::fs::remove_file(&disk);
    qemu_tests::create_overlay(&peer.join("root.ext4"), &disk, None)?;
    let g = GuestBuilder::direct(
        peer.join("vmlinuz"),
        peer.join("initrd.img"),
        "console=ttyS0,115200 quiet root=/dev/vda rw systemd.log_target=console systemd.log_level=info",
        None,
    )
    .disk_no_copy(&disk, qemu_tests::DiskFormat::Qcow2)
    .nic(NicModel::None)
    .spawn()?;
    let line = g.wait_for("Startup finished in ", BOOT)?;
    let at = g
        .lines_with_times()
        .iter()
        .find(|(_, l)| l.contains("Startup finished in "))
        .map(|(at, _)| at.as_secs_f64())
        .unwrap_or(0.0);
    let spans = line
        .split("Startup finished in ")
        .nth(1)
        .context("no Startup finished")?;
    let part = |name: &str| {
        spans.split(" + ").find_map(|p| {
            let p = p.split(" = ").next()?.trim();
            p.strip_suffix(&format!("({name})"))
                .and_then(|v| systemd_span(v.trim()))
        })
    };
    let kernel = part("kernel").context(format!("no kernel time in {line:?}"))?;
    let initrd = part("initrd").unwrap_or(0.0);
    let userspace = part("userspace").context(format!("no userspace time in {line:?}"))?;
    let initramfs = (kernel - floor_kernel).max(0.0) + initrd;
    Ok(Timeline {
        firmware: at - (kernel + initrd + userspace),
        kernel: kernel + initrd - initramfs,
        stage1: initramfs,
        stage2: userspace,
        init_total: initramfs + userspace,
        total: at,
        ..Timeline::default()
    })
}

fn median(runs: &[Timeline], f: impl Fn(&Timeline) -> f64) -> f64 {
    let v: Vec<f64> = runs.iter().map(f).collect();
    keelson_testkit::stats::median(&v).unwrap_or(0.0)
}

fn size(dir: &Path, name: &str) -> Result<u64> {
    Ok(std::fs::metadata(dir.join(name))
        .with_context(|| format!("{}/{name}", dir.display()))?
        .len())
}

fn mib(b: u64) -> String {
    format!("{:.1} MiB", b as f64 / 1048576.0)
}

fn main() -> Result<()> {
    let runs: usize = std::env::args()
        .nth(1)
        .map(|a| a.parse())
        .transpose()?
        .unwrap_or(3);
    if runs == 0 {
        bail!("RUNS must be at least 1");
    }
    // `bench-boot RUNS secure-boot`: only the Secure Boot table.
    match std::env::args().nth(2).as_deref() {
        None => {}
        Some("secure-boot") => {
            let work = tempfile::tempdir()?;
            return secure_boot_table(runs, work.path());
        }
        Some(other) => bail!("unknown section {other:?} (the only one is `secure-boot`)"),
    }
    let dir = image("vm")?;
    let uki = std::fs::read_dir(&dir)?
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .find(|n| n.starts_with("keelson_") && n.ends_with(".efi"))
        .context("no UKI in out/vm")?;
    let (uki_b, initrd_b, root_b, kernel_b) = (
        size(&dir, &uki)?,
        size(&dir, "initramfs.img")?,
        size(&dir, "root.erofs")?,
        size(&dir, "vmlinuz")?,
    );
    let disk_alloc = {
        use std::os::unix::fs::MetadataExt;
        std::fs::metadata(dir.join("disk.raw"))?.blocks() * 512
    };
    println!("## Image sizes (out/vm)\n");
    println!("| artifact | size |\n|---|---|");
    println!("| kernel (vmlinuz, Debian cloud) | {} |", mib(kernel_b));
    println!("| initramfs (init + modules, gzip) | {} |", mib(initrd_b));
    println!("| UKI ({uki}) | {} |", mib(uki_b));
    println!("| root fs (EROFS) | {} |", mib(root_b));
    println!(
        "| UKI + root fs | {} (target 40 MiB: {:.2}x of budget) |",
        mib(uki_b + root_b),
        (uki_b + root_b) as f64 / (40.0 * 1048576.0)
    );
    println!(
        "| disk.raw (allocated / apparent) | {} / {} |",
        mib(disk_alloc),
        mib(size(&dir, "disk.raw")?)
    );
    println!("| disk.qcow2 | {} |", mib(size(&dir, "disk.qcow2")?));

    let work = tempfile::tempdir()?;
    // The peer is made once (debootstrap from the mirror); without it the rows say why.
    let peer = debian_peer(&qemu_tests::workspace_root().join("configs/vm.lock"));
    if let Err(e) = &peer {
        eprintln!("the Debian peer is not measured: {e:#}");
    }
    let (mut direct, mut uefi, mut floor, mut debian, mut uefi_later) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for i in 0..runs {
        eprintln!("run {}/{runs}", i + 1);
        floor.push(busybox_floor(&dir, work.path())?);
        if let Ok(peer) = &peer {
            let floor_kernel = floor.last().map_or(0.0, |f: &Timeline| f.kernel);
            debian.push(debian_boot(peer, work.path(), floor_kernel)?);
        }
        direct.push(keelson_boot(&dir, false)?);
        uefi.push(keelson_boot(&dir, true)?);
        uefi_later.push(keelson_uefi_later_boot(&dir, work.path())?);
        write_svg(&format!("direct-{}", i + 1), &direct[i])?;
        write_svg(&format!("uefi-{}", i + 1), &uefi[i])?;
    }
    println!("\n## Boot timeline, QEMU TCG, 1 vCPU, median of {runs} runs (seconds)\n");
    println!("| phase | Keelson direct | Keelson UEFI (OVMF + systemd-boot + UKI) | busybox floor, same kernel | Debian 12 minbase + systemd, same kernel, direct | Keelson direct / Debian |");
    println!("|---|---|---|---|---|---|");
    let row = |name: &str, f: &dyn Fn(&Timeline) -> f64, with_floor: bool| {
        let fl = if with_floor {
            format!("{:.3}", median(&floor, f))
        } else {
            "-".into()
        };
        let (deb, ratio) = if debian.is_empty() {
            ("not measured".to_string(), "-".to_string())
        } else {
            let d = median(&debian, f);
            (format!("{d:.3}"), format!("{:.2}x", median(&direct, f) / d))
        };
        println!(
            "| {name} | {:.3} | {:.3} | {fl} | {deb} | {ratio} |",
            median(&direct, f),
            median(&uefi, f)
        );
    };
    row(
        "QEMU start → kernel start (firmware)",
        &|t| t.firmware,
        true,
    );
    row("kernel start → init (kernel)", &|t| t.kernel, true);
    row(
        "stage 1 (init → switch_root; Debian: its initrd)",
        &|t| t.stage1,
        false,
    );
    row(
        "stage 2 (→ sysd ready; Debian: userspace to the default target)",
        &|t| t.stage2,
        false,
    );
    row("init start → boot complete", &|t| t.init_total, false);
    row("QEMU start → boot complete", &|t| t.total, true);
    let ready = |runs: &[Timeline]| {
        let v: Vec<f64> = runs.iter().filter_map(|t| t.all_ready).collect();
        match keelson_testkit::stats::median(&v) {
            Some(m) if v.len() == runs.len() => format!("{m:.3}"),
            Some(m) => format!("{m:.3} ({} of {} runs)", v.len(), runs.len()),
            None => format!("not within {} s", ALL_READY.as_secs()),
        }
    };
    println!(
        "| kernel start → all services ready | {} | {} | - | - | - |",
        ready(&direct),
        ready(&uefi)
    );
    println!(
        "| init RSS at boot complete (KiB) | {:.0} | {:.0} | - | - | - |",
        median(&direct, |t| t.rss_kib),
        median(&uefi, |t| t.rss_kib)
    );
    println!("\n## UEFI: a VM's first boot and its later boots, median of {runs} runs (seconds)\n");
    println!("| boot | QEMU start → kernel start (firmware) | QEMU start → boot complete |");
    println!("|---|---|---|");
    for (name, runs) in [
        (
            "first boot (fresh OVMF variable store; the table above)",
            &uefi,
        ),
        (
            "later boot (the VM's variable store and disk kept)",
            &uefi_later,
        ),
    ] {
        println!(
            "| {name} | {:.3} | {:.3} |",
            median(runs, |t| t.firmware),
            median(runs, |t| t.total)
        );
    }
    // The history's figures (`./dev bench` compares them with docs/bench/figures.jsonl).
    let fig = |name: &str, unit: &str, samples: Vec<f64>| {
        history::record(history::Figure::from_samples(
            "bench-boot",
            name,
            unit,
            true,
            &samples,
        ))
    };
    let all =
        |runs: &[Timeline], f: &dyn Fn(&Timeline) -> f64| runs.iter().map(f).collect::<Vec<f64>>();
    fig(
        "init start → boot complete, direct",
        "s",
        all(&direct, &|t| t.init_total),
    )?;
    fig(
        "init start → boot complete, UEFI",
        "s",
        all(&uefi, &|t| t.init_total),
    )?;
    fig("stage 1, direct", "s", all(&direct, &|t| t.stage1))?;
    fig("stage 2, direct", "s", all(&direct, &|t| t.stage2))?;
    fig(
        "QEMU start → boot complete, UEFI",
        "s",
        all(&uefi, &|t| t.total),
    )?;
    fig(
        "QEMU start → boot complete, UEFI, later boot",
        "s",
        all(&uefi_later, &|t| t.total),
    )?;
    fig(
        "QEMU start → boot complete, direct",
        "s",
        all(&direct, &|t| t.total),
    )?;
    fig(
        "busybox floor: kernel start → /init",
        "s",
        all(&floor, &|t| t.kernel),
    )?;
    for (name, runs) in [("direct", &direct), ("UEFI", &uefi)] {
        // Only when every run got there: a partial set would hide the ones that did not.
        let ready: Vec<f64> = runs.iter().filter_map(|t| t.all_ready).collect();
        if ready.len() == runs.len() {
            fig(
                &format!("kernel start → all services ready, {name}"),
                "s",
                ready,
            )?;
        }
    }
    fig(
        "init RSS at boot complete, direct",
        "KiB",
        all(&direct, &|t| t.rss_kib),
    )?;
    fig(
        "UKI + root fs",
        "MiB",
        vec![(uki_b + root_b) as f64 / 1048576.0],
    )?;
    fig("UKI", "MiB", vec![uki_b as f64 / 1048576.0])?;
    fig("root fs (EROFS)", "MiB", vec![root_b as f64 / 1048576.0])?;

    let init = median(&direct, |t| t.init_total);
    println!("\nKeelson userspace (init start → boot complete): {init:.3} s; target 0.5 s ({:.2}x of target).", init / 0.5);
    if !debian.is_empty() {
        let deb = median(&debian, |t| t.init_total);
        println!(
            "Debian 12 minbase with systemd, measured in this run on the same kernel and QEMU: {deb:.3} s from its initramfs to the default target (systemd's `Startup finished` less the busybox floor's kernel time); Keelson's init start → boot complete is {:.2}x of it.",
            init / deb
        );
        fig(
            "Debian minbase+systemd: initramfs start → default target, direct",
            "s",
            all(&debian, &|t| t.init_total),
        )?;
    }
    println!(
        "Kernel + Keelson userspace vs the busybox floor (kernel start → boot complete vs → /init): {:.2}x.",
        (median(&direct, |t| t.kernel) + init) / median(&floor, |t| t.kernel)
    );

    for (name, runs) in [("direct", &direct), ("UEFI", &uefi)] {
        if let Some(t) = median_run(runs) {
            println!("\n## Timeline of the median {name} boot (`keelctl analyze timeline`; pictures in out/bench-boot/)\n");
            println!(
                "```\n{}{}```",
                analyze::summary(&t.boot),
                analyze::timeline(&t.boot)
            );
        }
    }

    secure_boot_table(runs, work.path())?;

    // QEMU's default CPU model (`qemu64`, no RDRAND) and `-cpu max`, a first boot and the
    // boot after it; without a firmware UUID; and with a virtio-rng device.
    let mut entropy: Vec<Vec<Timeline>> = Vec::new();
    for i in 0..runs {
        eprintln!("entropy run {}/{runs}", i + 1);
        entropy.push(entropy_boots(&dir, work.path())?);
    }
    println!("\n## Userspace by CPU model, first and later boots, direct boot, median of {runs} runs (seconds)\n");
    println!("| boot | init start → boot complete | stage 2 | kernel start → all services ready |");
    println!("|---|---|---|---|");
    for (k, (name, key)) in ENTROPY_BOOTS.iter().enumerate() {
        let runs: Vec<Timeline> = entropy.iter().map(|r| r[k].clone()).collect();
        println!(
            "| {name} | {:.3} | {:.3} | {} |",
            median(&runs, |t| t.init_total),
            median(&runs, |t| t.stage2),
            ready(&runs)
        );
        fig(
            &format!("init start → boot complete, direct, {key}"),
            "s",
            all(&runs, &|t| t.init_total),
        )?;
        let ready: Vec<f64> = runs.iter().filter_map(|t| t.all_ready).collect();
        if ready.len() == runs.len() {
            fig(
                &format!("kernel start → all services ready, direct, {key}"),
                "s",
                ready,
            )?;
        }
    }
    Ok(())
}

/// The boots of [`entropy_boots`], in its order: the table's name and the figure's.
const ENTROPY_BOOTS: [(&str, &str); 6] = [
    ("`-cpu max` (RDRAND), first boot", "-cpu max, first boot"),
    ("`-cpu max`, later boot", "-cpu max, later boot"),
    (
        "QEMU's default CPU (`qemu64`, no RDRAND), first boot (machine ID from the firmware UUID)",
        "-cpu qemu64, first boot",
    ),
    (
        "`qemu64`, later boot (random seed credited)",
        "-cpu qemu64, later boot",
    ),
    (
        "`qemu64`, first boot, no firmware UUID (random machine ID: waits for the pool)",
        "-cpu qemu64, first boot, no UUID",
    ),
    (
        "`qemu64` + virtio-rng-pci, first boot, no firmware UUID",
        "-cpu qemu64, virtio-rng, first boot, no UUID",
    ),
];

/// Direct boots, fresh disks unless said: `-cpu max` twice on one disk; `-cpu qemu64` with a
/// firmware UUID twice on one disk; `qemu64` without a UUID; and with a virtio-rng device.
fn entropy_boots(dir: &Path, work: &Path) -> Result<Vec<Timeline>> {
    let boot = |cpu: &str, disk: &Path, uuid: bool, rng: bool| -> Result<Timeline> {
        let mut b = GuestBuilder::from_image_dir(dir)?
            .disk_no_copy(disk, qemu_tests::DiskFormat::Qcow2)
            .cpu_model(cpu)
            .nic(NicModel::None);
        if uuid {
            b = b.args(["-uuid", "6c3f8a2e-1b4d-4e5f-9a0b-1c2d3e4f5a6b"]);
        }
        if rng {
            b = b.args(["-device", "virtio-rng-pci"]);
        }
        let g = b.spawn()?;
        g.wait_for("boot complete in", BOOT)?;
        let _ = g.wait_for(analyze::BOOT_READY, ALL_READY);
        // The seed is stored once the pool is ready: wait for it before the power-off (it may
        // have been stored before `boot complete`, which the console reader has moved past).
        let stored = |g: &qemu_tests::Guest| {
            g.lines_with_times()
                .iter()
                .any(|(_, l)| l.contains("random-seed: stored") || l.contains("bytes credited"))
        };
        if !stored(&g) {
            g.wait_for("random-seed: stored", BOOT)?;
        }
        let t = timeline(&g.lines_with_times())?;
        g.powerdown()?;
        g.wait_exit(BOOT)?;
        Ok(t)
    };
    let fresh = |name: &str| -> Result<std::path::PathBuf> {
        let disk = work.join(name);
        let _ = std::fs::remove_file(&disk);
        qemu_tests::create_overlay(&dir.join("disk.raw"), &disk, None)?;
        Ok(disk)
    };
    let max = fresh("max.qcow2")?;
    let uuid = fresh("uuid.qcow2")?;
    Ok(vec![
        boot("max", &max, false, false)?,
        boot("max", &max, false, false)?,
        boot("qemu64", &uuid, true, false)?,
        boot("qemu64", &uuid, true, false)?,
        boot("qemu64", &fresh("random.qcow2")?, false, false)?,
        boot("qemu64", &fresh("rng.qcow2")?, false, true)?,
    ])
}
