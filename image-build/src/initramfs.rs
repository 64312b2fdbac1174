//! The initramfs: init (stage 1), the kernel modules stage 1 loads with their dependency closure,
//! `modules.dep`/`modules.load`/`modules.alias`, `/etc/initrd-release` (which tells init it is stage 1) and
//! `/dev/console`; a gzip'd `newc` cpio, deterministic down to the gzip header.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::Path;

use anyhow::{Context, Result};
use flate2::{Compression, GzBuilder};

use crate::kmod::{render_alias, render_load, Closure, ModuleTree};
use crate::rootfs::FileEntry;
use crate::util::sha256_hex;
use keelson_common::cpio::{Entry, Writer};

/// Builds the compressed initramfs; returns it and its file list for the SBOM.
pub fn build(
    init: &[u8],
    os_release: &str,
    tree: &ModuleTree,
    closure: &Closure,
    release: &str,
    epoch: u64,
) -> Result<(Vec<u8>, Vec<FileEntry>)> {
    // path → (mode, contents); directories have no contents.
    let mut files: BTreeMap<String, (u32, Option<Vec<u8>>)> = BTreeMap::new();
    let add_dirs = |files: &mut BTreeMap<String, (u32, Option<Vec<u8>>)>, path: &str| {
        let mut acc = String::new();
        for part in path.split('/') {
            if !acc.is_empty() {
                acc.push('/');
            }
            acc.push_str(part);
            files.entry(acc.clone()).or_insert((0o755, None));
        }
    };
    for d in ["dev", "proc", "sys", "run", "sysroot", "etc"] {
        add_dirs(&mut files, d);
    }
    files.insert("init".into(), (0o755, Some(init.to_vec())));
    files.insert(
        "etc/initrd-release".into(),
        (0o644, Some(os_release.as_bytes().to_vec())),
    );
    let mod_dir = format!("lib/modules/{release}");
    add_dirs(&mut files, &mod_dir);
    files.insert(
        format!("{mod_dir}/modules.dep"),
        (0o644, Some(tree.render_dep(closure).into_bytes())),
    );
    files.insert(
        format!("{mod_dir}/modules.load"),
        (0o644, Some(render_load(closure).into_bytes())),
    );
    files.insert(
        format!("{mod_dir}/modules.alias"),
        (0o644, Some(render_alias(closure).into_bytes())),
    );
    for m in closure.deps.keys() {
        let rel = tree.file(m).context("module vanished from the tree")?;
        let data =
            std::fs::read(tree.root.join(rel)).with_context(|| format!("reading module {rel}"))?;
        let path = format!("{mod_dir}/{rel}");
        if let Some((parent, _)) = path.rsplit_once('/') {
            add_dirs(&mut files, parent);
        }
        files.insert(path, (0o644, Some(data)));
    }

    let mut cpio = Writer::new(Vec::new(), u32::try_from(epoch).unwrap_or(u32::MAX));
    let mut listing = Vec::new();
    for (path, (mode, data)) in &files {
        match data {
            None => cpio.add(&Entry::Dir { path, mode: *mode })?,
            Some(d) => cpio.add(&Entry::File {
                path,
                mode: *mode,
                data: d,
            })?,
        }
        listing.push(FileEntry {
            path: format!("/{path}"),
            mode: format!(
                "{:o}",
                mode | if data.is_some() { 0o100000 } else { 0o040000 }
            ),
            size: data.as_ref().map(|d| d.len() as u64),
            sha256: data.as_ref().map(|d| sha256_hex(d)),
            target: None,
        });
    }
    cpio.add(&Entry::CharDev {
        path: "dev/console",
        mode: 0o600,
        major: 5,
        minor: 1,
    })?;
    listing.push(FileEntry {
        path: "/dev/console".into(),
        mode: "20600".into(),
        size: None,
        sha256: None,
        target: None,
    });
    let raw = cpio.finish()?;

    // mtime 0 and no file name in the gzip header keep the output stable.
    let mut gz = GzBuilder::new()
        .mtime(0)
        .write(Vec::new(), Compression::best());
    gz.write_all(&raw)?;
    Ok((gz.finish()?, listing))
}

/// Extracts a `.deb` into `dir` with dpkg-deb.
pub fn unpack_deb(deb: &Path, dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir)?;
    crate::util::run(
        std::process::Command::new("dpkg-deb")
            .arg("-x")
            .arg(deb)
            .arg(dir),
    )
    .with_context(|| format!("unpacking {}", deb.display()))?;
    Ok(())
}
