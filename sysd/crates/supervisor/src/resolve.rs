//! From a validated service spec to a runtime [`ContainerConfig`]: find the image's root file
//! system, resolve the user in the image's own passwd/group files, turn volumes into host
//! directories, and compute argv and environment with Docker's precedence. Runs at every start,
//! so a problem here (image missing, no command) fails that start with its reason and is
//! retried with backoff, without touching other services.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

use keelson_runtime::{ContainerConfig, Mount, NetworkMode, Resources};
use keelson_spec::{MountSpec, Network, Service};

const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// Host paths the resolution depends on.
#[derive(Debug, Clone)]
pub struct Layout {
    /// Named volumes live in `volumes/NAME`.
    pub volumes: PathBuf,
    /// OCI image layouts are unpacked into `images/<manifest digest hex>/rootfs`.
    pub images: PathBuf,
    /// cgroup parent of every service, e.g. `/keelson`.
    pub cgroup_parent: String,
}

pub use keelson_images::Image;

/// Finds the image of `reference` (see [`keelson_images::lookup`]), unpacking OCI image layouts
/// into `layout.images`.
pub fn image(reference: &str, layout: &Layout) -> Result<Image> {
    keelson_images::lookup(reference, &layout.images)
}

/// The container for one start of `svc`.
pub fn container(svc: &Service, image: &Image, layout: &Layout) -> Result<ContainerConfig> {
    let spec = &svc.spec;
    let d = &image.defaults;
    let args: Vec<String> = match (&spec.entrypoint, &spec.command) {
        (Some(ep), cmd) => ep.iter().chain(cmd.iter().flatten()).cloned().collect(),
        (None, Some(cmd)) => d.entrypoint.iter().chain(cmd).cloned().collect(),
        (None, None) => d.entrypoint.iter().chain(&d.cmd).cloned().collect(),
    };
    if args.is_empty() {
        bail!(
            "no command: set `command` or `entrypoint` (the image {} has no default)",
            spec.image
        );
    }

    let mut env: BTreeMap<String, String> = BTreeMap::new();
    env.insert("PATH".into(), DEFAULT_PATH.into());
    // A host-network container has the node's host name (and no fixed $HOSTNAME, which
    // would go stale when the node's name changes); others have their service's name.
    if !matches!(spec.network, Network::Host) {
        env.insert("HOSTNAME".into(), svc.name.clone());
    }
    for kv in &d.env {
        if let Some((k, v)) = kv.split_once('=') {
            env.insert(k.into(), v.into());
        }
    }
    env.extend(spec.env.clone());

    let user = spec.user.as_deref().or(d.user.as_deref());
    let (uid, gid) = match user {
        Some(u) => resolve_user(&image.rootfs, u)?,
        None => (0, 0),
    };
    let additional_gids = spec
        .groups
        .iter()
        .map(|g| resolve_group(&image.rootfs, g))
        .collect::<Result<Vec<_>>>()?;

    // The root is read-only; give programs the scratch space they expect (as podman's
    // --read-only does), unless the service mounts something there itself.
    let mut mounts = Vec::new();
    for (target, mode) in [("/tmp", 0o1777), ("/run", 0o755), ("/var/tmp", 0o1777)] {
        if !spec
            .mounts
            .iter()
            .any(|m| m.target().trim_end_matches('/') == target)
        {
            mounts.push(Mount::Tmpfs {
                target: target.into(),
                size_bytes: None,
                mode: Some(mode),
            });
        }
    }
    for m in &spec.mounts {
        mounts.push(match m {
            MountSpec::Volume {
                source,
                target,
                readonly,
            } => {
                let dir = layout.volumes.join(source);
                std::fs::create_dir_all(&dir)
                    .with_context(|| format!("creating volume {source} at {}", dir.display()))?;
                Mount::Bind {
                    source: dir,
                    target: target.clone(),
                    readonly: *readonly,
                }
            }
            MountSpec::Bind {
                source,
                target,
                readonly,
            } => {
                if std::fs::symlink_metadata(source).is_err() {
                    bail!("mount source {source} does not exist on the host");
                }
                Mount::Bind {
                    source: source.into(),
                    target: target.clone(),
                    readonly: *readonly,
                }
            }
            MountSpec::Tmpfs { target, size, mode } => Mount::Tmpfs {
                target: target.clone(),
                size_bytes: size.map(|s| s.0),
                mode: mode.as_deref().and_then(|m| u32::from_str_radix(m, 8).ok()),
            },
        });
    }

    let r = &spec.resources;
    let resources = Resources {
        memory_max: r.memory_max.map(|s| s.0),
        cpu_weight: r.cpu_weight,
        cpu_quota_us: r.cpu_quota.map(|q| u64::from(q.0) * 1000),
        cpu_period_us: r.cpu_quota.map(|_| 100_000),
        pids_max: r.pids_max,
        io_weight: r.io_weight,
    };

    let mut annotations = BTreeMap::new();
    annotations.insert("org.keelson.service".into(), svc.name.clone());
    annotations.insert("org.keelson.spec-hash".into(), spec.hash());

    Ok(ContainerConfig {
        id: svc.name.clone(),
        service: svc.name.clone(),
        rootfs: image.rootfs.clone(),
        lowers: image.layers.clone(),
        writable_root: false,
        args,
        env: env.into_iter().map(|(k, v)| format!("{k}={v}")).collect(),
        cwd: spec
            .workdir
            .clone()
            .or_else(|| d.workdir.clone())
            .unwrap_or_else(|| "/".into()),
        uid,
        gid,
        additional_gids,
        mounts,
        network: match &spec.network {
            Network::Host => NetworkMode::Host,
            // Its own namespace; the helper plugs it into the bridge before the start.
            Network::None | Network::Bridge => NetworkMode::None,
            // The owner's namespace path is only known at the start (its pid).
            Network::Service(_) => NetworkMode::None,
        },
        cap_add: spec.cap_add.iter().map(|c| c.0.clone()).collect(),
        cap_drop: spec.cap_drop.iter().map(|c| c.0.clone()).collect(),
        privileged: spec.privileged,
        host_pid: spec.pid == keelson_spec::PidMode::Host,
        delegate: spec.delegate,
        init: spec.init,
        user_namespace: spec.user_namespace.then_some(100_000),
        resources,
        cgroup_path: format!("{}/{}", layout.cgroup_parent, svc.name),
        annotations,
    })
}

/// `NAME`, `UID`, `NAME:GROUP` or `UID:GID` against the image's /etc/passwd and /etc/group.
/// A numeric uid without a passwd entry gets gid 0, as Docker does.
fn resolve_user(rootfs: &Path, user: &str) -> Result<(u32, u32)> {
    let (u, g) = match user.split_once(':') {
        Some((u, g)) => (u, Some(g)),
        None => (user, None),
    };
    let passwd = read_db(rootfs, "etc/passwd");
    let entry = passwd
        .iter()
        .find(|f| f[0] == u || (u.parse::<u32>().is_ok() && f[2] == u));
    let uid = match u.parse::<u32>() {
        Ok(n) => n,
        Err(_) => entry
            .and_then(|f| f[2].parse().ok())
            .with_context(|| format!("user {u:?} is not in the image's /etc/passwd"))?,
    };
    let gid = match g {
        Some(g) => resolve_group(rootfs, g)?,
        None => entry.and_then(|f| f[3].parse().ok()).unwrap_or(0),
    };
    Ok((uid, gid))
}

fn resolve_group(rootfs: &Path, group: &str) -> Result<u32> {
    if let Ok(n) = group.parse() {
        return Ok(n);
    }
    read_db(rootfs, "etc/group")
        .iter()
        .find(|f| f[0] == group)
        .and_then(|f| f[2].parse().ok())
        .with_context(|| format!("group {group:?} is not in the image's /etc/group"))
}

/// Colon-separated records with at least four fields (passwd, group).
fn read_db(rootfs: &Path, rel: &str) -> Vec<Vec<String>> {
    std::fs::read_to_string(rootfs.join(rel))
        .unwrap_or_default()
        .lines()
        .filter(|l| !l.starts_with('#'))
        .map(|l| l.split(':').map(str::to_string).collect::<Vec<_>>())
        .filter(|f| f.len() >= 4)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use keelson_images::ImageDefaults;
    use keelson_spec::{parse_file, Source};

    fn service(body: &str) -> Service {
        let text = format!("version = 1\n[services.web]\n{body}");
        parse_file(Path::new("t.toml"), &text, Source::User)
            .unwrap()
            .remove(0)
    }

    #[test]
    fn argv_env_user_mounts() {
        let root = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(root.path().join("etc")).unwrap();
        std::fs::write(
            root.path().join("etc/passwd"),
            "root:x:0:0::/root:/bin/sh\nwww:x:33:34::/var/www:/bin/false\n",
        )
        .unwrap();
        std::fs::write(
            root.path().join("etc/group"),
            "root:x:0:\nwww:x:34:\nlog:x:4:\n",
        )
        .unwrap();
        let vols = tempfile::tempdir().unwrap();
        let layout = Layout {
            volumes: vols.path().to_path_buf(),
            images: vols.path().join("images"),
            cgroup_parent: "/keelson".into(),
        };
        let image = Image {
            rootfs: root.path().to_path_buf(),
            layers: vec![],
            defaults: ImageDefaults {
                entrypoint: vec!["/bin/srv".into()],
                cmd: vec!["--default".into()],
                env: vec!["A=image".into(), "B=image".into()],
                ..Default::default()
            },
        };
        let svc = service(&format!(
            "image = \"{}\"\ncommand = [\"--port\", \"80\"]\nenv = {{ B = \"spec\" }}\nuser = \"www\"\ngroups = [\"log\"]\nmounts = [{{ type = \"volume\", source = \"data\", target = \"/data\" }}, {{ type = \"tmpfs\", target = \"/tmp\", size = \"1M\" }}]\nresources = {{ cpu_quota = \"50%\" }}\n",
            root.path().display()
        ));
        let c = container(&svc, &image, &layout).unwrap();
        assert_eq!(c.args, ["/bin/srv", "--port", "80"]);
        assert!(c.env.contains(&"A=image".to_string()) && c.env.contains(&"B=spec".to_string()));
        assert_eq!((c.uid, c.gid, c.additional_gids.clone()), (33, 34, vec![4]));
        assert!(vols.path().join("data").is_dir());
        let tmpfs: Vec<_> = c
            .mounts
            .iter()
            .filter(|m| matches!(m, Mount::Tmpfs { target, .. } if target == "/tmp"))
            .collect();
        assert_eq!(
            tmpfs,
            [&Mount::Tmpfs {
                target: "/tmp".into(),
                size_bytes: Some(1 << 20),
                mode: None
            }]
        );
        assert_eq!(
            (c.resources.cpu_quota_us, c.resources.cpu_period_us),
            (Some(50_000), Some(100_000))
        );
        assert_eq!(c.cgroup_path, "/keelson/web");

        let e = container(
            &service(&format!(
                "image = \"{}\"\nuser = \"nobody\"\n",
                root.path().display()
            )),
            &image,
            &layout,
        )
        .unwrap_err();
        assert!(format!("{e:#}").contains("\"nobody\" is not in the image's /etc/passwd"));
        let bare = Image {
            rootfs: root.path().to_path_buf(),
            layers: vec![],
            defaults: ImageDefaults::default(),
        };
        let e = container(
            &service(&format!("image = \"{}\"\n", root.path().display())),
            &bare,
            &layout,
        )
        .unwrap_err();
        assert!(format!("{e:#}").starts_with("no command"));
    }
}
