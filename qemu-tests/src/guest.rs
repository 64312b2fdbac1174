//! One QEMU virtual machine: [`GuestBuilder`] assembles the command line, [`Guest`] runs it.
//!
//! The shape follows cloud-hypervisor's `test_infra`: a builder with the knobs the scenarios need
//! (boot mode, disk controller, NIC model, port forwards, firmware config entries), and a running
//! guest that tests drive through its serial console and its HMP monitor.
//!
//! What a [`Guest`] guarantees:
//!
//! - **Isolation.** QEMU runs in a fresh [`NetNs`] (see that module for why), or in one a
//!   [`crate::cluster`] shares between its guests ([`GuestBuilder::netns`]), with its own
//!   temporary directory holding everything it writes: the disk overlay, the private copy of the
//!   UEFI variable store, the serial log, the monitor socket, QEMU's stdout/stderr.
//! - **The built image is never modified.** The disk is attached through a qcow2 overlay backed by
//!   the image (or through a raw copy, for tests that corrupt bytes on purpose).
//! - **Serial timestamps.** A background thread tails the serial log every 10 ms and stamps each
//!   line with the moment its first byte was seen, relative to QEMU's spawn, so a benchmark can tell
//!   firmware time from kernel time ([`Guest::lines_with_times`]).
//! - **Failures explain themselves.** A timeout error carries the last 40 serial lines; QEMU dying
//!   early is reported with its stderr; a test that panics gets the last 60 serial lines printed.
//! - **Nothing outlives the test.** Drop SIGKILLs QEMU, reaps it, deletes the namespace (once
//!   no other guest shares it) and the temporary directory (kept, and its path printed, when
//!   `KEELSON_KEEP=1`).
//! - **The test image's shell.** [`Guest::sh`] runs a script in the test image's root shell
//!   (port [`TEST_SHELL_PORT`]) wherever the builder said it is: behind a port forward
//!   ([`GuestBuilder::forward_test_shell`]) or at the guest's own address on a shared LAN
//!   ([`GuestBuilder::test_shell_at`]).
//!
//! Acceleration is TCG unless `KEELSON_KVM=1`: the CI machines have no usable `/dev/kvm`, and a
//! TCG boot of a small image takes seconds, not minutes.

use std::ffi::OsString;
use std::fmt::Write as _;
use std::fs::File;
use std::io::{ErrorKind, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};

use crate::netns::NetNs;
use crate::paths::{self, image_files};
use crate::serial::{Cursor, Match, SerialLog};

/// How often the tailer thread reads the serial log (and so the timestamp resolution).
const POLL_INTERVAL: Duration = Duration::from_millis(10);
/// Serial lines included in timeout and early-exit errors.
const ERROR_TAIL_LINES: usize = 40;
/// Serial lines printed when a test panics with a live guest.
const PANIC_TAIL_LINES: usize = 60;
/// How long to wait for QEMU to create its monitor socket or answer a command.
const MONITOR_TIMEOUT: Duration = Duration::from_secs(10);
/// The HMP prompt that ends every monitor response.
const HMP_PROMPT: &[u8] = b"(qemu) ";
/// The guest port of the test image's root shell (the `testshell` service of
/// `configs/services/test.toml`).
pub const TEST_SHELL_PORT: u16 = 7000;
/// How long [`Guest::sh`] retries while the shell comes up.
const SHELL_RETRY: Duration = Duration::from_secs(120);
/// How long one shell connection may take to open (a cut-off guest never answers the SYN).
const SHELL_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a script may run in the shell.
const SHELL_READ_TIMEOUT: Duration = Duration::from_secs(900);
/// Printed by the shell after the script's output: its absence means the connection broke.
const SHELL_END: &str = "__END__";

/// The storage controller the main disk (and extra drives) hang off.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DiskController {
    /// `virtio-blk-pci` (`/dev/vda`).
    #[default]
    VirtioBlk,
    /// An NVMe controller per drive, serials `keelson0`, `keelson1`, ... (`/dev/nvme0n1`).
    Nvme,
    /// One AHCI controller, drives on its ports (`/dev/sda`).
    Ahci,
}

/// The network card model. The backend is QEMU user networking in the namespace, or a tap
/// device there ([`GuestBuilder::tap`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum NicModel {
    /// `virtio-net-pci`.
    #[default]
    VirtioNet,
    /// Intel `e1000e`, for testing a non-virtio driver.
    E1000e,
    /// No network card at all.
    None,
}

/// A disk image format, as QEMU's `format=` names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DiskFormat {
    /// A raw image.
    Raw,
    /// A qcow2 image (overlays).
    Qcow2,
}

impl DiskFormat {
    /// QEMU's name for the format.
    pub fn as_str(self) -> &'static str {
        match self {
            DiskFormat::Raw => "raw",
            DiskFormat::Qcow2 => "qcow2",
        }
    }
}

#[derive(Debug, Clone)]
enum Boot {
    /// OVMF from pflash; the firmware finds the bootloader on the disk.
    Uefi,
    /// QEMU loads the kernel itself (`-kernel`), bypassing firmware and bootloader.
    Direct {
        kernel: PathBuf,
        initrd: Option<PathBuf>,
        cmdline: String,
    },
}

/// How the main disk is attached.
#[derive(Debug, Clone, Copy)]
pub(crate) enum DiskMode {
    /// A qcow2 overlay in the guest directory, backed by the (raw) image; optionally larger.
    Overlay { size: Option<u64> },
    /// A full raw copy in the guest directory.
    RawCopy,
    /// The file itself, read-write: the test owns it.
    AsIs(DiskFormat),
}

#[derive(Debug, Clone)]
enum FwCfgValue {
    File(PathBuf),
    String(String),
}

/// Builds and spawns a [`Guest`]. Defaults: q35, 1 vCPU, 512 MiB, virtio-blk, virtio-net with user
/// networking, serial to a file, HMP monitor on a unix socket, a fresh network namespace.
#[derive(Debug, Clone)]
pub struct GuestBuilder {
    boot: Boot,
    pub(crate) disk: Option<PathBuf>,
    pub(crate) disk_mode: DiskMode,
    controller: DiskController,
    nic: NicModel,
    /// A tap device of the namespace as the NIC's backend instead of user networking.
    tap: Option<String>,
    mac: Option<String>,
    /// The namespace to run in; `None`: a fresh one.
    netns: Option<Arc<NetNs>>,
    /// A label for messages (a cluster's node name).
    name: Option<String>,
    /// Where [`Guest::sh`] reaches the test image's shell from the namespace.
    shell: Option<SocketAddr>,
    forwards: Vec<(u16, u16)>,
    /// QEMU user networking's `net=` and `host=` (default 10.0.2.0/24 and 10.0.2.2).
    user_net: Option<(String, String)>,
    memory_mib: u32,
    cpus: u32,
    /// TCG's CPU model (`-cpu`): `max` unless a test asks for another.
    cpu_model: String,
    no_reboot: bool,
    /// UEFI Secure Boot: OVMF's SMM build with a secure variable store.
    secure_boot: bool,
    /// Start from this variable store (copied) instead of the pristine template.
    uefi_vars: Option<PathBuf>,
    fw_cfg: Vec<(String, FwCfgValue)>,
    extra_drives: Vec<(PathBuf, DiskFormat)>,
    extra_args: Vec<OsString>,
}

impl GuestBuilder {
    fn new(boot: Boot, disk: Option<PathBuf>) -> Self {
        GuestBuilder {
            boot,
            disk,
            disk_mode: DiskMode::Overlay { size: None },
            controller: DiskController::default(),
            nic: NicModel::default(),
            tap: None,
            mac: None,
            netns: None,
            name: None,
            shell: None,
            forwards: Vec::new(),
            user_net: None,
            memory_mib: 512,
            cpus: 1,
            cpu_model: "max".into(),
            no_reboot: false,
            secure_boot: false,
            uefi_vars: None,
            fw_cfg: Vec::new(),
            extra_drives: Vec::new(),
            extra_args: Vec::new(),
        }
    }

    /// UEFI boot of a GPT disk: OVMF code read-only, a private copy of the variable store, and
    /// `disk` attached (through an overlay unless told otherwise).
    pub fn uefi(disk: impl Into<PathBuf>) -> Self {
        Self::new(Boot::Uefi, Some(disk.into()))
    }

    /// UEFI boot of a built image directory (`dir/disk.raw`).
    pub fn uefi_from_image_dir(dir: &Path) -> Result<Self> {
        Ok(Self::uefi(paths::image_file(dir, image_files::DISK)?))
    }

    /// Direct kernel boot: `-kernel kernel -initrd initrd -append cmdline`, with `disk` attached
    /// if given (`None` for a guest that lives in its initramfs).
    pub fn direct(
        kernel: impl Into<PathBuf>,
        initrd: impl Into<PathBuf>,
        cmdline: impl Into<String>,
        disk: Option<PathBuf>,
    ) -> Self {
        Self::new(
            Boot::Direct {
                kernel: kernel.into(),
                initrd: Some(initrd.into()),
                cmdline: cmdline.into(),
            },
            disk,
        )
    }

    /// Direct boot of a built image directory: `dir/vmlinuz`, `dir/initramfs.img`, the one line
    /// of `dir/cmdline`, and `dir/disk.raw` attached.
    pub fn from_image_dir(dir: &Path) -> Result<Self> {
        let kernel = paths::image_file(dir, image_files::KERNEL)?;
        let initrd = paths::image_file(dir, image_files::INITRD)?;
        let cmdline_path = paths::image_file(dir, image_files::CMDLINE)?;
        let disk = paths::image_file(dir, image_files::DISK)?;
        let cmdline = std::fs::read_to_string(&cmdline_path)
            .with_context(|| format!("reading {}", cmdline_path.display()))?;
        let cmdline = cmdline.lines().next().unwrap_or("").trim().to_string();
        Ok(Self::direct(kernel, initrd, cmdline, Some(disk)))
    }

    /// Replaces the kernel command line of a direct boot (no effect on UEFI boots, whose command
    /// line lives in the UKI).
    pub fn cmdline(mut self, cmdline: impl Into<String>) -> Self {
        if let Boot::Direct { cmdline: c, .. } = &mut self.boot {
            *c = cmdline.into();
        }
        self
    }

    /// Appends to the kernel command line of a direct boot.
    pub fn append_cmdline(mut self, extra: &str) -> Self {
        if let Boot::Direct { cmdline, .. } = &mut self.boot {
            if !cmdline.is_empty() {
                cmdline.push(' ');
            }
            cmdline.push_str(extra);
        }
        self
    }

    /// Drops the initrd of a direct boot.
    pub fn no_initrd(mut self) -> Self {
        if let Boot::Direct { initrd, .. } = &mut self.boot {
            *initrd = None;
        }
        self
    }

    /// Replaces the main disk (still attached through an overlay unless told otherwise).
    pub fn disk(mut self, disk: impl Into<PathBuf>) -> Self {
        self.disk = Some(disk.into());
        self
    }

    /// No main disk.
    pub fn no_disk(mut self) -> Self {
        self.disk = None;
        self
    }

    /// Makes the overlay `bytes` large (at least the image's size): the guest sees a bigger disk
    /// and grows its data partition on first boot. Implies overlay mode.
    pub fn disk_size(mut self, bytes: u64) -> Self {
        self.disk_mode = DiskMode::Overlay { size: Some(bytes) };
        self
    }

    /// Attaches a full raw copy of the disk (made in the guest directory) instead of an overlay.
    pub fn writable_copy(mut self) -> Self {
        self.disk_mode = DiskMode::RawCopy;
        self
    }

    /// Attaches this raw file itself, read-write, without copying: for a test that prepared its
    /// own copy (see [`copy_disk`]) and corrupted it, or that boots the same disk twice.
    pub fn disk_raw_no_copy(self, path: impl Into<PathBuf>) -> Self {
        self.disk_no_copy(path, DiskFormat::Raw)
    }

    /// Attaches this file itself, read-write, without copying (e.g. an overlay made with
    /// [`create_overlay`] that must survive this guest).
    pub fn disk_no_copy(mut self, path: impl Into<PathBuf>, format: DiskFormat) -> Self {
        self.disk = Some(path.into());
        self.disk_mode = DiskMode::AsIs(format);
        self
    }

    /// The controller for the main disk and the extra drives.
    pub fn controller(mut self, controller: DiskController) -> Self {
        self.controller = controller;
        self
    }

    /// Shorthand for `.controller(DiskController::Nvme)`.
    pub fn nvme(self) -> Self {
        self.controller(DiskController::Nvme)
    }

    /// Shorthand for `.controller(DiskController::Ahci)`.
    pub fn ahci(self) -> Self {
        self.controller(DiskController::Ahci)
    }

    /// The network card model.
    pub fn nic(mut self, nic: NicModel) -> Self {
        self.nic = nic;
        self
    }

    /// The user network's subnet and the address at which the guest reaches the host (the
    /// test's namespace): `user_net("169.254.0.0/16", "169.254.169.254")` puts a server on the
    /// namespace's loopback at the EC2 metadata address.
    pub fn user_net(mut self, net: &str, host: &str) -> Self {
        self.user_net = Some((net.to_string(), host.to_string()));
        self
    }

    /// Forwards TCP `127.0.0.1:host_port` in the guest's namespace to `guest_port` in the guest
    /// (reach it with [`Guest::run_in_netns`]). Ports cannot clash between guests: each guest has
    /// its own namespace.
    pub fn forward(mut self, host_port: u16, guest_port: u16) -> Self {
        self.forwards.push((host_port, guest_port));
        self
    }

    /// Forwards `host_port` to the test image's shell ([`TEST_SHELL_PORT`]) and makes
    /// [`Guest::sh`] use it.
    pub fn forward_test_shell(mut self, host_port: u16) -> Self {
        self.shell = Some(SocketAddr::from((Ipv4Addr::LOCALHOST, host_port)));
        self.forward(host_port, TEST_SHELL_PORT)
    }

    /// Makes [`Guest::sh`] reach the test image's shell at `addr` from the namespace (a tap
    /// guest's own address and [`TEST_SHELL_PORT`]).
    pub fn test_shell_at(mut self, addr: SocketAddr) -> Self {
        self.shell = Some(addr);
        self
    }

    /// Runs QEMU in `netns` (shared with other guests, deleted when the last holder drops it)
    /// instead of a fresh namespace of its own.
    pub fn netns(mut self, netns: Arc<NetNs>) -> Self {
        self.netns = Some(netns);
        self
    }

    /// Backs the network card with the existing tap device `ifname` of the guest's namespace
    /// (`-netdev tap,ifname=…,script=no,downscript=no`) instead of user networking: the guest is
    /// on whatever L2 network the tap is part of (a bridge, see [`crate::cluster`]). No port
    /// forwards then: the guest is reached at its own address.
    pub fn tap(mut self, ifname: &str) -> Self {
        self.tap = Some(ifname.to_string());
        self
    }

    /// The network card's MAC address (`52:54:00:12:34:56`; QEMU's default otherwise, the same
    /// for every guest).
    pub fn mac(mut self, mac: &str) -> Self {
        self.mac = Some(mac.to_string());
        self
    }

    /// A label for the guest's messages (timeouts, the serial tail of a failed test).
    pub fn name(mut self, name: &str) -> Self {
        self.name = Some(name.to_string());
        self
    }

    /// Guest memory in MiB (default 512).
    pub fn memory_mib(mut self, mib: u32) -> Self {
        self.memory_mib = mib;
        self
    }

    /// Number of vCPUs (default 1: the CI machines have 2 cores and TCG runs one thread per vCPU).
    pub fn cpus(mut self, cpus: u32) -> Self {
        self.cpus = cpus;
        self
    }

    /// TCG's CPU model (default `max`, every feature TCG emulates). `qemu64`, QEMU's own default,
    /// has no RDRAND: what a VM looks like whose entropy comes from nowhere. Ignored under KVM.
    pub fn cpu_model(mut self, model: &str) -> Self {
        self.cpu_model = model.to_owned();
        self
    }

    /// `-no-reboot`: a guest reboot makes QEMU exit instead, so [`Guest::wait_exit`] sees it.
    pub fn no_reboot(mut self) -> Self {
        self.no_reboot = true;
        self
    }

    /// UEFI Secure Boot: OVMF_CODE_4M.secboot.fd, which needs q35 with SMM and a pflash only
    /// SMM code may write (`cfi.pflash01.secure`). The pristine variable store is in setup
    /// mode: systemd-boot enrolls the ESP's keys and resets into Secure Boot.
    pub fn secure_boot(mut self) -> Self {
        self.secure_boot = true;
        self
    }

    /// Starts from a copy of this OVMF variable store (e.g. one with keys enrolled) instead of
    /// the pristine template.
    pub fn uefi_vars(mut self, vars: impl Into<PathBuf>) -> Self {
        self.uefi_vars = Some(vars.into());
        self
    }

    /// A firmware config file (`-fw_cfg name=NAME,file=PATH`); `name` must start with `opt/`.
    pub fn fw_cfg(mut self, name: &str, path: impl Into<PathBuf>) -> Self {
        self.fw_cfg
            .push((name.to_string(), FwCfgValue::File(path.into())));
        self
    }

    /// A firmware config string (`-fw_cfg name=NAME,string=VALUE`); `name` must start with `opt/`.
    pub fn fw_cfg_string(mut self, name: &str, value: &str) -> Self {
        self.fw_cfg
            .push((name.to_string(), FwCfgValue::String(value.to_string())));
        self
    }

    /// Another drive on the same kind of controller, used as is (not copied).
    pub fn extra_drive(mut self, path: impl Into<PathBuf>, format: DiskFormat) -> Self {
        self.extra_drives.push((path.into(), format));
        self
    }

    /// Raw QEMU arguments, appended last.
    pub fn args<I, S>(mut self, args: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<OsString>,
    {
        self.extra_args.extend(args.into_iter().map(Into::into));
        self
    }

    /// A cluster's template may not set what the cluster sets per node (see [`crate::cluster`]).
    pub(crate) fn check_cluster_template(&self) -> Result<()> {
        if self.nic == NicModel::None {
            bail!("the cluster's template has no network card (NicModel::None)");
        }
        if !self.forwards.is_empty() || self.user_net.is_some() || self.shell.is_some() {
            bail!(
                "the cluster's template has port forwards or user_net: cluster nodes are on \
                 the LAN, reached at their own addresses"
            );
        }
        if self.tap.is_some() || self.mac.is_some() || self.netns.is_some() {
            bail!("the cluster's template sets a tap, MAC or namespace: each node gets its own");
        }
        if self.disk.is_some() && matches!(self.disk_mode, DiskMode::AsIs(_)) {
            bail!(
                "the cluster's template must name an image, not a disk used as is: each node \
                 gets its own overlay or copy"
            );
        }
        Ok(())
    }

    /// Prepares the guest directory and starts QEMU in its network namespace (a fresh one unless
    /// [`netns`](Self::netns) gave one).
    pub fn spawn(self) -> Result<Guest> {
        let qemu = paths::qemu_system()?;
        let dir = tempfile::Builder::new()
            .prefix("keelson-guest-")
            .tempdir()
            .context("creating the guest's temporary directory")?;
        let dir_path = dir.path().to_path_buf();

        let disk = match &self.disk {
            None => None,
            Some(src) => Some(prepare_disk(src, self.disk_mode, &dir_path)?),
        };
        let pflash = match self.boot {
            Boot::Uefi => {
                let code = if self.secure_boot {
                    paths::ovmf_code_secboot()?
                } else {
                    paths::ovmf_code()?
                };
                // OVMF writes boot entries and variables into unit 1; sharing the system's file
                // between guests (or with later runs) would leak state across tests.
                let vars = dir_path.join("OVMF_VARS.fd");
                let template = match &self.uefi_vars {
                    Some(v) => v.clone(),
                    None => paths::ovmf_vars()?,
                };
                std::fs::copy(&template, &vars)
                    .with_context(|| format!("copying {}", template.display()))?;
                Some((code, vars))
            }
            Boot::Direct { .. } => None,
        };

        let serial_path = dir_path.join("serial.log");
        // Created (and opened for reading) before QEMU starts, so the tailer never races QEMU's
        // open. QEMU truncates it on open, which is harmless on an empty file.
        File::create(&serial_path).context("creating serial.log")?;
        let serial_reader = File::open(&serial_path).context("opening serial.log")?;
        let monitor_path = dir_path.join("monitor.sock");

        let args = self.qemu_args(
            disk.as_ref(),
            pflash.as_ref().map(|(c, v)| (c.as_path(), v.as_path())),
            &serial_path,
            &monitor_path,
        )?;
        let mut cmdline = shell_quote(&qemu.to_string_lossy());
        for arg in &args {
            cmdline.push(' ');
            cmdline.push_str(&shell_quote(&arg.to_string_lossy()));
        }
        std::fs::write(dir_path.join("qemu.cmdline"), format!("{cmdline}\n"))?;

        let netns = match &self.netns {
            Some(shared) => Arc::clone(shared),
            None => Arc::new(NetNs::new()?),
        };
        let stdout = File::create(dir_path.join("qemu.stdout"))?;
        let stderr = File::create(dir_path.join("qemu.stderr"))?;
        let mut command = netns.command(&qemu);
        command
            .args(&args)
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(stderr);
        let spawned_at = Instant::now();
        let child = command
            .spawn()
            .with_context(|| format!("spawning {cmdline}"))?;

        let serial = Arc::new(Mutex::new(SerialTail {
            file: serial_reader,
            log: SerialLog::new(),
            spawned_at,
        }));
        let stop = Arc::new(AtomicBool::new(false));
        let tailer = {
            let serial = Arc::clone(&serial);
            let stop = Arc::clone(&stop);
            std::thread::Builder::new()
                .name("serial-tail".into())
                .spawn(move || {
                    while !stop.load(Ordering::Relaxed) {
                        lock(&serial).poll();
                        std::thread::sleep(POLL_INTERVAL);
                    }
                })
                .context("spawning the serial tailer thread")?
        };

        Ok(Guest {
            child: Mutex::new(child),
            serial,
            cursor: Mutex::new(Cursor::default()),
            stop,
            tailer: Some(tailer),
            monitor_lock: Mutex::new(()),
            monitor_path,
            serial_path,
            disk: disk.map(|(path, _)| path),
            cmdline,
            spawned_at,
            name: self.name,
            shell: self.shell,
            netns,
            dir_path,
            dir: Some(dir),
        })
    }

    fn qemu_args(
        &self,
        disk: Option<&(PathBuf, DiskFormat)>,
        pflash: Option<(&Path, &Path)>,
        serial: &Path,
        monitor: &Path,
    ) -> Result<Vec<OsString>> {
        let mut a: Vec<OsString> = Vec::new();
        let mut push = |items: &[&str]| a.extend(items.iter().map(OsString::from));

        let kvm = std::env::var("KEELSON_KVM").is_ok_and(|v| v == "1");
        if self.secure_boot {
            push(&["-machine", "q35,smm=on"]);
            push(&["-global", "driver=cfi.pflash01,property=secure,value=on"]);
        } else {
            push(&["-machine", "q35"]);
        }
        if kvm {
            push(&["-accel", "kvm", "-cpu", "host"]);
        } else {
            // `max` gives TCG every feature it can emulate (the default qemu64 model lacks
            // x86-64-v2 instructions that userspace may be built for).
            push(&["-accel", "tcg", "-cpu", &self.cpu_model]);
        }
        push(&["-m", &self.memory_mib.to_string()]);
        push(&["-smp", &self.cpus.to_string()]);
        // No default devices (VGA, default NIC, CD-ROM, parallel port...), no host config file:
        // the guest sees exactly what the builder describes.
        push(&["-display", "none", "-nodefaults", "-no-user-config"]);
        push(&[
            "-chardev",
            &format!("file,id=serial0,path={}", escape_opt(serial)),
            "-serial",
            "chardev:serial0",
        ]);
        push(&[
            "-monitor",
            &format!("unix:{},server=on,wait=off", monitor.display()),
        ]);
        if self.no_reboot {
            push(&["-no-reboot"]);
        }

        match &self.boot {
            Boot::Uefi => {
                let (code, vars) =
                    pflash.ok_or_else(|| anyhow!("UEFI boot without firmware files"))?;
                push(&[
                    "-drive",
                    &format!(
                        "if=pflash,format=raw,unit=0,readonly=on,file={}",
                        escape_opt(code)
                    ),
                    "-drive",
                    &format!("if=pflash,format=raw,unit=1,file={}", escape_opt(vars)),
                ]);
            }
            Boot::Direct {
                kernel,
                initrd,
                cmdline,
            } => {
                a.push("-kernel".into());
                a.push(kernel.into());
                if let Some(initrd) = initrd {
                    a.push("-initrd".into());
                    a.push(initrd.into());
                }
                a.push("-append".into());
                a.push(cmdline.into());
            }
        }

        let drives = disk
            .map(|(p, f)| (p.as_path(), *f))
            .into_iter()
            .chain(self.extra_drives.iter().map(|(p, f)| (p.as_path(), *f)));
        // The boot disk of a UEFI guest is named in QEMU's boot order: OVMF then connects that
        // device alone instead of every device (the NIC's network stack included), ~0.7 s of
        // TCG firmware time; libvirt names its boot device the same way. Linux finds the other
        // drives itself.
        let boot_disk = matches!(self.boot, Boot::Uefi) && disk.is_some();
        let mut any_drive = false;
        for (index, (path, format)) in drives.enumerate() {
            if self.controller == DiskController::Ahci && !any_drive {
                a.extend(["-device", "ahci,id=ahci"].map(OsString::from));
            }
            any_drive = true;
            let id = format!("d{index}");
            a.push("-drive".into());
            a.push(
                format!(
                    "if=none,id={id},format={},file={}",
                    format.as_str(),
                    escape_opt(path)
                )
                .into(),
            );
            let mut device = match self.controller {
                DiskController::VirtioBlk => format!("virtio-blk-pci,drive={id}"),
                DiskController::Nvme => format!("nvme,serial=keelson{index},drive={id}"),
                DiskController::Ahci => {
                    if index >= 6 {
                        bail!("AHCI has 6 ports; {} drives requested", index + 1);
                    }
                    format!("ide-hd,drive={id},bus=ahci.{index}")
                }
            };
            if boot_disk && index == 0 {
                device.push_str(",bootindex=0");
            }
            a.push("-device".into());
            a.push(device.into());
        }

        if self.nic != NicModel::None {
            let netdev = match &self.tap {
                Some(ifname) => {
                    if !self.forwards.is_empty() || self.user_net.is_some() {
                        bail!(
                            "port forwards and user_net need user networking; a guest on tap \
                             {ifname:?} is reached at its own address"
                        );
                    }
                    check_ifname(ifname)?;
                    format!("tap,id=n0,ifname={ifname},script=no,downscript=no")
                }
                None => {
                    let mut netdev = "user,id=n0".to_string();
                    if let Some((net, host)) = &self.user_net {
                        write!(netdev, ",net={net},host={host}")?;
                    }
                    for (host, guest) in &self.forwards {
                        write!(netdev, ",hostfwd=tcp:127.0.0.1:{host}-:{guest}")?;
                    }
                    netdev
                }
            };
            let model = match self.nic {
                NicModel::VirtioNet => "virtio-net-pci",
                NicModel::E1000e => "e1000e",
                NicModel::None => unreachable!("checked above"),
            };
            // `romfile=` drops the iPXE option ROM: OVMF has its own drivers, and loading and
            // running the ROM under TCG costs firmware time for nothing.
            let mut device = format!("{model},netdev=n0,romfile=");
            if let Some(mac) = &self.mac {
                check_mac(mac)?;
                write!(device, ",mac={mac}")?;
            }
            a.push("-netdev".into());
            a.push(netdev.into());
            a.push("-device".into());
            a.push(device.into());
        } else if !self.forwards.is_empty() {
            bail!("port forwards need a network card (NicModel::None was chosen)");
        } else if let Some(ifname) = &self.tap {
            bail!("tap {ifname:?} needs a network card (NicModel::None was chosen)");
        }

        for (name, value) in &self.fw_cfg {
            if !name.starts_with("opt/") {
                bail!("fw_cfg name {name:?} must start with `opt/` (QEMU reserves the rest)");
            }
            let spec = match value {
                FwCfgValue::File(path) => format!("name={name},file={}", escape_opt(path)),
                FwCfgValue::String(s) => format!("name={name},string={}", s.replace(',', ",,")),
            };
            a.push("-fw_cfg".into());
            a.push(spec.into());
        }

        a.extend(self.extra_args.iter().cloned());
        Ok(a)
    }
}

/// A MAC address as QEMU takes it: six hex octets separated by `:`, unicast.
fn check_mac(mac: &str) -> Result<()> {
    let octets: Vec<&str> = mac.split(':').collect();
    let hex = |o: &&str| o.len() == 2 && o.bytes().all(|b| b.is_ascii_hexdigit());
    if octets.len() != 6 || !octets.iter().all(hex) {
        bail!("MAC address {mac:?} is not six hex octets separated by `:` (52:54:00:12:34:56)");
    }
    let first = u8::from_str_radix(octets[0], 16)?;
    if first & 1 == 1 {
        bail!("MAC address {mac:?} is a multicast address (the first octet must be even)");
    }
    Ok(())
}

/// A network interface name the kernel accepts and QEMU's option syntax keeps whole.
fn check_ifname(ifname: &str) -> Result<()> {
    if ifname.is_empty()
        || ifname.len() > 15
        || !ifname
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
    {
        bail!("tap name {ifname:?} must be 1-15 letters, digits, `-`, `_` or `.`");
    }
    Ok(())
}

/// Copies the main disk into the guest directory as the builder asked.
fn prepare_disk(src: &Path, mode: DiskMode, dir: &Path) -> Result<(PathBuf, DiskFormat)> {
    if !src.is_file() {
        bail!("disk image {} does not exist", src.display());
    }
    match mode {
        DiskMode::Overlay { size } => {
            let overlay = dir.join("overlay.qcow2");
            create_overlay(src, &overlay, size)?;
            Ok((overlay, DiskFormat::Qcow2))
        }
        DiskMode::RawCopy => {
            let copy = dir.join("disk.raw");
            copy_disk(src, &copy)?;
            Ok((copy, DiskFormat::Raw))
        }
        DiskMode::AsIs(format) => Ok((src.to_path_buf(), format)),
    }
}

/// Creates a qcow2 overlay at `dst` backed by the raw image `base`, optionally `size` bytes large
/// (never smaller than the image). Writes go to the overlay; `base` is only read.
pub fn create_overlay(base: &Path, dst: &Path, size: Option<u64>) -> Result<()> {
    // The backing path is stored in the overlay and resolved relative to the overlay's directory,
    // so it must be absolute.
    let base = base
        .canonicalize()
        .with_context(|| format!("resolving {}", base.display()))?;
    let mut cmd = Command::new(paths::qemu_img()?);
    cmd.args(["create", "-q", "-f", "qcow2", "-F", "raw", "-b"])
        .arg(&base)
        .arg(dst);
    if let Some(size) = size {
        let base_size = std::fs::metadata(&base)?.len();
        if size < base_size {
            bail!(
                "disk_size {size} is smaller than the image {} ({base_size} bytes)",
                base.display()
            );
        }
        cmd.arg(size.to_string());
    }
    run(&mut cmd)
}

/// Copies a raw disk image, keeping it sparse. For tests that modify a disk's bytes: copy, change
/// the copy, then boot it with [`GuestBuilder::disk_raw_no_copy`].
pub fn copy_disk(src: &Path, dst: &Path) -> Result<()> {
    // `cp --sparse=always` keeps the holes of a mostly-empty image (a plain byte copy would write
    // the full size) and reflinks where the filesystem can.
    run(Command::new("cp")
        .args(["--sparse=always", "--reflink=auto", "--"])
        .arg(src)
        .arg(dst))
}

fn run(cmd: &mut Command) -> Result<()> {
    let output = cmd
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running {cmd:?}"))?;
    if !output.status.success() {
        bail!(
            "{cmd:?} failed ({}): {}",
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(())
}

/// QEMU option values separate with `,`; a literal comma is written `,,`.
fn escape_opt(path: &Path) -> String {
    path.to_string_lossy().replace(',', ",,")
}

/// Quotes an argument for the copy-pasteable command line in `qemu.cmdline`.
fn shell_quote(s: &str) -> String {
    if !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_./=:,+@%".contains(&b))
    {
        s.to_string()
    } else {
        format!("'{}'", s.replace('\'', r"'\''"))
    }
}

/// Locks a mutex, ignoring poisoning: a panicking test thread must not make Drop fail too.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The read end of the serial log and what has been read so far.
struct SerialTail {
    file: File,
    log: SerialLog,
    spawned_at: Instant,
}

impl SerialTail {
    /// Reads whatever QEMU appended since the last call.
    fn poll(&mut self) {
        let mut buf = Vec::new();
        // The file handle's offset remembers where the previous read stopped.
        if self.file.read_to_end(&mut buf).is_ok() && !buf.is_empty() {
            self.log.push(self.spawned_at.elapsed(), &buf);
        }
    }
}

/// A running QEMU guest. Dropping it kills QEMU and removes everything it created.
pub struct Guest {
    child: Mutex<Child>,
    serial: Arc<Mutex<SerialTail>>,
    /// Where the next consuming wait starts.
    cursor: Mutex<Cursor>,
    stop: Arc<AtomicBool>,
    tailer: Option<JoinHandle<()>>,
    /// HMP serves one client at a time; concurrent `monitor` calls queue here.
    monitor_lock: Mutex<()>,
    monitor_path: PathBuf,
    serial_path: PathBuf,
    disk: Option<PathBuf>,
    cmdline: String,
    spawned_at: Instant,
    name: Option<String>,
    shell: Option<SocketAddr>,
    // Dropped after `Drop::drop` has reaped QEMU: the namespace (deleted with its last holder),
    // then the directory.
    netns: Arc<NetNs>,
    dir_path: PathBuf,
    dir: Option<tempfile::TempDir>,
}

impl std::fmt::Debug for Guest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Guest")
            .field("name", &self.label())
            .field("pid", &self.pid())
            .field("dir", &self.dir_path)
            .field("netns", &self.netns.name())
            .finish_non_exhaustive()
    }
}

impl Guest {
    /// Waits until a serial line at or after the end of the previous match contains `pattern`,
    /// consumes it, and returns the whole line.
    pub fn wait_for(&self, pattern: &str, timeout: Duration) -> Result<String> {
        self.wait(&[pattern], timeout, true).map(|m| m.line)
    }

    /// Like [`wait_for`](Self::wait_for) for several patterns: returns the index of the pattern
    /// that matched first in serial order, and the line.
    pub fn wait_for_any(&self, patterns: &[&str], timeout: Duration) -> Result<(usize, String)> {
        self.wait(patterns, timeout, true)
            .map(|m| (m.pattern, m.line))
    }

    /// Searches the whole serial log from its start, without consuming (the cursor of
    /// [`wait_for`](Self::wait_for) does not move).
    pub fn wait_for_from_start(&self, pattern: &str, timeout: Duration) -> Result<String> {
        self.wait(&[pattern], timeout, false).map(|m| m.line)
    }

    /// Like [`wait_for`](Self::wait_for), returning the full [`Match`] (with the line's timestamp).
    pub fn wait_for_match(&self, patterns: &[&str], timeout: Duration) -> Result<Match> {
        self.wait(patterns, timeout, true)
    }

    /// Moves the consume cursor past all output received so far: later waits only see new output.
    pub fn skip_to_end(&self) {
        let serial = self.poll_serial();
        *lock(&self.cursor) = serial.log.end();
    }

    fn wait(&self, patterns: &[&str], timeout: Duration, consume: bool) -> Result<Match> {
        let mut m = self.wait_raw(patterns, timeout, consume)?;
        // A match in the unterminated last line may have caught it half-written: give the line
        // a moment to complete so callers parsing it see all of it (prompts stay partial).
        let settle = Instant::now() + Duration::from_millis(300);
        while Instant::now() < settle {
            let serial = self.poll_serial();
            if let Some((_, full)) = serial.log.lines_with_times().get(m.next.line) {
                if full.len() >= m.line.len() && serial.log.complete_lines() > m.next.line {
                    m.line = full.clone();
                    break;
                }
            }
            drop(serial);
            std::thread::sleep(POLL_INTERVAL);
        }
        Ok(m)
    }

    fn wait_raw(&self, patterns: &[&str], timeout: Duration, consume: bool) -> Result<Match> {
        let deadline = Instant::now() + timeout;
        let mut exited = None;
        loop {
            {
                let serial = self.poll_serial();
                let mut cursor = lock(&self.cursor);
                let from = if consume { *cursor } else { Cursor::default() };
                if let Some(m) = serial.log.find(from, patterns) {
                    if consume {
                        *cursor = m.next;
                    }
                    return Ok(m);
                }
                if let Some(status) = exited {
                    // Checked after a final read of the log: QEMU may have printed the pattern
                    // just before exiting.
                    bail!(
                        "QEMU exited ({status}) before {patterns:?} appeared on the serial console\n\
                         {}--- last {ERROR_TAIL_LINES} serial lines ---\n{}",
                        self.stderr_section(),
                        serial.log.tail(ERROR_TAIL_LINES)
                    );
                }
                if Instant::now() >= deadline {
                    bail!(
                        "timed out after {timeout:?} waiting for {patterns:?} on the serial \
                         console of {} (guest dir {})\n--- last {ERROR_TAIL_LINES} serial lines \
                         ---\n{}",
                        self.label(),
                        self.dir_path.display(),
                        serial.log.tail(ERROR_TAIL_LINES)
                    );
                }
            }
            exited = self.try_wait()?;
            if exited.is_none() {
                std::thread::sleep(POLL_INTERVAL);
            }
        }
    }

    /// Waits for QEMU to exit (the guest powered off, or rebooted under `-no-reboot`).
    pub fn wait_exit(&self, timeout: Duration) -> Result<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.try_wait()? {
                drop(self.poll_serial());
                return Ok(status);
            }
            if Instant::now() >= deadline {
                bail!(
                    "timed out after {timeout:?} waiting for QEMU to exit\n\
                     --- last {ERROR_TAIL_LINES} serial lines ---\n{}",
                    self.serial_tail(ERROR_TAIL_LINES)
                );
            }
            std::thread::sleep(POLL_INTERVAL);
        }
    }

    /// QEMU's exit status if it has exited.
    pub fn try_wait(&self) -> Result<Option<ExitStatus>> {
        lock(&self.child)
            .try_wait()
            .context("checking whether QEMU exited")
    }

    /// The whole serial log so far.
    pub fn serial_log(&self) -> String {
        self.poll_serial().log.text()
    }

    /// The last `n` serial lines.
    pub fn serial_tail(&self, n: usize) -> String {
        self.poll_serial().log.tail(n)
    }

    /// Every serial line with the time its first byte was seen, relative to QEMU's spawn
    /// (resolution ~10 ms). The unterminated last line is included.
    pub fn lines_with_times(&self) -> Vec<(Duration, String)> {
        self.poll_serial().log.lines_with_times()
    }

    /// When QEMU was spawned.
    pub fn spawned_at(&self) -> Instant {
        self.spawned_at
    }

    /// Sends one HMP command over the monitor socket and returns its output (without the echoed
    /// command and the prompt).
    pub fn monitor(&self, cmd: &str) -> Result<String> {
        let _serialize = lock(&self.monitor_lock);
        let mut stream = self.connect_monitor()?;
        stream.set_read_timeout(Some(MONITOR_TIMEOUT))?;
        // The greeting ends with the first prompt.
        read_until_prompt(&mut stream).context("reading the HMP greeting")?;
        stream
            .write_all(format!("{cmd}\n").as_bytes())
            .with_context(|| format!("sending {cmd:?} to the monitor"))?;
        let raw = read_until_prompt(&mut stream)
            .with_context(|| format!("reading the monitor's answer to {cmd:?}"))?;
        Ok(clean_hmp_output(&raw))
    }

    fn connect_monitor(&self) -> Result<UnixStream> {
        // QEMU creates the socket while starting up; a test may ask before that.
        let deadline = Instant::now() + MONITOR_TIMEOUT;
        loop {
            match UnixStream::connect(&self.monitor_path) {
                Ok(stream) => return Ok(stream),
                Err(_) if Instant::now() < deadline => {
                    if let Some(status) = self.try_wait()? {
                        bail!(
                            "QEMU exited ({status}); no monitor\n{}",
                            self.stderr_section()
                        );
                    }
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(e) => {
                    return Err(e)
                        .with_context(|| format!("connecting to {}", self.monitor_path.display()))
                }
            }
        }
    }

    /// ACPI power button (`system_powerdown`): the guest shuts down if it handles the event.
    pub fn powerdown(&self) -> Result<()> {
        self.monitor("system_powerdown").map(drop)
    }

    /// Hard reset (`system_reset`), like pressing the reset button.
    pub fn reset(&self) -> Result<()> {
        self.monitor("system_reset").map(drop)
    }

    /// Asks QEMU to quit (`quit`), like pulling the plug but through QEMU.
    pub fn quit(&self) -> Result<()> {
        self.monitor("quit").map(drop)
    }

    /// SIGKILLs QEMU and reaps it (a power cut; no-op if it already exited).
    pub fn kill(&self) -> Result<()> {
        let mut child = lock(&self.child);
        if child.try_wait()?.is_none() {
            match child.kill() {
                Ok(()) => {}
                // Exited between the check and the kill.
                Err(e) if e.kind() == ErrorKind::InvalidInput => {}
                Err(e) => return Err(e).context("killing QEMU"),
            }
        }
        child.wait().context("reaping QEMU")?;
        Ok(())
    }

    /// QEMU's pid.
    pub fn pid(&self) -> u32 {
        lock(&self.child).id()
    }

    /// The guest's network namespace.
    pub fn netns(&self) -> &NetNs {
        &self.netns
    }

    /// [`Guest::wait_for`], failing the test with the console's tail when the line never comes.
    pub fn expect(&self, pattern: &str, timeout: Duration) -> String {
        self.wait_for(pattern, timeout)
            .unwrap_or_else(|e| panic!("{e}\n--- console ---\n{}", self.serial_tail(150)))
    }

    /// [`Guest::wait_for_from_start`], failing the test with the console's tail when the line
    /// never comes: for a line whose order against the lines already waited for is not fixed.
    pub fn expect_from_start(&self, pattern: &str, timeout: Duration) -> String {
        self.wait_for_from_start(pattern, timeout)
            .unwrap_or_else(|e| panic!("{e}\n--- console ---\n{}", self.serial_tail(150)))
    }

    /// Runs `script` in the test image's root shell (the `testshell` service) where the builder
    /// said it is ([`GuestBuilder::forward_test_shell`], [`GuestBuilder::test_shell_at`]);
    /// returns its combined output. Connections are retried for two minutes while the shell comes
    /// up; then the test fails with the console's tail.
    pub fn sh(&self, script: &str) -> String {
        self.try_sh(script)
            .unwrap_or_else(|e| panic!("{e:#}\n{}", self.serial_tail(80)))
    }

    /// [`sh`](Self::sh) returning an error instead of failing the test (for benchmarks).
    pub fn try_sh(&self, script: &str) -> Result<String> {
        let addr = self.shell.ok_or_else(|| {
            anyhow!(
                "{}: no test shell address (build the guest with forward_test_shell or \
                 test_shell_at)",
                self.label()
            )
        })?;
        self.shell_at(addr, script)
    }

    /// Runs `script` in the test image's shell forwarded to `port` (see [`sh`](Self::sh)).
    pub fn shell(&self, port: u16, script: &str) -> String {
        self.shell_at(SocketAddr::from((Ipv4Addr::LOCALHOST, port)), script)
            .unwrap_or_else(|e| panic!("{e:#}\n{}", self.serial_tail(80)))
    }

    fn shell_at(&self, addr: SocketAddr, script: &str) -> Result<String> {
        let deadline = Instant::now() + SHELL_RETRY;
        loop {
            let attempt = self.run_in_netns(|| -> std::io::Result<String> {
                let mut s = TcpStream::connect_timeout(&addr, SHELL_CONNECT_TIMEOUT)?;
                s.set_read_timeout(Some(SHELL_READ_TIMEOUT))?;
                write!(s, "{{ {script}\n}} 2>&1; echo {SHELL_END}\nexit\n")?;
                let mut out = String::new();
                s.read_to_string(&mut out)?;
                Ok(out)
            });
            match attempt {
                Ok(out) if out.contains(SHELL_END) => {
                    return Ok(out.replace(&format!("{SHELL_END}\n"), ""))
                }
                _ if Instant::now() < deadline => std::thread::sleep(Duration::from_secs(1)),
                other => bail!(
                    "{}: test shell at {addr} unreachable for {SHELL_RETRY:?}: {other:?}",
                    self.label()
                ),
            }
        }
    }

    /// The label given by [`GuestBuilder::name`], else `guest`.
    pub fn label(&self) -> &str {
        self.name.as_deref().unwrap_or("guest")
    }

    /// Runs `f` on a thread inside the guest's namespace (to reach forwarded ports on 127.0.0.1).
    pub fn run_in_netns<F, T>(&self, f: F) -> T
    where
        F: FnOnce() -> T + Send,
        T: Send,
    {
        self.netns.run_in(f)
    }

    /// The guest's temporary directory.
    pub fn dir(&self) -> &Path {
        &self.dir_path
    }

    /// The serial log file QEMU writes.
    pub fn serial_path(&self) -> &Path {
        &self.serial_path
    }

    /// The main disk as attached (the overlay, the copy, or the caller's file).
    pub fn disk_path(&self) -> Option<&Path> {
        self.disk.as_deref()
    }

    /// The QEMU command line, shell-quoted (also in `qemu.cmdline` in the guest directory).
    pub fn qemu_cmdline(&self) -> &str {
        &self.cmdline
    }

    /// QEMU's stderr so far.
    pub fn qemu_stderr(&self) -> String {
        std::fs::read_to_string(self.dir_path.join("qemu.stderr")).unwrap_or_default()
    }

    fn stderr_section(&self) -> String {
        let stderr = self.qemu_stderr();
        if stderr.trim().is_empty() {
            format!("--- command ---\n{}\n", self.cmdline)
        } else {
            format!(
                "--- command ---\n{}\n--- QEMU stderr ---\n{}\n",
                self.cmdline,
                stderr.trim_end()
            )
        }
    }

    /// Reads new serial output now (rather than waiting for the tailer) and returns the log.
    fn poll_serial(&self) -> MutexGuard<'_, SerialTail> {
        let mut serial = lock(&self.serial);
        serial.poll();
        serial
    }
}

impl Drop for Guest {
    fn drop(&mut self) {
        if let Err(e) = self.kill() {
            eprintln!("qemu-tests: {e:#}");
        }
        self.stop.store(true, Ordering::Relaxed);
        if let Some(tailer) = self.tailer.take() {
            let _ = tailer.join();
        }
        let keep = std::env::var("KEELSON_KEEP").is_ok_and(|v| v == "1");
        if std::thread::panicking() {
            eprintln!(
                "qemu-tests: test failed; the last {PANIC_TAIL_LINES} serial lines of {}:\n{}\n\
                 --- end of the serial of {} (guest dir {}{}) ---",
                self.label(),
                self.serial_tail(PANIC_TAIL_LINES),
                self.label(),
                self.dir_path.display(),
                if keep {
                    ""
                } else {
                    ", deleted; set KEELSON_KEEP=1 to keep it"
                }
            );
        }
        if keep {
            if let Some(dir) = self.dir.take() {
                let path = dir.keep();
                eprintln!("qemu-tests: KEELSON_KEEP=1: kept {}", path.display());
            }
        }
        // The namespace and the directory go when the fields drop, QEMU being reaped by now.
    }
}

/// Reads from the monitor until the HMP prompt (or EOF, which `quit` causes).
fn read_until_prompt(stream: &mut UnixStream) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        if out.ends_with(HMP_PROMPT) {
            out.truncate(out.len() - HMP_PROMPT.len());
            return Ok(out);
        }
        match stream.read(&mut buf) {
            Ok(0) => return Ok(out),
            Ok(n) => out.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return Err(e.into()),
        }
    }
}

/// HMP echoes the command line back (with terminal escape sequences, as for a terminal) before
/// the answer; keep only the answer.
fn clean_hmp_output(raw: &[u8]) -> String {
    let text = String::from_utf8_lossy(raw).replace('\r', "");
    let answer = match text.split_once('\n') {
        Some((_echo, rest)) => rest,
        None => "",
    };
    answer.trim_end().to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hmp_echo_is_stripped() {
        let raw = b"info status\r\nVM status: running\r\n";
        assert_eq!(clean_hmp_output(raw), "VM status: running");
        assert_eq!(clean_hmp_output(b"system_powerdown\r\n"), "");
        assert_eq!(clean_hmp_output(b""), "");
    }

    #[test]
    fn command_line_for_defaults() {
        let b = GuestBuilder::direct("/k", "/i", "console=ttyS0 quiet", None)
            .forward(8022, 22)
            .forward(8080, 80)
            .fw_cfg_string("opt/keelson/x", "a,b");
        let args = b
            .qemu_args(
                None,
                None,
                Path::new("/d/serial.log"),
                Path::new("/d/m.sock"),
            )
            .unwrap();
        let args: Vec<String> = args.iter().map(|a| a.to_string_lossy().into()).collect();
        let joined = args.join(" ");
        assert!(joined.contains("-machine q35"), "{joined}");
        assert!(joined.contains("-m 512 -smp 1"));
        assert!(joined.contains("-display none -nodefaults -no-user-config"));
        assert!(joined.contains("-monitor unix:/d/m.sock,server=on,wait=off"));
        assert!(!joined.contains("-no-reboot"));
        let append = args.iter().position(|a| a == "-append").unwrap();
        assert_eq!(args[append + 1], "console=ttyS0 quiet");
        assert!(joined
            .contains("user,id=n0,hostfwd=tcp:127.0.0.1:8022-:22,hostfwd=tcp:127.0.0.1:8080-:80"));
        assert!(joined.contains("virtio-net-pci,netdev=n0,romfile="));
        assert!(joined.contains("name=opt/keelson/x,string=a,,b"));
        assert!(!joined.contains("-drive"));
    }

    #[test]
    fn command_line_for_controllers() {
        let disk = (PathBuf::from("/g/overlay.qcow2"), DiskFormat::Qcow2);
        let args = |b: GuestBuilder| -> String {
            b.qemu_args(
                Some(&disk),
                Some((Path::new("/g/CODE.fd"), Path::new("/g/VARS.fd"))),
                Path::new("/g/s"),
                Path::new("/g/m"),
            )
            .unwrap()
            .iter()
            .map(|a| a.to_string_lossy().into_owned())
            .collect::<Vec<_>>()
            .join(" ")
        };
        let nvme = args(
            GuestBuilder::uefi("/x.img")
                .nvme()
                .extra_drive("/e.raw", DiskFormat::Raw)
                .no_reboot(),
        );
        assert!(nvme.contains("if=none,id=d0,format=qcow2,file=/g/overlay.qcow2"));
        assert!(nvme.contains("nvme,serial=keelson0,drive=d0,bootindex=0"));
        assert!(nvme.contains("if=none,id=d1,format=raw,file=/e.raw"));
        // Only the boot disk is in the boot order.
        assert!(nvme.contains("nvme,serial=keelson1,drive=d1 "));
        assert!(nvme.contains("if=pflash,format=raw,unit=1,file=/g/VARS.fd"));
        assert!(nvme.contains("-no-reboot"));
        let sb = args(GuestBuilder::uefi("/x.img").secure_boot());
        assert!(sb.contains("-machine q35,smm=on"), "{sb}");
        assert!(
            sb.contains("-global driver=cfi.pflash01,property=secure,value=on"),
            "{sb}"
        );
        let ahci = args(GuestBuilder::uefi("/x.img").ahci().nic(NicModel::E1000e));
        assert!(ahci.contains("-device ahci,id=ahci -drive"));
        assert!(ahci.contains("ide-hd,drive=d0,bus=ahci.0,bootindex=0"));
        assert!(ahci.contains("e1000e,netdev=n0"));
        let virtio = args(GuestBuilder::uefi("/x.img").nic(NicModel::None));
        assert!(virtio.contains("virtio-blk-pci,drive=d0,bootindex=0"));
        assert!(!virtio.contains("-netdev"));
    }

    #[test]
    fn command_line_for_a_tap_guest() {
        let args = |b: GuestBuilder| -> Result<String> {
            Ok(
                b.qemu_args(None, None, Path::new("/g/s"), Path::new("/g/m"))?
                    .iter()
                    .map(|a| a.to_string_lossy().into_owned())
                    .collect::<Vec<_>>()
                    .join(" "),
            )
        };
        let tap = || GuestBuilder::direct("/k", "/i", "", None).tap("ktap0");
        let joined = args(tap().mac("52:54:00:4b:00:0b")).unwrap();
        assert!(
            joined.contains("-netdev tap,id=n0,ifname=ktap0,script=no,downscript=no"),
            "{joined}"
        );
        assert!(joined.contains("virtio-net-pci,netdev=n0,romfile=,mac=52:54:00:4b:00:0b"));
        assert!(!joined.contains("user,"));

        let err = |b: GuestBuilder| args(b).unwrap_err().to_string();
        assert!(err(tap().forward(1, 2)).contains("reached at its own address"));
        assert!(err(tap().user_net("10.1.0.0/24", "10.1.0.2")).contains("user networking"));
        assert!(err(tap().nic(NicModel::None)).contains("needs a network card"));
        let bad = GuestBuilder::direct("/k", "/i", "", None).tap("a,b");
        assert!(err(bad).contains("tap name \"a,b\""));
        let long = GuestBuilder::direct("/k", "/i", "", None).tap("sixteen-chars-xx");
        assert!(err(long).contains("1-15"));
        assert!(err(tap().mac("52:54:00:4b:00")).contains("six hex octets"));
        assert!(err(tap().mac("52:54:00:4b:00:zz")).contains("six hex octets"));
        assert!(err(tap().mac("01:00:5e:00:00:01")).contains("multicast"));
        // A MAC on a user-networking guest is fine too.
        let user = GuestBuilder::direct("/k", "/i", "", None).mac("52:54:00:00:00:02");
        assert!(args(user).unwrap().contains("user,id=n0"));
    }

    #[test]
    fn test_shell_address_follows_the_builder() {
        let b = GuestBuilder::direct("/k", "/i", "", None).forward_test_shell(17000);
        assert_eq!(
            b.shell,
            Some(SocketAddr::from((Ipv4Addr::LOCALHOST, 17000)))
        );
        assert_eq!(b.forwards, vec![(17000, TEST_SHELL_PORT)]);
        let at = SocketAddr::from((Ipv4Addr::new(10, 77, 0, 11), TEST_SHELL_PORT));
        assert_eq!(
            GuestBuilder::direct("/k", "/i", "", None)
                .test_shell_at(at)
                .shell,
            Some(at)
        );
    }

    #[test]
    fn bad_fw_cfg_name_is_rejected() {
        let err = GuestBuilder::uefi("/x")
            .fw_cfg("keelson/x", "/f")
            .qemu_args(
                None,
                Some((Path::new("/c"), Path::new("/v"))),
                Path::new("/s"),
                Path::new("/m"),
            )
            .unwrap_err();
        assert!(err.to_string().contains("opt/"));
    }

    #[test]
    fn shell_quoting() {
        assert_eq!(shell_quote("-m"), "-m");
        assert_eq!(shell_quote("console=ttyS0 quiet"), "'console=ttyS0 quiet'");
        assert_eq!(shell_quote("it's"), r"'it'\''s'");
    }
}
