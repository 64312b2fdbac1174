//! The extension store on /var: `NAME/ROOTHASH.raw` images and `state.json`, which lists the
//! set of extensions of each OS version. Content-addressed by root hash, so an image shared by
//! two OS versions is stored once, and a half-downloaded file (`.part`) is never an image.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};

use serde::{Deserialize, Serialize};

use crate::{check_name, ddi, Entry, Error};

const STATE: &str = "state.json";

/// Serialises the changes of `state.json` (and [`Store::gc`]'s deletions) within the process:
/// the update agent records a set on its own thread when a download ends, while the health
/// gate collects garbage on sysd's runtime when it blesses a boot, both early in a first boot.
/// Held for file operations only, never across a download.
static STATE_LOCK: Mutex<()> = Mutex::new(());

fn state_lock() -> MutexGuard<'static, ()> {
    STATE_LOCK.lock().unwrap_or_else(|p| p.into_inner())
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct State {
    /// OS version → the extensions that go with it.
    #[serde(default)]
    sets: BTreeMap<String, Vec<Entry>>,
}

/// The store directory.
#[derive(Debug, Clone)]
pub struct Store {
    dir: PathBuf,
}

impl Store {
    pub fn new(dir: impl Into<PathBuf>) -> Store {
        Store { dir: dir.into() }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The image file of `entry`.
    pub fn image(&self, entry: &Entry) -> PathBuf {
        self.dir
            .join(&entry.name)
            .join(format!("{}.raw", entry.roothash))
    }

    /// Where a download of `entry` is written before [`Store::commit`] (created empty).
    pub fn staging(&self, entry: &Entry) -> Result<PathBuf, Error> {
        check_name(&entry.name)?;
        ddi::decode_roothash(&entry.roothash).map_err(|why| Error::BadImage {
            path: self.image(entry),
            why: why.into(),
        })?;
        let dir = self.dir.join(&entry.name);
        std::fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
        Ok(dir.join(format!("{}.raw.part", entry.roothash)))
    }

    /// Whether the image of `entry` is already in the store.
    pub fn has(&self, entry: &Entry) -> bool {
        self.image(entry).is_file()
    }

    /// Moves a complete download into place after checking its layout against the root hash
    /// (the content itself is checked block by block by dm-verity on every read).
    pub fn commit(&self, entry: &Entry) -> Result<PathBuf, Error> {
        let part = self.staging(entry)?;
        let layout = ddi::read(&part, &entry.roothash);
        if let Err(e) = layout {
            let _ = std::fs::remove_file(&part);
            return Err(e);
        }
        let dst = self.image(entry);
        keelson_common::durable::commit(&part, &dst).map_err(|e| Error::io(&dst, e.into()))?;
        Ok(dst)
    }

    /// The extensions of OS version `os_version` (empty when none were recorded).
    pub fn set(&self, os_version: &str) -> Result<Vec<Entry>, Error> {
        Ok(self.load()?.sets.remove(os_version).unwrap_or_default())
    }

    /// Every recorded set, by OS version.
    pub fn sets(&self) -> Result<BTreeMap<String, Vec<Entry>>, Error> {
        Ok(self.load()?.sets)
    }

    /// Records `entries` as the set of `os_version`, replacing what it had. Every image must
    /// be in the store already.
    pub fn record(&self, os_version: &str, entries: Vec<Entry>) -> Result<(), Error> {
        let _guard = state_lock();
        for e in &entries {
            check_name(&e.name)?;
            if !self.has(e) {
                return Err(Error::State(format!(
                    "extension {} ({}) is not in the store; download it first",
                    e.name, e.roothash
                )));
            }
        }
        let mut state = self.load()?;
        state.sets.insert(os_version.to_owned(), entries);
        self.save(&state)
    }

    /// Drops the sets of every OS version not in `keep` and deletes the images only they named
    /// (with any partial download of them). Returns the files removed. An image no set names
    /// yet (a download about to be recorded) is not the collector's: it is left alone.
    pub fn gc(&self, keep: &[&str]) -> Result<Vec<PathBuf>, Error> {
        let _guard = state_lock();
        let mut state = self.load()?;
        let (kept, dropped): (BTreeMap<_, _>, BTreeMap<_, _>) = std::mem::take(&mut state.sets)
            .into_iter()
            .partition(|(v, _)| keep.contains(&v.as_str()));
        state.sets = kept;
        self.save(&state)?;
        let wanted: Vec<PathBuf> = state
            .sets
            .values()
            .flatten()
            .map(|e| self.image(e))
            .collect();
        let mut removed = Vec::new();
        for e in dropped.values().flatten() {
            let image = self.image(e);
            if wanted.contains(&image) {
                continue;
            }
            let part = image.with_extension("raw.part");
            for p in [image, part] {
                if std::fs::remove_file(&p).is_ok() && !removed.contains(&p) {
                    removed.push(p);
                }
            }
        }
        Ok(removed)
    }

    fn load(&self) -> Result<State, Error> {
        let path = self.dir.join(STATE);
        match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .map_err(|e| Error::State(format!("{}: {e}", path.display()))),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(State::default()),
            Err(e) => Err(Error::io(&path, e)),
        }
    }

    fn save(&self, state: &State) -> Result<(), Error> {
        std::fs::create_dir_all(&self.dir).map_err(|e| Error::io(&self.dir, e))?;
        let path = self.dir.join(STATE);
        let bytes = serde_json::to_vec_pretty(state)
            .map_err(|e| Error::State(format!("encoding {}: {e}", path.display())))?;
        keelson_common::durable::replace(&path, &bytes).map_err(|e| Error::io(&path, e.into()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ddi::testing::make_ddi;

    fn entry(name: &str, roothash: &str) -> Entry {
        Entry {
            name: name.into(),
            version: "1".into(),
            roothash: roothash.into(),
            built_for: "0.1.0".into(),
            source: "test".into(),
            listed_for: vec![],
        }
    }

    #[test]
    fn commit_record_and_gc() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::new(dir.path().join("ext"));
        let tmp = dir.path().join("a.raw");
        let rh = make_ddi(&tmp, &vec![3; 8 * 4096], "etcd_1");
        let e = entry("etcd", &rh);
        let part = store.staging(&e).unwrap();
        std::fs::copy(&tmp, &part).unwrap();
        let img = store.commit(&e).unwrap();
        assert!(img.is_file() && !part.exists());
        store.record("0.1.0", vec![e.clone()]).unwrap();
        store.record("0.2.0", vec![e.clone()]).unwrap();
        assert_eq!(store.set("0.1.0").unwrap(), vec![e.clone()]);
        assert!(store.set("9.9.9").unwrap().is_empty());
        // Keeping one version that still names the image keeps the image.
        assert!(store.gc(&["0.2.0"]).unwrap().is_empty());
        assert!(store.set("0.1.0").unwrap().is_empty());
        assert_eq!(store.gc(&[]).unwrap(), vec![img.clone()]);
        assert!(!img.exists());
    }

    #[test]
    fn gc_leaves_a_download_not_yet_recorded_and_loses_no_set_to_a_concurrent_record() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::new(dir.path().join("ext"));
        let tmp = dir.path().join("a.raw");
        let rh = make_ddi(&tmp, &vec![3; 8 * 4096], "etcd_1");
        let e = entry("etcd", &rh);
        std::fs::copy(&tmp, store.staging(&e).unwrap()).unwrap();
        store.commit(&e).unwrap();
        // The health gate blesses a first boot while the download is being recorded.
        assert!(store.gc(&["0.1.0"]).unwrap().is_empty());
        assert!(store.has(&e));
        store.record("0.1.0", vec![e.clone()]).unwrap();

        // Sets recorded from several threads while another collects: none is lost.
        let versions: Vec<String> = (0..8).map(|i| format!("0.{i}.0")).collect();
        std::thread::scope(|s| {
            for v in &versions {
                let (store, e) = (store.clone(), e.clone());
                s.spawn(move || store.record(v, vec![e]).unwrap());
            }
            let keep: Vec<&str> = versions.iter().map(String::as_str).collect();
            for _ in 0..8 {
                store.gc(&keep).unwrap();
            }
        });
        assert_eq!(store.sets().unwrap().len(), versions.len());
        assert!(store.has(&e));
    }

    #[test]
    fn commit_refuses_an_image_of_another_root_hash() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::new(dir.path().join("ext"));
        let tmp = dir.path().join("a.raw");
        make_ddi(&tmp, &vec![3; 8 * 4096], "etcd_1");
        let e = entry("etcd", &"cd".repeat(32));
        let part = store.staging(&e).unwrap();
        std::fs::copy(&tmp, &part).unwrap();
        let err = store.commit(&e).unwrap_err().to_string();
        assert!(err.contains("not those of root hash"), "{err}");
        assert!(!part.exists() && !store.has(&e));
        let err = store.record("0.1.0", vec![e]).unwrap_err().to_string();
        assert!(err.contains("not in the store"), "{err}");
    }

    #[test]
    fn names_that_escape_are_refused() {
        let store = Store::new("/nonexistent");
        for bad in ["../x", "a/b", "", "-x", "UPPER", &"x".repeat(65)] {
            assert!(
                store.staging(&entry(bad, &"ab".repeat(32))).is_err(),
                "{bad}"
            );
        }
    }
}
