//! The one way Keelson replaces a file so that a power cut leaves the old content or the new
//! one, never a torn, empty or foreign file.
//!
//! **POSIX file systems** (ext4 /var, tmpfs /run): [`replace`], [`replace_with`] and
//! [`Staged`] (for writers that stream, e.g. downloads):
//! 1. open the directory once and work relative to that descriptor;
//! 2. create a temporary sibling `.<name>.<16 hex>.tmp` with `O_CREAT|O_EXCL|O_NOFOLLOW`: a
//!    planted file or symbolic link of that name is refused (never followed, never truncated),
//!    and the random part means a guessed name or a leftover of an earlier crash never collides;
//! 3. write, set the mode (and owner) on the descriptor, `fsync` the file;
//! 4. `rename` it over the target (a symbolic link at the target is replaced, not followed);
//! 5. `fsync` the directory, which makes the rename itself durable.
//!
//! A failure at any step removes the temporary file and leaves the target as it was.
//! [`commit`] is steps 3–5 for a file written elsewhere in the same directory (a verified
//! download moved into a store).
//!
//! **In place** ([`rewrite_in_place`]): files on /run that services bind-mount (resolv.conf,
//! the bridge's hosts file) must keep their inode, so they cannot be renamed over; they are
//! rewritten from offset 0 and then cut to length, so a reader never sees an empty file.
//!
//! **vfat** ([`vfat`]): the ESP has its own rules, kept in that module.
//!
//! Every `fsync` the helpers issue is counted ([`syncs`]) so benchmarks can say what a change
//! costs.

use std::ffi::{CString, OsStr, OsString};
use std::fs::File;
use std::io::{self, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

static SYNCS: AtomicU64 = AtomicU64::new(0);
static COUNTER: AtomicU64 = AtomicU64::new(0);

/// How many `fsync`s the helpers of this module issued in this process.
pub fn syncs() -> u64 {
    SYNCS.load(Ordering::Relaxed)
}

/// The step of a durable write that failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    CreateDir,
    OpenDir,
    CreateTemp,
    Write,
    Permissions,
    Sync,
    Rename,
    SyncDir,
    Remove,
}

impl Step {
    fn text(self) -> &'static str {
        match self {
            Step::CreateDir => "creating the directory of",
            Step::OpenDir => "opening the directory of",
            Step::CreateTemp => "creating a temporary file for",
            Step::Write => "writing",
            Step::Permissions => "setting the mode or owner of",
            Step::Sync => "syncing",
            Step::Rename => "renaming into place",
            Step::SyncDir => "syncing the directory of",
            Step::Remove => "removing",
        }
    }
}

/// A durable write that failed: which step, on which file.
#[derive(Debug, thiserror::Error)]
#[error("{} {}", step.text(), path.display())]
pub struct Error {
    pub step: Step,
    pub path: PathBuf,
    #[source]
    pub source: io::Error,
}

impl Error {
    fn new(step: Step, path: &Path, source: io::Error) -> Self {
        Error {
            step,
            path: path.to_path_buf(),
            source,
        }
    }
}

/// Keeps the OS error's kind so `?` into an `io::Result` still lets callers match on it, and
/// says the cause in the text (callers print io errors with `{}`).
impl From<Error> for io::Error {
    fn from(e: Error) -> io::Error {
        io::Error::new(e.source.kind(), format!("{e}: {}", e.source))
    }
}

/// What the replaced file looks like besides its content.
#[derive(Debug, Clone, Copy)]
pub struct Options {
    /// Its permission bits (set on the descriptor, so the umask does not apply).
    pub mode: u32,
    /// Its owner and group (set on the descriptor, before the rename).
    pub owner: Option<(u32, u32)>,
    /// Create missing parent directories first.
    pub create_dirs: bool,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            mode: 0o644,
            owner: None,
            create_dirs: true,
        }
    }
}

impl Options {
    /// Default options with `mode`.
    pub fn mode(mode: u32) -> Self {
        Options {
            mode,
            ..Options::default()
        }
    }
}

/// Replaces `path` with `data` (mode 0644, parents created).
pub fn replace(path: &Path, data: &[u8]) -> Result<(), Error> {
    replace_with(path, &Options::default(), |f| f.write_all(data))
}

/// Replaces `path` with what `fill` writes into the temporary file.
pub fn replace_with(
    path: &Path,
    opts: &Options,
    fill: impl FnOnce(&mut File) -> io::Result<()>,
) -> Result<(), Error> {
    let mut staged = Staged::create(path, opts)?;
    fill(staged.file()).map_err(|e| Error::new(Step::Write, path, e))?;
    staged.commit()
}

/// A temporary file beside its target, committed with [`Staged::commit`] or removed on drop.
#[derive(Debug)]
pub struct Staged {
    dir: OwnedFd,
    temp: OsString,
    target: PathBuf,
    name: OsString,
    file: File,
    opts: Options,
    committed: bool,
}

impl Staged {
    /// Creates the temporary file for `path` (see the module's steps 1 and 2).
    pub fn create(path: &Path, opts: &Options) -> Result<Staged, Error> {
        let (dir_path, name) = split(path)?;
        if opts.create_dirs {
            std::fs::create_dir_all(dir_path).map_err(|e| Error::new(Step::CreateDir, path, e))?;
        }
        let dir = open_dir(dir_path).map_err(|e| Error::new(Step::OpenDir, path, e))?;
        let temp = temp_name(name);
        Self::create_named(dir, temp, path, name, opts)
    }

    fn create_named(
        dir: OwnedFd,
        temp: OsString,
        path: &Path,
        name: &OsStr,
        opts: &Options,
    ) -> Result<Staged, Error> {
        let file = openat_excl(&dir, &temp, opts.mode)
            .map_err(|e| Error::new(Step::CreateTemp, &path.with_file_name(&temp), e))?;
        Ok(Staged {
            dir,
            temp,
            target: path.to_path_buf(),
            name: name.to_os_string(),
            file,
            opts: *opts,
            committed: false,
        })
    }

    /// The open temporary file.
    pub fn file(&mut self) -> &mut File {
        &mut self.file
    }

    /// The temporary file's path (to read it back before committing).
    pub fn temp_path(&self) -> PathBuf {
        self.target.with_file_name(&self.temp)
    }

    /// Mode and owner on the descriptor, fsync, rename over the target, fsync the directory.
    pub fn commit(mut self) -> Result<(), Error> {
        let path = self.target.clone();
        let step = |s: Step| {
            let path = path.clone();
            move |e| Error::new(s, &path, e)
        };
        self.file
            .set_permissions(std::fs::Permissions::from_mode(self.opts.mode))
            .map_err(step(Step::Permissions))?;
        if let Some((uid, gid)) = self.opts.owner {
            std::os::unix::fs::fchown(&self.file, Some(uid), Some(gid))
                .map_err(step(Step::Permissions))?;
        }
        fsync(self.file.as_raw_fd()).map_err(step(Step::Sync))?;
        renameat(&self.dir, &self.temp, &self.name).map_err(step(Step::Rename))?;
        self.committed = true;
        fsync(self.dir.as_raw_fd()).map_err(step(Step::SyncDir))
    }
}

impl Drop for Staged {
    fn drop(&mut self) {
        if !self.committed {
            let _ = unlinkat(&self.dir, &self.temp);
        }
    }
}

/// Moves `staged` (a complete file, e.g. a verified download) over `target` durably: fsync the
/// file, rename, fsync the target's directory (and the staged file's, when it is another one on
/// the same file system, so the old entry does not come back either).
pub fn commit(staged: &Path, target: &Path) -> Result<(), Error> {
    move_synced(staged, target)?;
    let ((to_dir, _), (from_dir, _)) = (split(target)?, split(staged)?);
    sync_dir(to_dir)?;
    if from_dir != to_dir {
        sync_dir(from_dir)?;
    }
    Ok(())
}

/// [`commit`] without its directory fsyncs: fsync the file, rename it over `target`. For many
/// files moved between the same two directories at once (a pull's blobs): the caller fsyncs
/// each directory once ([`sync_dir`]) before anything relies on the new names. Until then a
/// crash leaves each file whole, under its old name or its new one (a rename is one journal
/// transaction); never a new name on bytes that did not reach the disk.
pub fn move_synced(staged: &Path, target: &Path) -> Result<(), Error> {
    let (to_dir_path, to) = split(target)?;
    let (from_dir_path, from) = split(staged)?;
    let to_dir = open_dir(to_dir_path).map_err(|e| Error::new(Step::OpenDir, target, e))?;
    let from_dir = open_dir(from_dir_path).map_err(|e| Error::new(Step::OpenDir, staged, e))?;
    let f = openat_read(&from_dir, from).map_err(|e| Error::new(Step::Sync, staged, e))?;
    fsync(f.as_raw_fd()).map_err(|e| Error::new(Step::Sync, staged, e))?;
    renameat2(&from_dir, from, &to_dir, to).map_err(|e| Error::new(Step::Rename, target, e))
}

/// fsyncs the directory `dir` (its entries: names renamed into or out of it).
pub fn sync_dir(dir: &Path) -> Result<(), Error> {
    let d = open_dir(dir).map_err(|e| Error::new(Step::OpenDir, dir, e))?;
    fsync(d.as_raw_fd()).map_err(|e| Error::new(Step::SyncDir, dir, e))
}

/// Rewrites `path` in place (same inode) for files on /run that services bind-mount: the new
/// content is written from offset 0 and the file then cut to its length, so a concurrent
/// reader sees the old content, the new one, or (for the instant of the copy) the new content
/// followed by the old tail, never an empty file. Nothing is written when the content is
/// already `data`. This is not a durable write: use it only where the file dies with the boot.
pub fn rewrite_in_place(path: &Path, data: &[u8]) -> Result<(), Error> {
    use std::io::{Read, Seek};
    use std::os::unix::fs::{FileExt, OpenOptionsExt};
    let (dir_path, _) = split(path)?;
    std::fs::create_dir_all(dir_path).map_err(|e| Error::new(Step::CreateDir, path, e))?;
    let mut f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .mode(0o644)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(path)
        .map_err(|e| Error::new(Step::CreateTemp, path, e))?;
    let mut old = Vec::new();
    f.read_to_end(&mut old)
        .map_err(|e| Error::new(Step::Write, path, e))?;
    if old == data {
        return Ok(());
    }
    f.rewind().map_err(|e| Error::new(Step::Write, path, e))?;
    f.write_all_at(data, 0)
        .and_then(|()| f.set_len(data.len() as u64))
        .map_err(|e| Error::new(Step::Write, path, e))
}

/// The ESP (vfat). Its rules differ from POSIX file systems:
/// - no symbolic links, owners or modes: nothing to refuse or set;
/// - a rename is durable only once the *file* is fsynced after it: vfat keeps a file's size and
///   first cluster in its directory entry, written back with the file's inode, so a directory
///   fsync alone persists a 0-byte entry (the power-cut scenario caught exactly that);
/// - the FAT and other directories are separate buffers, so every change ends with `syncfs`;
/// - temporary names are fixed by the caller (e.g. `.keelson_<v>.efi.part`) and a leftover of a
///   cut is removed before it is created again: the ESP is small, and a random name per attempt
///   would fill it with the leftovers of cut downloads.
pub mod vfat {
    use super::*;

    /// Creates `dir/temp` for writing, removing a leftover of an interrupted attempt first.
    pub fn create(dir: &Path, temp: &str) -> Result<File, Error> {
        let path = dir.join(temp);
        std::fs::create_dir_all(dir).map_err(|e| Error::new(Step::CreateDir, &path, e))?;
        let d = open_dir(dir).map_err(|e| Error::new(Step::OpenDir, &path, e))?;
        match unlinkat(&d, OsStr::new(temp)) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(Error::new(Step::Remove, &path, e)),
        }
        openat_excl(&d, OsStr::new(temp), 0o644).map_err(|e| Error::new(Step::CreateTemp, &path, e))
    }

    /// Renames `dir/from` to `dir/to` durably: rename, fsync the file, syncfs.
    pub fn rename(dir: &Path, from: &str, to: &str) -> Result<(), Error> {
        let target = dir.join(to);
        let d = open_dir(dir).map_err(|e| Error::new(Step::OpenDir, &target, e))?;
        renameat(&d, OsStr::new(from), OsStr::new(to))
            .map_err(|e| Error::new(Step::Rename, &target, e))?;
        let f = openat_read(&d, OsStr::new(to)).map_err(|e| Error::new(Step::Sync, &target, e))?;
        fsync(f.as_raw_fd()).map_err(|e| Error::new(Step::Sync, &target, e))?;
        sync_fs(&d).map_err(|e| Error::new(Step::SyncDir, &target, e))
    }

    /// Replaces `dir/name` with `data`: write `.<name>.part`, fsync, [`rename`].
    pub fn replace(dir: &Path, name: &str, data: &[u8]) -> Result<(), Error> {
        let temp = format!(".{name}.part");
        let mut f = create(dir, &temp)?;
        f.write_all(data)
            .and_then(|()| fsync(f.as_raw_fd()))
            .map_err(|e| Error::new(Step::Write, &dir.join(&temp), e))?;
        drop(f);
        rename(dir, &temp, name)
    }

    /// Removes `dir/name` durably (absent is fine): unlink, fsync the directory, syncfs.
    pub fn remove(dir: &Path, name: &str) -> Result<(), Error> {
        let path = dir.join(name);
        let d = open_dir(dir).map_err(|e| Error::new(Step::OpenDir, &path, e))?;
        match unlinkat(&d, OsStr::new(name)) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(Error::new(Step::Remove, &path, e)),
        }
        sync_dir(dir)
    }

    /// fsyncs `dir`, then its whole file system.
    pub fn sync_dir(dir: &Path) -> Result<(), Error> {
        let d = open_dir(dir).map_err(|e| Error::new(Step::OpenDir, dir, e))?;
        fsync(d.as_raw_fd())
            .and_then(|()| sync_fs(&d))
            .map_err(|e| Error::new(Step::SyncDir, dir, e))
    }

    fn sync_fs(d: &OwnedFd) -> io::Result<()> {
        SYNCS.fetch_add(1, Ordering::Relaxed);
        // SAFETY: syncfs on a descriptor we own; no memory is passed.
        if unsafe { libc::syncfs(d.as_raw_fd()) } != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }
}

/// Flushes the whole file system `dir` is on (`syncfs`): for the moments everything written
/// before must survive a power cut, not just one replaced file.
pub fn sync_file_system(dir: &Path) -> Result<(), Error> {
    let d = open_dir(dir).map_err(|e| Error::new(Step::OpenDir, dir, e))?;
    SYNCS.fetch_add(1, Ordering::Relaxed);
    // SAFETY: syncfs on a descriptor we own; no memory is passed.
    if unsafe { libc::syncfs(d.as_raw_fd()) } != 0 {
        return Err(Error::new(Step::SyncDir, dir, io::Error::last_os_error()));
    }
    Ok(())
}

fn dir_or_dot(p: &Path) -> &Path {
    if p.as_os_str().is_empty() {
        Path::new(".")
    } else {
        p
    }
}

fn split(path: &Path) -> Result<(&Path, &OsStr), Error> {
    let name = path.file_name().ok_or_else(|| {
        Error::new(
            Step::CreateTemp,
            path,
            io::Error::new(io::ErrorKind::InvalidInput, "no file name"),
        )
    })?;
    Ok((dir_or_dot(path.parent().unwrap_or(Path::new("/"))), name))
}

/// `.<name>.<16 hex>.tmp`: random (getrandom, else pid, a counter and the clock mixed) so it can
/// neither be guessed nor collide with a leftover; long names are shortened to fit NAME_MAX.
fn temp_name(name: &OsStr) -> OsString {
    let mut r = [0u8; 8];
    // SAFETY: getrandom writes at most r.len() bytes into r, which we own.
    let n = unsafe { libc::getrandom(r.as_mut_ptr().cast(), r.len(), libc::GRND_NONBLOCK) };
    let rand = if n == r.len() as isize {
        u64::from_ne_bytes(r)
    } else {
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0);
        let c = COUNTER.fetch_add(1, Ordering::Relaxed);
        (u64::from(std::process::id()) << 40)
            ^ c.rotate_left(20)
            ^ t.wrapping_mul(0x9e37_79b9_7f4a_7c15)
    };
    let bytes = name.as_bytes();
    let keep = &bytes[..bytes.len().min(200)];
    let mut t = OsString::from(".");
    t.push(OsStr::from_bytes(keep));
    t.push(format!(".{rand:016x}.tmp"));
    t
}

fn cstr(name: &OsStr) -> io::Result<CString> {
    CString::new(name.as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "NUL in a file name"))
}

fn open_dir(dir: &Path) -> io::Result<OwnedFd> {
    use std::os::unix::fs::OpenOptionsExt;
    let f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECTORY | libc::O_CLOEXEC)
        .open(dir)?;
    Ok(f.into())
}

fn openat_excl(dir: &OwnedFd, name: &OsStr, mode: u32) -> io::Result<File> {
    let c = cstr(name)?;
    let flags = libc::O_WRONLY | libc::O_CREAT | libc::O_EXCL | libc::O_NOFOLLOW | libc::O_CLOEXEC;
    // SAFETY: `c` is a valid NUL-terminated string and `dir` an open descriptor we own.
    let fd = unsafe { libc::openat(dir.as_raw_fd(), c.as_ptr(), flags, mode as libc::c_uint) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: openat returned a new descriptor that nothing else owns.
    Ok(unsafe { File::from_raw_fd(fd) })
}

fn openat_read(dir: &OwnedFd, name: &OsStr) -> io::Result<File> {
    let c = cstr(name)?;
    let flags = libc::O_RDONLY | libc::O_NOFOLLOW | libc::O_CLOEXEC;
    // SAFETY: `c` is a valid NUL-terminated string and `dir` an open descriptor we own.
    let fd = unsafe { libc::openat(dir.as_raw_fd(), c.as_ptr(), flags) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: openat returned a new descriptor that nothing else owns.
    Ok(unsafe { File::from_raw_fd(fd) })
}

fn renameat(dir: &OwnedFd, from: &OsStr, to: &OsStr) -> io::Result<()> {
    renameat2(dir, from, dir, to)
}

fn renameat2(from_dir: &OwnedFd, from: &OsStr, to_dir: &OwnedFd, to: &OsStr) -> io::Result<()> {
    let (f, t) = (cstr(from)?, cstr(to)?);
    let (fd, td) = (from_dir.as_raw_fd(), to_dir.as_raw_fd());
    // SAFETY: both names are valid NUL-terminated strings, both descriptors open directories.
    if unsafe { libc::renameat(fd, f.as_ptr(), td, t.as_ptr()) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

fn unlinkat(dir: &OwnedFd, name: &OsStr) -> io::Result<()> {
    let c = cstr(name)?;
    // SAFETY: `c` is a valid NUL-terminated string, `dir` an open directory descriptor; unlinkat
    // removes a symbolic link itself, never its target.
    if unsafe { libc::unlinkat(dir.as_raw_fd(), c.as_ptr(), 0) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

fn fsync(fd: std::os::fd::RawFd) -> io::Result<()> {
    SYNCS.fetch_add(1, Ordering::Relaxed);
    // SAFETY: fsync on a descriptor the caller holds open; no memory is passed.
    if unsafe { libc::fsync(fd) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    fn tmp() -> PathBuf {
        let d = std::env::temp_dir().join(format!(
            "keelson-durable-{}-{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    fn entries(d: &Path) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(d)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    }

    #[test]
    fn replaces_with_mode_and_leaves_no_temp() {
        let d = tmp();
        let p = d.join("state.json");
        std::fs::write(&p, "old").unwrap();
        replace_with(&p, &Options::mode(0o600), |f| f.write_all(b"new")).unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"new");
        let mode = std::fs::metadata(&p).unwrap().permissions().mode() & 0o7777;
        assert_eq!(mode, 0o600);
        assert_eq!(entries(&d), ["state.json"]);
        // Parents are created.
        replace(&d.join("a/b/c"), b"x").unwrap();
        assert_eq!(std::fs::read(d.join("a/b/c")).unwrap(), b"x");
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn a_planted_temp_symlink_is_refused_and_its_target_unchanged() {
        let d = tmp();
        let p = d.join("lease.json");
        std::fs::write(&p, "old lease").unwrap();
        let victim = d.join("victim");
        std::fs::write(&victim, "precious").unwrap();
        // The name the helper will use, planted as a link to the victim.
        let temp = OsString::from(".lease.json.00000000deadbeef.tmp");
        symlink(&victim, d.join(&temp)).unwrap();
        let dir = open_dir(&d).unwrap();
        let e = Staged::create_named(dir, temp, &p, OsStr::new("lease.json"), &Options::default())
            .unwrap_err();
        assert_eq!(e.step, Step::CreateTemp);
        assert_eq!(e.source.kind(), io::ErrorKind::AlreadyExists, "{e}");
        assert!(
            e.to_string().contains(".lease.json.00000000deadbeef.tmp"),
            "{e}"
        );
        assert_eq!(std::fs::read(&victim).unwrap(), b"precious");
        assert_eq!(std::fs::read(&p).unwrap(), b"old lease");
        // The link is still a link (the refused create removed nothing that was not its own).
        assert!(
            std::fs::symlink_metadata(d.join(".lease.json.00000000deadbeef.tmp"))
                .unwrap()
                .file_type()
                .is_symlink()
        );
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn a_planted_legacy_new_symlink_is_never_followed() {
        // The old helpers wrote `<file>.new` with File::create, which follows a link there.
        let d = tmp();
        let p = d.join("services.toml");
        std::fs::write(&p, "old").unwrap();
        let victim = d.join("victim");
        std::fs::write(&victim, "precious").unwrap();
        symlink(&victim, d.join("services.toml.new")).unwrap();
        symlink(&victim, d.join(".services.toml.tmp")).unwrap();
        replace(&p, b"new").unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"new");
        assert_eq!(std::fs::read(&victim).unwrap(), b"precious");
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn a_symlink_at_the_target_is_replaced_not_followed() {
        let d = tmp();
        let victim = d.join("victim");
        std::fs::write(&victim, "precious").unwrap();
        let p = d.join("hostname");
        symlink(&victim, &p).unwrap();
        replace(&p, b"node\n").unwrap();
        assert!(std::fs::symlink_metadata(&p).unwrap().is_file());
        assert_eq!(std::fs::read(&victim).unwrap(), b"precious");
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn a_failed_write_leaves_the_old_file_whole_and_no_temp() {
        let d = tmp();
        let p = d.join("state.json");
        std::fs::write(&p, "old state").unwrap();
        let e = replace_with(&p, &Options::default(), |f| {
            f.write_all(b"half")?;
            Err(io::Error::other("disk on fire"))
        })
        .unwrap_err();
        assert_eq!(e.step, Step::Write);
        assert_eq!(std::fs::read(&p).unwrap(), b"old state");
        assert_eq!(entries(&d), ["state.json"]);
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn a_full_file_system_leaves_the_old_file_whole() {
        // A real ENOSPC from a 64 KiB tmpfs (mounting needs root, as `./dev test` runs).
        assert!(
            nix_is_root(),
            "this test needs root (./dev test runs it as root)"
        );
        let d = tmp();
        let c = CString::new(d.as_os_str().as_bytes()).unwrap();
        // SAFETY: valid NUL-terminated strings; mounting a fresh tmpfs on our own temp dir.
        let r = unsafe {
            libc::mount(
                c"tmpfs".as_ptr(),
                c.as_ptr(),
                c"tmpfs".as_ptr(),
                0,
                c"size=64k".as_ptr().cast(),
            )
        };
        assert_eq!(r, 0, "mount: {}", io::Error::last_os_error());
        let p = d.join("services.toml");
        replace(&p, b"old config").unwrap();
        let e = replace(&p, &vec![b'x'; 1 << 20]).unwrap_err();
        let kind = e.source.raw_os_error();
        assert_eq!(std::fs::read(&p).unwrap(), b"old config");
        assert_eq!(entries(&d), ["services.toml"]);
        // SAFETY: unmounting the tmpfs mounted above.
        unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
        assert_eq!(kind, Some(libc::ENOSPC), "{e}");
        std::fs::remove_dir_all(&d).unwrap();
    }

    fn nix_is_root() -> bool {
        // SAFETY: geteuid has no preconditions.
        unsafe { libc::geteuid() == 0 }
    }

    #[test]
    fn commit_moves_a_download_within_and_across_directories() {
        let d = tmp();
        std::fs::create_dir(d.join("blobs")).unwrap();
        std::fs::create_dir(d.join(".downloads")).unwrap();
        std::fs::write(d.join("blobs/.part"), "blob").unwrap();
        let before = syncs();
        commit(&d.join("blobs/.part"), &d.join("blobs/abc")).unwrap();
        assert!(syncs() - before >= 2, "the file and its directory");
        assert_eq!(std::fs::read(d.join("blobs/abc")).unwrap(), b"blob");
        std::fs::write(d.join(".downloads/def"), "other").unwrap();
        commit(&d.join(".downloads/def"), &d.join("blobs/def")).unwrap();
        assert_eq!(std::fs::read(d.join("blobs/def")).unwrap(), b"other");
        assert!(!d.join(".downloads/def").exists());
        // A missing download is an error naming it; the store is untouched.
        let e = commit(&d.join(".downloads/gone"), &d.join("blobs/gone")).unwrap_err();
        assert!(e.to_string().contains(".downloads/gone"), "{e}");
        assert_eq!(entries(&d.join("blobs")), ["abc", "def"]);
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn move_synced_fsyncs_the_file_and_leaves_the_directories_to_the_caller() {
        let d = tmp();
        std::fs::create_dir(d.join("blobs")).unwrap();
        std::fs::create_dir(d.join(".downloads")).unwrap();
        std::fs::write(d.join(".downloads/abc"), "blob").unwrap();
        // (syncs() counts the whole process: other tests run beside this one.)
        let before = syncs();
        move_synced(&d.join(".downloads/abc"), &d.join("blobs/abc")).unwrap();
        assert!(syncs() > before, "the file");
        assert_eq!(std::fs::read(d.join("blobs/abc")).unwrap(), b"blob");
        assert!(!d.join(".downloads/abc").exists());
        let before = syncs();
        sync_dir(&d.join("blobs")).unwrap();
        assert!(syncs() > before, "the directory");
        let e = move_synced(&d.join(".downloads/gone"), &d.join("blobs/gone")).unwrap_err();
        assert!(e.to_string().contains(".downloads/gone"), "{e}");
        let e = sync_dir(&d.join("nowhere")).unwrap_err();
        assert!(e.to_string().contains("nowhere"), "{e}");
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn rewrite_in_place_keeps_the_inode() {
        use std::os::unix::fs::MetadataExt;
        let d = tmp();
        let p = d.join("resolv.conf");
        rewrite_in_place(&p, b"nameserver 10.0.0.1\nnameserver 10.0.0.2\n").unwrap();
        let ino = std::fs::metadata(&p).unwrap().ino();
        rewrite_in_place(&p, b"nameserver 10.0.0.9\n").unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"nameserver 10.0.0.9\n");
        assert_eq!(std::fs::metadata(&p).unwrap().ino(), ino);
        // Never through a link.
        std::fs::write(d.join("victim"), "precious").unwrap();
        symlink(d.join("victim"), d.join("hosts")).unwrap();
        assert!(rewrite_in_place(&d.join("hosts"), b"x").is_err());
        assert_eq!(std::fs::read(d.join("victim")).unwrap(), b"precious");
        std::fs::remove_dir_all(&d).unwrap();
    }

    /// The ESP's steps on a real vfat (loop-mounted), then read back after a remount.
    #[test]
    fn vfat_steps_on_a_real_vfat_survive_a_remount() {
        use std::process::Command;
        let has_vfat = std::fs::read_to_string("/proc/filesystems")
            .is_ok_and(|f| f.lines().any(|l| l.trim_end().ends_with("vfat")));
        assert!(
            nix_is_root(),
            "this test needs root (./dev test runs it as root)"
        );
        assert!(
            Path::new("/usr/sbin/mkfs.vfat").exists(),
            "mkfs.vfat missing: apt-get install dosfstools (./dev deps)"
        );
        if !has_vfat {
            // A property of the host kernel, not an install step: the QEMU update scenarios
            // exercise these steps on the guest's ESP instead.
            eprintln!("not run: this host's kernel has no vfat");
            return;
        }
        let d = tmp();
        let img = d.join("esp.img");
        File::create(&img).unwrap().set_len(32 << 20).unwrap();
        let ok = |c: &mut Command| {
            let out = c.output().unwrap();
            assert!(
                out.status.success(),
                "{c:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        };
        ok(Command::new("mkfs.vfat").arg(&img));
        let mnt = d.join("mnt");
        std::fs::create_dir(&mnt).unwrap();
        let mount = |ok: &dyn Fn(&mut Command)| {
            ok(Command::new("mount")
                .arg("-o")
                .arg("loop")
                .arg(&img)
                .arg(&mnt))
        };
        mount(&ok);
        let linux = mnt.join("EFI/Linux");
        vfat::replace(&linux, "keelson_0.1.0.efi", b"running").unwrap();
        // A cut download's leftover, then the real one over it.
        let mut f = vfat::create(&linux, ".keelson_0.2.0.efi.part").unwrap();
        f.write_all(b"cut sh").unwrap();
        drop(f);
        let mut f = vfat::create(&linux, ".keelson_0.2.0.efi.part").unwrap();
        f.write_all(b"new uki").unwrap();
        fsync(f.as_raw_fd()).unwrap();
        drop(f);
        vfat::rename(&linux, ".keelson_0.2.0.efi.part", "keelson_0.2.0+3.efi").unwrap();
        vfat::rename(&linux, "keelson_0.1.0.efi", "keelson_0.1.0+0.efi").unwrap();
        vfat::remove(&linux, "gone.efi").unwrap();
        ok(Command::new("umount").arg(&mnt));
        mount(&ok);
        let mut names = entries(&linux);
        names.sort();
        let new = std::fs::read(linux.join("keelson_0.2.0+3.efi")).unwrap();
        let old = std::fs::read(linux.join("keelson_0.1.0+0.efi")).unwrap();
        ok(Command::new("umount").arg(&mnt));
        assert_eq!(names, ["keelson_0.1.0+0.efi", "keelson_0.2.0+3.efi"]);
        assert_eq!(new, b"new uki");
        assert_eq!(old, b"running");
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn vfat_replace_removes_a_leftover_part_and_counts_syncs() {
        let d = tmp();
        std::fs::write(d.join(".loader.conf.part"), "cut short").unwrap();
        let before = syncs();
        vfat::replace(&d, "loader.conf", b"timeout 0\n").unwrap();
        assert!(
            syncs() >= before + 3,
            "file before and after the rename, then syncfs"
        );
        assert_eq!(
            std::fs::read(d.join("loader.conf")).unwrap(),
            b"timeout 0\n"
        );
        assert_eq!(entries(&d), ["loader.conf"]);
        vfat::remove(&d, "loader.conf").unwrap();
        vfat::remove(&d, "loader.conf").unwrap();
        assert!(entries(&d).is_empty());
        std::fs::remove_dir_all(&d).unwrap();
    }
}
