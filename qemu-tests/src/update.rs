//! What the update scenarios (`tests/update.rs`, `tests/delta.rs`) share: a TUF signing key and
//! root made here, images of `configs/test.toml` at chosen versions trusting it, repositories
//! of them (`image-build update add`), and the node side: its update status, its `[update]`
//! table, what every power cut must leave, and a slot partition read back from its disk.
//!
//! ```no_run
//! use qemu_tests::update::Signing;
//!
//! let dir = std::path::Path::new("target/qemu-example");
//! let s = Signing::for_scenario(dir);
//! let n = s.image("0.1.0", None, &[]);
//! let n1 = s.image("0.2.0", None, &[]);
//! let repo = dir.join("repo");
//! s.add(&repo, &n);
//! s.add(&repo, &n1);
//! ```

use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Command;

use keelson_common::gpt::Gpt;
use keelson_common::partitions;
use keelson_common::update::{ChunkList, Manifest};
use serde_json::Value;

use crate::scenario::{image_build, run, Httpd};
use crate::{create_overlay, qemu_img, workspace_root, Guest};

/// The port the scenarios serve repositories on in a guest's namespace (`10.0.2.2:8000` for
/// the guest).
pub const REPO_PORT: u16 = 8000;

/// An update signing key and the TUF root trusting it, with the `image-build` that uses them,
/// and the images of `configs/test.toml` built to trust it.
pub struct Signing {
    pub image_build: PathBuf,
    pub key: PathBuf,
    pub root: PathBuf,
    /// Where [`image`](Self::image) builds (and finds) its images.
    images: PathBuf,
}

/// A services file whose `canary` is never ready: the health gate of a version built with it
/// must fail (the update and fleet scenarios' broken version).
pub const NEVER_READY: &str = r#"version = 1
# Never ready: the health gate of the version carrying it must fail.
[services.canary]
image = "/usr/lib/keelson/images/base"
command = ["sh", "-c", "trap 'exit 0' TERM; while :; do sleep 5 & wait $!; done"]
ready = { tcp = "127.0.0.1:9", interval = "1s" }
critical = true
stop_timeout = "2s"
"#;

/// Set by `./dev test` to a name unique to the run: the scenarios of that run share one key,
/// root and set of built images ([`Signing::for_scenario`]).
pub const RUN_ENV: &str = "KEELSON_TEST_RUN";

impl Signing {
    /// A fresh key and root in `dir` (`test-key.pk8`, `root.json`).
    pub fn new(dir: &Path) -> Signing {
        let ib = image_build().unwrap();
        let key = dir.join("test-key.pk8");
        let root = dir.join("root.json");
        run(Command::new(&ib).args(["update", "keygen"]).arg(&key));
        run(Command::new(&ib)
            .args(["update", "root", "--key"])
            .arg(&key)
            .arg("--out")
            .arg(&root));
        Signing {
            image_build: ib,
            key,
            root,
            images: dir.to_path_buf(),
        }
    }

    /// The signing a scenario uses: inside one `./dev test` run ([`RUN_ENV`] set), one key and
    /// root for every scenario in `target/qemu-signed/<run>`, so that an image they all need
    /// (0.1.0, 0.2.0, the broken 0.3.0) is built once per run, not once per scenario; else
    /// (a scenario run on its own) a fresh key and root in `dir`. Never across runs: the
    /// images are the sources of this run, and `./dev test` removes older runs' directories.
    pub fn for_scenario(dir: &Path) -> Signing {
        let Some(run) = std::env::var_os(RUN_ENV).filter(|r| !r.is_empty()) else {
            return Signing::new(dir);
        };
        let shared = workspace_root().join("target/qemu-signed").join(run);
        std::fs::create_dir_all(&shared).unwrap();
        let _lock = Lock::take(&shared);
        if shared.join("root.json").is_file() {
            Signing {
                image_build: image_build().unwrap(),
                key: shared.join("test-key.pk8"),
                root: shared.join("root.json"),
                images: shared,
            }
        } else {
            let _ = std::fs::remove_file(shared.join("test-key.pk8"));
            Signing::new(&shared)
        }
    }

    /// `configs/test.toml` built as `version`, trusting this root, with `extra_services` (a
    /// services file) and `kernel_args` added: built once per signing (a second call with the
    /// same arguments, from this or another scenario of the run, returns the same directory).
    pub fn image(
        &self,
        version: &str,
        extra_services: Option<&Path>,
        kernel_args: &[&str],
    ) -> PathBuf {
        use sha2::Digest;
        let mut h = sha2::Sha256::new();
        h.update(version.as_bytes());
        if let Some(e) = extra_services {
            h.update(b"\0services\0");
            h.update(std::fs::read(e).unwrap());
        }
        for a in kernel_args {
            h.update(b"\0arg\0");
            h.update(a.as_bytes());
        }
        let key: String = h.finalize()[..6]
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        let name = format!("{version}-{key}");
        let _lock = Lock::take(&self.images);
        let out = self.images.join(&name);
        let done = self.images.join(format!("{name}.complete"));
        if !done.is_file() {
            let mut c = Command::new(&self.image_build);
            c.current_dir(workspace_root())
                .args(["-q", "build", "configs/test.toml", "--version", version])
                .arg("--trusted-root")
                .arg(&self.root)
                .arg("--out")
                .arg(&out);
            if let Some(e) = extra_services {
                c.arg("--extra-services").arg(e);
            }
            for a in kernel_args {
                c.args(["--kernel-arg", a]);
            }
            run(&mut c);
            std::fs::write(&done, "").unwrap();
        }
        out
    }

    /// The extension `config` (a path relative to the workspace, e.g.
    /// `configs/extensions/docker.toml`) built for OS version `os_version`: built once per
    /// signing, like [`image`](Self::image) (the docker scenarios of one run share it).
    pub fn extension(&self, config: &str, os_version: &str) -> PathBuf {
        let stem = Path::new(config)
            .file_stem()
            .and_then(|s| s.to_str())
            .unwrap_or("ext");
        let name = format!("ext-{stem}-{os_version}");
        let _lock = Lock::take(&self.images);
        let out = self.images.join(&name);
        let done = self.images.join(format!("{name}.complete"));
        if !done.is_file() {
            let _ = std::fs::remove_dir_all(&out);
            run(Command::new(&self.image_build)
                .current_dir(workspace_root())
                .args([
                    "-q",
                    "extension",
                    config,
                    "--os-version",
                    os_version,
                    "--out",
                ])
                .arg(&out));
            std::fs::write(&done, "").unwrap();
        }
        out
    }

    /// Adds the image in `img` to the repository `repo` (created if new), signed with this key,
    /// with a root patch against the previous version as releases have (made at
    /// [`TEST_PATCH_LEVEL`]).
    pub fn add(&self, repo: &Path, img: &Path) {
        self.add_with_extensions(repo, img, &[]);
    }

    /// [`add`](Self::add), listing the extensions built in `extensions` for that version.
    pub fn add_with_extensions(&self, repo: &Path, img: &Path, extensions: &[&Path]) {
        self.add_with(repo, img, extensions, &["--patch-level", TEST_PATCH_LEVEL]);
    }

    /// Adds with these `image-build update add` options and its defaults otherwise (a release's
    /// root patch level; `--root-patches 0`: a repository whose nodes take the chunks).
    pub fn add_with(&self, repo: &Path, img: &Path, extensions: &[&Path], options: &[&str]) {
        let mut c = Command::new(&self.image_build);
        c.args(["-q", "update", "add", "--repo"])
            .arg(repo)
            .arg("--root")
            .arg(&self.root)
            .arg("--key")
            .arg(&self.key)
            .args(options);
        for e in extensions {
            c.arg("--extension").arg(e);
        }
        c.arg(img);
        run(&mut c);
    }
}

/// The zstd level of the root patches scenarios publish: level 3 makes one in under a second,
/// where releases' default (19, which `bench-update` measures) takes about 20 s of CPU; the
/// scenarios check what a patch builds, not how small it is.
pub const TEST_PATCH_LEVEL: &str = "3";

/// An exclusive `flock` on `dir/.lock`, held until dropped: scenarios of one run may build
/// into the shared directory at once.
struct Lock {
    _file: std::fs::File,
}

impl Lock {
    fn take(dir: &Path) -> Lock {
        use std::os::fd::AsRawFd;
        let file = std::fs::File::create(dir.join(".lock")).unwrap();
        // SAFETY: flock on a descriptor this function owns; no memory is involved.
        let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) };
        assert_eq!(
            rc,
            0,
            "flock {}: {}",
            dir.display(),
            std::io::Error::last_os_error()
        );
        Lock { _file: file }
    }
}

/// `dir/name.qcow2`: a fresh 2 GiB overlay of the image in `image`'s disk (a first boot).
pub fn fresh_disk(image: &Path, dir: &Path, name: &str) -> PathBuf {
    let disk = dir.join(format!("{name}.qcow2"));
    let _ = std::fs::remove_file(&disk);
    create_overlay(&image.join("disk.raw"), &disk, Some(2 << 30)).unwrap();
    disk
}

/// busybox httpd serving a repository in the guest's namespace (10.0.2.2 for the guest).
pub fn serve(g: &Guest, repo: &Path) -> Httpd {
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, REPO_PORT));
    Httpd::serve(g.netns(), addr, repo).unwrap()
}

/// `keelctl -o json update status`.
pub fn status(g: &Guest) -> Value {
    let out = g.sh("keelctl -o json update status");
    serde_json::from_str(out.trim()).unwrap_or_else(|e| panic!("update status: {e}: {out}"))
}

/// The node's update policy (the user's config on /var, which every version reads), with
/// `extra` lines in the `[update]` table.
pub fn configure_with(g: &Guest, extra: &str) {
    let out = g.sh(&format!(
            "cat > /tmp/update.toml <<'EOF'\nversion = 1\n[update]\nrepository = \"http://10.0.2.2:{REPO_PORT}/\"\nhealth_timeout = \"40s\"\nboot_tries = 2\n{extra}EOF\nkeelctl apply /tmp/update.toml"
        ),
    );
    assert!(!out.contains("error"), "{out}");
}

/// What every power cut must leave (read from PID 1's root: the shell is a container): the node
/// up on `slot` running `version`, assessed good, and /var as it was: the marker file the test
/// wrote to the volume, the user config the agent reads, the DHCP lease.
pub fn assert_intact(g: &Guest, version: &str, slot: &str) {
    let s = status(g);
    assert_eq!(s["version"], version, "{s}");
    assert_eq!(s["slot"], slot, "{s}");
    assert_eq!(s["assessment"], "good", "{s}");
    assert_eq!(g.sh("cat /flush/marker").trim(), "kept");
    let config = g.sh("cat /proc/1/root/var/lib/keelson/services.toml");
    assert!(
        config.contains("[update]") && config.contains("boot_tries = 2"),
        "the applied config did not survive: {config}"
    );
    let lease = g.sh("cat /proc/1/root/var/lib/keelson/network/lease-*.json");
    let lease: Value = serde_json::from_str(lease.trim())
        .unwrap_or_else(|e| panic!("the DHCP lease did not survive: {e}: {lease}"));
    assert!(lease["address"].is_string(), "{lease}");
}

/// A shell script for the test shell: starts `keelctl update apply --no-wait` and polls the
/// agent until its phase is `phase`; prints `reached PHASE` and the status it saw then (its
/// progress), or `missed PHASE`.
pub fn apply_until_phase(phase: &str) -> String {
    format!(
        "keelctl update apply --no-wait >/dev/null; \
         i=0; until s=$(keelctl -o json update status) && echo \"$s\" | grep -q '\"{phase}\"'; do \
           i=$((i+1)); [ $i -lt 5000 ] || {{ echo missed {phase}; exit 1; }}; done; echo reached {phase}; echo \"$s\""
    )
}

/// The repository's signed manifest (read from its targets directory, as published).
pub fn manifest(repo: &Path) -> Manifest {
    serde_json::from_slice(&target(repo, keelson_common::update::MANIFEST_TARGET)).unwrap()
}

/// A target's bytes as published in `repo` (consistent snapshots name the file
/// `<sha256>.<name>`; the newest is taken).
pub fn target(repo: &Path, name: &str) -> Vec<u8> {
    std::fs::read(target_path(repo, name)).unwrap()
}

/// Where `name` is published in `repo`.
pub fn target_path(repo: &Path, name: &str) -> PathBuf {
    let dir = repo.join("targets");
    let plain = dir.join(name);
    if plain.is_file() {
        return plain;
    }
    let suffix = format!(".{name}");
    std::fs::read_dir(&dir)
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().ends_with(&suffix))
        .max_by_key(|e| e.metadata().and_then(|m| m.modified()).ok())
        .map(|e| e.path())
        .unwrap_or_else(|| panic!("{name} is not published in {}", dir.display()))
}

/// A version's chunk list as `repo` publishes it.
pub fn chunk_list(repo: &Path, version: &str) -> ChunkList {
    let m = manifest(repo);
    let p = m
        .updates
        .iter()
        .find(|p| p.version == version)
        .unwrap_or_else(|| panic!("{version} is not in {}", repo.display()));
    let c = p.chunks.as_ref().expect("a chunk list");
    serde_json::from_slice(&target(repo, &c.target)).unwrap()
}

/// The sha256 of every chunk of `to`'s root that `from`'s root does not have (what a node
/// running `from` downloads), in list order.
pub fn new_chunks(repo: &Path, from: &str, to: &str) -> Vec<String> {
    let have: std::collections::HashSet<String> = chunk_list(repo, from)
        .chunks
        .into_iter()
        .map(|c| c.sha256)
        .collect();
    let mut out = Vec::new();
    for c in chunk_list(repo, to).chunks {
        if !have.contains(&c.sha256) && !out.contains(&c.sha256) {
            out.push(c.sha256);
        }
    }
    out
}

/// Of `shas` (chunks of `to`'s root that a node lacks, from [`new_chunks`]), those a slot
/// that held the root image `held` already has at their place in `to`'s root: the agent hashes
/// the bytes at each missing chunk's offset in the slot it writes and keeps what matches
/// instead of downloading it (`update-delta-resumed`). Past the end of `held` the slot holds
/// zeros (image-build's disks are sparse there).
pub fn chunks_in_place(repo: &Path, to: &str, shas: &[String], held: &Path) -> Vec<String> {
    use sha2::{Digest, Sha256};
    let mut held = std::fs::read(held).unwrap();
    let list = chunk_list(repo, to);
    held.resize(held.len().max(list.size as usize), 0);
    shas.iter()
        .filter(|sha| {
            let c = list.chunks.iter().find(|c| &c.sha256 == *sha).unwrap();
            let (start, end) = (c.offset as usize, (c.offset + c.length) as usize);
            hex::encode(Sha256::digest(&held[start..end])) == **sha
        })
        .cloned()
        .collect()
}

/// The first `len` bytes of the partition `label` (of GPT type `type_guid`) on `disk` (a qcow2
/// overlay of `image`'s disk, no QEMU running on it), read with `qemu-img dd`.
pub fn read_partition(
    image: &Path,
    disk: &Path,
    type_guid: keelson_common::gpt::Guid,
    label: &str,
    len: u64,
    scratch: &Path,
) -> Vec<u8> {
    let gpt = Gpt::read(&mut std::fs::File::open(image.join("disk.raw")).unwrap()).unwrap();
    let (_, part) = gpt
        .find(type_guid, label)
        .unwrap_or_else(|| panic!("no partition {label} on {}", image.display()));
    let offset = part.first_lba * 512;
    assert!(
        offset % 4096 == 0 && len % 4096 == 0,
        "{label}: {offset}+{len} is not 4 KiB aligned"
    );
    let out = scratch.join(format!("{label}.raw"));
    let _ = std::fs::remove_file(&out);
    // qemu-img dd counts `count` from the start of the input, not from `skip`.
    run(Command::new(qemu_img().unwrap())
        .args(["dd", "-f", "qcow2", "-O", "raw", "bs=4096"])
        .arg(format!("skip={}", offset / 4096))
        .arg(format!("count={}", (offset + len) / 4096))
        .arg(format!("if={}", disk.display()))
        .arg(format!("of={}", out.display())));
    let bytes = std::fs::read(&out).unwrap();
    let _ = std::fs::remove_file(&out);
    assert_eq!(
        bytes.len() as u64,
        len,
        "qemu-img dd read {} bytes of {label}, not {len}",
        bytes.len()
    );
    bytes
}

/// Asserts that slot `slot`'s root and verity partitions on `disk` hold exactly the root image
/// and verity tree of the image built in `built` (what a full update writes), byte for byte.
pub fn assert_slot_holds(image: &Path, disk: &Path, slot: partitions::Slot, built: &Path) {
    let scratch = disk.parent().unwrap();
    for (type_guid, label, file) in [
        (
            partitions::ROOT_X86_64_TYPE,
            slot.root_label(),
            "root.erofs",
        ),
        (
            partitions::ROOT_X86_64_VERITY_TYPE,
            slot.verity_label(),
            "root.verity",
        ),
    ] {
        let want = std::fs::read(built.join(file)).unwrap();
        let got = read_partition(image, disk, type_guid, &label, want.len() as u64, scratch);
        assert!(
            got == want,
            "partition {label} does not hold {}/{file} byte for byte (first difference at byte {})",
            built.display(),
            got.iter()
                .zip(&want)
                .position(|(a, b)| a != b)
                .unwrap_or(got.len().min(want.len()))
        );
        eprintln!(
            "{label}: the {} bytes of {}/{file}, byte for byte",
            want.len(),
            built.display()
        );
    }
}
