//! What an extension asks of the kernel (docs/node-agent.md): the modules its engines need,
//! shipped inside the extension image with their dependency closure for the kernel it was built
//! for, and the sysctls they need. Both are put in force when the extension is activated,
//! before the system services are read, so none of its services starts without them; a module
//! that cannot be loaded or a sysctl that cannot be set refuses the extension, naming it.
//!
//! The tree (written by `image-build extension`):
//! `usr/lib/keelson/kernel/<name>/modules/<release>/{modules.dep,modules.load,kernel/…}` and
//! `usr/lib/keelson/kernel/<name>/sysctl.conf`.

use std::collections::BTreeMap;
use std::ffi::CStr;
use std::fs::File;
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::kmod::{finit_module, ModuleInitFlags};

use crate::Error;

/// Where an extension's kernel files are in its tree.
pub const KERNEL_DIR: &str = "usr/lib/keelson/kernel";

/// The node's kernel, as the activation sees it (tests point it elsewhere).
#[derive(Debug, Clone)]
pub struct Kernel {
    /// `/proc/sys`.
    pub proc_sys: PathBuf,
    /// `/sys/module`: a module listed there is loaded (or built in) already.
    pub sys_module: PathBuf,
    /// The running kernel's release (`uname -r`); `None` asks the kernel.
    pub release: Option<String>,
}

impl Default for Kernel {
    fn default() -> Self {
        Kernel {
            proc_sys: "/proc/sys".into(),
            sys_module: "/sys/module".into(),
            release: None,
        }
    }
}

impl Kernel {
    fn release(&self) -> String {
        match &self.release {
            Some(r) => r.clone(),
            None => nix::sys::utsname::uname()
                .map(|u| u.release().to_string_lossy().into_owned())
                .unwrap_or_default(),
        }
    }
}

/// What [`prepare`] did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Prepared {
    /// Module files loaded now (dependencies included), in load order.
    pub loaded: Vec<String>,
    /// Requested modules that were loaded already.
    pub present: Vec<String>,
    /// Sysctls set, `key = value`.
    pub sysctls: Vec<String>,
}

/// Loads a module file (`finit_module`); a module already loaded is not an error.
pub fn finit(path: &Path) -> Result<(), String> {
    let file = File::open(path).map_err(|e| format!("opening {}: {e}", path.display()))?;
    match finit_module(&file, c"" as &CStr, ModuleInitFlags::empty()) {
        Ok(()) | Err(Errno::EEXIST) => Ok(()),
        Err(e) => Err(format!("finit_module: {e}")),
    }
}

/// Normalises a module name as the kernel does (`nf-nat` → `nf_nat`), from a name or a path.
fn module_name(path_or_name: &str) -> String {
    let base = path_or_name.rsplit('/').next().unwrap_or(path_or_name);
    let stem = base.split(".ko").next().unwrap_or(base);
    stem.replace('-', "_")
}

/// Loads the modules and sets the sysctls of extension `name` mounted at `root`, with `load`
/// doing the loading of one module file ([`finit`] on a node).
pub fn prepare(
    root: &Path,
    name: &str,
    kernel: &Kernel,
    load: &mut dyn FnMut(&Path) -> Result<(), String>,
) -> Result<Prepared, Error> {
    let fail = |why: String| Error::Activate {
        name: name.to_owned(),
        why,
    };
    let dir = root.join(KERNEL_DIR).join(name);
    let mut done = Prepared::default();
    let modules = dir.join("modules");
    if modules.is_dir() {
        let release = kernel.release();
        let rdir = modules.join(&release);
        if !rdir.is_dir() {
            let built: Vec<String> = list_dirs(&modules);
            let wanted: Vec<String> = built
                .first()
                .map(|b| read_load(&modules.join(b).join("modules.load")))
                .unwrap_or_default();
            return Err(fail(format!(
                "its kernel modules are for kernel {}, the running kernel is {release}: {} cannot be loaded",
                if built.is_empty() { "(none)".to_owned() } else { built.join(", ") },
                if wanted.is_empty() { "its modules".to_owned() } else { wanted.join(", ") }
            )));
        }
        let dep_path = rdir.join("modules.dep");
        let dep_text = std::fs::read_to_string(&dep_path).map_err(|e| {
            fail(format!(
                "reading {}: {e}",
                dep_path.strip_prefix(root).unwrap_or(&dep_path).display()
            ))
        })?;
        let deps = parse_dep(&dep_text);
        for m in read_load(&rdir.join("modules.load")) {
            if kernel.sys_module.join(&m).exists() {
                done.present.push(m);
                continue;
            }
            let Some((file, file_deps)) = deps.get(&m) else {
                return Err(fail(format!(
                    "kernel module {m} is not among its modules for kernel {release} (its modules.dep has no {m}.ko) and is not loaded"
                )));
            };
            // depmod order: the last dependency is loaded first.
            for f in file_deps.iter().rev().chain(std::iter::once(file)) {
                let mname = module_name(f);
                if done.loaded.contains(&mname) || kernel.sys_module.join(&mname).exists() {
                    continue;
                }
                let path = rdir.join(f);
                if !path.is_file() {
                    return Err(fail(format!(
                        "kernel module {mname} (needed for {m}): {} is missing from the image",
                        path.strip_prefix(root).unwrap_or(&path).display()
                    )));
                }
                load(&path).map_err(|e| {
                    fail(if mname == m {
                        format!("loading kernel module {m}: {e}")
                    } else {
                        format!("loading kernel module {mname} (needed for {m}): {e}")
                    })
                })?;
                done.loaded.push(mname);
            }
        }
    }
    let conf = dir.join("sysctl.conf");
    if conf.is_file() {
        let text = std::fs::read_to_string(&conf)
            .map_err(|e| fail(format!("reading sysctl.conf: {e}")))?;
        for (key, value) in
            parse_sysctl(&text).map_err(|(n, why)| fail(format!("sysctl.conf:{n}: {why}")))?
        {
            let path = kernel.proc_sys.join(key.replace('.', "/"));
            if !path.exists() {
                return Err(fail(format!(
                    "sysctl {key}: {} does not exist on this kernel (after loading the extension's modules)",
                    path.display()
                )));
            }
            std::fs::write(&path, format!("{value}\n")).map_err(|e| {
                fail(format!(
                    "sysctl {key} = {value}: writing {}: {e}",
                    path.display()
                ))
            })?;
            done.sysctls.push(format!("{key} = {value}"));
        }
    }
    Ok(done)
}

fn list_dirs(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .map(|d| {
            d.flatten()
                .filter(|e| e.path().is_dir())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

/// `modules.load`: one module name a line, `#` comments.
fn read_load(path: &Path) -> Vec<String> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(module_name)
        .collect()
}

/// `modules.dep` → module name → (its file, its dependencies' files in depmod order).
fn parse_dep(text: &str) -> BTreeMap<String, (String, Vec<String>)> {
    text.lines()
        .filter_map(|l| l.split_once(':'))
        .map(|(file, deps)| {
            let file = file.trim().to_owned();
            (
                module_name(&file),
                (file, deps.split_whitespace().map(str::to_owned).collect()),
            )
        })
        .collect()
}

/// `sysctl.conf`: `key = value` lines, `#`/`;` comments; a key as image-build checked it.
fn parse_sysctl(text: &str) -> Result<Vec<(String, String)>, (usize, String)> {
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let l = line.trim();
        if l.is_empty() || l.starts_with('#') || l.starts_with(';') {
            continue;
        }
        let Some((k, v)) = l.split_once('=') else {
            return Err((i + 1, format!("{l:?} is not key = value")));
        };
        let (k, v) = (k.trim(), v.trim());
        let ok = !k.is_empty()
            && k.split('.').all(|w| {
                !w.is_empty()
                    && w.bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
            });
        if !ok || v.is_empty() {
            return Err((i + 1, format!("{l:?} is not a sysctl key = value")));
        }
        out.push((k.to_owned(), v.to_owned()));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    const R: &str = "6.1.0-test";

    /// An extension tree with br_netfilter (needing bridge, stp, llc) and vxlan.
    fn tree(root: &Path) {
        let m = root.join(KERNEL_DIR).join("docker/modules").join(R);
        for f in [
            "kernel/net/bridge/br_netfilter.ko",
            "kernel/net/bridge/bridge.ko",
            "kernel/net/802/stp.ko",
            "kernel/net/llc/llc.ko",
            "kernel/drivers/net/vxlan/vxlan.ko",
        ] {
            std::fs::create_dir_all(m.join(f).parent().unwrap()).unwrap();
            std::fs::write(m.join(f), "elf").unwrap();
        }
        std::fs::write(
            m.join("modules.dep"),
            "kernel/net/bridge/br_netfilter.ko: kernel/net/bridge/bridge.ko kernel/net/802/stp.ko kernel/net/llc/llc.ko\n\
             kernel/net/bridge/bridge.ko: kernel/net/802/stp.ko kernel/net/llc/llc.ko\n\
             kernel/net/802/stp.ko: kernel/net/llc/llc.ko\n\
             kernel/net/llc/llc.ko:\n\
             kernel/drivers/net/vxlan/vxlan.ko:\n",
        )
        .unwrap();
        std::fs::write(m.join("modules.load"), "# x\nbr_netfilter\nvxlan\n").unwrap();
    }

    fn kernel(dir: &Path) -> Kernel {
        std::fs::create_dir_all(dir.join("sys/module/overlay")).unwrap();
        std::fs::create_dir_all(dir.join("proc/sys/net/bridge")).unwrap();
        std::fs::write(
            dir.join("proc/sys/net/bridge/bridge-nf-call-iptables"),
            "0\n",
        )
        .unwrap();
        Kernel {
            proc_sys: dir.join("proc/sys"),
            sys_module: dir.join("sys/module"),
            release: Some(R.into()),
        }
    }

    #[test]
    fn modules_load_after_their_dependencies_then_sysctls_are_set() {
        let d = tempfile::tempdir().unwrap();
        let root = d.path().join("root");
        tree(&root);
        let k = kernel(d.path());
        // bridge is loaded already (the OS loads it): not loaded again.
        std::fs::create_dir_all(k.sys_module.join("bridge")).unwrap();
        std::fs::write(
            root.join(KERNEL_DIR).join("docker/sysctl.conf"),
            "# c\nnet.bridge.bridge-nf-call-iptables = 1\n",
        )
        .unwrap();
        let mut calls = Vec::new();
        let done = prepare(&root, "docker", &k, &mut |p: &Path| {
            calls.push(p.file_name().unwrap().to_string_lossy().into_owned());
            Ok(())
        })
        .unwrap();
        assert_eq!(calls, ["llc.ko", "stp.ko", "br_netfilter.ko", "vxlan.ko"]);
        assert_eq!(done.loaded, ["llc", "stp", "br_netfilter", "vxlan"]);
        assert_eq!(done.sysctls, ["net.bridge.bridge-nf-call-iptables = 1"]);
        assert_eq!(
            std::fs::read_to_string(k.proc_sys.join("net/bridge/bridge-nf-call-iptables")).unwrap(),
            "1\n"
        );
        // Activated again (modules now loaded): nothing is loaded twice.
        for m in &done.loaded {
            std::fs::create_dir_all(k.sys_module.join(m)).unwrap();
        }
        let again = prepare(&root, "docker", &k, &mut |p: &Path| {
            panic!("loaded {} again", p.display())
        })
        .unwrap();
        assert_eq!(again.present, ["br_netfilter", "vxlan"]);
    }

    #[test]
    fn a_missing_module_refuses_the_extension_naming_it() {
        let d = tempfile::tempdir().unwrap();
        let root = d.path().join("root");
        tree(&root);
        let k = kernel(d.path());
        let m = root.join(KERNEL_DIR).join("docker/modules").join(R);
        std::fs::write(m.join("modules.load"), "vxlan\nip_vs\n").unwrap();
        let mut calls = 0;
        let e = prepare(&root, "docker", &k, &mut |_: &Path| {
            calls += 1;
            Ok(())
        })
        .unwrap_err()
        .to_string();
        assert_eq!(
            e,
            "extension docker: kernel module ip_vs is not among its modules for kernel 6.1.0-test (its modules.dep has no ip_vs.ko) and is not loaded"
        );
        // A dependency's file gone from the image.
        std::fs::write(m.join("modules.load"), "br_netfilter\n").unwrap();
        std::fs::remove_file(m.join("kernel/net/802/stp.ko")).unwrap();
        let e = prepare(&root, "docker", &k, &mut |_: &Path| Ok(()))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("kernel module stp (needed for br_netfilter)")
                && e.contains("kernel/net/802/stp.ko is missing from the image"),
            "{e}"
        );
        // The kernel refusing to load one names it and its error.
        std::fs::write(m.join("modules.load"), "vxlan\n").unwrap();
        let e = prepare(&root, "docker", &k, &mut |_: &Path| {
            Err("finit_module: ENOEXEC: Exec format error".into())
        })
        .unwrap_err()
        .to_string();
        assert_eq!(
            e,
            "extension docker: loading kernel module vxlan: finit_module: ENOEXEC: Exec format error"
        );
    }

    #[test]
    fn modules_for_another_kernel_are_refused_with_their_names() {
        let d = tempfile::tempdir().unwrap();
        let root = d.path().join("root");
        tree(&root);
        let mut k = kernel(d.path());
        k.release = Some("6.12.0-other".into());
        let e = prepare(&root, "docker", &k, &mut |_: &Path| Ok(()))
            .unwrap_err()
            .to_string();
        assert_eq!(
            e,
            "extension docker: its kernel modules are for kernel 6.1.0-test, the running kernel is 6.12.0-other: br_netfilter, vxlan cannot be loaded"
        );
    }

    #[test]
    fn sysctls_that_do_not_exist_or_do_not_parse_are_refused() {
        let d = tempfile::tempdir().unwrap();
        let root = d.path().join("root");
        std::fs::create_dir_all(root.join(KERNEL_DIR).join("e")).unwrap();
        let k = kernel(d.path());
        let conf = root.join(KERNEL_DIR).join("e/sysctl.conf");
        std::fs::write(&conf, "net.ipv4.vs.conntrack = 1\n").unwrap();
        let e = prepare(&root, "e", &k, &mut |_: &Path| Ok(()))
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("extension e: sysctl net.ipv4.vs.conntrack: ")
                && e.contains("proc/sys/net/ipv4/vs/conntrack does not exist"),
            "{e}"
        );
        std::fs::write(&conf, "net/../../etc = 1\n").unwrap();
        let e = prepare(&root, "e", &k, &mut |_: &Path| Ok(()))
            .unwrap_err()
            .to_string();
        assert!(e.contains("sysctl.conf:1:"), "{e}");
        // Nothing asked: nothing done.
        std::fs::remove_file(&conf).unwrap();
        assert_eq!(
            prepare(&root, "e", &k, &mut |_: &Path| Ok(())).unwrap(),
            Prepared::default()
        );
    }

    #[test]
    fn names_are_normalised() {
        assert_eq!(module_name("kernel/net/netfilter/nf-nat.ko"), "nf_nat");
        assert_eq!(module_name("ip_vs"), "ip_vs");
    }
}
