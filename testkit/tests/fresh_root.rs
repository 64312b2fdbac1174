//! `./dev deps` on a fresh Debian 12 machine: a `minbase` root made with debootstrap, put in
//! the state of this project's machine image (qemu-utils from bookworm-backports, no backports
//! source configured, services kept from starting by policy-rc.d), then `./dev deps` inside it
//! with the checkout bind-mounted read-only, then every entry of the host tool list checked
//! there. A green run on a machine whose packages were installed by hand cannot hide a missing
//! install step any more.
//!
//! The debootstrap tarball and the downloaded .debs are cached under `out/fresh-root/`; the
//! root itself is made anew on every run and removed afterwards (apt still installs every
//! package, the cache only saves the download).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use keelson_testkit::tools;

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

fn out_dir() -> PathBuf {
    match std::env::var_os("KEELSON_OUT") {
        Some(d) if !d.is_empty() => PathBuf::from(d),
        _ => workspace().join("out"),
    }
}

fn run(what: &str, cmd: &mut Command) -> String {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("{what}: {cmd:?}: {e}"));
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{what} failed ({}):\n--- stdout\n{}\n--- stderr\n{}",
        out.status,
        tail(&stdout, 60),
        tail(&String::from_utf8_lossy(&out.stderr), 60)
    );
    stdout
}

fn tail(s: &str, n: usize) -> String {
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// Mounts below `dir` in this (the host's) mount namespace.
fn mounts_below(dir: &Path) -> Vec<String> {
    let dir = dir.to_string_lossy();
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .filter(|m| m.starts_with(&*dir))
        .map(str::to_string)
        .collect()
}

/// Removes the root once nothing is mounted below it (the mounts lived in the test's private
/// mount namespace, gone with it; this refuses rather than deleting through a bind mount).
struct Root(PathBuf);

impl Drop for Root {
    fn drop(&mut self) {
        let left = mounts_below(&self.0);
        if left.is_empty() {
            let _ = std::fs::remove_dir_all(&self.0);
        } else {
            eprintln!(
                "fresh root {} kept: still mounted {left:?}",
                self.0.display()
            );
        }
    }
}

#[test]
fn dev_deps_on_a_fresh_debian_12_root_resolves_every_host_tool() {
    // SAFETY: geteuid has no preconditions and cannot fail.
    let euid = unsafe { libc::geteuid() };
    assert_eq!(
        euid, 0,
        "the fresh-root test needs root (debootstrap, chroot): ./dev test runs as root"
    );
    let cache = out_dir().join("fresh-root");
    let archives = cache.join("apt-archives");
    std::fs::create_dir_all(archives.join("partial")).unwrap();
    let mirror = run(
        "./dev mirror",
        Command::new(workspace().join("dev")).arg("mirror"),
    )
    .trim()
    .to_string();

    // The minbase tarball, made once: debootstrap downloads and verifies it against the
    // machine's Debian keyring.
    let tarball = cache.join("bookworm-minbase.tgz");
    if !tarball.is_file() {
        let work = tempfile::tempdir_in(&cache).unwrap();
        let partial = cache.join("bookworm-minbase.tgz.partial");
        run(
            "debootstrap --make-tarball",
            tools::command("debootstrap")
                .args(["--variant=minbase", "--make-tarball"])
                .arg(&partial)
                .arg("bookworm")
                .arg(work.path())
                .arg(&mirror),
        );
        std::fs::rename(&partial, &tarball).unwrap();
    }

    let root = Root(cache.join("root"));
    if root.0.exists() {
        assert!(
            mounts_below(&root.0).is_empty(),
            "{} is still mounted from an earlier run",
            root.0.display()
        );
        std::fs::remove_dir_all(&root.0).unwrap();
    }
    run(
        "debootstrap --unpack-tarball",
        tools::command("debootstrap")
            .args(["--variant=minbase", "--unpack-tarball"])
            .arg(&tarball)
            .arg("bookworm")
            .arg(&root.0)
            .arg(&mirror),
    );

    let ws = workspace().display().to_string();
    let home = std::env::var("HOME").unwrap_or_else(|_| "/root".into());
    let cargo_home = std::env::var("CARGO_HOME").unwrap_or_else(|_| format!("{home}/.cargo"));
    let rustup_home = std::env::var("RUSTUP_HOME").unwrap_or_else(|_| format!("{home}/.rustup"));
    // The check, generated from the one tool list.
    let mut check = String::from("missing=0\n");
    for t in tools::all() {
        let test = if t.name.starts_with('/') {
            format!("[ -e '{}' ]", t.name)
        } else {
            format!("command -v '{}' >/dev/null", t.name)
        };
        check.push_str(&format!(
            "{test} || {{ echo 'MISSING {} ({})'; missing=1; }}\n",
            t.name, t.package
        ));
    }
    check.push_str("exit $missing\n");
    std::fs::write(root.0.join("check-tools.sh"), check).unwrap();

    // Everything runs in a private mount namespace: its mounts vanish with it.
    let script = format!(
        r#"mkdir -p "$R/src" "$R{cargo_home}" "$R{rustup_home}"
mount --bind {ws} "$R/src" && mount -o remount,bind,ro "$R/src"
mount --bind {cargo_home} "$R{cargo_home}" && mount -o remount,bind,ro "$R{cargo_home}"
mount --bind {rustup_home} "$R{rustup_home}" && mount -o remount,bind,ro "$R{rustup_home}"
mount --bind {archives} "$R/var/cache/apt/archives"
cp /etc/resolv.conf "$R/etc/resolv.conf"
in_root() {{ chroot "$R" /usr/bin/env -i HOME=/root PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin:{cargo_home}/bin \
  CARGO_HOME={cargo_home} RUSTUP_HOME={rustup_home} DEBIAN_FRONTEND=noninteractive "$@"; }}

echo '== this machine image state: qemu-utils from bookworm-backports, no backports source'
printf '#!/bin/sh\nexit 101\n' > "$R/usr/sbin/policy-rc.d"; chmod +x "$R/usr/sbin/policy-rc.d"
printf 'deb {mirror} bookworm-backports main\n' > "$R/etc/apt/sources.list.d/bpo.list"
in_root apt-get update -qq
in_root apt-get install -y -qq --no-install-recommends -t bookworm-backports qemu-utils >/dev/null
rm "$R/etc/apt/sources.list.d/bpo.list"
in_root apt-get update -qq
in_root dpkg-query -W qemu-utils

echo '== ./dev deps'
in_root /bin/bash -c 'cd /src && ./dev deps'
echo '== tools'
in_root /bin/sh /check-tools.sh
in_root qemu-system-x86_64 --version | head -n1
"#,
        archives = archives.display(),
    );
    let out = run(
        "./dev deps in a fresh Debian 12 root",
        &mut tools::chroot_shell(&root.0, &script),
    );
    eprintln!("{}", tail(&out, 40));
    assert!(out.contains("== tools"), "{out}");
    assert!(!out.contains("MISSING"), "{out}");
    assert!(out.contains("QEMU emulator version"), "{out}");
}
