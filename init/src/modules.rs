//! Kernel modules in the initramfs: parsing `modules.dep` and `modules.load`, working out the load
//! order (each module after its dependencies, each once), and loading them with finit_module(2).

use std::collections::{HashMap, HashSet};
use std::ffi::CStr;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::time::Instant;

use nix::errno::Errno;
use nix::kmod::{finit_module, ModuleInitFlags};

/// The module name of a path or a name from `modules.load`: the file stem with `-` as `_`
/// (`kernel/drivers/block/virtio-blk.ko` → `virtio_blk`), as modprobe normalises it.
pub fn module_name(path_or_name: &str) -> String {
    let file = path_or_name.rsplit('/').next().unwrap_or(path_or_name);
    let stem = file.split('.').next().unwrap_or(file);
    stem.replace('-', "_")
}

/// `modules.dep`: for each module path, the paths of all it depends on, in depmod's order (the
/// one to load first is last).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct DepMap {
    /// Module name → its path.
    by_name: HashMap<String, String>,
    /// Module path → dependency paths.
    deps: HashMap<String, Vec<String>>,
}

impl DepMap {
    /// Parses `path: dep dep ...` lines; malformed lines are skipped.
    pub fn parse(text: &str) -> DepMap {
        let mut map = DepMap::default();
        for line in text.lines() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let Some((path, deps)) = line.split_once(':') else {
                continue;
            };
            let path = path.trim();
            if path.is_empty() {
                continue;
            }
            map.by_name.insert(module_name(path), path.to_owned());
            map.deps.insert(
                path.to_owned(),
                deps.split_whitespace().map(str::to_owned).collect(),
            );
        }
        map
    }
}

/// Module names from `modules.load`, normalised, comments and blanks skipped, duplicates dropped.
pub fn parse_load_list(text: &str) -> Vec<String> {
    let mut seen = HashSet::new();
    text.lines()
        .map(|l| l.split('#').next().unwrap_or("").trim())
        .filter(|l| !l.is_empty())
        .map(module_name)
        .filter(|n| seen.insert(n.clone()))
        .collect()
}

/// What to load, in order, and which requested modules are presumed built into the kernel.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Plan {
    /// Module paths (as in `modules.dep`), dependencies first, each once.
    pub order: Vec<String>,
    /// Requested names `modules.dep` does not know.
    pub builtin: Vec<String>,
}

/// Orders the requested modules and their dependency closure. depmod already lists a module's full
/// closure, last-to-load-first; walking each dependency's own entry too keeps the order right even
/// for a hand-written, incomplete `modules.dep`, and the visited set makes cycles harmless.
pub fn plan(dep: &DepMap, wanted: &[String]) -> Plan {
    fn visit(dep: &DepMap, path: &str, seen: &mut HashSet<String>, order: &mut Vec<String>) {
        if !seen.insert(path.to_owned()) {
            return;
        }
        if let Some(deps) = dep.deps.get(path) {
            for d in deps.iter().rev() {
                visit(dep, d, seen, order);
            }
        }
        order.push(path.to_owned());
    }
    let mut plan = Plan::default();
    let mut seen = HashSet::new();
    for name in wanted {
        match dep.by_name.get(name) {
            Some(path) => visit(dep, path, &mut seen, &mut plan.order),
            None => plan.builtin.push(name.clone()),
        }
    }
    plan
}

/// The outcome of [`load_all`].
#[derive(Debug, Default)]
pub struct Loaded {
    /// Modules now in the kernel (freshly loaded or already there).
    pub count: usize,
    /// Milliseconds spent.
    pub millis: u128,
}

/// Loads everything `modules.load` in `/lib/modules/<running kernel>` asks for. A module that
/// fails to load is logged, not fatal: if it mattered, the boot-disk wait fails with a
/// description of what is missing.
pub fn load_all() -> Loaded {
    let start = Instant::now();
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let dir = Path::new("/lib/modules").join(release.trim());
    let load_list = match std::fs::read_to_string(dir.join("modules.load")) {
        Ok(text) => parse_load_list(&text),
        Err(e) => {
            crate::say!(
                "modules: no {}/modules.load ({e}); loading none",
                dir.display()
            );
            Vec::new()
        }
    };
    let dep = match std::fs::read_to_string(dir.join("modules.dep")) {
        Ok(text) => DepMap::parse(&text),
        Err(e) => {
            if !load_list.is_empty() {
                crate::say!("modules: no {}/modules.dep ({e})", dir.display());
            }
            DepMap::default()
        }
    };
    let plan = plan(&dep, &load_list);
    if !plan.builtin.is_empty() {
        crate::say!(
            "modules: not in modules.dep, assuming built into the kernel: {}",
            plan.builtin.join(", ")
        );
    }
    let mut count = 0;
    for path in &plan.order {
        let full = if path.starts_with('/') {
            PathBuf::from(path)
        } else {
            dir.join(path)
        };
        match load_one(&full) {
            Ok(()) => count += 1,
            Err(e) => crate::say!("modules: cannot load {}: {e}", full.display()),
        }
    }
    Loaded {
        count,
        millis: start.elapsed().as_millis(),
    }
}

/// Why one module did not load.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("open: {0}")]
    Open(std::io::Error),
    #[error("finit_module: {0}")]
    Init(Errno),
}

fn load_one(path: &Path) -> Result<(), Error> {
    let file = File::open(path).map_err(Error::Open)?;
    match finit_module(&file, c"" as &CStr, ModuleInitFlags::empty()) {
        Ok(()) | Err(Errno::EEXIST) => Ok(()),
        Err(e) => Err(Error::Init(e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DEP: &str = "\
kernel/drivers/md/dm-verity.ko: kernel/drivers/md/dm-bufio.ko kernel/drivers/md/dm-mod.ko
kernel/drivers/md/dm-bufio.ko:
kernel/drivers/md/dm-mod.ko:
kernel/drivers/block/virtio_blk.ko: kernel/drivers/virtio/virtio_ring.ko
kernel/drivers/virtio/virtio_ring.ko:
kernel/a.ko: kernel/b.ko kernel/c.ko
kernel/b.ko: kernel/c.ko
kernel/c.ko: kernel/a.ko
garbage line without colon
";

    #[test]
    fn names_are_normalised() {
        assert_eq!(module_name("kernel/drivers/md/dm-verity.ko"), "dm_verity");
        assert_eq!(module_name("dm-verity"), "dm_verity");
        assert_eq!(module_name("virtio_blk.ko.xz"), "virtio_blk");
    }

    #[test]
    fn load_list_skips_comments_and_duplicates() {
        let l =
            parse_load_list("# initramfs modules\nvirtio-blk\n\ndm_verity # root\nvirtio_blk\n");
        assert_eq!(l, vec!["virtio_blk", "dm_verity"]);
    }

    #[test]
    fn dependencies_load_first_and_once() {
        let dep = DepMap::parse(DEP);
        assert_eq!(dep.deps.len(), 8);
        let wanted = parse_load_list("dm_verity\nvirtio_blk\ndm-mod\nbutton\n");
        let p = plan(&dep, &wanted);
        assert_eq!(
            p.order,
            vec![
                "kernel/drivers/md/dm-mod.ko",
                "kernel/drivers/md/dm-bufio.ko",
                "kernel/drivers/md/dm-verity.ko",
                "kernel/drivers/virtio/virtio_ring.ko",
                "kernel/drivers/block/virtio_blk.ko",
            ]
        );
        assert_eq!(p.builtin, vec!["button"]);
    }

    #[test]
    fn cycles_terminate() {
        let dep = DepMap::parse(DEP);
        let p = plan(&dep, &["a".to_owned()]);
        assert_eq!(p.order, vec!["kernel/c.ko", "kernel/b.ko", "kernel/a.ko"]);
    }
}
