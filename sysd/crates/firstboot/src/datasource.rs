//! Where user data comes from: the datasources, tried in a fixed, documented order.
//!
//! 1. `keelson.config=LABEL=<label>:/<file>` on the kernel command line: an explicit choice
//!    wins over discovery (a file in the root directory of a labelled ISO 9660 or FAT volume).
//! 2. QEMU fw_cfg: `opt/keelson/user-data` (and optionally `opt/keelson/meta-data`), under
//!    `/sys/firmware/qemu_fw_cfg/by_name/` (the qemu_fw_cfg driver is coldplugged by stage 1).
//! 3. NoCloud: a volume labelled `cidata`/`CIDATA` (ISO 9660 or FAT) with `user-data` and
//!    `meta-data` (both required, as cloud-init requires them) and an optional
//!    `network-config`.
//!
//! Each step logs one line saying what it found. None of them touches the network, so a node
//! with no user data pays only a directory lookup and a few superblock reads per block device.
//!
//! Instance identity decides first boot: NoCloud's `instance-id`; for fw_cfg and the command
//! line, `meta-data`'s if given, else a hash of the user data (new data = a new instance).

use std::fs::File;
use std::path::{Path, PathBuf};

use keelson_common::partitions::{self, Slot};
use serde::Deserialize;
use sha2::{Digest, Sha256};

use super::cloudconfig::check_hostname;
use super::seedfs::{self, Volume};
use super::userdata::MAX_RAW;
use super::Error;

/// Largest `meta-data` / `network-config` read.
pub const MAX_META: u64 = 64 * 1024;

/// User data found by a datasource.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Found {
    /// Where it came from, for logs and `keelctl`: `fw_cfg`, `nocloud:/dev/vdb`, ...
    pub source: String,
    pub user_data: Vec<u8>,
    pub meta: MetaData,
    /// cloud-init network config (v1 or v2), as delivered.
    pub network_config: Option<Vec<u8>>,
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct MetaData {
    pub instance_id: String,
    pub local_hostname: Option<String>,
}

#[derive(Deserialize)]
#[serde(rename_all = "kebab-case")]
struct RawMeta {
    instance_id: Option<serde_yaml::Value>,
    local_hostname: Option<String>,
}

/// Parses NoCloud `meta-data` (YAML, or JSON which is YAML). Other keys are platform
/// information and ignored.
pub fn parse_meta(text: &[u8], origin: &str) -> Result<MetaData, Error> {
    let text = std::str::from_utf8(text)
        .map_err(|e| Error::Invalid(format!("{origin}: not UTF-8: {e}")))?;
    if text.trim().is_empty() {
        return Err(Error::Invalid(format!(
            "{origin}: is empty; NoCloud needs at least `instance-id: <id>`"
        )));
    }
    let raw: RawMeta = serde_yaml::from_str(text).map_err(|e| {
        let at = e
            .location()
            .map(|l| format!(":{}:{}", l.line(), l.column()))
            .unwrap_or_default();
        Error::Invalid(format!("{origin}{at}: {e}"))
    })?;
    let instance_id = match raw.instance_id {
        Some(serde_yaml::Value::String(s)) if !s.trim().is_empty() => s.trim().to_owned(),
        Some(serde_yaml::Value::Number(n)) => n.to_string(),
        Some(_) => {
            return Err(Error::Invalid(format!(
                "{origin}: instance-id must be a non-empty string"
            )))
        }
        None => {
            return Err(Error::Invalid(format!(
                "{origin}: has no instance-id (NoCloud defines first boot by it)"
            )))
        }
    };
    if instance_id.len() > 256 || instance_id.contains(['/', '\n', '\0']) {
        return Err(Error::Invalid(format!(
            "{origin}: instance-id must be at most 256 characters without `/` or line breaks"
        )));
    }
    if let Some(h) = &raw.local_hostname {
        check_hostname(h).map_err(|e| Error::Invalid(format!("{origin}: local-hostname: {e}")))?;
    }
    Ok(MetaData {
        instance_id,
        local_hostname: raw.local_hostname,
    })
}

/// The machine as the datasources see it (paths overridable for tests).
#[derive(Debug, Clone)]
pub struct Probe {
    pub sys: PathBuf,
    pub dev: PathBuf,
    pub cmdline: String,
    /// This node applied user data before (it has an instance id on /var): a NoCloud seed on
    /// a USB device is then ignored (see [`Probe::find`]).
    pub provisioned: bool,
}

impl Probe {
    pub fn system() -> Probe {
        Probe {
            sys: PathBuf::from("/sys"),
            dev: PathBuf::from("/dev"),
            cmdline: std::fs::read_to_string("/proc/cmdline").unwrap_or_default(),
            provisioned: super::Paths::system()
                .state_dir
                .join("instance-id")
                .exists(),
        }
    }

    /// Whether block device `name` hangs off a USB bus (its sysfs device path goes through a
    /// `usbN` host controller).
    fn on_usb(&self, name: &str) -> bool {
        std::fs::canonicalize(self.sys.join("class/block").join(name)).is_ok_and(|p| {
            p.components().any(|c| {
                c.as_os_str()
                    .to_str()
                    .and_then(|c| c.strip_prefix("usb"))
                    .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
            })
        })
    }

    /// Tries each datasource in order; `log` receives one line per source tried. An error
    /// means user data was found but could not be read whole (nothing is applied then).
    pub fn find(&self, log: &mut Vec<String>) -> Result<Option<Found>, Error> {
        if let Some(arg) = self
            .cmdline
            .split_whitespace()
            .find_map(|w| w.strip_prefix("keelson.config="))
        {
            let found = self.cmdline_file(arg)?;
            log.push(format!("kernel command line: {}", found.source));
            return Ok(Some(found));
        }
        log.push("kernel command line: no keelson.config=".into());
        match self.fw_cfg()? {
            Some(found) => {
                log.push(format!(
                    "fw_cfg: opt/keelson/user-data ({} bytes)",
                    found.user_data.len()
                ));
                return Ok(Some(found));
            }
            None => log.push("fw_cfg: no opt/keelson/user-data".into()),
        }
        let volumes = self.volumes();
        // A seed is a key to the node (its user data can grant admin SSH): one on a USB device
        // (a stick anyone can plug in) counts only while the node has never been provisioned,
        // the way Ignition runs only on a machine's first boot. Seeds a hypervisor attaches
        // (virtio, SCSI, IDE/SATA CD-ROMs) count at every boot, as cloud-init reads them.
        let mut seeds = Vec::new();
        for (dev, vol) in &volumes {
            if !vol.label().eq_ignore_ascii_case("cidata") {
                continue;
            }
            let name = dev.file_name().and_then(|n| n.to_str()).unwrap_or_default();
            if self.provisioned && self.on_usb(name) {
                log.push(format!(
                    "nocloud: {} (label cidata) is on USB and this node was provisioned already: ignored (a USB seed counts only before a node's first provisioning)",
                    dev.display()
                ));
                continue;
            }
            seeds.push((dev, vol));
        }
        let Some((dev, vol)) = seeds.first() else {
            log.push(format!(
                "nocloud: no volume labelled cidata ({} block devices looked at)",
                self.block_devices().len()
            ));
            return Ok(None);
        };
        if seeds.len() > 1 {
            log.push(format!(
                "nocloud: {} volumes labelled cidata; using the first, {}",
                seeds.len(),
                dev.display()
            ));
        }
        let found = self.nocloud(dev, vol)?;
        log.push(format!(
            "nocloud: {} ({} bytes of user data)",
            found.source,
            found.user_data.len()
        ));
        Ok(Some(found))
    }

    fn fw_cfg(&self) -> Result<Option<Found>, Error> {
        let base = self.sys.join("firmware/qemu_fw_cfg/by_name/opt/keelson");
        let read = |name: &str, limit: u64| -> Result<Option<Vec<u8>>, Error> {
            let path = base.join(name).join("raw");
            let unreadable = |e: &dyn std::fmt::Display| {
                Error::Unreadable(format!("fw_cfg opt/keelson/{name}: {e}"))
            };
            match std::fs::metadata(&path) {
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
                Err(e) => return Err(unreadable(&e)),
                Ok(_) => {}
            }
            read_limited(&path, limit)
                .map(Some)
                .map_err(|e| unreadable(&e))
        };
        let Some(user_data) = read("user-data", MAX_RAW as u64)? else {
            return Ok(None);
        };
        let meta = match read("meta-data", MAX_META)? {
            Some(m) => parse_meta(&m, "fw_cfg opt/keelson/meta-data")?,
            None => MetaData {
                instance_id: hashed_id("fwcfg", &user_data),
                local_hostname: None,
            },
        };
        Ok(Some(Found {
            source: "fw_cfg".into(),
            network_config: read("network-config", MAX_META)?,
            user_data,
            meta,
        }))
    }

    fn nocloud(&self, dev: &Path, vol: &Volume) -> Result<Found, Error> {
        let source = format!("nocloud:{}", dev.display());
        let unreadable = |e: &dyn std::fmt::Display| Error::Unreadable(format!("{source}: {e}"));
        let mut f = File::open(dev).map_err(|e| unreadable(&e))?;
        let files = seedfs::read_root_files(
            &mut f,
            vol,
            &["user-data", "meta-data", "network-config"],
            MAX_META.max(MAX_RAW as u64),
        )
        .map_err(|e| unreadable(&e))?;
        let [user_data, meta, network_config]: [Option<Vec<u8>>; 3] =
            files.try_into().map_err(|_| unreadable(&"short read"))?;
        let missing = |name: &str| {
            Error::Unreadable(format!(
                "{source} (label {}): has no {name} file; a NoCloud seed needs both user-data \
                 and meta-data (cloud-localds writes both)",
                vol.label()
            ))
        };
        let user_data = user_data.ok_or_else(|| missing("user-data"))?;
        if user_data.len() > MAX_RAW {
            return Err(Error::Unreadable(format!(
                "{source}: user-data is {} bytes, more than the {MAX_RAW}-byte limit",
                user_data.len()
            )));
        }
        let meta = meta.ok_or_else(|| missing("meta-data"))?;
        let meta = parse_meta(&meta, &format!("{source}:meta-data"))?;
        Ok(Found {
            source,
            user_data,
            meta,
            network_config,
        })
    }

    /// `LABEL=<label>:/<file>`.
    fn cmdline_file(&self, arg: &str) -> Result<Found, Error> {
        let bad = || {
            Error::Invalid(format!(
                "keelson.config={arg}: expected LABEL=<volume label>:/<file in its root directory>"
            ))
        };
        let (label, file) = arg
            .strip_prefix("LABEL=")
            .and_then(|rest| rest.split_once(":/"))
            .ok_or_else(bad)?;
        if label.is_empty() || file.is_empty() || file.contains('/') {
            return Err(bad());
        }
        let (dev, vol) = self
            .volumes()
            .into_iter()
            .find(|(_, v)| v.label() == label)
            .ok_or_else(|| {
                Error::Unreadable(format!("keelson.config={arg}: no volume labelled {label}"))
            })?;
        let source = format!("cmdline:{}:/{file}", dev.display());
        let unreadable = |e: &dyn std::fmt::Display| Error::Unreadable(format!("{source}: {e}"));
        let mut f = File::open(&dev).map_err(|e| unreadable(&e))?;
        let user_data = seedfs::read_root_files(&mut f, &vol, &[file], MAX_RAW as u64)
            .map_err(|e| unreadable(&e))?
            .pop()
            .flatten()
            .ok_or_else(|| {
                unreadable(&format_args!("no such file on the volume labelled {label}"))
            })?;
        Ok(Found {
            meta: MetaData {
                instance_id: hashed_id("cmdline", &user_data),
                local_hostname: None,
            },
            source,
            user_data,
            network_config: None,
        })
    }

    /// Block devices worth looking at: disks and partitions with a size (no loop, ram, zram,
    /// device-mapper or nbd devices), in name order.
    fn block_devices(&self) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(self.sys.join("class/block"))
            .into_iter()
            .flatten()
            .filter_map(|e| e.ok()?.file_name().into_string().ok())
            .filter(|n| {
                !["loop", "ram", "zram", "dm-", "nbd", "md"]
                    .iter()
                    .any(|p| n.starts_with(p))
            })
            .filter(|n| {
                std::fs::read_to_string(self.sys.join("class/block").join(n).join("size"))
                    .ok()
                    .and_then(|s| s.trim().parse::<u64>().ok())
                    .is_some_and(|s| s > 0)
            })
            .collect();
        let own = self.boot_disk_own();
        names.retain(|n| !own.contains(n));
        names.sort();
        names
    }

    /// Keelson's boot disk and the partitions its image made (found by their GPT names: the
    /// disk with a `root-a` or `root-b` partition): none of them can hold a seed, so their first
    /// blocks are not read at every boot (seven reads of the disk on a vm image). Other
    /// partitions on that disk, and every other disk, are still looked at.
    fn boot_disk_own(&self) -> Vec<String> {
        let block = self.sys.join("class/block");
        let partname = |dir: &Path| -> Option<String> {
            std::fs::read_to_string(dir.join("uevent"))
                .ok()?
                .lines()
                .find_map(|l| l.strip_prefix("PARTNAME=").map(str::to_owned))
        };
        let ours = |label: &str| {
            label == partitions::ESP_LABEL
                || label == partitions::DATA_LABEL
                || Slot::ALL
                    .iter()
                    .any(|s| label == s.root_label() || label == s.verity_label())
        };
        let mut own = Vec::new();
        for disk in std::fs::read_dir(&block).into_iter().flatten().flatten() {
            let dir = disk.path();
            if dir.join("partition").exists() {
                continue;
            }
            // A disk's sysfs directory holds one directory per partition.
            let parts: Vec<(String, Option<String>)> = std::fs::read_dir(&dir)
                .into_iter()
                .flatten()
                .flatten()
                .filter(|p| p.path().join("partition").exists())
                .filter_map(|p| Some((p.file_name().into_string().ok()?, partname(&p.path()))))
                .collect();
            let boot = parts.iter().any(|(_, label)| {
                label
                    .as_deref()
                    .is_some_and(|l| Slot::ALL.iter().any(|s| l == s.root_label()))
            });
            if boot {
                own.extend(disk.file_name().into_string());
                own.extend(
                    parts
                        .into_iter()
                        .filter(|(_, label)| label.as_deref().is_some_and(ours))
                        .map(|(name, _)| name),
                );
            }
        }
        own
    }

    /// Every ISO 9660 or FAT volume found, with its device path.
    fn volumes(&self) -> Vec<(PathBuf, Volume)> {
        self.block_devices()
            .into_iter()
            .filter_map(|name| {
                let path = self.dev.join(&name);
                let mut f = File::open(&path).ok()?;
                Some((path, seedfs::identify(&mut f).ok()??))
            })
            .collect()
    }
}

fn hashed_id(prefix: &str, data: &[u8]) -> String {
    format!("{prefix}-{}", &hex::encode(Sha256::digest(data))[..16])
}

fn read_limited(path: &Path, limit: u64) -> std::io::Result<Vec<u8>> {
    use std::io::Read;
    let mut data = Vec::new();
    File::open(path).and_then(|f| f.take(limit + 1).read_to_end(&mut data))?;
    if data.len() as u64 > limit {
        return Err(std::io::Error::other(format!(
            "more than the {limit}-byte limit"
        )));
    }
    Ok(data)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fake /sys and /dev: block devices are plain files (a seed image made by
    /// cloud-localds, an empty disk), fw_cfg entries are directories with a `raw` file.
    struct Machine {
        dir: tempfile::TempDir,
    }

    impl Machine {
        fn new() -> Machine {
            let m = Machine {
                dir: tempfile::tempdir().unwrap(),
            };
            std::fs::create_dir_all(m.dir.path().join("sys/class/block")).unwrap();
            std::fs::create_dir_all(m.dir.path().join("dev")).unwrap();
            m.disk("vda", &vec![0u8; 128 * 1024]);
            m
        }
        fn disk(&self, name: &str, content: &[u8]) {
            let d = self.dir.path().join("sys/class/block").join(name);
            std::fs::create_dir_all(&d).unwrap();
            std::fs::write(d.join("size"), format!("{}\n", content.len() / 512)).unwrap();
            std::fs::write(self.dir.path().join("dev").join(name), content).unwrap();
        }
        fn fw_cfg(&self, name: &str, content: &[u8]) {
            let d = self
                .dir
                .path()
                .join("sys/firmware/qemu_fw_cfg/by_name/opt/keelson")
                .join(name);
            std::fs::create_dir_all(&d).unwrap();
            std::fs::write(d.join("raw"), content).unwrap();
        }
        fn seed(&self, name: &str, files: &[(&str, &str)], vfat: bool) {
            let d = tempfile::tempdir().unwrap();
            for (f, c) in files {
                std::fs::write(d.path().join(f), c).unwrap();
            }
            let mut args: Vec<&str> = vec![];
            if vfat {
                args.extend(["-f", "vfat"]);
            }
            args.push("seed");
            args.extend(
                files
                    .iter()
                    .map(|(f, _)| *f)
                    .filter(|f| *f != "network-config"),
            );
            if files.iter().any(|(f, _)| *f == "network-config") {
                args.splice(0..0, ["-N", "network-config"]);
            }
            let ok = std::process::Command::new("cloud-localds")
                .args(&args)
                .current_dir(d.path())
                .status()
                .expect("cloud-localds (cloud-image-utils)")
                .success();
            assert!(ok);
            self.disk(name, &std::fs::read(d.path().join("seed")).unwrap());
        }
        fn probe(&self, cmdline: &str) -> Probe {
            Probe {
                sys: self.dir.path().join("sys"),
                dev: self.dir.path().join("dev"),
                cmdline: cmdline.into(),
                provisioned: false,
            }
        }
        /// Moves device `name`'s sysfs directory under a USB host controller, as the kernel
        /// lays out a USB stick (`class/block/NAME` a symlink into `devices/…/usb1/…`).
        fn on_usb(&self, name: &str) {
            let sys = self.dir.path().join("sys");
            let real = sys.join(format!(
                "devices/pci0000:00/0000:00:14.0/usb1/1-1/1-1:1.0/host6/target6:0:0/6:0:0:0/block/{name}"
            ));
            std::fs::create_dir_all(real.parent().unwrap()).unwrap();
            let link = sys.join("class/block").join(name);
            std::fs::rename(&link, &real).unwrap();
            std::os::unix::fs::symlink(&real, &link).unwrap();
        }
        /// What `find` returns, its error as the report shows it.
        fn find(&self, cmdline: &str) -> (Result<Option<Found>, String>, Vec<String>) {
            let mut log = Vec::new();
            let r = self.probe(cmdline).find(&mut log);
            (r.map_err(|e| e.to_string()), log)
        }
    }

    const UD: &str = "#cloud-config\nhostname: seeded\n";

    #[test]
    fn the_boot_disks_own_partitions_are_not_read_and_a_seed_beside_them_is() {
        let m = Machine::new();
        let sys = m.dir.path().join("sys/class/block");
        // vda as the kernel shows a Keelson disk: a partition directory per partition inside
        // the disk's, and class/block/vdaN linking to it.
        for (n, label) in [
            (1, "esp"),
            (2, "root-a"),
            (3, "root-a-verity"),
            (4, "root-b"),
            (5, "root-b-verity"),
            (6, "data"),
            (7, "seed"),
        ] {
            let name = format!("vda{n}");
            let d = sys.join("vda").join(&name);
            std::fs::create_dir_all(&d).unwrap();
            std::fs::write(d.join("partition"), format!("{n}\n")).unwrap();
            std::fs::write(d.join("size"), "2048\n").unwrap();
            std::fs::write(
                d.join("uevent"),
                format!("MAJOR=254\nMINOR={n}\nDEVNAME={name}\nDEVTYPE=partition\nPARTN={n}\nPARTNAME={label}\n"),
            )
            .unwrap();
            std::os::unix::fs::symlink(&d, sys.join(&name)).unwrap();
            std::fs::write(m.dir.path().join("dev").join(&name), vec![0u8; 4096]).unwrap();
        }
        m.seed(
            "vdb",
            &[("user-data", UD), ("meta-data", "instance-id: i-1\n")],
            false,
        );
        assert_eq!(m.probe("quiet").block_devices(), ["vda7", "vdb"]);
        // A seed on a partition of the boot disk that the image did not make is found.
        std::fs::remove_file(m.dir.path().join("dev/vdb")).unwrap();
        std::fs::remove_dir_all(sys.join("vdb")).unwrap();
        let seed = {
            m.seed(
                "tmp",
                &[("user-data", UD), ("meta-data", "instance-id: i-2\n")],
                false,
            );
            std::fs::read(m.dir.path().join("dev/tmp")).unwrap()
        };
        std::fs::remove_dir_all(sys.join("tmp")).unwrap();
        std::fs::write(m.dir.path().join("dev/vda7"), seed).unwrap();
        let (r, log) = m.find("quiet");
        assert_eq!(r.unwrap().unwrap().meta.instance_id, "i-2", "{log:?}");
    }

    #[test]
    fn nothing_found_says_what_was_looked_at() {
        let m = Machine::new();
        let (r, log) = m.find("quiet");
        assert_eq!(r.unwrap(), None);
        assert_eq!(
            log,
            [
                "kernel command line: no keelson.config=",
                "fw_cfg: no opt/keelson/user-data",
                "nocloud: no volume labelled cidata (1 block devices looked at)"
            ]
        );
    }

    /// A USB stick labelled cidata provisions a node that never was, and is ignored (said in
    /// the log) once the node has an instance; a hypervisor's seed disk counts either way.
    #[test]
    fn a_usb_seed_counts_only_before_the_first_provisioning() {
        let m = Machine::new();
        m.seed(
            "sdb",
            &[("user-data", UD), ("meta-data", "instance-id: from-usb\n")],
            true,
        );
        m.on_usb("sdb");
        let mut log = Vec::new();
        let mut probe = m.probe("quiet");
        let found = probe.find(&mut log).unwrap().unwrap();
        assert_eq!(found.meta.instance_id, "from-usb");

        probe.provisioned = true;
        let mut log = Vec::new();
        assert_eq!(probe.find(&mut log).unwrap(), None);
        assert!(
            log.iter().any(|l| l.ends_with("sdb (label cidata) is on USB and this node was provisioned already: ignored (a USB seed counts only before a node's first provisioning)")),
            "{log:?}"
        );
        // A seed the hypervisor attached still counts.
        m.seed(
            "vdc",
            &[
                ("user-data", UD),
                ("meta-data", "instance-id: from-virtio\n"),
            ],
            false,
        );
        let mut log = Vec::new();
        let found = probe.find(&mut log).unwrap().unwrap();
        assert_eq!(found.meta.instance_id, "from-virtio");
    }

    #[test]
    fn nocloud_iso_and_vfat() {
        for vfat in [false, true] {
            let m = Machine::new();
            m.seed(
                "vdb",
                &[
                    ("user-data", UD),
                    ("meta-data", "instance-id: iid-7\nlocal-hostname: meta\n"),
                    ("network-config", "version: 2\n"),
                ],
                vfat,
            );
            let (r, log) = m.find("");
            let f = r.unwrap().unwrap();
            assert!(f.source.ends_with("/dev/vdb"), "{}", f.source);
            assert_eq!(f.user_data, UD.as_bytes());
            assert_eq!(
                f.meta,
                MetaData {
                    instance_id: "iid-7".into(),
                    local_hostname: Some("meta".into())
                }
            );
            assert_eq!(f.network_config.as_deref(), Some(&b"version: 2\n"[..]));
            assert!(log[2].starts_with("nocloud: nocloud:"), "{log:?}");
        }
    }

    #[test]
    fn nocloud_needs_meta_data_with_an_instance_id() {
        let m = Machine::new();
        m.seed(
            "vdb",
            &[("user-data", UD), ("meta-data", "local-hostname: x\n")],
            false,
        );
        let e = m.find("").0.unwrap_err();
        assert!(
            e.ends_with("meta-data: has no instance-id (NoCloud defines first boot by it)"),
            "{e}"
        );

        // cloud-localds always writes both files; build a seed without meta-data by hand.
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join("user-data"), UD).unwrap();
        let ok = std::process::Command::new("genisoimage")
            .args([
                "-quiet",
                "-J",
                "-R",
                "-V",
                "cidata",
                "-o",
                "s.iso",
                "user-data",
            ])
            .current_dir(d.path())
            .status()
            .unwrap()
            .success();
        assert!(ok);
        let m = Machine::new();
        m.disk("sr0", &std::fs::read(d.path().join("s.iso")).unwrap());
        let e = m.find("").0.unwrap_err();
        assert!(e.contains("(label cidata): has no meta-data file"), "{e}");
    }

    #[test]
    fn fw_cfg_wins_over_nocloud_and_hashes_its_instance() {
        let m = Machine::new();
        m.seed(
            "vdb",
            &[("user-data", UD), ("meta-data", "instance-id: iid-7\n")],
            false,
        );
        m.fw_cfg("user-data", b"version = 1\n");
        let (r, log) = m.find("");
        let f = r.unwrap().unwrap();
        assert_eq!(f.source, "fw_cfg");
        assert!(f.meta.instance_id.starts_with("fwcfg-"));
        assert_eq!(log[1], "fw_cfg: opt/keelson/user-data (12 bytes)");
        // Different data, different instance; meta-data, when given, decides.
        m.fw_cfg("user-data", b"version = 1\n\n");
        let g = m.find("").0.unwrap().unwrap();
        assert_ne!(f.meta.instance_id, g.meta.instance_id);
        m.fw_cfg("meta-data", b"{\"instance-id\": \"json-1\"}");
        assert_eq!(m.find("").0.unwrap().unwrap().meta.instance_id, "json-1");
        // Oversized fw_cfg user data is refused, not truncated.
        m.fw_cfg("user-data", &vec![b'#'; MAX_RAW + 1]);
        let e = m.find("").0.unwrap_err();
        assert_eq!(
            e,
            "fw_cfg opt/keelson/user-data: more than the 16384-byte limit"
        );
    }

    #[test]
    fn kernel_command_line_names_a_file_on_a_labelled_volume() {
        let m = Machine::new();
        m.seed(
            "vdc",
            &[("user-data", UD), ("meta-data", "instance-id: a\n")],
            true,
        );
        let f = m
            .find("quiet keelson.config=LABEL=cidata:/user-data")
            .0
            .unwrap()
            .unwrap();
        assert!(f.source.starts_with("cmdline:") && f.source.ends_with("vdc:/user-data"));
        assert_eq!(f.user_data, UD.as_bytes());
        for (arg, want) in [
            (
                "keelson.config=LABEL=other:/user-data",
                "no volume labelled other",
            ),
            ("keelson.config=LABEL=cidata:/nope", "no such file"),
            (
                "keelson.config=/user-data",
                "expected LABEL=<volume label>:/<file",
            ),
            ("keelson.config=LABEL=cidata:/a/b", "expected LABEL="),
        ] {
            let e = m.find(arg).0.unwrap_err();
            assert!(e.contains(want), "{arg}: {e}");
        }
    }

    #[test]
    fn meta_data_values() {
        let e = parse_meta(b"instance-id: [a]\n", "md").unwrap_err();
        assert_eq!(
            e,
            Error::Invalid("md: instance-id must be a non-empty string".into())
        );
        let e = parse_meta(b"instance-id: a/b\n", "md")
            .unwrap_err()
            .to_string();
        assert!(e.contains("without `/`"), "{e}");
        let e = parse_meta(b"instance-id: a\nlocal-hostname: no_good\n", "md")
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("md: local-hostname: `no_good`"), "{e}");
        let e = parse_meta(b"instance-id: a\n  bad: [\n", "md")
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("md:"), "{e}");
        assert_eq!(
            parse_meta(b"instance-id: 42\n", "md").unwrap().instance_id,
            "42"
        );
    }
}
