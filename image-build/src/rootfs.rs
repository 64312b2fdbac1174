//! The root file system: a staged tree (merged /usr, mount points, Keelson's binaries and
//! os-release) packed into EROFS with every timestamp and owner fixed; and the initial data
//! file system (ext4) that init grows on first boot.

use std::os::unix::fs::{symlink, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result};
use keelson_common::gpt::Guid;
use serde::Serialize;

use crate::config::Compression;
use crate::kmod::{render_load, Closure, ModuleTree};
use crate::util::{run, sha256_file};

/// One file of a built file system, for the SBOM.
#[derive(Debug, Serialize)]
pub struct FileEntry {
    pub path: String,
    pub mode: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub size: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sha256: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub target: Option<String>,
}

/// What goes into the root besides the skeleton: (path in the image, source, mode).
pub type Install = (String, PathBuf, u32);

/// Mount points and directories every Keelson root has, with their modes.
const DIRS: &[(&str, u32)] = &[
    ("dev", 0o755),
    ("efi", 0o700),
    ("etc", 0o755),
    ("proc", 0o555),
    ("run", 0o755),
    ("sys", 0o555),
    ("tmp", 0o1777),
    ("usr", 0o755),
    ("usr/bin", 0o755),
    ("usr/lib", 0o755),
    ("usr/lib/keelson", 0o755),
    ("usr/lib/keelson/images", 0o755),
    ("usr/lib/keelson/services.d", 0o755),
    ("usr/sbin", 0o755),
    ("usr/share", 0o755),
    ("usr/share/keelson", 0o755),
    ("var", 0o755),
];

/// Merged-/usr compatibility links.
const LINKS: &[(&str, &str)] = &[("bin", "usr/bin"), ("lib", "usr/lib"), ("sbin", "usr/sbin")];

pub fn set_mode(path: &Path, mode: u32) -> Result<()> {
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .with_context(|| format!("chmod {}", path.display()))
}

/// Stages the root tree in `dir`. Modes are set explicitly, so the caller's umask never leaks in.
pub fn stage(dir: &Path, os_release: &str, installs: &[Install]) -> Result<()> {
    if dir.exists() {
        std::fs::remove_dir_all(dir)?;
    }
    std::fs::create_dir_all(dir)?;
    set_mode(dir, 0o755)?;
    for (d, mode) in DIRS {
        let p = dir.join(d);
        std::fs::create_dir_all(&p)?;
        set_mode(&p, *mode)?;
    }
    for (link, target) in LINKS {
        symlink(target, dir.join(link))?;
    }
    let osr = dir.join("usr/lib/os-release");
    std::fs::write(&osr, os_release)?;
    set_mode(&osr, 0o644)?;
    for (path, src, mode) in installs {
        let dst = dir.join(path);
        std::fs::copy(src, &dst)
            .with_context(|| format!("installing {} as /{path}", src.display()))?;
        set_mode(&dst, *mode)?;
    }
    Ok(())
}

/// Adds the kernel modules of `closure` under `usr/lib/modules/<release>` with their
/// `modules.dep` and `modules.load`, for stage 2 to load.
pub fn add_modules(dir: &Path, tree: &ModuleTree, closure: &Closure, release: &str) -> Result<()> {
    add_modules_at(
        dir,
        &Path::new("usr/lib/modules").join(release),
        tree,
        closure,
    )
}

/// Adds the kernel modules of `closure` under `base` (relative to `dir`), in the layout of
/// `lib/modules/<release>`: `modules.dep`, `modules.load` and the module files.
pub fn add_modules_at(dir: &Path, base: &Path, tree: &ModuleTree, closure: &Closure) -> Result<()> {
    let mut files: Vec<(PathBuf, Vec<u8>)> = vec![
        (
            base.join("modules.dep"),
            tree.render_dep(closure).into_bytes(),
        ),
        (base.join("modules.load"), render_load(closure).into_bytes()),
    ];
    for m in closure.deps.keys() {
        let rel = tree.file(m).context("module vanished from the tree")?;
        let data =
            std::fs::read(tree.root.join(rel)).with_context(|| format!("reading module {rel}"))?;
        files.push((base.join(rel), data));
    }
    for (path, data) in files {
        // Create each missing parent with an explicit mode: the umask must not reach the image.
        let mut acc = dir.to_owned();
        for part in path.parent().into_iter().flat_map(Path::components) {
            acc.push(part);
            if !acc.exists() {
                std::fs::create_dir(&acc)?;
                set_mode(&acc, 0o755)?;
            }
        }
        let dst = dir.join(&path);
        std::fs::write(&dst, data)?;
        set_mode(&dst, 0o644)?;
    }
    Ok(())
}

/// Files with the same bytes and mode stored once: every copy after the first (in path order)
/// becomes a hard link to it, so EROFS keeps one inode and one copy of the data. The service
/// images each carry their own libc, libm, busybox…; the root is read-only, so a shared inode is
/// never written through. Returns how many files were linked and the bytes saved.
pub fn link_duplicates(dir: &Path) -> Result<(usize, u64)> {
    use std::collections::HashMap;
    use std::os::unix::fs::MetadataExt;

    let mut files = Vec::new();
    let mut stack = vec![dir.to_owned()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d)? {
            let path = entry?.path();
            let meta = std::fs::symlink_metadata(&path)?;
            if meta.is_dir() {
                stack.push(path);
            } else if meta.is_file() && meta.len() > 0 {
                files.push((path, meta));
            }
        }
    }
    files.sort_by(|a, b| a.0.cmp(&b.0));
    // (size, mode) first: only files that could be equal are hashed.
    let mut candidates: HashMap<(u64, u32), Vec<usize>> = HashMap::new();
    for (i, (_, meta)) in files.iter().enumerate() {
        candidates
            .entry((meta.len(), meta.mode()))
            .or_default()
            .push(i);
    }
    let mut first: HashMap<(u64, u32, String), usize> = HashMap::new();
    let mut links = Vec::new();
    let mut groups: Vec<_> = candidates.into_values().filter(|g| g.len() > 1).collect();
    groups.sort();
    for group in groups {
        for i in group {
            let (path, meta) = &files[i];
            let key = (meta.len(), meta.mode(), sha256_file(path)?);
            match first.get(&key) {
                None => {
                    first.insert(key, i);
                }
                Some(&j) => {
                    let target = &files[j];
                    if (target.1.dev(), target.1.ino()) != (meta.dev(), meta.ino()) {
                        links.push((j, i));
                    }
                }
            }
        }
    }
    links.sort();
    let mut saved = 0;
    for &(j, i) in &links {
        let (target, (path, meta)) = (&files[j].0, &files[i]);
        std::fs::remove_file(path).with_context(|| format!("replacing {}", path.display()))?;
        std::fs::hard_link(target, path)
            .with_context(|| format!("linking {} to {}", path.display(), target.display()))?;
        saved += meta.len();
    }
    Ok((links.len(), saved))
}

/// Packs `dir` into an EROFS image at `out`.
pub fn mkfs_erofs(
    dir: &Path,
    out: &Path,
    epoch: u64,
    uuid: Guid,
    compression: Compression,
) -> Result<()> {
    let _ = std::fs::remove_file(out);
    let mut cmd = Command::new("mkfs.erofs");
    if compression == Compression::Lz4hc {
        cmd.args(["-zlz4hc,12", "-C65536"]);
    }
    run(cmd
        .arg("--quiet")
        .arg(format!("-T{epoch}"))
        .arg(format!("-U{uuid}"))
        .arg("--all-root")
        // Host xattrs (SELinux labels and the like) must not leak into the image.
        .arg("-x-1")
        // An exported SOURCE_DATE_EPOCH overrides -T in erofs-utils 1.5 and changes the output.
        .env_remove("SOURCE_DATE_EPOCH")
        .arg(out)
        .arg(dir))
    .context("mkfs.erofs (package erofs-utils)")?;
    Ok(())
}

/// mke2fs settings spelled out, so the host's /etc/mke2fs.conf cannot change the image.
const MKE2FS_CONF: &str = "[defaults]\n\
    base_features = sparse_super,large_file,filetype,resize_inode,dir_index,ext_attr,has_journal,extent,huge_file,flex_bg,metadata_csum,64bit,dir_nlink,extra_isize\n\
    default_mntopts = acl,user_xattr\n\
    blocksize = 4096\n\
    inode_size = 256\n\
    inode_ratio = 16384\n";

/// Makes the initial ext4 data file system (`size` bytes) at `out`.
pub fn mkfs_data(out: &Path, work: &Path, size: u64, epoch: u64, uuid: Guid) -> Result<()> {
    let conf = work.join("mke2fs.conf");
    std::fs::write(&conf, MKE2FS_CONF)?;
    let _ = std::fs::remove_file(out);
    std::fs::File::create(out)?.set_len(size)?;
    run(Command::new("mkfs.ext4")
        .args(["-q", "-F", "-L", "keelson-data", "-U"])
        .arg(uuid.to_string())
        .arg("-E")
        .arg(format!(
            "hash_seed={uuid},root_owner=0:0,lazy_itable_init=0,lazy_journal_init=0,nodiscard"
        ))
        .arg(out)
        .env("MKE2FS_CONFIG", &conf)
        .env("E2FSPROGS_FAKE_TIME", epoch.to_string()))
    .context("mkfs.ext4 (package e2fsprogs)")?;
    Ok(())
}

/// Lists every file under `dir` (sorted) with mode, size and hash, for the SBOM.
pub fn list(dir: &Path) -> Result<Vec<FileEntry>> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_owned()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d)? {
            let path = entry?.path();
            let meta = std::fs::symlink_metadata(&path)?;
            let rel = format!("/{}", path.strip_prefix(dir)?.display());
            let mode = format!("{:o}", meta.permissions().mode());
            let ft = meta.file_type();
            if ft.is_symlink() {
                let target = std::fs::read_link(&path)?.display().to_string();
                out.push(FileEntry {
                    path: rel,
                    mode,
                    size: None,
                    sha256: None,
                    target: Some(target),
                });
            } else if ft.is_dir() {
                out.push(FileEntry {
                    path: rel,
                    mode,
                    size: None,
                    sha256: None,
                    target: None,
                });
                stack.push(path);
            } else {
                out.push(FileEntry {
                    path: rel,
                    mode,
                    size: Some(meta.len()),
                    sha256: Some(sha256_file(&path)?),
                    target: None,
                });
            }
        }
    }
    out.sort_by(|a, b| a.path.cmp(&b.path));
    Ok(out)
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::MetadataExt;

    use super::*;

    #[test]
    fn same_bytes_and_mode_are_stored_once() {
        let dir = tempfile::tempdir().unwrap();
        let put = |path: &str, data: &str, mode: u32| {
            let p = dir.path().join(path);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(&p, data).unwrap();
            set_mode(&p, mode).unwrap();
        };
        put("images/b/lib/libc.so.6", "libc", 0o644);
        put("images/a/lib/libc.so.6", "libc", 0o644);
        put("images/c/lib/libc.so.6", "libc", 0o755);
        put("images/c/etc/other", "other", 0o644);
        put("images/a/etc/empty", "", 0o644);
        put("images/b/etc/empty", "", 0o644);
        let (linked, saved) = link_duplicates(dir.path()).unwrap();
        assert_eq!((linked, saved), (1, 4));
        let ino = |p: &str| std::fs::metadata(dir.path().join(p)).unwrap().ino();
        // The first in path order keeps its inode; the copy becomes a link to it.
        assert_eq!(ino("images/a/lib/libc.so.6"), ino("images/b/lib/libc.so.6"));
        assert_eq!(
            std::fs::metadata(dir.path().join("images/a/lib/libc.so.6"))
                .unwrap()
                .nlink(),
            2
        );
        // Another mode is another file; empty files are left alone.
        assert_ne!(ino("images/a/lib/libc.so.6"), ino("images/c/lib/libc.so.6"));
        assert_ne!(ino("images/a/etc/empty"), ino("images/b/etc/empty"));
        assert_eq!(
            std::fs::read_to_string(dir.path().join("images/b/lib/libc.so.6")).unwrap(),
            "libc"
        );
        // A second pass finds nothing left to do.
        assert_eq!(link_duplicates(dir.path()).unwrap(), (0, 0));
    }
}
