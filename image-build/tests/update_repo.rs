//! `image-build update`: keys, root metadata and repositories, and the errors a release
//! engineer gets for bad input (each names what is wrong; nothing is half-written).

use std::path::Path;
use std::process::{Command, Output};

fn ib(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_image-build"))
        .args(args)
        .output()
        .unwrap()
}

fn ok(args: &[&str]) {
    let o = ib(args);
    assert!(
        o.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
}

fn err(args: &[&str]) -> String {
    let o = ib(args);
    assert!(!o.status.success(), "{args:?} should fail");
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// A signing key `dir/k.pk8` and the repository root `dir/root.json` it signs.
fn key_and_root(dir: &Path) {
    let p = |n: &str| dir.join(n).to_str().unwrap().to_owned();
    ok(&["update", "keygen", &p("k.pk8")]);
    ok(&[
        "update",
        "root",
        "--key",
        &p("k.pk8"),
        "--out",
        &p("root.json"),
    ]);
}

/// A build output directory as far as `update add` reads it.
fn image(dir: &Path, version: &str) -> String {
    let d = dir.join(format!("img-{version}"));
    std::fs::create_dir_all(&d).unwrap();
    std::fs::write(d.join("root.erofs"), vec![7u8; 8192]).unwrap();
    std::fs::write(d.join("root.verity"), vec![1u8; 4096]).unwrap();
    let uki = format!("keelson_{version}+3.efi");
    std::fs::write(d.join(&uki), b"MZ uki a").unwrap();
    std::fs::write(d.join("uki-slot-b.efi"), b"MZ uki b").unwrap();
    let m = format!(
        r#"{{"image": {{"name": "t", "version": "{version}", "roothash_a": "{}", "uki": "{uki}"}}}}"#,
        "ab".repeat(32)
    );
    std::fs::write(d.join("manifest.json"), m).unwrap();
    d.to_str().unwrap().to_owned()
}

#[test]
fn repository_lifecycle_and_refusals() {
    let t = tempfile::tempdir().unwrap();
    let p = |n: &str| t.path().join(n).to_str().unwrap().to_owned();
    ok(&["update", "keygen", &p("k1.pk8")]);
    ok(&["update", "keygen", &p("k2.pk8")]);
    // Keys are never overwritten.
    assert!(err(&["update", "keygen", &p("k1.pk8")]).contains("k1.pk8"));
    ok(&[
        "update",
        "root",
        "--key",
        &p("k1.pk8"),
        "--out",
        &p("root.json"),
    ]);
    let root: serde_json::Value =
        serde_json::from_slice(&std::fs::read(p("root.json")).unwrap()).unwrap();
    assert_eq!(root["signed"]["_type"], "root");
    assert_eq!(root["signatures"].as_array().unwrap().len(), 1);

    let v1 = image(t.path(), "1.0");
    let v2 = image(t.path(), "1.1");
    let add = |key: &str, img: &str, extra: &[&str]| {
        let mut a: Vec<String> = ["update", "add", "--repo"].map(str::to_owned).to_vec();
        a.extend([
            p("repo"),
            "--root".into(),
            p("root.json"),
            "--key".into(),
            key.into(),
        ]);
        a.extend(extra.iter().map(|s| s.to_string()));
        a.push(img.into());
        a
    };
    let run = |a: Vec<String>| ib(&a.iter().map(String::as_str).collect::<Vec<_>>());
    let o = run(add(&p("k1.pk8"), &v1, &[]));
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    // A key the root does not trust cannot sign.
    let o = run(add(&p("k2.pk8"), &v2, &[]));
    assert!(!o.status.success());
    // Bad waves name the problem.
    let o = run(add(
        &p("k1.pk8"),
        &v2,
        &["--wave", "24:50", "--wave", "48:40"],
    ));
    assert!(String::from_utf8_lossy(&o.stderr).contains("percentages must increase"));
    let o = run(add(&p("k1.pk8"), &v2, &["--wave", "soon"]));
    assert!(String::from_utf8_lossy(&o.stderr).contains("HOURS:PERCENT"));
    // Versions are immutable.
    let o = run(add(&p("k1.pk8"), &v1, &[]));
    assert!(String::from_utf8_lossy(&o.stderr).contains("already in the repository"));
    // A version nodes would refuse (it becomes part of file names on their ESP) is never
    // signed.
    let o = run(add(&p("k1.pk8"), &image(t.path(), "0.9+evil"), &[]));
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(
        e.contains("not publishing manifest.json: version \"0.9+evil\": '+' is not allowed"),
        "{e}"
    );
    // The refused attempts left the repository at its first version.
    let ts: serde_json::Value = serde_json::from_slice(
        &std::fs::read(t.path().join("repo/metadata/timestamp.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(ts["signed"]["version"], 1);
    // A second version: metadata versions move on, the manifest lists both, newest first.
    let o = run(add(
        &p("k1.pk8"),
        &v2,
        &["--wave", "0:10", "--wave", "24:100"],
    ));
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let ts: serde_json::Value = serde_json::from_slice(
        &std::fs::read(t.path().join("repo/metadata/timestamp.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(ts["signed"]["version"], 2);
    let manifest = std::fs::read_dir(t.path().join("repo/targets"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.to_string_lossy().ends_with(".manifest.json"))
        .map(|p| serde_json::from_slice::<serde_json::Value>(&std::fs::read(p).unwrap()).unwrap())
        .find(|m| m["updates"].as_array().unwrap().len() == 2)
        .expect("a manifest with both versions");
    assert_eq!(manifest["updates"][0]["version"], "1.1");
    assert_eq!(manifest["updates"][0]["waves"][1]["percent"], 100);
    assert_eq!(manifest["updates"][0]["uki_b"], "t-1.1-uki-b.efi");
}

/// An extension build as far as `update add --extension` and `update extension` read it.
fn extension(dir: &Path, name: &str, version: &str, os_version: &str) -> String {
    let d = dir.join(format!("ext-{name}-{version}-{os_version}"));
    std::fs::create_dir_all(&d).unwrap();
    let raw: Vec<u8> = (0..64 * 1024u32).map(|i| (i % 251) as u8).collect();
    std::fs::write(d.join(format!("{name}.raw")), &raw).unwrap();
    let sha = sha256(&raw);
    let m = serde_json::json!({
        "name": name, "version": version, "os_version": os_version,
        "roothash": "cd".repeat(32),
        "raw": {"path": format!("{name}.raw"), "size": raw.len(), "sha256": sha},
    });
    std::fs::write(d.join("manifest.json"), m.to_string()).unwrap();
    d.to_str().unwrap().to_owned()
}

fn sha256(data: &[u8]) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(data))
}

/// The newest signed manifest.json of a repository (from the timestamp down the chain, as a
/// client would: snapshot names the targets version, targets names the manifest's hash).
fn signed_manifest(repo: &Path) -> serde_json::Value {
    let read = |p: &Path| -> serde_json::Value {
        serde_json::from_slice(&std::fs::read(p).unwrap()).unwrap()
    };
    let meta = repo.join("metadata");
    let ts = read(&meta.join("timestamp.json"));
    let snap_v = &ts["signed"]["meta"]["snapshot.json"]["version"];
    let snap = read(&meta.join(format!("{snap_v}.snapshot.json")));
    let tgt_v = &snap["signed"]["meta"]["targets.json"]["version"];
    let targets = read(&meta.join(format!("{tgt_v}.targets.json")));
    let t = &targets["signed"]["targets"]["manifest.json"];
    let sha = t["hashes"]["sha256"].as_str().unwrap();
    read(&repo.join(format!("targets/{sha}.manifest.json")))
}

/// The file of a signed target, checked against its signed length and sha256.
fn signed_target(repo: &Path, name: &str) -> Vec<u8> {
    let meta = repo.join("metadata");
    let read = |p: &Path| -> serde_json::Value {
        serde_json::from_slice(&std::fs::read(p).unwrap()).unwrap()
    };
    let ts = read(&meta.join("timestamp.json"));
    let snap_v = &ts["signed"]["meta"]["snapshot.json"]["version"];
    let snap = read(&meta.join(format!("{snap_v}.snapshot.json")));
    let tgt_v = &snap["signed"]["meta"]["targets.json"]["version"];
    let targets = read(&meta.join(format!("{tgt_v}.targets.json")));
    let t = &targets["signed"]["targets"][name];
    let sha = t["hashes"]["sha256"]
        .as_str()
        .unwrap_or_else(|| panic!("{name} is not a signed target"));
    let data = std::fs::read(repo.join(format!("targets/{sha}.{name}"))).unwrap();
    assert_eq!(t["length"], data.len());
    assert_eq!(sha256(&data), sha);
    data
}

#[test]
fn extensions_are_signed_and_listed_per_os_version() {
    let t = tempfile::tempdir().unwrap();
    let p = |n: &str| t.path().join(n).to_str().unwrap().to_owned();
    key_and_root(t.path());
    let repo = t.path().join("repo");
    let common = |cmd: &str| -> Vec<String> {
        [
            "update",
            cmd,
            "--repo",
            &p("repo"),
            "--root",
            &p("root.json"),
        ]
        .iter()
        .chain(&["--key", &p("k.pk8")])
        .map(|s| s.to_string())
        .collect()
    };
    let run = |a: Vec<String>| ib(&a.iter().map(String::as_str).collect::<Vec<_>>());
    let v1 = image(t.path(), "1.0");
    let v2 = image(t.path(), "1.1");
    let etcd_for_v1 = extension(t.path(), "etcd", "3.4.23-1", "1.0");

    // Version 1.0 with the extension built for it: signed as a target, listed under 1.0.
    let mut a = common("add");
    a.extend(["--extension".into(), etcd_for_v1.clone(), v1]);
    let o = run(a);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let m = signed_manifest(&repo);
    let e = &m["updates"][0]["extensions"][0];
    assert_eq!(e["name"], "etcd");
    assert_eq!(e["version"], "3.4.23-1");
    assert_eq!(e["built_for"], "1.0");
    assert_eq!(e["roothash"], "cd".repeat(32));
    assert_eq!(e["target"], "ext-etcd-3.4.23-1-for-1.0.raw.gz");
    let gz = signed_target(&repo, "ext-etcd-3.4.23-1-for-1.0.raw.gz");
    assert_eq!(e["size"], gz.len());
    assert_eq!(e["sha256"], sha256(&gz));
    let mut raw = Vec::new();
    std::io::Read::read_to_end(&mut flate2::read::GzDecoder::new(&gz[..]), &mut raw).unwrap();
    assert_eq!(
        raw,
        std::fs::read(Path::new(&etcd_for_v1).join("etcd.raw")).unwrap()
    );

    // An extension built for another version is not listed under a new one by `add`.
    let mut a = common("add");
    a.extend(["--extension".into(), etcd_for_v1.clone(), v2.clone()]);
    let o = run(a);
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && e.contains("was built for OS 1.0, not 1.1"),
        "{e}"
    );
    let mut a = common("add");
    a.push(v2);
    let o = run(a);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(
        signed_manifest(&repo)["updates"][0]["extensions"],
        serde_json::json!([])
    );

    // `update extension`: the repository says the 1.0 build fits 1.1 too; same target.
    let list = |os: &str, ext: &str| {
        let mut a = common("extension");
        a.extend([
            "--os-version".into(),
            os.into(),
            "--extension".into(),
            ext.into(),
        ]);
        run(a)
    };
    let targets_before = std::fs::read_dir(repo.join("targets")).unwrap().count();
    let o = list("1.1", &etcd_for_v1);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let m = signed_manifest(&repo);
    assert_eq!(m["updates"][0]["version"], "1.1");
    assert_eq!(
        m["updates"][0]["extensions"][0],
        m["updates"][1]["extensions"][0]
    );
    // Only a new manifest.json was written: the image target was already there.
    assert_eq!(
        std::fs::read_dir(repo.join("targets")).unwrap().count(),
        targets_before + 1
    );
    let e = String::from_utf8_lossy(&list("1.1", &etcd_for_v1).stderr).into_owned();
    assert!(e.contains("already listed under OS version 1.1"), "{e}");
    let e = String::from_utf8_lossy(&list("9.9", &etcd_for_v1).stderr).into_owned();
    assert!(
        e.contains("OS version 9.9 is not in the repository") && e.contains("1.1, 1.0"),
        "{e}"
    );

    // A newer extension version replaces the old one under 1.1 only.
    let etcd2 = extension(t.path(), "etcd", "3.4.23-2", "1.1");
    let o = list("1.1", &etcd2);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(String::from_utf8_lossy(&o.stderr).contains("replacing etcd 3.4.23-1"));
    let m = signed_manifest(&repo);
    assert_eq!(m["updates"][0]["extensions"][0]["version"], "3.4.23-2");
    assert_eq!(m["updates"][0]["extensions"].as_array().unwrap().len(), 1);
    assert_eq!(m["updates"][1]["extensions"][0]["version"], "3.4.23-1");

    // A build whose image no longer matches its manifest is refused, and so is a different
    // image under a target name the repository already signs.
    let bad = extension(t.path(), "bad", "1", "1.1");
    std::fs::write(Path::new(&bad).join("bad.raw"), vec![0u8; 64 * 1024]).unwrap();
    let e = String::from_utf8_lossy(&list("1.1", &bad).stderr).into_owned();
    assert!(
        e.contains("not the") && e.contains("its manifest.json records"),
        "{e}"
    );
    let other = t.path().join("other");
    std::fs::create_dir_all(&other).unwrap();
    let changed = vec![9u8; 4096];
    std::fs::write(other.join("etcd.raw"), &changed).unwrap();
    let m = serde_json::json!({
        "name": "etcd", "version": "3.4.23-1", "os_version": "1.0", "roothash": "ef".repeat(32),
        "raw": {"path": "etcd.raw", "size": changed.len(), "sha256": sha256(&changed)},
    });
    std::fs::write(other.join("manifest.json"), m.to_string()).unwrap();
    let e = String::from_utf8_lossy(&list("1.0", other.to_str().unwrap()).stderr).into_owned();
    assert!(
        e.contains("already in the repository with sha256") && e.contains("immutable"),
        "{e}"
    );
    // Not an extension build at all.
    let e = String::from_utf8_lossy(&list("1.0", &p("img-1.0")).stderr).into_owned();
    assert!(e.contains("not the manifest of an extension build"), "{e}");
}

/// Pseudo-random bytes (incompressible-ish, like a file system's compressed files).
fn noise(seed: u32, len: usize) -> Vec<u8> {
    let mut x = seed.max(1);
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            (x % 64) as u8
        })
        .collect()
}

/// The files under `repo/targets/chunks`.
fn stored_chunks(repo: &Path) -> std::collections::BTreeSet<String> {
    std::fs::read_dir(repo.join("targets/chunks"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect()
}

/// Every version carries a signed chunk list whose chunks, decompressed in order, are its root
/// image byte for byte; chunks are stored once across versions; what no listed version uses
/// (here: the chunks of a refused add) is collected by the next add.
#[test]
fn chunk_lists_rebuild_the_root_and_unused_chunks_are_collected() {
    let t = tempfile::tempdir().unwrap();
    let p = |n: &str| t.path().join(n).to_str().unwrap().to_owned();
    key_and_root(t.path());
    let repo = t.path().join("repo");
    let add = |img: &str| -> Output {
        ib(&[
            "update",
            "add",
            "--repo",
            &p("repo"),
            "--root",
            &p("root.json"),
            "--key",
            &p("k.pk8"),
            img,
        ])
    };
    let v1_root = noise(1, 1 << 20);
    let mut v2_root = v1_root.clone();
    // One file changed in place and one grown: offsets after it move.
    v2_root[300_000..304_096].copy_from_slice(&noise(2, 4096));
    v2_root.splice(600_000..600_000, noise(3, 8192));
    v2_root.truncate(1 << 20);
    let v1 = image(t.path(), "1.0");
    std::fs::write(Path::new(&v1).join("root.erofs"), &v1_root).unwrap();
    let o = add(&v1);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let list_of = |version: &str| -> serde_json::Value {
        let m = signed_manifest(&repo);
        let u = m["updates"]
            .as_array()
            .unwrap()
            .iter()
            .find(|u| u["version"] == version)
            .unwrap()
            .clone();
        let target = u["chunks"]["target"].as_str().unwrap().to_owned();
        assert_eq!(target, format!("t-{version}-root.chunks.json"));
        let list: serde_json::Value =
            serde_json::from_slice(&signed_target(&repo, &target)).unwrap();
        assert_eq!(
            u["chunks"]["count"],
            list["chunks"].as_array().unwrap().len()
        );
        list
    };
    let rebuild = |list: &serde_json::Value| -> Vec<u8> {
        let mut out = Vec::new();
        for c in list["chunks"].as_array().unwrap() {
            let sha = c["sha256"].as_str().unwrap();
            let z = std::fs::read(repo.join("targets/chunks").join(sha)).unwrap();
            assert_eq!(c["stored"], z.len());
            let data = zstd::decode_all(&z[..]).unwrap();
            assert_eq!(sha256(&data), sha);
            assert_eq!(c["offset"], out.len());
            assert_eq!(c["length"], data.len());
            out.extend_from_slice(&data);
        }
        out
    };
    let l1 = list_of("1.0");
    assert_eq!(l1["chunker"], "fastcdc-v2020/16384/32768/65536");
    assert_eq!(l1["compression"], "zstd");
    assert_eq!(l1["size"], 1 << 20);
    assert!(
        rebuild(&l1) == v1_root,
        "version 1.0's chunks are not its root"
    );
    let after_v1 = stored_chunks(&repo);

    // A refused add (a version nodes would refuse) leaves chunks nothing lists...
    let evil = image(t.path(), "0.9+evil");
    std::fs::write(Path::new(&evil).join("root.erofs"), noise(9, 256 << 10)).unwrap();
    assert!(!add(&evil).status.success());
    std::fs::write(repo.join("targets/chunks/.deadbeef.tmp"), b"cut off").unwrap();
    let strays: Vec<String> = stored_chunks(&repo)
        .difference(&after_v1)
        .cloned()
        .collect();
    assert!(strays.len() >= 5, "{strays:?}");

    // ...which the next add collects, keeping both listed versions' chunks, shared once.
    let v2 = image(t.path(), "1.1");
    std::fs::write(Path::new(&v2).join("root.erofs"), &v2_root).unwrap();
    let o = add(&v2);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let l2 = list_of("1.1");
    assert!(
        rebuild(&l2) == v2_root,
        "version 1.1's chunks are not its root"
    );
    assert!(rebuild(&list_of("1.0")) == v1_root);
    let names = |l: &serde_json::Value| -> std::collections::BTreeSet<String> {
        l["chunks"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["sha256"].as_str().unwrap().to_owned())
            .collect()
    };
    let (n1, n2) = (names(&l1), names(&l2));
    let union: std::collections::BTreeSet<String> = n1.union(&n2).cloned().collect();
    assert_eq!(
        stored_chunks(&repo),
        union,
        "stored chunks = the listed versions' chunks"
    );
    let new_in_v2 = n2.difference(&n1).count();
    assert!(
        new_in_v2 * 4 < n2.len(),
        "{new_in_v2} of {} chunks of 1.1 are new: the chunks after the change should recur",
        n2.len()
    );
}

/// From the second version on, each UKI also comes as a zstd `--patch-from` patch against the
/// previous listed version's UKI for the other slot (what a node running it booted), named in
/// the manifest with that UKI's sha256; applied, it is the new UKI byte for byte.
#[test]
fn uki_patches_rebuild_each_uki_from_the_previous_versions() {
    use std::io::Read;
    let t = tempfile::tempdir().unwrap();
    let p = |n: &str| t.path().join(n).to_str().unwrap().to_owned();
    key_and_root(t.path());
    let repo = t.path().join("repo");
    // Two versions' UKIs: the same 1 MiB kernel and initramfs, another command line.
    let kernel = noise(5, 1 << 20);
    let uki = |version: &str, slot: &str| {
        let mut u = format!("MZ keelson.slot={slot} version={version} ").into_bytes();
        u.extend_from_slice(&kernel);
        u
    };
    let mut ukis = std::collections::HashMap::new();
    for v in ["1.0", "2.0"] {
        let img = image(t.path(), v);
        for (file, slot) in [
            (format!("keelson_{v}+3.efi"), "a"),
            ("uki-slot-b.efi".into(), "b"),
        ] {
            std::fs::write(Path::new(&img).join(file), uki(v, slot)).unwrap();
            ukis.insert((v, slot), uki(v, slot));
        }
        ok(&[
            "update",
            "add",
            "--repo",
            &p("repo"),
            "--root",
            &p("root.json"),
            "--key",
            &p("k.pk8"),
            &img,
        ]);
    }
    let m = signed_manifest(&repo);
    let version = |v: &str| {
        m["updates"]
            .as_array()
            .unwrap()
            .iter()
            .find(|u| u["version"] == v)
            .unwrap()
            .clone()
    };
    assert!(version("1.0").get("uki_patches").is_none(), "{m}");
    let patches = version("2.0")["uki_patches"].as_array().unwrap().clone();
    assert_eq!(patches.len(), 2, "{m}");
    for (slot, other) in [("a", "b"), ("b", "a")] {
        let x = patches.iter().find(|x| x["slot"] == slot).unwrap();
        assert_eq!(x["from_version"], "1.0");
        assert_eq!(x["target"], format!("t-2.0-uki-{slot}.from-1.0.zst"));
        let reference = &ukis[&("1.0", other)];
        assert_eq!(x["from_sha256"], sha256(reference));
        let patch = signed_target(&repo, x["target"].as_str().unwrap());
        assert!(
            patch.len() * 100 < reference.len(),
            "a {}-byte patch for a {}-byte UKI",
            patch.len(),
            reference.len()
        );
        let mut out = Vec::new();
        zstd::stream::read::Decoder::with_ref_prefix(&patch[..], &reference[..])
            .unwrap()
            .read_to_end(&mut out)
            .unwrap();
        assert!(out == ukis[&("2.0", slot)], "slot {slot}'s patch");
    }
}

/// From the second version on, the root also comes as a zstd `--patch-from` patch against the
/// roots of the newest older versions (`--root-patches N`, 1 by default, 0 for none), each
/// naming the root hash and size it applies to; applied, it is the new root byte for byte.
#[test]
fn root_patches_rebuild_the_root_from_older_versions() {
    let t = tempfile::tempdir().unwrap();
    let p = |n: &str| t.path().join(n).to_str().unwrap().to_owned();
    key_and_root(t.path());
    let repo = t.path().join("repo");
    // Three versions' roots: 2 MiB alike but for one changed 16 KiB stretch each.
    let mut roots = std::collections::HashMap::new();
    let mut root = noise(9, 2 << 20);
    for (i, (v, extra)) in [
        ("1.0", &[][..]),
        ("2.0", &[][..]),
        ("3.0", &["--root-patches", "2"][..]),
    ]
    .into_iter()
    .enumerate()
    {
        if i > 0 {
            let at = i * (512 << 10);
            root[at..at + (16 << 10)].copy_from_slice(&noise(20 + i as u32, 16 << 10));
        }
        let img = image(t.path(), v);
        std::fs::write(Path::new(&img).join("root.erofs"), &root).unwrap();
        let roothash = format!("{i:x}").repeat(64);
        let m = format!(
            r#"{{"image": {{"name": "t", "version": "{v}", "roothash_a": "{roothash}", "uki": "keelson_{v}+3.efi"}}}}"#
        );
        std::fs::write(Path::new(&img).join("manifest.json"), m).unwrap();
        roots.insert(v, (root.clone(), roothash));
        let (repo_arg, root_arg, key_arg) = (p("repo"), p("root.json"), p("k.pk8"));
        let mut args = vec![
            "update",
            "add",
            "--repo",
            &repo_arg,
            "--root",
            &root_arg,
            "--key",
            &key_arg,
            "--patch-level",
            "3",
        ];
        args.extend_from_slice(extra);
        args.push(&img);
        ok(&args);
    }
    let m = signed_manifest(&repo);
    let version = |v: &str| {
        m["updates"]
            .as_array()
            .unwrap()
            .iter()
            .find(|u| u["version"] == v)
            .unwrap()
            .clone()
    };
    assert!(version("1.0").get("root_patches").is_none(), "{m}");
    let from = |v: &str| -> Vec<String> {
        version(v)["root_patches"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x["from_version"].as_str().unwrap().to_owned())
            .collect()
    };
    assert_eq!(from("2.0"), ["1.0"], "{m}");
    assert_eq!(from("3.0"), ["2.0", "1.0"], "{m}");
    for (v, x) in [("2.0", 0), ("3.0", 0), ("3.0", 1)] {
        let x = &version(v)["root_patches"][x];
        let old = x["from_version"].as_str().unwrap();
        let (reference, roothash) = &roots[old];
        assert_eq!(x["from_roothash"], roothash.as_str());
        assert_eq!(x["from_size"], reference.len());
        assert_eq!(x["target"], format!("t-{v}-root.from-{old}.zst"));
        let patch = signed_target(&repo, x["target"].as_str().unwrap());
        assert!(
            patch.len() < 64 << 10,
            "a {}-byte patch of {v}'s root from {old}'s",
            patch.len()
        );
        let mut d = zstd::zstd_safe::DCtx::create();
        d.ref_prefix(&reference[..]).unwrap();
        let mut out = Vec::with_capacity(reference.len());
        d.decompress(&mut out, &patch).unwrap();
        assert!(out == roots[v].0, "{v}'s root from {old}'s");
    }
    // None asked for: none published.
    let img = image(t.path(), "4.0");
    ok(&[
        "update",
        "add",
        "--repo",
        &p("repo"),
        "--root",
        &p("root.json"),
        "--key",
        &p("k.pk8"),
        "--root-patches",
        "0",
        &img,
    ]);
    let m = signed_manifest(&repo);
    let v4 = m["updates"]
        .as_array()
        .unwrap()
        .iter()
        .find(|u| u["version"] == "4.0")
        .unwrap();
    assert!(v4.get("root_patches").is_none(), "{m}");
}
