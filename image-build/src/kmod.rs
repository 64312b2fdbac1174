//! Kernel modules: the dependency closure of the modules an image asks for, read from each
//! module's `.modinfo` section (`depends=`, `softdep=pre:`), since the Debian package ships no
//! `modules.dep` (depmod runs at install time) and the host may have no depmod.
//!
//! The result is written as a trimmed `modules.dep` in depmod's format (a module's dependencies
//! listed so that the last one must be loaded first) plus `modules.load`, the list init loads.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use object::{Object, ObjectSection};

/// Normalises a module name as the kernel does (`dm-verity` → `dm_verity`).
pub fn normalise(name: &str) -> String {
    name.replace('-', "_")
}

/// The modules of one kernel release, indexed by name.
pub struct ModuleTree {
    /// `lib/modules/<release>` inside the unpacked kernel package.
    pub root: PathBuf,
    /// name → path relative to `root`.
    files: BTreeMap<String, String>,
    builtin: BTreeSet<String>,
}

/// The closure of a module request.
#[derive(Debug, PartialEq, Eq)]
pub struct Closure {
    /// The requested modules that are loadable, in request order (normalised names).
    pub load: Vec<String>,
    /// Requested modules built into the kernel (nothing to load).
    pub builtin: Vec<String>,
    /// Hardware drivers: loaded by init only when a device's modalias matches one of theirs.
    pub drivers: Vec<String>,
    /// Every module file needed, with its dependencies in depmod order.
    pub deps: BTreeMap<String, Vec<String>>,
    /// `(modalias pattern, driver)` for every requested driver, sorted.
    pub aliases: Vec<(String, String)>,
}

impl ModuleTree {
    /// Indexes `root` (`.../lib/modules/<release>`).
    pub fn open(root: &Path) -> Result<Self> {
        let mut files = BTreeMap::new();
        let mut stack = vec![root.join("kernel")];
        while let Some(dir) = stack.pop() {
            for entry in
                std::fs::read_dir(&dir).with_context(|| format!("reading {}", dir.display()))?
            {
                let path = entry?.path();
                if path.is_dir() {
                    stack.push(path);
                } else if path.extension().is_some_and(|e| e == "ko") {
                    let rel = path.strip_prefix(root)?.to_string_lossy().into_owned();
                    let stem = path.file_stem().unwrap_or_default().to_string_lossy();
                    files.insert(normalise(&stem), rel);
                }
            }
        }
        let builtin = std::fs::read_to_string(root.join("modules.builtin"))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| Path::new(l).file_stem())
            .map(|s| normalise(&s.to_string_lossy()))
            .collect();
        Ok(ModuleTree {
            root: root.to_owned(),
            files,
            builtin,
        })
    }

    /// Path (relative to the tree) of a module.
    pub fn file(&self, name: &str) -> Option<&str> {
        self.files.get(name).map(String::as_str)
    }

    fn modinfo(&self, name: &str) -> Result<Vec<u8>> {
        let rel = &self.files[name];
        let data = std::fs::read(self.root.join(rel)).with_context(|| format!("reading {rel}"))?;
        let obj =
            object::File::parse(&*data).with_context(|| format!("{rel} is not an ELF module"))?;
        let section = obj
            .section_by_name(".modinfo")
            .with_context(|| format!("{rel} has no .modinfo section"))?;
        Ok(section.data()?.to_vec())
    }

    fn direct_deps(&self, name: &str) -> Result<Vec<String>> {
        Ok(modinfo_deps(&self.modinfo(name)?)
            .into_iter()
            .filter_map(|d| {
                // A soft dependency may name a crypto algorithm (`crc32c`) rather than a module;
                // its generic implementation is `<name>_generic` by kernel convention.
                let d = normalise(&d);
                let generic = format!("{d}_generic");
                [d, generic]
                    .into_iter()
                    .find(|c| self.files.contains_key(c))
            })
            .collect())
    }

    fn split(
        &self,
        key: &str,
        requested: &[String],
        builtin: &mut Vec<String>,
    ) -> Result<Vec<String>> {
        let mut found = Vec::new();
        let mut unknown = Vec::new();
        for r in requested {
            let n = normalise(r);
            if self.files.contains_key(&n) {
                found.push(n);
            } else if self.builtin.contains(&n) {
                builtin.push(n);
            } else {
                unknown.push(r.clone());
            }
        }
        if !unknown.is_empty() {
            bail!(
                "{key} names modules this kernel has neither as a file nor built in: {}",
                unknown.join(", ")
            );
        }
        Ok(found)
    }

    /// Resolves the always-loaded `modules` and the hardware `drivers` to their closure.
    /// Unknown names are an error naming them.
    pub fn closure(&self, key: &str, modules: &[String], drivers: &[String]) -> Result<Closure> {
        let mut builtin = Vec::new();
        let load = self.split(key, modules, &mut builtin)?;
        let drivers = self.split("kernel.drivers", drivers, &mut builtin)?;
        let mut aliases = Vec::new();
        for d in &drivers {
            let info = self.modinfo(d)?;
            let before = aliases.len();
            aliases.extend(modinfo_aliases(&info).into_iter().map(|a| (a, d.clone())));
            if aliases.len() == before {
                bail!("kernel.drivers: {d} declares no device aliases, so no device would ever load it; move it to kernel.modules");
            }
        }
        aliases.sort();
        let mut direct: BTreeMap<String, Vec<String>> = BTreeMap::new();
        let mut todo: Vec<String> = load.iter().chain(&drivers).cloned().collect();
        while let Some(m) = todo.pop() {
            if direct.contains_key(&m) {
                continue;
            }
            let d = self.direct_deps(&m)?;
            todo.extend(d.iter().cloned());
            direct.insert(m, d);
        }
        let deps = direct
            .keys()
            .map(|m| (m.clone(), depmod_order(m, &direct)))
            .collect();
        Ok(Closure {
            load,
            builtin,
            drivers,
            deps,
            aliases,
        })
    }

    /// Renders `modules.dep` for a closure (paths relative to the module tree).
    pub fn render_dep(&self, closure: &Closure) -> String {
        let mut out = String::new();
        for (m, deps) in &closure.deps {
            out.push_str(&self.files[m]);
            out.push(':');
            for d in deps {
                out.push(' ');
                out.push_str(&self.files[d]);
            }
            out.push('\n');
        }
        out
    }
}

/// Renders `modules.alias` in depmod's format (`alias <pattern> <module>`), drivers only.
pub fn render_alias(closure: &Closure) -> String {
    let mut out = String::from("# Device aliases of the hardware drivers init loads on demand.\n");
    for (pattern, module) in &closure.aliases {
        out.push_str(&format!("alias {pattern} {module}\n"));
    }
    out
}

/// Renders `modules.load`.
pub fn render_load(closure: &Closure) -> String {
    let mut out =
        String::from("# Modules stage 1 loads, in order (dependencies from modules.dep first).\n");
    for m in &closure.load {
        out.push_str(m);
        out.push('\n');
    }
    out
}

/// The transitive dependencies of `m` ordered as depmod writes them: every module before its own
/// dependencies, so loading from the end of the list backwards satisfies each one.
fn depmod_order(m: &str, direct: &BTreeMap<String, Vec<String>>) -> Vec<String> {
    fn visit(
        n: &str,
        direct: &BTreeMap<String, Vec<String>>,
        seen: &mut BTreeSet<String>,
        post: &mut Vec<String>,
    ) {
        if !seen.insert(n.to_owned()) {
            return;
        }
        for d in direct.get(n).into_iter().flatten() {
            visit(d, direct, seen, post);
        }
        post.push(n.to_owned());
    }
    let mut seen = BTreeSet::new();
    let mut post = Vec::new();
    visit(m, direct, &mut seen, &mut post);
    post.pop(); // `m` itself comes last in post-order
    post.reverse();
    post
}

/// Device aliases (`alias=pci:v00001AF4d*...`) in a `.modinfo` section; symbolic aliases that
/// match no device (`alias=fs-erofs`, `alias=crypto-...`) are left out.
pub fn modinfo_aliases(info: &[u8]) -> Vec<String> {
    info.split(|&b| b == 0)
        .filter_map(|f| {
            String::from_utf8_lossy(f)
                .strip_prefix("alias=")
                .map(str::to_owned)
        })
        .filter(|a| a.contains(':'))
        .collect()
}

/// Dependencies named in a `.modinfo` section: `depends=a,b` and the `pre:` part of `softdep=`.
pub fn modinfo_deps(info: &[u8]) -> Vec<String> {
    let mut deps = Vec::new();
    for field in info.split(|&b| b == 0) {
        let field = String::from_utf8_lossy(field);
        if let Some(list) = field.strip_prefix("depends=") {
            deps.extend(list.split(',').filter(|s| !s.is_empty()).map(str::to_owned));
        } else if let Some(soft) = field.strip_prefix("softdep=") {
            let mut in_pre = false;
            for word in soft.split_whitespace() {
                match word {
                    "pre:" => in_pre = true,
                    "post:" => in_pre = false,
                    w if in_pre => deps.push(w.to_owned()),
                    _ => {}
                }
            }
        }
    }
    deps
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_depends_and_pre_softdeps() {
        let info = b"license=GPL\0depends=dm-mod,dm-bufio\0softdep=pre: crc32c post: foo\0name=dm_verity\0";
        assert_eq!(modinfo_deps(info), vec!["dm-mod", "dm-bufio", "crc32c"]);
    }

    #[test]
    fn depmod_order_puts_deepest_last() {
        let mut direct = BTreeMap::new();
        direct.insert("a".to_owned(), vec!["b".to_owned(), "c".to_owned()]);
        direct.insert("b".to_owned(), vec!["c".to_owned()]);
        direct.insert("c".to_owned(), vec![]);
        // Loading from the end: c, then b, then a.
        assert_eq!(depmod_order("a", &direct), vec!["b", "c"]);
        assert_eq!(depmod_order("c", &direct), Vec::<String>::new());
    }
}
