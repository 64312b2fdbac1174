//! Init's persistent state in /var/lib/keelson: the machine ID, the boot counter and the optional
//! hostname, with crash-safe replacement (write to a temporary file, fsync, rename, fsync the
//! directory) so a power cut leaves the old or the new content, never a torn file.

use std::io::Write;
use std::path::Path;

use keelson_common::durable;
use keelson_common::gpt::Guid;
use keelson_common::verity::to_hex;

/// Init's state directory.
pub const DIR: &str = "/var/lib/keelson";
pub const MACHINE_ID: &str = "/var/lib/keelson/machine-id";
pub const BOOT_COUNT: &str = "/var/lib/keelson/boot-count";
pub const HOSTNAME: &str = "/var/lib/keelson/hostname";

/// Replaces `path` with `contents` through `keelson_common::durable` (the directory exists).
pub fn write_atomic(path: &Path, contents: &[u8], mode: u32) -> std::io::Result<()> {
    let opts = durable::Options {
        mode,
        owner: None,
        create_dirs: false,
    };
    Ok(durable::replace_with(path, &opts, |f| {
        f.write_all(contents)
    })?)
}

/// Whether `s` is a machine ID: 32 lowercase hex digits, not all zero (systemd's rule).
pub fn is_machine_id(s: &str) -> bool {
    s.len() == 32
        && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
        && s.bytes().any(|b| b != b'0')
}

/// Parses the content of a machine-id file (one trailing newline allowed).
pub fn parse_machine_id(content: &str) -> Option<String> {
    let id = content.strip_suffix('\n').unwrap_or(content);
    is_machine_id(id).then(|| id.to_owned())
}

/// A machine ID from 16 random bytes, marked as a version 4 UUID as systemd does.
pub fn machine_id_from_random(bytes: [u8; 16]) -> String {
    to_hex(&Guid::from_bytes_v4(bytes).0)
}

/// Fills `buf` from the kernel's CSPRNG (blocking until it is seeded, which on current kernels
/// happens long before stage 2).
pub fn random_bytes(buf: &mut [u8]) -> std::io::Result<()> {
    getrandom(buf, 0)
}

/// Fills `buf` with getrandom(2) and `flags` (0 blocks until the pool is initialized;
/// `GRND_INSECURE` never blocks).
pub fn getrandom(buf: &mut [u8], flags: libc::c_uint) -> std::io::Result<()> {
    let mut filled = 0;
    while filled < buf.len() {
        let rest = buf.get_mut(filled..).unwrap_or(&mut []);
        // SAFETY: rest is a valid writable slice of rest.len() bytes.
        let n = unsafe { libc::getrandom(rest.as_mut_ptr().cast(), rest.len(), flags) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        filled += usize::try_from(n).unwrap_or(0);
    }
    Ok(())
}

/// How the machine ID was obtained.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MachineId {
    Kept(String),
    Generated(String),
    /// The VM's SMBIOS product UUID, as systemd takes it in a VM.
    FromVm(String),
}

/// The machine ID a VM's firmware gives it: the SMBIOS product UUID (`product_uuid`, as the
/// kernel shows it), when `cpuinfo` says a hypervisor runs the machine (physical machines'
/// UUIDs are too often shared or blank to trust, which is systemd's rule too) and the UUID is
/// not all zeros or all ones (QEMU's default is all zeros).
pub fn machine_id_from_vm(cpuinfo: &str, product_uuid: &str) -> Option<String> {
    let in_vm = cpuinfo
        .lines()
        .filter(|l| l.starts_with("flags"))
        .any(|l| l.split_whitespace().any(|f| f == "hypervisor"));
    if !in_vm {
        return None;
    }
    let hex: String = product_uuid
        .trim()
        .chars()
        .filter(|&c| c != '-')
        .map(|c| c.to_ascii_lowercase())
        .collect();
    (is_machine_id(&hex) && hex.bytes().any(|b| b != b'f')).then_some(hex)
}

/// Reads the machine ID from /var, or makes one and stores it: the VM's UUID where there is
/// one (no randomness needed, so a first boot never waits for the entropy pool), else random.
pub fn machine_id() -> std::io::Result<MachineId> {
    if let Some(id) = std::fs::read_to_string(MACHINE_ID)
        .ok()
        .and_then(|c| parse_machine_id(&c))
    {
        return Ok(MachineId::Kept(id));
    }
    let from_vm = machine_id_from_vm(
        &std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default(),
        &std::fs::read_to_string("/sys/class/dmi/id/product_uuid").unwrap_or_default(),
    );
    let id = match &from_vm {
        Some(id) => id.clone(),
        None => {
            let mut bytes = [0u8; 16];
            random_bytes(&mut bytes)?;
            machine_id_from_random(bytes)
        }
    };
    write_atomic(Path::new(MACHINE_ID), format!("{id}\n").as_bytes(), 0o444)?;
    Ok(match from_vm {
        Some(_) => MachineId::FromVm(id),
        None => MachineId::Generated(id),
    })
}

/// The next boot number given the stored counter (missing or unreadable counts as 0).
pub fn next_boot_count(stored: Option<&str>) -> u64 {
    stored
        .and_then(|s| s.trim().parse::<u64>().ok())
        .unwrap_or(0)
        .saturating_add(1)
}

/// Increments and stores the boot counter; returns this boot's number.
pub fn count_boot() -> std::io::Result<u64> {
    let stored = std::fs::read_to_string(BOOT_COUNT).ok();
    let n = next_boot_count(stored.as_deref());
    write_atomic(Path::new(BOOT_COUNT), format!("{n}\n").as_bytes(), 0o644)?;
    Ok(n)
}

/// Whether `name` is a valid hostname: 1-64 bytes of letters, digits, `-` and `.`, with no empty
/// label and no label starting or ending in `-`.
pub fn is_hostname(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && name.split('.').all(|label| {
            !label.is_empty()
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-')
        })
}

/// The hostname: the configured one if valid, else `keelson-<first 8 hex of the machine ID>`.
/// The second value explains a rejected configured name.
pub fn choose_hostname(configured: Option<&str>, machine_id: &str) -> (String, Option<String>) {
    let fallback = format!("keelson-{}", machine_id.get(..8).unwrap_or(machine_id));
    match configured.map(str::trim) {
        None | Some("") => (fallback, None),
        Some(name) if is_hostname(name) => (name.to_owned(), None),
        Some(name) => (
            fallback.clone(),
            Some(format!(
                "hostname: ignoring invalid {HOSTNAME} ({name:?}); using {fallback}"
            )),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn a_vm_s_uuid_is_its_machine_id_and_nothing_else_is() {
        let vm = "processor\t: 0\nflags\t\t: fpu vme sse2 hypervisor rdrand\n";
        let metal = "processor\t: 0\nflags\t\t: fpu vme sse2 rdrand\n";
        let uuid = "6C3F8A2E-1B4D-4E5F-9A0B-1C2D3E4F5A6B\n";
        assert_eq!(
            machine_id_from_vm(vm, uuid).as_deref(),
            Some("6c3f8a2e1b4d4e5f9a0b1c2d3e4f5a6b")
        );
        assert_eq!(machine_id_from_vm(metal, uuid), None);
        for blank in [
            "00000000-0000-0000-0000-000000000000",
            "ffffffff-ffff-ffff-ffff-ffffffffffff",
            "",
            "not-a-uuid",
        ] {
            assert_eq!(machine_id_from_vm(vm, blank), None, "{blank:?}");
        }
    }

    #[test]
    fn machine_id_validation() {
        let id = "0123456789abcdef0123456789abcdef";
        assert_eq!(parse_machine_id(&format!("{id}\n")), Some(id.to_owned()));
        assert_eq!(parse_machine_id(id), Some(id.to_owned()));
        assert_eq!(parse_machine_id(&id.to_uppercase()), None);
        assert_eq!(parse_machine_id(&format!("{id}\n\n")), None);
        assert_eq!(parse_machine_id(&"0".repeat(32)), None);
        assert_eq!(parse_machine_id(""), None);
    }

    #[test]
    fn generated_ids_are_v4() {
        let id = machine_id_from_random([0xff; 16]);
        assert!(is_machine_id(&id));
        assert_eq!(&id[12..13], "4");
        assert_eq!(&id[16..17], "b");
        let mut buf = [0u8; 16];
        random_bytes(&mut buf).unwrap();
        assert!(is_machine_id(&machine_id_from_random(buf)));
    }

    #[test]
    fn boot_counter() {
        assert_eq!(next_boot_count(None), 1);
        assert_eq!(next_boot_count(Some("41\n")), 42);
        assert_eq!(next_boot_count(Some("garbage")), 1);
        assert_eq!(next_boot_count(Some(&u64::MAX.to_string())), u64::MAX);
    }

    #[test]
    fn hostnames() {
        let id = "0123456789abcdef0123456789abcdef";
        assert_eq!(choose_hostname(None, id), ("keelson-01234567".into(), None));
        assert_eq!(choose_hostname(Some("  \n"), id).0, "keelson-01234567");
        assert_eq!(choose_hostname(Some("web-1\n"), id), ("web-1".into(), None));
        let (name, warning) = choose_hostname(Some("bad_name"), id);
        assert_eq!(name, "keelson-01234567");
        assert!(warning.is_some());
        assert!(is_hostname("a.b-c.d"));
        assert!(!is_hostname("-a"));
        assert!(!is_hostname("a..b"));
        assert!(!is_hostname(&"a".repeat(65)));
    }

    #[test]
    fn atomic_write_replaces() {
        let dir = std::env::temp_dir().join(format!("keelson-init-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("f");
        write_atomic(&p, b"one", 0o644).unwrap();
        write_atomic(&p, b"two", 0o644).unwrap();
        assert_eq!(std::fs::read_to_string(&p).unwrap(), "two");
        let left: Vec<_> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(left, ["f"], "no temporary file is left behind");
        assert_eq!(
            std::fs::metadata(&p).unwrap().permissions().mode() & 0o777,
            0o644
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
