use super::*;
use std::path::Path;
use std::process::Command;

/// An RSA key and self-signed certificate made by openssl, as PEM (key, cert).
pub(super) fn keypair(dir: &Path, cn: &str) -> (Vec<u8>, Vec<u8>) {
    let (key, crt) = keelson_testkit::secure_boot::keypair(dir, cn, cn);
    (std::fs::read(key).unwrap(), std::fs::read(crt).unwrap())
}

fn tmp() -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!(
        "keelson-authenticode-{}-{:?}",
        std::process::id(),
        std::thread::current().id()
    ));
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn db_of(cert_pem: &[u8]) -> SignatureDb {
    SignatureDb {
        certs: vec![pem_or_der(cert_pem, &["CERTIFICATE"]).unwrap()],
        sha256: vec![],
    }
}

#[test]
fn signing_is_deterministic_and_verifies() {
    let dir = tmp();
    let (key, crt) = keypair(&dir, "Keelson test db");
    let signer = Signer::new(&key, &crt).unwrap();
    let pe = sample_image(b"keelson.slot=a");
    let a = signer.sign(&pe).unwrap();
    let b = signer.sign(&pe).unwrap();
    assert!(a == b, "two signatures of one image with one key differ");
    assert_eq!(image_digest(&a).unwrap(), {
        let mut padded = pe.clone();
        padded.resize(pe.len().next_multiple_of(8), 0);
        image_digest(&padded).unwrap()
    });
    let v = verify(&a, &db_of(&crt), &SignatureDb::default()).unwrap();
    assert_eq!(v.signer, "Keelson test db");
    assert_eq!(signer.sign(&a), Err(Error::AlreadySigned));
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn refusals_name_what_is_wrong() {
    let dir = tmp();
    let (key, crt) = keypair(&dir, "Keelson test db");
    let (_, other_crt) = keypair(&dir, "Someone else");
    let signer = Signer::new(&key, &crt).unwrap();
    let db = db_of(&crt);
    let none = SignatureDb::default();
    let pe = sample_image(b"keelson.slot=a");
    assert_eq!(verify(&pe, &db, &none), Err(Error::Unsigned));
    let signed = signer.sign(&pe).unwrap();

    // One byte of .cmdline changed after signing.
    let mut tampered = signed.clone();
    tampered[0x600] ^= 1;
    let err = verify(&tampered, &db, &none).unwrap_err();
    assert!(matches!(err, Error::Tampered { .. }), "{err}");
    assert!(err.to_string().contains("changed after signing"), "{err}");

    // A db that holds another certificate.
    assert_eq!(
        verify(&signed, &db_of(&other_crt), &none),
        Err(Error::Untrusted("Keelson test db".into()))
    );
    // The image's hash, or its signer, in dbx.
    let by_hash = SignatureDb {
        certs: vec![],
        sha256: vec![image_digest(&signed).unwrap()],
    };
    assert_eq!(verify(&signed, &db, &by_hash), Err(Error::Forbidden));
    assert_eq!(verify(&signed, &db, &db), Err(Error::Forbidden));
    // A key that is not the certificate's.
    let (other_key, _) = keypair(&dir, "Third");
    let err = Signer::new(&other_key, &crt).unwrap_err();
    assert!(err.to_string().contains("is not the key's"), "{err}");
    // Garbage.
    assert!(matches!(verify(b"MZ", &db, &none), Err(Error::NotPe(_))));
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn a_db_certificate_that_issued_the_signer_is_trusted() {
    let dir = tmp();
    let (_, ca_crt) = keypair(&dir, "Keelson CA");
    // A leaf issued by the CA.
    let leaf_key = dir.join("leaf.key");
    let csr = dir.join("leaf.csr");
    let leaf_crt = dir.join("leaf.crt");
    let ok = |c: &mut Command| assert!(c.status().unwrap().success(), "{c:?}");
    ok(Command::new("openssl")
        .args([
            "req",
            "-new",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-subj",
            "/CN=Keelson leaf/",
        ])
        .arg("-keyout")
        .arg(&leaf_key)
        .arg("-out")
        .arg(&csr));
    ok(Command::new("openssl")
        .args(["x509", "-req", "-sha256", "-days", "30", "-set_serial", "7"])
        .arg("-in")
        .arg(&csr)
        .arg("-CA")
        .arg(dir.join("Keelson CA.crt"))
        .arg("-CAkey")
        .arg(dir.join("Keelson CA.key"))
        .arg("-out")
        .arg(&leaf_crt));
    let signer = Signer::new(
        &std::fs::read(&leaf_key).unwrap(),
        &std::fs::read(&leaf_crt).unwrap(),
    )
    .unwrap();
    let signed = signer.sign(&sample_image(b"x")).unwrap();
    let v = verify(&signed, &db_of(&ca_crt), &SignatureDb::default()).unwrap();
    assert_eq!(v.signer, "Keelson leaf");
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn signature_lists_parse() {
    let cert = b"not really a certificate".to_vec();
    let hash = [7u8; 32];
    let mut data = Vec::new();
    for (kind, value) in [(EFI_CERT_X509, &cert[..]), (EFI_CERT_SHA256, &hash[..])] {
        let size = 16 + value.len();
        data.extend_from_slice(&kind);
        data.extend_from_slice(&((28 + size) as u32).to_le_bytes());
        data.extend_from_slice(&0u32.to_le_bytes());
        data.extend_from_slice(&(size as u32).to_le_bytes());
        data.extend_from_slice(&[0x11; 16]);
        data.extend_from_slice(value);
    }
    let db = SignatureDb::parse(&data).unwrap();
    assert_eq!(db.certs, vec![cert]);
    assert_eq!(db.sha256, vec![hash]);
    assert!(SignatureDb::parse(&data[..40]).is_err());
}
