//! `image-build`: Keelson's reproducible image pipeline.
//!
//! `image-build build configs/vm.toml` writes `out/vm/`; `image-build extension
//! configs/extensions/etcd.toml` writes the system extension `out/ext/etcd/`;
//! `image-build lock CONFIG` re-pins a config's Debian packages. See ARCHITECTURE.md for the
//! pipeline's steps and docs/extensions.md for extensions.

mod binaries;
mod build;
mod config;
mod disk;
mod esp;
mod extension;
mod fetch;
mod images;
mod initramfs;
mod kmod;
mod lock;
mod manifest;
mod oci;
mod pipeline;
mod rootfs;
mod secure_boot;
mod services;
mod uki;
mod update;
mod util;

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Result};
use clap::{Parser, Subcommand};

/// Builds Keelson disk images from declarative configs.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    /// Print nothing but errors.
    #[arg(short, long, global = true)]
    quiet: bool,
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Build the image a config describes into out/<name>/ (given an extension definition,
    /// build the extension as `extension` does).
    Build {
        /// The image config, e.g. configs/vm.toml.
        config: PathBuf,
        #[command(flatten)]
        common: CommonArgs,
        /// Bake this TUF root.json in as the update agent's trust anchor (overrides
        /// `[update] trusted_root`).
        #[arg(long)]
        trusted_root: Option<PathBuf>,
        /// An extra system service file, installed after the config's own (repeatable).
        #[arg(long = "extra-services")]
        extra_services: Vec<PathBuf>,
        /// A kernel command line argument added to the config's (repeatable), e.g.
        /// `keelson.fatal=reboot` so a failing boot counts against its tries.
        #[arg(long = "kernel-arg")]
        kernel_args: Vec<String>,
        /// Sign systemd-boot and the UKIs for UEFI Secure Boot with the keys in this directory
        /// (PK.key PK.crt KEK.key KEK.crt db.key db.crt, PEM; keep it outside the repository), and
        /// put the keys on the ESP for systemd-boot to enroll (docs/secure-boot.md).
        #[arg(long, env = "KEELSON_SECURE_BOOT_KEYS")]
        secure_boot_keys: Option<PathBuf>,
    },
    /// Build a system extension (a Discoverable Disk Image with its service images and
    /// services) into out/ext/<name>/.
    Extension {
        /// The extension definition, e.g. configs/extensions/etcd.toml.
        config: PathBuf,
        #[command(flatten)]
        common: CommonArgs,
        /// Build for this OS version instead of the OS config's `version`.
        #[arg(long)]
        os_version: Option<String>,
    },
    /// Update repositories: signing keys, trusted root metadata, adding versions.
    #[command(subcommand)]
    Update(UpdateCmd),
    /// Pin the config's packages (exact version and sha256) in configs/<name>.lock, with the
    /// dependency closure of every service image's packages.
    Lock {
        config: PathBuf,
        /// SOURCE_DATE_EPOCH to record (default: keep the lock's, or now for a new lock).
        #[arg(long)]
        source_date_epoch: Option<u64>,
    },
}

/// The options `build` and `extension` share.
#[derive(clap::Args)]
struct CommonArgs {
    /// Output directory (default: out/<config name>, out/ext/<name> for an extension).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Where downloaded packages are cached (default: <workspace>/cache/debs).
    #[arg(long)]
    cache: Option<PathBuf>,
    /// Take keelson-init, sysd and keelctl from this directory instead of building them (an
    /// extension takes only the OS's sysd, which checks its services).
    #[arg(long)]
    bins: Option<PathBuf>,
    /// Build this version instead of the definition's `version` (an extension's own version).
    #[arg(long)]
    version: Option<String>,
}

#[derive(Subcommand)]
enum UpdateCmd {
    /// Generate an Ed25519 signing key (PKCS#8 DER, mode 0600). Keep release keys offline.
    Keygen {
        /// The new key file (never overwritten).
        out: PathBuf,
    },
    /// Write a version-1 TUF root.json trusting the given keys for every top-level role.
    Root {
        /// Signing keys (repeatable).
        #[arg(long = "key", required = true)]
        keys: Vec<PathBuf>,
        /// Output root.json.
        #[arg(long)]
        out: PathBuf,
        /// Lifetime of the root metadata in days.
        #[arg(long, default_value_t = 365)]
        expires_days: u32,
    },
    /// Add a built image (out/<name>/) to an update repository as a new version and re-sign
    /// the targets, snapshot and timestamp metadata.
    Add {
        #[command(flatten)]
        repo: RepoArgs,
        /// The built image directory.
        image: PathBuf,
        /// A rollout wave, HOURS:PERCENT after the release (repeatable, increasing).
        #[arg(long = "wave")]
        waves: Vec<String>,
        /// An extension build (out/ext/<name>/) built for this version, signed as a target
        /// and listed under it (repeatable).
        #[arg(long = "extension")]
        extensions: Vec<PathBuf>,
        /// Publish the root as a patch against each of the N newest older versions of the
        /// variant (0: none; nodes running another version use the chunks).
        #[arg(long, default_value_t = 1, value_name = "N")]
        root_patches: usize,
        /// zstd level of the root patches (1-22; lower is faster to make, larger to download).
        #[arg(long, default_value_t = update::ROOT_PATCH_LEVEL, value_parser = clap::value_parser!(i32).range(1..=22))]
        patch_level: i32,
    },
    /// List an extension build under an OS version already in the repository (the repository
    /// says it fits that version, whatever it was built for), signing its image if new.
    Extension {
        #[command(flatten)]
        repo: RepoArgs,
        /// The OS version to list it under.
        #[arg(long)]
        os_version: String,
        /// The extension build directory (out/ext/<name>/).
        #[arg(long)]
        extension: PathBuf,
    },
}

/// The options every command that signs into an update repository takes.
#[derive(clap::Args)]
struct RepoArgs {
    /// Repository directory (metadata/ and targets/ are created in it).
    #[arg(long)]
    repo: PathBuf,
    /// The repository's root.json (the one baked into images).
    #[arg(long)]
    root: PathBuf,
    /// Signing keys (repeatable).
    #[arg(long = "key", required = true)]
    keys: Vec<PathBuf>,
    /// Lifetime of the targets/snapshot/timestamp metadata (e.g. 7d, 12h, 30s).
    #[arg(long, default_value = "7d")]
    expires_in: String,
}

impl RepoArgs {
    fn options(self) -> Result<update::RepoOptions> {
        Ok(update::RepoOptions {
            repo: self.repo,
            root: self.root,
            keys: self.keys,
            expires_in: parse_duration(&self.expires_in)?,
        })
    }
}

fn parse_wave(text: &str) -> Result<(u64, u8)> {
    let (h, p) = text
        .split_once(':')
        .ok_or_else(|| anyhow::anyhow!("--wave {text:?}: expected HOURS:PERCENT, e.g. 24:50"))?;
    let hours = h
        .parse()
        .map_err(|_| anyhow::anyhow!("--wave {text:?}: {h:?} is not a number of hours"))?;
    let percent = p
        .parse()
        .map_err(|_| anyhow::anyhow!("--wave {text:?}: {p:?} is not a percentage"))?;
    Ok((hours, percent))
}

fn parse_duration(text: &str) -> Result<jiff::SignedDuration> {
    let bad = || anyhow::anyhow!("{text:?}: expected a duration like 7d, 12h, 30m or 45s");
    let (num, unit) = text.split_at(text.find(|c: char| !c.is_ascii_digit()).ok_or_else(bad)?);
    let n: i64 = num.parse().map_err(|_| bad())?;
    let secs = match unit {
        "s" => n,
        "m" => n * 60,
        "h" => n * 3600,
        "d" => n * 86400,
        _ => return Err(bad()),
    };
    Ok(jiff::SignedDuration::from_secs(secs))
}

fn run_update(cmd: UpdateCmd, quiet: bool) -> Result<()> {
    match cmd {
        UpdateCmd::Keygen { out } => update::keygen(&out)?,
        UpdateCmd::Root {
            keys,
            out,
            expires_days,
        } => {
            let expires = jiff::Timestamp::now().checked_add(jiff::SignedDuration::from_hours(
                24 * i64::from(expires_days),
            ))?;
            update::root(&keys, &out, expires)?;
        }
        UpdateCmd::Add {
            repo,
            image,
            waves,
            extensions,
            root_patches,
            patch_level,
        } => {
            let repo = repo.options()?;
            let dir = repo.repo.clone();
            let payload = update::add(&update::AddOptions {
                repo,
                image,
                waves: waves.iter().map(|w| parse_wave(w)).collect::<Result<_>>()?,
                release: jiff::Timestamp::now(),
                extensions,
                root_patches,
                patch_level,
            })?;
            if !quiet {
                eprintln!(
                    "added {} {} to {} (root {} bytes, {} waves)",
                    payload.variant,
                    payload.version,
                    dir.display(),
                    payload.root_size,
                    payload.waves.len()
                );
                for e in &payload.extensions {
                    eprintln!(
                        "  with extension {} {} ({}, {} bytes, root hash {})",
                        e.name, e.version, e.target, e.size, e.roothash
                    );
                }
            }
        }
        UpdateCmd::Extension {
            repo,
            os_version,
            extension,
        } => {
            let repo = repo.options()?;
            let dir = repo.repo.clone();
            let listed = update::list_extension(&update::ExtensionOptions {
                repo,
                os_version: os_version.clone(),
                extension,
            })?;
            if !quiet {
                let e = &listed.extension;
                eprintln!(
                    "listed extension {} {} (built for {}) under {os_version} in {}{}",
                    e.name,
                    e.version,
                    e.built_for,
                    dir.display(),
                    listed
                        .replaced
                        .map(|r| format!(", replacing {} {}", r.name, r.version))
                        .unwrap_or_default()
                );
            }
        }
    }
    Ok(())
}

fn workspace() -> PathBuf {
    let manifest_dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    manifest_dir
        .parent()
        .map(PathBuf::from)
        .unwrap_or(manifest_dir)
}

impl CommonArgs {
    fn options(self, config: PathBuf, quiet: bool) -> pipeline::Options {
        let ws = workspace();
        pipeline::Options {
            config,
            out: self.out,
            cache: self.cache.unwrap_or_else(|| ws.join("cache/debs")),
            workspace: ws,
            bins: self.bins,
            quiet,
            version: self.version,
        }
    }
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Cmd::Build {
            config,
            common,
            trusted_root,
            extra_services,
            kernel_args,
            secure_boot_keys,
        } => {
            if config::kind_of(&config)? == config::Kind::Extension {
                if trusted_root.is_some()
                    || !extra_services.is_empty()
                    || !kernel_args.is_empty()
                    || secure_boot_keys.is_some()
                {
                    bail!(
                        "{} is an extension definition: --trusted-root, --extra-services, --kernel-arg and --secure-boot-keys are for OS images",
                        config.display()
                    );
                }
                extension::build(&extension::Options {
                    common: common.options(config, cli.quiet),
                    os_version: None,
                })?;
                return Ok(());
            }
            build::build(&build::Options {
                common: common.options(config, cli.quiet),
                trusted_root,
                extra_services,
                kernel_args,
                secure_boot_keys,
            })?;
        }
        Cmd::Extension {
            config,
            common,
            os_version,
        } => {
            if config::kind_of(&config)? != config::Kind::Extension {
                bail!(
                    "{} is an OS config, not an extension definition (it has no `os`): build it with `image-build build`",
                    config.display()
                );
            }
            extension::build(&extension::Options {
                common: common.options(config, cli.quiet),
                os_version,
            })?;
        }
        Cmd::Update(cmd) => run_update(cmd, cli.quiet)?,
        Cmd::Lock {
            config,
            source_date_epoch,
        } => {
            let cfg: Box<dyn lock::Pinned> = match config::kind_of(&config)? {
                config::Kind::Os => Box::new(config::ImageConfig::load(&config)?),
                config::Kind::Extension => Box::new(config::ExtensionConfig::load(&config)?),
            };
            let cfg = cfg.as_ref();
            let path = lock::lock_path(cfg);
            let old = std::fs::read_to_string(&path)
                .ok()
                .and_then(|t| toml::from_str::<lock::Lock>(&t).ok());
            let epoch = source_date_epoch
                .or(old.as_ref().map(|l| l.source_date_epoch))
                .unwrap_or_else(|| {
                    std::time::SystemTime::now()
                        .duration_since(std::time::UNIX_EPOCH)
                        .map(|d| d.as_secs())
                        .unwrap_or(0)
                });
            let mut index = lock::AptCache::default();
            let mut packages = cfg
                .boot_packages()
                .iter()
                .map(|r| lock::resolve(&mut index, r))
                .collect::<Result<Vec<_>>>()?;
            packages.extend(lock::resolve_images(&mut index, cfg)?);
            let new = lock::Lock {
                source_date_epoch: epoch,
                packages,
            };
            if !cli.quiet {
                for p in &new.packages {
                    let images = if p.images.is_empty() {
                        String::new()
                    } else {
                        format!(" (images: {})", p.images.join(", "))
                    };
                    eprintln!(
                        "{} -> {} {} sha256:{}{images}",
                        p.requested,
                        p.name,
                        p.version,
                        &p.sha256[..16]
                    );
                }
            }
            new.save(&path, &config)?;
            if !cli.quiet {
                eprintln!("wrote {}", path.display());
            }
        }
    }
    Ok(())
}

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("image-build: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
