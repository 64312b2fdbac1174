//! Builds the Keelson binaries that go into the image (init, sysd, keelctl): statically linked
//! (`x86_64-unknown-linux-gnu` with `crt-static`) and reproducible (build paths remapped, one
//! codegen unit, SOURCE_DATE_EPOCH set), in a target directory of their own so the developer's
//! normal builds are not invalidated by the different flags.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{bail, Context, Result};

/// The Rust target image binaries are built for.
pub const TARGET: &str = "x86_64-unknown-linux-gnu";

/// Binaries the image needs, with their packages.
pub const BINARIES: &[(&str, &str)] = &[
    ("keelson-init", "keelson-init"),
    ("sysd", "keelson-sysd"),
    ("keelctl", "keelctl"),
];

/// `cargo`/`rustc` from PATH, run in the workspace with the toolchain choices of whoever
/// called us removed: rustup then takes the workspace's rust-toolchain.toml, so every caller
/// (a shell, `cargo test` under another toolchain, `./dev`) builds with the same compiler and
/// the same remapped sysroot. (Taking `$CARGO` mixed a caller's toolchain with the pinned
/// `rustc`: two toolchain directories alternated in one target directory, each rebuilding the
/// binaries, and their paths could differ inside them.)
fn pinned(program: &str, workspace: &Path) -> Command {
    let mut cmd = Command::new(program);
    cmd.current_dir(workspace);
    for var in [
        "CARGO",
        "RUSTC",
        "RUSTUP_TOOLCHAIN",
        "RUSTC_WRAPPER",
        "RUSTDOC",
    ] {
        cmd.env_remove(var);
    }
    cmd
}

/// Builds the image binaries from `workspace` and returns the directory holding them.
pub fn build(workspace: &Path, epoch: u64, quiet: bool) -> Result<PathBuf> {
    let cargo = "cargo";
    let target_dir = workspace.join("target/image");
    let cargo_home = std::env::var("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|_| std::env::var("HOME").map(|h| Path::new(&h).join(".cargo")))
        .unwrap_or_else(|_| PathBuf::from("/root/.cargo"));
    let sysroot = pinned("rustc", workspace)
        .args(["--print", "sysroot"])
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default();
    let mut rustflags = vec![
        "-C".to_owned(),
        "target-feature=+crt-static".to_owned(),
        format!("--remap-path-prefix={}=/keelson", workspace.display()),
        format!("--remap-path-prefix={}=/cargo", cargo_home.display()),
    ];
    if !sysroot.is_empty() {
        rustflags.push(format!("--remap-path-prefix={sysroot}=/rustc"));
    }
    let mut cmd = pinned(cargo, workspace);
    cmd.args([
        "build",
        "--release",
        "--locked",
        "--target",
        TARGET,
        "--target-dir",
    ])
    .arg(&target_dir)
    .env("CARGO_ENCODED_RUSTFLAGS", rustflags.join("\x1f"))
    .env_remove("RUSTFLAGS")
    .env("SOURCE_DATE_EPOCH", epoch.to_string());
    for (bin, package) in BINARIES {
        cmd.args(["-p", package, "--bin", bin]);
    }
    if quiet {
        cmd.arg("-q").stdout(Stdio::null());
    }
    let status = cmd.status().with_context(|| format!("running {cargo}"))?;
    if !status.success() {
        bail!("building the image binaries failed ({status}); see cargo's output above");
    }
    Ok(target_dir.join(TARGET).join("release"))
}
