//! [`ContainerConfig`] → OCI runtime-spec `config.json`, and the bundle directory holding it.
//!
//! The defaults mirror what Docker/runc give a container, because that is what images are
//! built and tested against: private mount/pid/ipc/uts/cgroup namespaces (network unless
//! host), the standard /proc /dev /sys mounts, Docker's capability set, its masked and
//! read-only /proc and /sys paths, `no_new_privileges` and a seccomp allowlist. `privileged`
//! removes the confinement (all capabilities, no seccomp, no masked paths, host devices) but
//! keeps the namespaces.
//!
//! Resource limits are written to `linux.resources.unified` (cgroup v2 file → value):
//! libcontainer's typed fields are cgroup v1 shaped (cpu shares are converted to a weight by
//! a formula, not passed through), while `unified` is written verbatim, so `cpu.weight = 100`
//! means exactly that, and a limit whose controller is not enabled fails the start with
//! libcontainer's "subsystem X is not available" instead of being silently dropped.
//!
//! Capabilities: bounding = effective = permitted = Docker's default set with `cap_add` /
//! `cap_drop` applied (`ALL` allowed). Inheritable and ambient are empty for uid 0. For any
//! other uid they carry the *explicitly added* capabilities (`cap_add` minus `cap_drop`), so a
//! non-root service that asks for e.g. `CAP_NET_BIND_SERVICE` really holds it after exec
//! (like systemd's `AmbientCapabilities=`); the default set is not made ambient, so a plain
//! non-root service runs with no effective capabilities, as under Docker.

use std::collections::{BTreeSet, HashMap};
use std::fs;
use std::io::Write;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};

use anyhow::{bail, Context, Result};
use oci_spec::runtime::{
    Capability, LinuxBuilder, LinuxCapabilitiesBuilder, LinuxDevice, LinuxDeviceBuilder,
    LinuxDeviceType, LinuxIdMappingBuilder, LinuxNamespaceBuilder, LinuxNamespaceType,
    LinuxResourcesBuilder, Mount as SpecMount, MountBuilder, PosixRlimit, PosixRlimitBuilder,
    PosixRlimitType, ProcessBuilder, RootBuilder, Spec, SpecBuilder, UserBuilder,
};

use super::{seccomp, ContainerConfig, Mount, NetworkMode};

/// Docker's default capability set without CAP_MKNOD, as Podman does (there is no device
/// cgroup: on cgroup v2 it is a BPF program libcontainer only loads with libbpf, so a service
/// that could mknod a block device could open the host's disks), and without CAP_NET_RAW, as
/// Docker itself dropped it (raw sockets sniff and spoof whatever the service's network
/// carries: on the host network, the node's traffic). ping works without it (ICMP echo
/// sockets, [`PING_GROUP_RANGE`]). Add either back with `cap_add`.
pub const DEFAULT_CAPS: &[&str] = &[
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_FSETID",
    "CAP_FOWNER",
    "CAP_SETGID",
    "CAP_SETUID",
    "CAP_SETFCAP",
    "CAP_SETPCAP",
    "CAP_NET_BIND_SERVICE",
    "CAP_SYS_CHROOT",
    "CAP_KILL",
    "CAP_AUDIT_WRITE",
];

pub use keelson_common::caps::ALL_CAPS;

/// Set in every network namespace a container gets of its own (as Docker does; init sets it
/// on the host): any group may open ICMP echo sockets, so ping needs no CAP_NET_RAW. In a
/// user namespace, every group the namespace maps.
pub const PING_GROUP_RANGE: (&str, &str) = ("net.ipv4.ping_group_range", "0 2147483647");

/// Docker's masked paths: hidden behind /dev/null (files) or an empty read-only tmpfs (dirs).
pub const MASKED_PATHS: &[&str] = &[
    "/proc/asound",
    "/proc/acpi",
    "/proc/interrupts",
    "/proc/kcore",
    "/proc/keys",
    "/proc/latency_stats",
    "/proc/timer_list",
    "/proc/timer_stats",
    "/proc/sched_debug",
    "/proc/scsi",
    "/sys/firmware",
    "/sys/devices/virtual/powercap",
];

/// Docker's read-only paths.
pub const READONLY_PATHS: &[&str] = &[
    "/proc/bus",
    "/proc/fs",
    "/proc/irq",
    "/proc/sys",
    "/proc/sysrq-trigger",
];

/// The PATH searched for argv[0] when the environment has none.
pub const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// Size of the user namespace mapping.
const USERNS_SIZE: u32 = 65536;

/// The capabilities this process holds (its bounding set): a container cannot get more,
/// and "all" means these (as containerd's privileged mode does), so sysd also works where it
/// is itself confined.
pub fn held_capabilities() -> BTreeSet<String> {
    let status = fs::read_to_string("/proc/self/status").unwrap_or_default();
    let mask = status
        .lines()
        .find_map(|l| l.strip_prefix("CapBnd:"))
        .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        .unwrap_or(u64::MAX);
    ALL_CAPS
        .iter()
        .enumerate()
        .filter(|(bit, _)| mask & (1u64 << bit) != 0)
        .map(|(_, c)| c.to_string())
        .collect()
}

/// The capability set (bounding = effective = permitted) of a container.
pub fn capabilities(cfg: &ContainerConfig) -> Result<BTreeSet<String>> {
    let held = held_capabilities();
    if cfg.privileged {
        return Ok(held);
    }
    // Docker's order: `cap_drop = ["ALL"]` empties the base set, then `cap_add` adds, then
    // the other drops remove (so `drop ALL, add X` is exactly X).
    let mut set: BTreeSet<String> = if cfg.cap_drop.iter().any(|c| c == "ALL") {
        BTreeSet::new()
    } else {
        DEFAULT_CAPS
            .iter()
            .map(|c| c.to_string())
            .filter(|c| held.contains(c))
            .collect()
    };
    for cap in &cfg.cap_add {
        if cap == "ALL" {
            set.extend(held.iter().cloned());
        } else {
            let cap = checked_cap(&cfg.service, cap)?;
            if !held.contains(&cap) {
                bail!(
                    "service {}: cannot add {cap}: sysd itself does not hold it",
                    cfg.service
                );
            }
            set.insert(cap);
        }
    }
    for cap in cfg.cap_drop.iter().filter(|c| *c != "ALL") {
        set.remove(&checked_cap(&cfg.service, cap)?);
    }
    Ok(set)
}

/// The capabilities a non-root process keeps across exec (inheritable and ambient).
pub fn ambient_capabilities(cfg: &ContainerConfig) -> Result<BTreeSet<String>> {
    if cfg.uid == 0 {
        return Ok(BTreeSet::new());
    }
    let bounding = capabilities(cfg)?;
    let mut added = BTreeSet::new();
    for cap in &cfg.cap_add {
        if cap == "ALL" {
            added.extend(bounding.iter().cloned());
        } else {
            added.insert(checked_cap(&cfg.service, cap)?);
        }
    }
    Ok(added.intersection(&bounding).cloned().collect())
}

fn checked_cap(service: &str, cap: &str) -> Result<String> {
    if ALL_CAPS.contains(&cap) {
        Ok(cap.to_owned())
    } else {
        bail!("service {service}: unknown capability {cap:?} (expected e.g. CAP_NET_ADMIN or ALL)")
    }
}

fn to_oci_caps(set: &BTreeSet<String>) -> Result<std::collections::HashSet<Capability>> {
    set.iter()
        .map(|c| {
            serde_json::from_value::<Capability>(serde_json::Value::String(c.clone()))
                .with_context(|| format!("capability {c}"))
        })
        .collect()
}

fn mount(dest: &str, typ: &str, source: &str, options: &[&str]) -> Result<SpecMount> {
    Ok(MountBuilder::default()
        .destination(dest)
        .typ(typ)
        .source(source)
        .options(options.iter().map(|s| s.to_string()).collect::<Vec<_>>())
        .build()?)
}

/// The mounts every container gets, as runc/Docker make them.
fn default_mounts(cfg: &ContainerConfig) -> Result<Vec<SpecMount>> {
    let sys_ro = if cfg.privileged { "rw" } else { "ro" };
    // A delegated service manages its own cgroup subtree (its cgroup namespace's root is its
    // service cgroup), so its cgroupfs is writable even when the rest of /sys is not.
    let cgroup_ro = if cfg.privileged || cfg.delegate {
        "rw"
    } else {
        "ro"
    };
    let mut mounts = vec![
        mount("/proc", "proc", "proc", &["nosuid", "noexec", "nodev"])?,
        mount(
            "/dev",
            "tmpfs",
            "tmpfs",
            &["nosuid", "strictatime", "mode=755", "size=65536k"],
        )?,
        mount(
            "/dev/pts",
            "devpts",
            "devpts",
            &[
                "nosuid",
                "noexec",
                "newinstance",
                "ptmxmode=0666",
                "mode=0620",
                "gid=5",
            ],
        )?,
        mount(
            "/dev/shm",
            "tmpfs",
            "shm",
            &["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"],
        )?,
        mount(
            "/dev/mqueue",
            "mqueue",
            "mqueue",
            &["nosuid", "noexec", "nodev"],
        )?,
    ];
    if cfg.user_namespace.is_some() && cfg.network != NetworkMode::None {
        // sysfs can only be mounted by the owner of the network namespace; a user-namespaced
        // container on the host network gets the host's /sys bound read-only (as runc does).
        mounts.push(mount(
            "/sys",
            "none",
            "/sys",
            &["rbind", "nosuid", "noexec", "nodev", "ro"],
        )?);
    } else {
        mounts.push(mount(
            "/sys",
            "sysfs",
            "sysfs",
            &["nosuid", "noexec", "nodev", sys_ro],
        )?);
        mounts.push(mount(
            "/sys/fs/cgroup",
            "cgroup",
            "cgroup",
            &["nosuid", "noexec", "nodev", "relatime", cgroup_ro],
        )?);
    }
    Ok(mounts)
}

fn user_mounts(cfg: &ContainerConfig) -> Result<Vec<SpecMount>> {
    let mut out = Vec::new();
    for m in &cfg.mounts {
        match m {
            Mount::Bind {
                source,
                target,
                readonly,
            } => {
                if !source.is_absolute() {
                    bail!(
                        "service {}: bind mount source {} is not an absolute path",
                        cfg.service,
                        source.display()
                    );
                }
                let mode = if *readonly { "ro" } else { "rw" };
                out.push(
                    MountBuilder::default()
                        .destination(target)
                        .typ("bind")
                        .source(source)
                        .options(
                            ["rbind", mode, "nosuid", "nodev"]
                                .map(String::from)
                                .to_vec(),
                        )
                        .build()?,
                );
            }
            Mount::Tmpfs {
                target,
                size_bytes,
                mode,
            } => {
                let mut options = vec!["nosuid".to_owned(), "nodev".to_owned()];
                if let Some(size) = size_bytes {
                    options.push(format!("size={size}"));
                }
                if let Some(mode) = mode {
                    options.push(format!("mode={mode:o}"));
                }
                out.push(
                    MountBuilder::default()
                        .destination(target)
                        .typ("tmpfs")
                        .source("tmpfs")
                        .options(options)
                        .build()?,
                );
            }
        }
    }
    Ok(out)
}

/// cgroup v2 files and values for the resource limits.
pub fn unified_resources(cfg: &ContainerConfig) -> HashMap<String, String> {
    let r = &cfg.resources;
    let mut u = HashMap::new();
    if let Some(v) = r.memory_max {
        u.insert("memory.max".into(), v.to_string());
    }
    if let Some(v) = r.cpu_weight {
        u.insert("cpu.weight".into(), v.to_string());
    }
    if r.cpu_quota_us.is_some() || r.cpu_period_us.is_some() {
        let quota = r.cpu_quota_us.map_or("max".to_owned(), |q| q.to_string());
        let period = r.cpu_period_us.unwrap_or(100_000);
        u.insert("cpu.max".into(), format!("{quota} {period}"));
    }
    if let Some(v) = r.pids_max {
        u.insert("pids.max".into(), v.to_string());
    }
    if let Some(v) = r.io_weight {
        // io.weight's file format is "default <weight>".
        u.insert("io.weight".into(), format!("default {v}"));
    }
    u
}

/// The runtime spec for `cfg`.
pub fn spec(cfg: &ContainerConfig) -> Result<Spec> {
    let ctx = || format!("service {}: building the container spec", cfg.service);
    let caps = capabilities(cfg)?;
    let ambient = ambient_capabilities(cfg)?;
    let oci_caps = to_oci_caps(&caps)?;
    let oci_ambient = to_oci_caps(&ambient)?;

    let user = UserBuilder::default()
        .uid(cfg.uid)
        .gid(cfg.gid)
        .additional_gids(cfg.additional_gids.clone())
        .build()
        .with_context(ctx)?;
    let process = ProcessBuilder::default()
        .terminal(false)
        .user(user)
        .args(cfg.args.clone())
        .env(cfg.env.clone())
        .cwd(if cfg.cwd.is_empty() {
            "/"
        } else {
            cfg.cwd.as_str()
        })
        .capabilities(
            LinuxCapabilitiesBuilder::default()
                .bounding(oci_caps.clone())
                .effective(oci_caps.clone())
                .permitted(oci_caps)
                .inheritable(oci_ambient.clone())
                .ambient(oci_ambient)
                .build()
                .with_context(ctx)?,
        )
        .no_new_privileges(!cfg.privileged)
        .rlimits(vec![nofile_limit().with_context(ctx)?])
        .build()
        .with_context(ctx)?;

    let mut namespaces = vec![
        LinuxNamespaceType::Mount,
        LinuxNamespaceType::Ipc,
        LinuxNamespaceType::Cgroup,
    ];
    // A host-network service sees the node's host name, as a Docker `--network host`
    // container does: it shares the node's UTS namespace, so the name stays in step when the
    // node's host name changes (sethostname needs CAP_SYS_ADMIN, which only privileged
    // services hold). Every other container gets its service name.
    let own_uts = cfg.network != NetworkMode::Host;
    if own_uts {
        namespaces.push(LinuxNamespaceType::Uts);
    }
    if !cfg.host_pid {
        namespaces.push(LinuxNamespaceType::Pid);
    }
    if cfg.network != NetworkMode::Host {
        namespaces.push(LinuxNamespaceType::Network);
    }
    if cfg.user_namespace.is_some() {
        namespaces.push(LinuxNamespaceType::User);
    }
    let namespaces = namespaces
        .into_iter()
        .map(|typ| {
            let mut ns = LinuxNamespaceBuilder::default().typ(typ);
            if let (LinuxNamespaceType::Network, NetworkMode::Join(path)) = (typ, &cfg.network) {
                // Another container's namespace (`network = "service:NAME"`).
                ns = ns.path(path.clone());
            }
            ns.build()
        })
        .collect::<Result<Vec<_>, _>>()
        .with_context(ctx)?;

    let mut linux = LinuxBuilder::default()
        .namespaces(namespaces)
        .cgroups_path(PathBuf::from(&cfg.cgroup_path))
        .resources(
            LinuxResourcesBuilder::default()
                .unified(unified_resources(cfg))
                .build()
                .with_context(ctx)?,
        );
    if cfg.network == NetworkMode::None {
        // In a user namespace the range must map into it: the container's own groups.
        let range = match cfg.user_namespace {
            None => PING_GROUP_RANGE.1.to_owned(),
            Some(_) => format!("0 {}", USERNS_SIZE - 1),
        };
        linux = linux.sysctl(std::collections::HashMap::from([(
            PING_GROUP_RANGE.0.to_owned(),
            range,
        )]));
    }
    if let Some(base) = cfg.user_namespace {
        let map = LinuxIdMappingBuilder::default()
            .container_id(0u32)
            .host_id(base)
            .size(USERNS_SIZE)
            .build()
            .with_context(ctx)?;
        linux = linux.uid_mappings(vec![map]).gid_mappings(vec![map]);
    }
    if cfg.privileged {
        linux = linux.devices(host_devices(Path::new("/dev")));
    } else {
        linux = linux
            .masked_paths(
                MASKED_PATHS
                    .iter()
                    .map(|s| s.to_string())
                    .collect::<Vec<_>>(),
            )
            .readonly_paths(
                READONLY_PATHS
                    .iter()
                    .map(|s| s.to_string())
                    .collect::<Vec<_>>(),
            )
            .seccomp(seccomp::default_profile(&caps));
    }
    let mut linux = linux.build().with_context(ctx)?;
    if cfg.privileged {
        // The builder starts from oci-spec's defaults, which carry runc's masked paths.
        linux.set_masked_paths(None);
        linux.set_readonly_paths(None);
    }

    let mut mounts = default_mounts(cfg).with_context(ctx)?;
    mounts.extend(user_mounts(cfg)?);

    let rootfs = std::path::absolute(&cfg.rootfs)
        .with_context(|| format!("service {}: rootfs {}", cfg.service, cfg.rootfs.display()))?;
    let mut spec = SpecBuilder::default()
        .version("1.0.2")
        .hostname(cfg.service.clone())
        .root(
            RootBuilder::default()
                .path(rootfs)
                .readonly(!cfg.writable_root)
                .build()?,
        )
        .process(process)
        .mounts(mounts)
        .linux(linux)
        .annotations(
            cfg.annotations
                .clone()
                .into_iter()
                .collect::<HashMap<_, _>>(),
        )
        .build()
        .with_context(ctx)?;
    if !own_uts {
        // No UTS namespace, no host name of its own (oci-spec's default would be "youki").
        spec.set_hostname(None);
    }
    Ok(spec)
}

/// RLIMIT_NOFILE: soft 1024 keeps select()-based programs safe, hard 524288 lets the others
/// raise it (systemd's and containerd's defaults), both capped at sysd's own hard limit,
/// which cannot be exceeded without CAP_SYS_RESOURCE.
fn nofile_limit() -> Result<PosixRlimit> {
    let mut cur = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into `cur`.
    let own_hard = if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut cur) } == 0 {
        cur.rlim_max
    } else {
        1024
    };
    let hard = own_hard.min(524_288);
    Ok(PosixRlimitBuilder::default()
        .typ(PosixRlimitType::RlimitNofile)
        .soft(hard.min(1024))
        .hard(hard)
        .build()?)
}

/// Writes `spec` as `<dir>/config.json` (replacing an older bundle of the same id).
pub fn write(dir: &Path, spec: &Spec) -> Result<()> {
    fs::create_dir_all(dir).with_context(|| format!("creating bundle dir {}", dir.display()))?;
    fs::set_permissions(dir, fs::Permissions::from_mode(0o700))
        .with_context(|| format!("chmod {}", dir.display()))?;
    let path = dir.join("config.json");
    let json = serde_json::to_vec_pretty(spec).context("serializing config.json")?;
    // On /run (tmpfs) the fsyncs cost nothing; the exclusive, never-followed temporary file is
    // what matters here.
    keelson_common::durable::replace_with(
        &path,
        &keelson_common::durable::Options::mode(0o600),
        |f| f.write_all(&json),
    )?;
    Ok(())
}

/// The annotation that names the bundle file holding the container's compiled seccomp
/// program ([`SECCOMP_PROGRAM`]). Its presence, not the file's, is what the runtime helper acts
/// on: a bundle that names a program it cannot load is refused, never run unfiltered.
pub const SECCOMP_ANNOTATION: &str = "org.keelson.seccomp";
/// The compiled program's file name in the bundle.
pub const SECCOMP_PROGRAM: &str = "seccomp.bpf";

/// Seccomp programs compiled so far, by profile: a node's services hold a handful of
/// capability sets, so each profile is compiled once per daemon, not once per start.
#[derive(Debug, Default, Clone)]
pub struct Programs(std::sync::Arc<std::sync::Mutex<HashMap<String, std::sync::Arc<Vec<u8>>>>>);

impl Programs {
    /// `profile`'s program, compiled on first use.
    fn get(&self, profile: &oci_spec::runtime::LinuxSeccomp) -> Result<std::sync::Arc<Vec<u8>>> {
        let key = serde_json::to_string(profile).context("serializing the seccomp profile")?;
        let mut known = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(p) = known.get(&key) {
            return Ok(p.clone());
        }
        let program = std::sync::Arc::new(seccomp::compile(profile)?);
        known.insert(key, program.clone());
        Ok(program)
    }
}

/// Writes `spec` as a bundle in `dir` the way the runtime helper runs it: a seccomp profile is
/// taken out of `config.json` and written compiled ([`SECCOMP_PROGRAM`], named by
/// [`SECCOMP_ANNOTATION`]), so that the container's process loads it as it is instead of
/// libcontainer compiling it again for every start.
pub fn write_compiled(dir: &Path, mut spec: Spec, programs: &Programs) -> Result<()> {
    let profile = spec
        .linux_mut()
        .as_mut()
        .and_then(|l| l.seccomp_mut().take());
    let Some(profile) = profile else {
        return write(dir, &spec);
    };
    let program = programs
        .get(&profile)
        .context("compiling the seccomp profile")?;
    let mut notes = spec.annotations().clone().unwrap_or_default();
    notes.insert(SECCOMP_ANNOTATION.into(), SECCOMP_PROGRAM.into());
    spec.set_annotations(Some(notes));
    // The bundle directory (0700) first, then the program beside config.json.
    write(dir, &spec)?;
    keelson_common::durable::replace_with(
        &dir.join(SECCOMP_PROGRAM),
        &keelson_common::durable::Options::mode(0o600),
        |f| f.write_all(&program),
    )?;
    Ok(())
}

/// The seccomp program a bundle names ([`SECCOMP_ANNOTATION`]), read and checked; `None`
/// when it names none (a privileged container).
pub fn compiled_program(dir: &Path, spec: &Spec) -> Result<Option<Vec<libc::sock_filter>>> {
    let Some(name) = spec
        .annotations()
        .as_ref()
        .and_then(|a| a.get(SECCOMP_ANNOTATION))
    else {
        return Ok(None);
    };
    if name != SECCOMP_PROGRAM {
        bail!("annotation {SECCOMP_ANNOTATION} names {name:?}, not {SECCOMP_PROGRAM}");
    }
    let path = dir.join(name);
    let bytes = fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
    seccomp::decode(&bytes)
        .map(Some)
        .with_context(|| format!("{}", path.display()))
}

/// Device nodes under `dev` (recursively, not pts/shm/mqueue), for privileged containers.
fn host_devices(dev: &Path) -> Vec<LinuxDevice> {
    fn walk(dir: &Path, out: &mut Vec<LinuxDevice>) {
        let Ok(entries) = fs::read_dir(dir) else {
            return;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            let Ok(meta) = fs::symlink_metadata(&path) else {
                continue;
            };
            let ft = meta.file_type();
            if ft.is_dir() {
                let name = entry.file_name();
                if !["pts", "shm", "mqueue", "fd"].iter().any(|n| name == *n) {
                    walk(&path, out);
                }
                continue;
            }
            let typ = if ft.is_char_device() {
                LinuxDeviceType::C
            } else if ft.is_block_device() {
                LinuxDeviceType::B
            } else {
                continue;
            };
            if path == Path::new("/dev/console") || path == Path::new("/dev/ptmx") {
                continue;
            }
            let rdev = meta.rdev();
            let device = LinuxDeviceBuilder::default()
                .path(&path)
                .typ(typ)
                .major(libc::major(rdev) as i64)
                .minor(libc::minor(rdev) as i64)
                .file_mode(meta.mode() & 0o7777)
                .uid(meta.uid())
                .gid(meta.gid())
                .build();
            if let Ok(device) = device {
                out.push(device);
            }
        }
    }
    let mut out = Vec::new();
    walk(dev, &mut out);
    out.sort_by(|a, b| a.path().cmp(b.path()));
    out
}

/// Resolves `path` (absolute, inside the container) against `rootfs`, following symlinks the
/// way the kernel would inside the container (absolute links are relative to `rootfs`, `..`
/// stops at its root). Returns the host path of the final target, or `None` if a component
/// does not exist.
pub fn resolve_in_rootfs(rootfs: &Path, path: &str) -> Option<PathBuf> {
    let mut pending: Vec<String> = path
        .split('/')
        .filter(|c| !c.is_empty() && *c != ".")
        .rev()
        .map(str::to_owned)
        .collect();
    let mut resolved: Vec<String> = Vec::new();
    let mut hops = 0;
    while let Some(comp) = pending.pop() {
        if comp == ".." {
            resolved.pop();
            continue;
        }
        let mut host = rootfs.to_path_buf();
        host.extend(&resolved);
        host.push(&comp);
        let meta = fs::symlink_metadata(&host).ok()?;
        if meta.file_type().is_symlink() {
            hops += 1;
            if hops > 40 {
                return None;
            }
            let target = fs::read_link(&host).ok()?;
            if target.is_absolute() {
                resolved.clear();
            }
            for c in target.components().rev() {
                match c {
                    Component::Normal(s) => pending.push(s.to_string_lossy().into_owned()),
                    Component::ParentDir => pending.push("..".into()),
                    _ => {}
                }
            }
        } else {
            resolved.push(comp);
        }
    }
    let mut host = rootfs.to_path_buf();
    host.extend(&resolved);
    Some(host)
}

/// Checks that the rootfs exists and argv[0] names an executable file in it (searching the
/// container's PATH when argv[0] has no slash), so a typo gives a clear message instead of
/// libcontainer's.
pub fn preflight(cfg: &ContainerConfig) -> Result<()> {
    let meta = fs::metadata(&cfg.rootfs).with_context(|| {
        format!(
            "service {}: rootfs {} is not accessible",
            cfg.service,
            cfg.rootfs.display()
        )
    })?;
    if !meta.is_dir() {
        bail!(
            "service {}: rootfs {} is not a directory",
            cfg.service,
            cfg.rootfs.display()
        );
    }
    let Some(argv0) = cfg.args.first() else {
        bail!(
            "service {}: empty command (no entrypoint and no command)",
            cfg.service
        );
    };
    let is_exec = |p: &Path| {
        fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
    };
    if argv0.contains('/') {
        let abs = if argv0.starts_with('/') {
            argv0.clone()
        } else {
            format!(
                "{}/{argv0}",
                if cfg.cwd.is_empty() { "/" } else { &cfg.cwd }
            )
        };
        match resolve_in_rootfs(&cfg.rootfs, &abs) {
            Some(host) if is_exec(&host) => Ok(()),
            Some(_) => bail!(
                "service {}: {argv0} is not an executable file in the image rootfs {}",
                cfg.service,
                cfg.rootfs.display()
            ),
            None => bail!(
                "service {}: {argv0} not found in the image rootfs {}",
                cfg.service,
                cfg.rootfs.display()
            ),
        }
    } else {
        let path = cfg
            .env
            .iter()
            .find_map(|e| e.strip_prefix("PATH="))
            .unwrap_or(DEFAULT_PATH);
        let found = path
            .split(':')
            .filter(|d| d.starts_with('/'))
            .filter_map(|d| resolve_in_rootfs(&cfg.rootfs, &format!("{d}/{argv0}")))
            .any(|host| is_exec(&host));
        if found {
            Ok(())
        } else {
            bail!(
                "service {}: {argv0} not found in PATH {path} of the image rootfs {}",
                cfg.service,
                cfg.rootfs.display()
            )
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::Resources;
    use oci_spec::runtime::LinuxSeccompAction;
    use std::collections::BTreeMap;

    pub(crate) fn config() -> ContainerConfig {
        ContainerConfig {
            id: "web-1".into(),
            env: vec!["PATH=/usr/bin:/bin".into()],
            annotations: BTreeMap::from([("org.keelson.service".into(), "web".into())]),
            ..ContainerConfig::new(
                "web",
                "/var/lib/keelson/images/web",
                &["/bin/httpd", "-f"],
                "/keelson/web".into(),
            )
        }
    }

    fn ns_types(spec: &Spec) -> Vec<LinuxNamespaceType> {
        spec.linux()
            .as_ref()
            .unwrap()
            .namespaces()
            .as_ref()
            .unwrap()
            .iter()
            .map(|n| n.typ())
            .collect()
    }

    fn names(set: &BTreeSet<String>) -> Vec<&str> {
        set.iter().map(String::as_str).collect()
    }

    #[test]
    fn default_caps_and_add_drop() {
        let mut cfg = config();
        assert_eq!(capabilities(&cfg).unwrap().len(), DEFAULT_CAPS.len());
        cfg.cap_add = vec!["CAP_NET_ADMIN".into()];
        cfg.cap_drop = vec!["CAP_CHOWN".into(), "CAP_KILL".into()];
        let caps = capabilities(&cfg).unwrap();
        assert!(caps.contains("CAP_NET_ADMIN"));
        assert!(
            !caps.contains("CAP_MKNOD")
                && !caps.contains("CAP_CHOWN")
                && !caps.contains("CAP_KILL")
        );
        assert_eq!(caps.len(), DEFAULT_CAPS.len() - 1);

        cfg.cap_add = vec![];
        cfg.cap_drop = vec!["ALL".into()];
        assert!(capabilities(&cfg).unwrap().is_empty());
        cfg.cap_add = vec!["CAP_KILL".into()];
        cfg.cap_drop = vec!["ALL".into(), "CAP_KILL".into()];
        assert!(capabilities(&cfg).unwrap().is_empty());

        cfg.cap_drop = vec!["ALL".into()];
        cfg.cap_add = vec!["CAP_NET_BIND_SERVICE".into()];
        assert_eq!(
            names(&capabilities(&cfg).unwrap()),
            ["CAP_NET_BIND_SERVICE"]
        );

        cfg.cap_add = vec!["ALL".into()];
        cfg.cap_drop = vec!["CAP_SYS_ADMIN".into()];
        let held = held_capabilities();
        assert_eq!(capabilities(&cfg).unwrap().len(), held.len() - 1);

        cfg.cap_add = vec!["CAP_BOGUS".into()];
        let err = capabilities(&cfg).unwrap_err().to_string();
        assert!(err.contains("CAP_BOGUS") && err.contains("web"), "{err}");
    }

    #[test]
    fn ambient_only_for_non_root_and_only_added() {
        let mut cfg = config();
        cfg.cap_add = vec!["CAP_NET_ADMIN".into()];
        assert!(ambient_capabilities(&cfg).unwrap().is_empty());
        cfg.uid = 1000;
        assert_eq!(
            names(&ambient_capabilities(&cfg).unwrap()),
            ["CAP_NET_ADMIN"]
        );
        // Docker's order: drop ALL, then add.
        cfg.cap_drop = vec!["ALL".into()];
        let spec = spec(&cfg).unwrap();
        let caps = spec
            .process()
            .as_ref()
            .unwrap()
            .capabilities()
            .clone()
            .unwrap();
        assert_eq!(caps.ambient().as_ref().unwrap().len(), 1);
        assert_eq!(caps.bounding().as_ref().unwrap().len(), 1);
        cfg.cap_drop = vec!["CAP_NET_ADMIN".into()];
        assert!(ambient_capabilities(&cfg).unwrap().is_empty());
    }

    #[test]
    fn confined_by_default() {
        let cfg = config();
        let spec = spec(&cfg).unwrap();
        let linux = spec.linux().as_ref().unwrap();
        assert_eq!(
            linux.masked_paths().as_ref().unwrap().len(),
            MASKED_PATHS.len()
        );
        assert!(linux
            .masked_paths()
            .as_ref()
            .unwrap()
            .contains(&"/proc/kcore".to_string()));
        assert_eq!(
            linux.readonly_paths().as_ref().unwrap().len(),
            READONLY_PATHS.len()
        );
        let seccomp = linux.seccomp().as_ref().unwrap();
        assert_eq!(seccomp.default_action(), LinuxSeccompAction::ScmpActErrno);
        let process = spec.process().as_ref().unwrap();
        assert_eq!(process.no_new_privileges(), Some(true));
        let caps = process.capabilities().as_ref().unwrap();
        assert_eq!(caps.effective().as_ref().unwrap().len(), DEFAULT_CAPS.len());
        assert!(caps
            .effective()
            .as_ref()
            .unwrap()
            .contains(&Capability::NetBindService));
        assert!(caps.inheritable().as_ref().unwrap().is_empty());
        assert!(linux.devices().is_none());
        let root = spec.root().as_ref().unwrap();
        assert_eq!(root.readonly(), Some(true));
        assert_eq!(root.path(), Path::new("/var/lib/keelson/images/web"));
        assert_eq!(spec.hostname().as_deref(), Some("web"));
        assert_eq!(
            linux.cgroups_path().as_deref(),
            Some(Path::new("/keelson/web"))
        );
        assert_eq!(
            spec.annotations()
                .as_ref()
                .unwrap()
                .get("org.keelson.service")
                .map(String::as_str),
            Some("web")
        );
        let dests: Vec<_> = spec
            .mounts()
            .as_ref()
            .unwrap()
            .iter()
            .map(|m| m.destination().clone())
            .collect();
        for d in [
            "/proc",
            "/dev",
            "/dev/pts",
            "/dev/shm",
            "/dev/mqueue",
            "/sys",
            "/sys/fs/cgroup",
        ] {
            assert!(dests.contains(&PathBuf::from(d)), "{d} missing");
        }
    }

    #[test]
    fn delegated_cgroupfs_is_writable_in_its_own_cgroup_namespace() {
        let cgroup_options = |cfg: &ContainerConfig| {
            let spec = spec(cfg).unwrap();
            let ns = ns_types(&spec);
            assert!(ns.contains(&LinuxNamespaceType::Cgroup), "{ns:?}");
            spec.mounts()
                .as_ref()
                .unwrap()
                .iter()
                .find(|m| m.destination() == Path::new("/sys/fs/cgroup"))
                .and_then(|m| m.options().clone())
                .unwrap()
        };
        let mut cfg = config();
        let plain = cgroup_options(&cfg);
        assert!(plain.contains(&"ro".to_string()), "{plain:?}");
        cfg.delegate = true;
        let delegated = cgroup_options(&cfg);
        assert!(delegated.contains(&"rw".to_string()), "{delegated:?}");
        assert!(!delegated.contains(&"ro".to_string()), "{delegated:?}");
        // The rest of /sys stays read-only: only the cgroup subtree is delegated.
        let spec = spec(&cfg).unwrap();
        let sys = spec
            .mounts()
            .as_ref()
            .unwrap()
            .iter()
            .find(|m| m.destination() == Path::new("/sys"))
            .and_then(|m| m.options().clone())
            .unwrap();
        assert!(sys.contains(&"ro".to_string()), "{sys:?}");
        // Confinement is unchanged: seccomp and masked paths stay.
        assert!(spec.linux().as_ref().unwrap().seccomp().is_some());
    }

    #[test]
    fn privileged_unconfined() {
        let mut cfg = config();
        cfg.privileged = true;
        cfg.writable_root = true;
        let spec = spec(&cfg).unwrap();
        let linux = spec.linux().as_ref().unwrap();
        assert!(linux.seccomp().is_none());
        assert!(linux.masked_paths().is_none() && linux.readonly_paths().is_none());
        let json = serde_json::to_string(&spec).unwrap();
        assert!(!json.contains("maskedPaths") && !json.contains("readonlyPaths"));
        let process = spec.process().as_ref().unwrap();
        assert_eq!(process.no_new_privileges(), Some(false));
        let caps = process.capabilities().as_ref().unwrap();
        assert_eq!(
            caps.bounding().as_ref().unwrap().len(),
            held_capabilities().len()
        );
        assert_eq!(spec.root().as_ref().unwrap().readonly(), Some(false));
        assert!(linux
            .devices()
            .as_ref()
            .is_some_and(|d| d.iter().any(|d| d.path() == Path::new("/dev/null"))));
        // Namespaces stay.
        assert!(ns_types(&spec).contains(&LinuxNamespaceType::Pid));
    }

    #[test]
    fn namespaces_per_network_mode() {
        let mut cfg = config();
        let ns = ns_types(&spec(&cfg).unwrap());
        for t in [
            LinuxNamespaceType::Mount,
            LinuxNamespaceType::Pid,
            LinuxNamespaceType::Ipc,
            LinuxNamespaceType::Uts,
            LinuxNamespaceType::Cgroup,
            LinuxNamespaceType::Network,
        ] {
            assert!(ns.contains(&t), "{t:?}");
        }
        assert!(!ns.contains(&LinuxNamespaceType::User));
        cfg.network = NetworkMode::Host;
        let host = spec(&cfg).unwrap();
        let ns = ns_types(&host);
        assert!(!ns.contains(&LinuxNamespaceType::Network));
        // The node's UTS namespace, hence its host name, like Docker's `--network host`.
        assert!(!ns.contains(&LinuxNamespaceType::Uts));
        assert_eq!(host.hostname(), &None);
        assert_eq!(ns.len(), 4);
        // `service:NAME`: the network namespace is the other container's, by path.
        cfg.network = NetworkMode::Join("/proc/42/ns/net".into());
        let spec = spec(&cfg).unwrap();
        let net = spec
            .linux()
            .as_ref()
            .unwrap()
            .namespaces()
            .as_ref()
            .unwrap()
            .iter()
            .find(|n| n.typ() == LinuxNamespaceType::Network)
            .unwrap();
        assert_eq!(net.path().as_deref(), Some(Path::new("/proc/42/ns/net")));
    }

    #[test]
    fn user_namespace_mappings() {
        let mut cfg = config();
        cfg.user_namespace = Some(200_000);
        let spec = spec(&cfg).unwrap();
        assert!(ns_types(&spec).contains(&LinuxNamespaceType::User));
        let linux = spec.linux().as_ref().unwrap();
        for maps in [linux.uid_mappings(), linux.gid_mappings()] {
            let m = maps.as_ref().unwrap()[0];
            assert_eq!(
                (m.container_id(), m.host_id(), m.size()),
                (0, 200_000, 65536)
            );
        }
        // Host network + user namespace: /sys is a read-only bind, not a new sysfs.
        cfg.network = NetworkMode::Host;
        let spec = super::spec(&cfg).unwrap();
        let sys = spec
            .mounts()
            .as_ref()
            .unwrap()
            .iter()
            .find(|m| m.destination() == Path::new("/sys"))
            .unwrap();
        assert_eq!(sys.typ().as_deref(), Some("none"));
    }

    #[test]
    fn resources_to_unified() {
        let mut cfg = config();
        assert!(unified_resources(&cfg).is_empty());
        cfg.resources = Resources {
            memory_max: Some(256 << 20),
            cpu_weight: Some(200),
            cpu_quota_us: Some(50_000),
            cpu_period_us: None,
            pids_max: Some(64),
            io_weight: Some(300),
        };
        let u = unified_resources(&cfg);
        assert_eq!(u["memory.max"], "268435456");
        assert_eq!(u["cpu.weight"], "200");
        assert_eq!(u["cpu.max"], "50000 100000");
        assert_eq!(u["pids.max"], "64");
        assert_eq!(u["io.weight"], "default 300");
        cfg.resources = Resources {
            cpu_period_us: Some(20_000),
            ..Default::default()
        };
        assert_eq!(unified_resources(&cfg)["cpu.max"], "max 20000");
        let spec = spec(&cfg).unwrap();
        let res = spec.linux().as_ref().unwrap().resources().as_ref().unwrap();
        assert_eq!(res.unified().as_ref().unwrap()["cpu.max"], "max 20000");
        assert!(res.memory().is_none() && res.cpu().is_none());
    }

    #[test]
    fn user_mount_options() {
        let mut cfg = config();
        cfg.mounts = vec![
            Mount::Bind {
                source: "/var/lib/keelson/volumes/data".into(),
                target: "/data".into(),
                readonly: false,
            },
            Mount::Bind {
                source: "/etc/ssl".into(),
                target: "/etc/ssl".into(),
                readonly: true,
            },
            Mount::Tmpfs {
                target: "/tmp".into(),
                size_bytes: Some(1 << 20),
                mode: Some(0o1777),
            },
        ];
        let spec = spec(&cfg).unwrap();
        let mounts = spec.mounts().as_ref().unwrap();
        let opts = |d: &str| {
            mounts
                .iter()
                .find(|m| m.destination() == Path::new(d))
                .unwrap()
                .options()
                .clone()
                .unwrap()
        };
        assert_eq!(opts("/data"), ["rbind", "rw", "nosuid", "nodev"]);
        assert_eq!(opts("/etc/ssl"), ["rbind", "ro", "nosuid", "nodev"]);
        assert_eq!(
            opts("/tmp"),
            ["nosuid", "nodev", "size=1048576", "mode=1777"]
        );
        cfg.mounts = vec![Mount::Bind {
            source: "rel".into(),
            target: "/x".into(),
            readonly: true,
        }];
        assert!(super::spec(&cfg).is_err());
    }

    #[test]
    fn spec_roundtrips_through_json() {
        let spec = spec(&config()).unwrap();
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), &spec).unwrap();
        let back = Spec::load(dir.path().join("config.json")).unwrap();
        assert_eq!(back, spec);
    }

    #[test]
    fn resolve_and_preflight() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        fs::create_dir_all(root.join("bin")).unwrap();
        fs::create_dir_all(root.join("usr")).unwrap();
        fs::write(root.join("bin/busybox"), b"").unwrap();
        fs::set_permissions(root.join("bin/busybox"), fs::Permissions::from_mode(0o755)).unwrap();
        std::os::unix::fs::symlink("/bin/busybox", root.join("bin/sh")).unwrap();
        std::os::unix::fs::symlink("../bin", root.join("usr/bin")).unwrap();
        fs::write(root.join("bin/data"), b"").unwrap();
        assert_eq!(
            resolve_in_rootfs(root, "/usr/bin/sh"),
            Some(root.join("bin/busybox"))
        );
        assert_eq!(
            resolve_in_rootfs(root, "/../../bin/sh"),
            Some(root.join("bin/busybox"))
        );
        assert_eq!(resolve_in_rootfs(root, "/bin/nope"), None);

        let mut cfg = config();
        cfg.rootfs = root.to_path_buf();
        cfg.args = vec!["sh".into()];
        preflight(&cfg).unwrap();
        cfg.args = vec!["/usr/bin/sh".into()];
        preflight(&cfg).unwrap();
        cfg.args = vec!["/bin/httpd".into()];
        let err = preflight(&cfg).unwrap_err().to_string();
        assert_eq!(
            err,
            format!(
                "service web: /bin/httpd not found in the image rootfs {}",
                root.display()
            )
        );
        cfg.args = vec!["httpd".into()];
        let err = preflight(&cfg).unwrap_err().to_string();
        assert!(
            err.contains("httpd not found in PATH /usr/bin:/bin"),
            "{err}"
        );
        cfg.args = vec!["/bin/data".into()];
        assert!(preflight(&cfg)
            .unwrap_err()
            .to_string()
            .contains("not an executable"));
        cfg.rootfs = root.join("missing");
        assert!(preflight(&cfg)
            .unwrap_err()
            .to_string()
            .contains("is not accessible"));
    }
}
