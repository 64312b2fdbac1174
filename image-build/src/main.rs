//! `image-build`: Keelson's reproducible image pipeline.
//!
//! `image-build build configs/vm.toml` writes `out/vm/`; `image-build lock configs/vm.toml`
//! re-pins the config's Debian packages. See ARCHITECTURE.md for the pipeline's steps.

mod binaries;
mod build;
mod config;
mod disk;
mod esp;
mod fetch;
mod images;
mod initramfs;
mod kmod;
mod lock;
mod oci;
mod rootfs;
mod services;
mod uki;
mod util;

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Result;
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
    /// Build the image a config describes into out/<name>/.
    Build {
        /// The image config, e.g. configs/vm.toml.
        config: PathBuf,
        /// Output directory (default: out/<config name>).
        #[arg(long)]
        out: Option<PathBuf>,
        /// Where downloaded packages are cached (default: <workspace>/cache/debs).
        #[arg(long)]
        cache: Option<PathBuf>,
        /// Take keelson-init, sysd and keelctl from this directory instead of building them.
        #[arg(long)]
        bins: Option<PathBuf>,
    },
    /// Pin the config's packages (exact version and sha256) in configs/<name>.lock, with the
    /// dependency closure of every service image's packages.
    Lock {
        config: PathBuf,
        /// SOURCE_DATE_EPOCH to record (default: keep the lock's, or now for a new lock).
        #[arg(long)]
        source_date_epoch: Option<u64>,
    },
}

fn workspace() -> PathBuf {
    let manifest_dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    manifest_dir
        .parent()
        .map(PathBuf::from)
        .unwrap_or(manifest_dir)
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Cmd::Build {
            config,
            out,
            cache,
            bins,
        } => {
            let ws = workspace();
            build::build(&build::Options {
                config,
                out,
                cache: cache.unwrap_or_else(|| ws.join("cache/debs")),
                workspace: ws,
                bins,
                quiet: cli.quiet,
            })?;
        }
        Cmd::Lock {
            config,
            source_date_epoch,
        } => {
            let cfg = config::ImageConfig::load(&config)?;
            let path = lock::lock_path(&cfg);
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
            let mut packages = lock::requested_packages(&cfg)
                .iter()
                .map(|r| lock::resolve(&mut index, r))
                .collect::<Result<Vec<_>>>()?;
            packages.extend(lock::resolve_images(&mut index, &cfg)?);
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
