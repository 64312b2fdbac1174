//! The kernel's entropy pool across boots, the way systemd-random-seed keeps it: a seed on /var
//! written from the kernel's CSPRNG once it is initialized, credited to the pool at the next
//! boot, and replaced before it is credited, so no seed is credited twice. A VM without
//! RDRAND or virtio-rng otherwise waits a second or more in the kernel's jitter dance the first
//! time anything asks for blocking randomness.
//!
//! The first boot has no seed: nothing on init's path needs blocking randomness then (the
//! machine ID comes from the VM's SMBIOS UUID where there is one, see
//! [`crate::state::machine_id`]), and the seed is written by a child process that waits for
//! the pool. At shutdown the seed is written again from the pool, which has gathered the
//! whole boot's entropy by then ([`save`]), as `systemd-random-seed save` does.

use std::fs::File;
use std::io::Write;
use std::os::fd::AsRawFd;
use std::path::Path;

use crate::say;

/// The seed, readable by root only.
pub const SEED: &str = "/var/lib/keelson/random-seed";
/// The pool's size in bytes (what systemd keeps too).
const SIZE: usize = 512;
/// `RNDADDENTROPY`, `_IOW('R', 0x03, int[2])`.
const RNDADDENTROPY: libc::c_ulong = 0x4008_5203;

/// What happened to the seed at this boot.
#[derive(Debug, PartialEq, Eq)]
pub enum Loaded {
    /// Mixed in and credited; a new one was stored first.
    Credited(usize),
    /// None on /var (a first boot, or /var lost): one is written once the pool is ready.
    None,
    /// Mixed in but not credited, because a new seed could not be stored (crediting a seed
    /// that stays on disk would credit it again at the next boot).
    NotCredited(String),
}

/// Mixes the stored seed into the pool, stores a fresh one in its place, then credits the old
/// one. `urandom` is the pool (`/dev/urandom`).
pub fn load(seed: &Path, urandom: &Path) -> Loaded {
    let old = match std::fs::read(seed) {
        Ok(b) if (32..=4096).contains(&b.len()) => b,
        Ok(_) | Err(_) => return Loaded::None,
    };
    let pool = match std::fs::OpenOptions::new().write(true).open(urandom) {
        Ok(f) => f,
        Err(e) => return Loaded::NotCredited(format!("{}: {e}", urandom.display())),
    };
    // Mixed without credit first, so it counts towards the pool even if the credit fails.
    if let Err(e) = (&pool).write_all(&old) {
        return Loaded::NotCredited(format!("writing to {}: {e}", urandom.display()));
    }
    // The new seed is the old one XORed with the kernel's output so far: unpredictable if
    // either is. (Before the pool is initialized the kernel's output does not depend on what
    // was written to /dev/urandom, so the old seed is folded in here.)
    let mut new = [0u8; SIZE];
    if let Err(e) = crate::state::getrandom(&mut new, libc::GRND_INSECURE) {
        return Loaded::NotCredited(format!("getrandom: {e}"));
    }
    for (n, o) in new.iter_mut().zip(old.iter().cycle()) {
        *n ^= o;
    }
    if let Err(e) = crate::state::write_atomic(seed, &new, 0o600) {
        return Loaded::NotCredited(format!("replacing {}: {e}", seed.display()));
    }
    match credit(&pool, &old) {
        Ok(()) => Loaded::Credited(old.len()),
        Err(e) => Loaded::NotCredited(format!("RNDADDENTROPY: {e}")),
    }
}

/// Stores a seed once the pool is initialized (blocking until then), in a child process so
/// nothing waits for it and init stays single-threaded (it forks the module loader and sysd).
/// The child is reaped by init's ordinary zombie reaping; it reports through `say!`.
pub fn store_when_ready(seed: &'static str) {
    // SAFETY: init is single-threaded, so the child may run arbitrary code (allocate, log)
    // after fork; it ends with _exit and never returns into init's loop.
    match unsafe { nix::unistd::fork() } {
        Ok(nix::unistd::ForkResult::Child) => {
            let mut new = [0u8; SIZE];
            let result = crate::state::getrandom(&mut new, 0)
                .and_then(|()| crate::state::write_atomic(Path::new(seed), &new, 0o600));
            match result {
                Ok(()) => say!("random-seed: stored for the next boot"),
                Err(e) => say!("random-seed: cannot store {seed}: {e}"),
            }
            // SAFETY: ends the child without running init's exit paths.
            unsafe { libc::_exit(0) }
        }
        Ok(nix::unistd::ForkResult::Parent { .. }) => {}
        Err(e) => say!("random-seed: cannot fork its writer: {e}"),
    }
}

/// What [`save`] did at shutdown.
#[derive(Debug, PartialEq, Eq)]
pub enum Saved {
    /// A new seed from the initialized pool replaced the one of the boot.
    Refreshed,
    /// The pool is not initialized yet: the seed written at boot (or by the waiting child)
    /// stays; nothing from an uninitialized pool is stored to be credited.
    PoolNotReady,
    Failed(String),
}

/// Replaces the seed with one from the pool, if the pool is initialized (never blocking:
/// shutdown must not wait for entropy).
pub fn save(seed: &Path) -> Saved {
    let mut new = [0u8; SIZE];
    match crate::state::getrandom(&mut new, libc::GRND_NONBLOCK) {
        Ok(()) => {}
        Err(e) if e.raw_os_error() == Some(libc::EAGAIN) => return Saved::PoolNotReady,
        Err(e) => return Saved::Failed(format!("getrandom: {e}")),
    }
    match crate::state::write_atomic(seed, &new, 0o600) {
        Ok(()) => Saved::Refreshed,
        Err(e) => Saved::Failed(format!("replacing {}: {e}", seed.display())),
    }
}

/// Adds `bytes` to the pool with full credit (8 bits a byte: the seed came from the CSPRNG).
fn credit(pool: &File, bytes: &[u8]) -> std::io::Result<()> {
    let bits = i32::try_from(bytes.len() * 8).map_err(std::io::Error::other)?;
    let len = i32::try_from(bytes.len()).map_err(std::io::Error::other)?;
    // struct rand_pool_info { int entropy_count; int buf_size; __u32 buf[]; }
    let mut info = Vec::with_capacity(8 + bytes.len());
    info.extend_from_slice(&bits.to_ne_bytes());
    info.extend_from_slice(&len.to_ne_bytes());
    info.extend_from_slice(bytes);
    // SAFETY: `info` is a valid rand_pool_info of `bytes.len()` bytes of buffer, alive for the
    // call; the kernel only reads it.
    let rc = unsafe { libc::ioctl(pool.as_raw_fd(), RNDADDENTROPY as _, info.as_ptr()) };
    if rc < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// With a plain file standing in for /dev/urandom: the seed is mixed in, replaced by a new
    /// one before anything is credited, and the credit ioctl (refused by a plain file) leaves
    /// it not credited. A missing or truncated seed is none.
    #[test]
    fn a_seed_is_replaced_before_it_is_credited() {
        let t = tempfile::tempdir().unwrap();
        let seed = t.path().join("random-seed");
        let pool = t.path().join("urandom");
        std::fs::write(&pool, b"").unwrap();
        assert_eq!(load(&seed, &pool), Loaded::None);
        std::fs::write(&seed, [1u8; 16]).unwrap();
        assert_eq!(load(&seed, &pool), Loaded::None);

        let old = vec![7u8; SIZE];
        std::fs::write(&seed, &old).unwrap();
        match load(&seed, &pool) {
            Loaded::NotCredited(why) => assert!(why.starts_with("RNDADDENTROPY: "), "{why}"),
            other => panic!("{other:?}"),
        }
        assert_eq!(std::fs::read(&pool).unwrap(), old, "mixed into the pool");
        let new = std::fs::read(&seed).unwrap();
        assert_eq!(new.len(), SIZE);
        assert_ne!(new, old, "replaced before the credit");
        assert_ne!(new, [0u8; SIZE], "not the old seed cancelled out");
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(
            std::fs::metadata(&seed).unwrap().permissions().mode() & 0o777,
            0o600
        );
    }

    /// At shutdown the seed is replaced from the pool (the host's, initialized long ago).
    #[test]
    fn shutdown_refreshes_the_seed() {
        let t = tempfile::tempdir().unwrap();
        let seed = t.path().join("random-seed");
        std::fs::write(&seed, [7u8; SIZE]).unwrap();
        assert_eq!(save(&seed), Saved::Refreshed);
        let new = std::fs::read(&seed).unwrap();
        assert_eq!(new.len(), SIZE);
        assert_ne!(new, vec![7u8; SIZE]);
        let missing = t.path().join("missing/random-seed");
        match save(&missing) {
            Saved::Failed(why) => assert!(
                why.starts_with(&format!("replacing {}: ", missing.display())),
                "{why}"
            ),
            other => panic!("{other:?}"),
        }
    }
}
