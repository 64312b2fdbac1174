//! Kernel modules in the initramfs: parsing `modules.dep` and `modules.load`, working out the load
//! order (each module after its dependencies, each once), and loading them with finit_module(2).

use std::collections::{HashMap, HashSet};
use std::ffi::CStr;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::time::Instant;

use keelson_common::notify;
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

/// Loads modules as stage 1 needs them: the always-loaded list (`modules.load`) and, by
/// coldplug, the hardware drivers whose device aliases (`modules.alias`) match a device the
/// kernel has found. Each module is loaded once; failures are logged, not fatal: if a module
/// mattered, the boot-disk wait fails with a description of what is missing.
pub struct Loader {
    dir: PathBuf,
    dep: DepMap,
    aliases: Vec<(String, String)>,
    /// Module paths already loaded (or tried).
    done: HashSet<String>,
    /// Device modaliases already matched.
    seen: HashSet<String>,
    /// Modules loaded so far.
    pub count: usize,
    started: Instant,
}

impl Loader {
    /// Reads `modules.dep` and `modules.alias` of the running kernel (in `/lib/modules`, which
    /// is the initramfs' in stage 1 and the root's `/usr/lib/modules` in stage 2).
    pub fn open() -> Loader {
        let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
        let dir = Path::new("/lib/modules").join(release.trim());
        let dep = match std::fs::read_to_string(dir.join("modules.dep")) {
            Ok(text) => DepMap::parse(&text),
            Err(e) => {
                crate::say!("modules: no {}/modules.dep ({e})", dir.display());
                DepMap::default()
            }
        };
        let aliases = std::fs::read_to_string(dir.join("modules.alias"))
            .map(|t| parse_aliases(&t))
            .unwrap_or_default();
        Loader {
            dir,
            dep,
            aliases,
            done: HashSet::new(),
            seen: HashSet::new(),
            count: 0,
            started: Instant::now(),
        }
    }

    /// Milliseconds since [`Loader::open`].
    pub fn millis(&self) -> u128 {
        self.started.elapsed().as_millis()
    }

    /// Loads everything `modules.load` asks for.
    pub fn load_list(&mut self) {
        let list = self.read_list();
        let order = self.plan_list(&list);
        self.load_paths(&order);
    }

    /// Stage 1: the drivers of the devices present and `modules.load`, loaded together (one
    /// parallel batch), then [`Loader::coldplug`] for the devices the drivers revealed.
    pub fn load_boot(&mut self) {
        let list = self.read_list();
        let mut order = self.plan_list(&list);
        let drivers = self.unmatched_drivers();
        for path in plan(&self.dep, &drivers).order {
            if !order.contains(&path) {
                order.push(path);
            }
        }
        self.load_paths(&order);
        self.coldplug();
    }

    fn read_list(&self) -> Vec<String> {
        match std::fs::read_to_string(self.dir.join("modules.load")) {
            Ok(text) => parse_load_list(&text),
            Err(e) => {
                crate::say!(
                    "modules: no {}/modules.load ({e}); loading none",
                    self.dir.display()
                );
                Vec::new()
            }
        }
    }

    /// The load order of `list`, naming the modules the kernel has built in.
    fn plan_list(&self, list: &[String]) -> Vec<String> {
        let plan = plan(&self.dep, list);
        if !plan.builtin.is_empty() {
            crate::say!(
                "modules: not in modules.dep, assuming built into the kernel: {}",
                plan.builtin.join(", ")
            );
        }
        plan.order
    }

    /// The drivers whose aliases match a device not matched before.
    fn unmatched_drivers(&mut self) -> Vec<String> {
        let fresh: Vec<String> = device_modaliases()
            .into_iter()
            .filter(|m| self.seen.insert(m.clone()))
            .collect();
        self.aliases
            .iter()
            .filter(|(pattern, _)| fresh.iter().any(|m| glob_match(pattern, m)))
            .map(|(_, module)| module.clone())
            .collect()
    }

    /// Loads the drivers of devices not matched before; returns how many modules it loaded.
    /// Loading a bus driver (virtio_pci) reveals new devices (virtio disks), so callers repeat
    /// this until it loads nothing, and keep calling it while waiting for slow buses.
    pub fn coldplug(&mut self) -> usize {
        let before = self.count;
        loop {
            let wanted = self.unmatched_drivers();
            if wanted.is_empty() {
                return self.count - before;
            }
            let order = plan(&self.dep, &wanted).order;
            if !self.load_paths(&order) {
                return self.count - before;
            }
        }
    }

    /// Loads the paths not tried before, [`THREADS`] at a time (see [`load_parallel`]);
    /// returns whether any was new.
    fn load_paths(&mut self, order: &[String]) -> bool {
        let fresh: Vec<String> = order
            .iter()
            .filter(|p| self.done.insert((*p).clone()))
            .cloned()
            .collect();
        let dir = &self.dir;
        let results = load_parallel(&fresh, &self.dep, THREADS, |path| {
            if path.starts_with('/') {
                load_one(Path::new(path))
            } else {
                load_one(&dir.join(path))
            }
        });
        for (path, result) in fresh.iter().zip(results) {
            match result {
                Ok(()) => self.count += 1,
                // No such hardware or firmware interface (efivarfs without UEFI): nothing to do.
                Err(Error::Init(Errno::ENODEV)) => {}
                Err(e) => crate::say!("modules: cannot load {path}: {e}"),
            }
        }
        !fresh.is_empty()
    }
}

/// How many modules are loaded at once. Most of a module load is the kernel waiting (RCU grace
/// periods, a driver's probe waiting for its device), not computing, so loads overlap well
/// even on one CPU; udev's workers load modules the same way.
pub const THREADS: usize = 8;

/// Runs `load` for every path of `order` (dependencies before the modules that need them, as
/// [`plan`] orders them) on up to `threads` threads: a path starts once every dependency
/// `dep` names for it that is in `order` has finished (loaded or failed; a module whose
/// dependency failed fails on its own, naming the missing symbols). Returns the results in
/// the order of `order`.
pub fn load_parallel<E: Send>(
    order: &[String],
    dep: &DepMap,
    threads: usize,
    load: impl Fn(&str) -> Result<(), E> + Sync,
) -> Vec<Result<(), E>> {
    use std::sync::{Condvar, Mutex};
    struct Sched<E> {
        /// Indices of `order` not started yet.
        waiting: Vec<usize>,
        running: usize,
        finished: HashSet<usize>,
        results: Vec<(usize, Result<(), E>)>,
    }
    let index: HashMap<&str, usize> = order
        .iter()
        .enumerate()
        .map(|(i, p)| (p.as_str(), i))
        .collect();
    // For each path, the indices in `order` it waits for.
    let needs: Vec<Vec<usize>> = order
        .iter()
        .map(|p| {
            dep.deps
                .get(p)
                .map(|ds| {
                    ds.iter()
                        .filter_map(|d| index.get(d.as_str()).copied())
                        .collect()
                })
                .unwrap_or_default()
        })
        .collect();
    let sched = Mutex::new(Sched {
        waiting: (0..order.len()).collect(),
        running: 0,
        finished: HashSet::new(),
        results: Vec::with_capacity(order.len()),
    });
    let turn = Condvar::new();
    let worker = || loop {
        let next = {
            let mut s = sched.lock().unwrap_or_else(|p| p.into_inner());
            loop {
                if s.waiting.is_empty() {
                    break None;
                }
                let ready = s
                    .waiting
                    .iter()
                    .position(|&i| needs[i].iter().all(|d| s.finished.contains(d)));
                let at = match ready {
                    Some(at) => at,
                    // Only a cycle (a broken modules.dep) leaves none ready with none running:
                    // take the first one anyway rather than wait forever.
                    None if s.running == 0 => 0,
                    None => {
                        s = turn.wait(s).unwrap_or_else(|p| p.into_inner());
                        continue;
                    }
                };
                s.running += 1;
                break Some(s.waiting.remove(at));
            }
        };
        let Some(i) = next else { return };
        let result = load(&order[i]);
        let mut s = sched.lock().unwrap_or_else(|p| p.into_inner());
        s.running -= 1;
        s.results.push((i, result));
        s.finished.insert(i);
        turn.notify_all();
    };
    std::thread::scope(|scope| {
        for _ in 1..threads.clamp(1, order.len().max(1)) {
            // A thread that cannot be made leaves its share to the others.
            let _ = std::thread::Builder::new().spawn_scoped(scope, worker);
        }
        worker();
    });
    let mut results = sched
        .into_inner()
        .unwrap_or_else(|p| p.into_inner())
        .results;
    results.sort_by_key(|(i, _)| *i);
    results.into_iter().map(|(_, r)| r).collect()
}

/// Stage 2: loads the root's `modules.load` in a child process, so init keeps serving
/// signals and sysd starts at the same time. The child's pid goes to
/// [`notify::ROOT_MODULES_LOADING`] and its summary to [`notify::ROOT_MODULES_LOADED`] in
/// `run_dir`: what needs a module in sysd waits for them (it found `overlay` missing when the
/// loader was slower than its start), nothing before its READY does. The child is reaped by
/// init's ordinary zombie reaping.
pub fn load_root_modules_in_background(run_dir: &Path) {
    let loaded = run_dir.join(notify::ROOT_MODULES_LOADED);
    // SAFETY: init is single-threaded, so the child may run arbitrary code (allocate, log)
    // after fork; it ends with _exit and never returns into init's loop.
    match unsafe { nix::unistd::fork() } {
        Ok(nix::unistd::ForkResult::Child) => {
            // Niced: sysd's start to READY waits for no module, so it comes first on a busy
            // CPU; what does wait (container starts, the extension merge) waits while sysd is
            // idle, and then the loader has the CPU. Set before the loader's threads start
            // (they inherit it).
            // SAFETY: setpriority on this process only, no memory arguments.
            unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, 19) };
            let summary = load_root_list();
            if let Err(e) = crate::state::write_atomic(&loaded, summary.as_bytes(), 0o644) {
                crate::say!("modules: cannot record {}: {e}", loaded.display());
            }
            // SAFETY: ends the child without running init's exit paths.
            unsafe { libc::_exit(0) }
        }
        Ok(nix::unistd::ForkResult::Parent { child }) => {
            // Written after the fork: a loader that finished first has written `loaded`, which
            // sysd looks for first.
            let loading = run_dir.join(notify::ROOT_MODULES_LOADING);
            if let Err(e) =
                crate::state::write_atomic(&loading, format!("{child}\n").as_bytes(), 0o644)
            {
                crate::say!("modules: cannot record {}: {e}", loading.display());
            }
        }
        Err(e) => {
            crate::say!("modules: cannot fork the root module loader ({e}): loading them now");
            let summary = load_root_list();
            let _ = crate::state::write_atomic(&loaded, summary.as_bytes(), 0o644);
        }
    }
}

/// Loads the root's list; says and returns the summary line.
fn load_root_list() -> String {
    let mut loader = Loader::open();
    loader.load_list();
    let summary = format!(
        "modules: {} from the root loaded in {} ms",
        loader.count,
        loader.millis()
    );
    crate::say!("{summary}");
    summary
}

/// `alias <pattern> <module>` lines of `modules.alias`, module names normalised.
pub fn parse_aliases(text: &str) -> Vec<(String, String)> {
    text.lines()
        .filter_map(|l| {
            let mut words = l.split_whitespace();
            match (words.next(), words.next(), words.next()) {
                (Some("alias"), Some(pattern), Some(module)) => {
                    Some((pattern.to_owned(), module_name(module)))
                }
                _ => None,
            }
        })
        .collect()
}

/// The modalias of every device on every bus (`/sys/bus/*/devices/*/modalias`).
fn device_modaliases() -> Vec<String> {
    let mut out = Vec::new();
    let Ok(buses) = std::fs::read_dir("/sys/bus") else {
        return out;
    };
    for bus in buses.filter_map(Result::ok) {
        let Ok(devices) = std::fs::read_dir(bus.path().join("devices")) else {
            continue;
        };
        for dev in devices.filter_map(Result::ok) {
            if let Ok(alias) = std::fs::read_to_string(dev.path().join("modalias")) {
                let alias = alias.trim();
                if !alias.is_empty() {
                    out.push(alias.to_owned());
                }
            }
        }
    }
    out
}

/// fnmatch(3) without flags, as modprobe matches aliases: `*`, `?` and `[...]` classes
/// (with ranges and `!`/`^` negation).
pub fn glob_match(pattern: &str, text: &str) -> bool {
    fn class(p: &[u8], c: u8) -> Option<(bool, usize)> {
        // p starts after '['; returns (matched, bytes consumed including ']').
        let mut i = 0;
        let negate = matches!(p.first(), Some(b'!') | Some(b'^'));
        if negate {
            i += 1;
        }
        let mut matched = false;
        let mut first = true;
        while i < p.len() {
            let b = p[i];
            if b == b']' && !first {
                return Some((matched != negate, i + 1));
            }
            first = false;
            if i + 2 < p.len() && p[i + 1] == b'-' && p[i + 2] != b']' {
                if (b..=p[i + 2]).contains(&c) {
                    matched = true;
                }
                i += 3;
            } else {
                if b == c {
                    matched = true;
                }
                i += 1;
            }
        }
        None
    }
    let (p, t) = (pattern.as_bytes(), text.as_bytes());
    let (mut pi, mut ti) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while ti < t.len() {
        let step = match p.get(pi) {
            Some(b'*') => {
                star = Some((pi, ti));
                pi += 1;
                continue;
            }
            Some(b'?') => Some(1),
            Some(b'[') => match class(&p[pi + 1..], t[ti]) {
                Some((true, used)) => Some(used + 1),
                Some((false, _)) => None,
                None => (t[ti] == b'[').then_some(1),
            },
            Some(&c) => (c == t[ti]).then_some(1),
            None => None,
        };
        match step {
            Some(n) => {
                pi += n;
                ti += 1;
            }
            None => match star {
                Some((sp, st)) => {
                    pi = sp + 1;
                    ti = st + 1;
                    star = Some((sp, st + 1));
                }
                None => return false,
            },
        }
    }
    p[pi..].iter().all(|&b| b == b'*')
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
    fn globs_match_like_fnmatch() {
        let virtio_blk = "virtio:d00000002v*";
        assert!(glob_match(virtio_blk, "virtio:d00000002v00001AF4"));
        assert!(!glob_match(virtio_blk, "virtio:d00000001v00001AF4"));
        assert!(glob_match(
            "pci:v*d*sv*sd*bc01sc06i01*",
            "pci:v00008086d00002922sv00001AF4sd00001100bc01sc06i01"
        ));
        assert!(glob_match("acpi*:PNP0C0C:*", "acpi:PNP0C0C:"));
        assert!(glob_match("a[0-9]c", "a7c") && !glob_match("a[!0-9]c", "a7c"));
        assert!(glob_match("x?z", "xyz") && !glob_match("x?z", "xz"));
        assert!(!glob_match("abc", "abcd") && glob_match("abc*", "abc"));
    }

    #[test]
    fn aliases_parse() {
        let a = parse_aliases(
            "# c\nalias pci:v*d*bc01sc06i01* ahci\nalias acpi*:PNP0C0C:* button\njunk\n",
        );
        assert_eq!(
            a,
            vec![
                ("pci:v*d*bc01sc06i01*".to_owned(), "ahci".to_owned()),
                ("acpi*:PNP0C0C:*".to_owned(), "button".to_owned())
            ]
        );
    }

    /// Every module once, each after the dependencies it waits for, several at a time; a
    /// cycle in a broken modules.dep does not hang.
    #[test]
    fn parallel_loads_respect_dependencies() {
        use std::sync::Mutex;
        let dep = DepMap::parse(DEP);
        let wanted = parse_load_list("dm_verity\nvirtio_blk\nbutton\na\n");
        let order = plan(&dep, &wanted).order;
        let log = Mutex::new(Vec::<(String, &str)>::new());
        let results = load_parallel(&order, &dep, 4, |path| {
            log.lock().unwrap().push((path.to_owned(), "start"));
            std::thread::sleep(std::time::Duration::from_millis(20));
            log.lock().unwrap().push((path.to_owned(), "end"));
            if path.ends_with("virtio_blk.ko") {
                Err(path.to_owned())
            } else {
                Ok(())
            }
        });
        assert_eq!(results.len(), order.len());
        for (path, r) in order.iter().zip(&results) {
            assert_eq!(r.is_err(), path.ends_with("virtio_blk.ko"), "{path}");
        }
        let log = log.into_inner().unwrap();
        let at = |p: &str, what: &str| {
            log.iter()
                .position(|(l, w)| l == p && *w == what)
                .unwrap_or_else(|| panic!("{p} {what}: {log:?}"))
        };
        assert_eq!(log.len(), order.len() * 2, "each once: {log:?}");
        for (path, deps) in &dep.deps {
            if !order.contains(path)
                || path.starts_with("kernel/a")
                || path.starts_with("kernel/b")
                || path.starts_with("kernel/c")
            {
                continue;
            }
            for d in deps {
                assert!(
                    at(d, "end") < at(path, "start"),
                    "{d} before {path}: {log:?}"
                );
            }
        }
        // dm-mod and virtio_ring have no dependencies: they overlap.
        let (m, r) = (
            "kernel/drivers/md/dm-mod.ko",
            "kernel/drivers/virtio/virtio_ring.ko",
        );
        assert!(
            at(m, "start") < at(r, "end") && at(r, "start") < at(m, "end"),
            "{log:?}"
        );
    }

    #[test]
    fn cycles_terminate() {
        let dep = DepMap::parse(DEP);
        let p = plan(&dep, &["a".to_owned()]);
        assert_eq!(p.order, vec!["kernel/c.ko", "kernel/b.ko", "kernel/a.ko"]);
    }
}
