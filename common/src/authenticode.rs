//! UEFI Secure Boot signatures on PE images (Authenticode), both sides of the contract: the
//! pipeline signs systemd-boot and every UKI ([`sign`]), the update agent checks a downloaded UKI
//! against the firmware's `db`/`dbx` before it touches the ESP ([`verify`]).
//!
//! The signature is a PKCS#7 `SignedData` over an `SpcIndirectDataContent` holding the image's
//! Authenticode SHA-256 (the file minus its checksum, its certificate table entry and the table),
//! with two authenticated attributes, `contentType` and `messageDigest`, the shape `sbsign`
//! writes minus its `signingTime` (which would make two builds with one key differ) and its
//! S/MIME capabilities. RSA PKCS#1 v1.5 signatures are deterministic, so signing one image with
//! one key always gives the same bytes. The digest follows EDK2's `DxeImageVerificationLib` (the
//! firmware is the judge): headers, sections in file order, then whatever follows the last one.
//!
//! Verification trusts a signer certificate that is itself in `db`, or one issued by a `db`
//! certificate (one level, RSA with SHA-256, what UEFI keys use); a hash or certificate listed in
//! `dbx` is refused first.

use aws_lc_rs::rand::SystemRandom;
use aws_lc_rs::signature::{self, KeyPair, RsaKeyPair, UnparsedPublicKey};
use sha2::{Digest, Sha256};

/// `WIN_CERT_REVISION_2_0`.
const WIN_CERT_REVISION: u16 = 0x0200;
/// `WIN_CERT_TYPE_PKCS_SIGNED_DATA`.
const WIN_CERT_TYPE_PKCS: u16 = 0x0002;
/// The index of the certificate table in the optional header's data directories.
const SECURITY_DIR: usize = 4;

const OID_SIGNED_DATA: &[u8] = &[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x07, 0x02];
const OID_SPC_INDIRECT_DATA: &[u8] = &[0x2b, 0x06, 0x01, 0x04, 0x01, 0x82, 0x37, 0x02, 0x01, 0x04];
const OID_SHA256: &[u8] = &[0x60, 0x86, 0x48, 0x01, 0x65, 0x03, 0x04, 0x02, 0x01];
const OID_RSA: &[u8] = &[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x01];
const OID_SHA256_RSA: &[u8] = &[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x0b];
const OID_CONTENT_TYPE: &[u8] = &[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x09, 0x03];
const OID_MESSAGE_DIGEST: &[u8] = &[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x09, 0x04];
const OID_COMMON_NAME: &[u8] = &[0x55, 0x04, 0x03];
/// `SpcAttributeTypeAndOptionalValue { SPC_PE_IMAGE_DATAOBJ, SpcPeImageData { flags: {},
/// file: SpcLink.file("<<<Obsolete>>>") } }`, byte for byte what sbsign and signtool write.
const SPC_PE_IMAGE_DATA: &[u8] = &[
    0x30, 0x33, 0x06, 0x0a, 0x2b, 0x06, 0x01, 0x04, 0x01, 0x82, 0x37, 0x02, 0x01, 0x0f, 0x30, 0x25,
    0x03, 0x01, 0x00, 0xa0, 0x20, 0xa2, 0x1e, 0x80, 0x1c, 0x00, 0x3c, 0x00, 0x3c, 0x00, 0x3c, 0x00,
    0x4f, 0x00, 0x62, 0x00, 0x73, 0x00, 0x6f, 0x00, 0x6c, 0x00, 0x65, 0x00, 0x74, 0x00, 0x65, 0x00,
    0x3e, 0x00, 0x3e, 0x00, 0x3e,
];

/// `EFI_CERT_X509_GUID` and `EFI_CERT_SHA256_GUID` as stored (mixed endian).
const EFI_CERT_X509: [u8; 16] = guid(
    0xa5c059a1,
    0x94e4,
    0x4aa7,
    [0x87, 0xb5, 0xab, 0x15, 0x5c, 0x2b, 0xf0, 0x72],
);
const EFI_CERT_SHA256: [u8; 16] = guid(
    0xc1c41626,
    0x504c,
    0x4092,
    [0xac, 0xa9, 0x41, 0xf9, 0x36, 0x93, 0x43, 0x28],
);

const fn guid(a: u32, b: u16, c: u16, d: [u8; 8]) -> [u8; 16] {
    let a = a.to_le_bytes();
    let b = b.to_le_bytes();
    let c = c.to_le_bytes();
    [
        a[0], a[1], a[2], a[3], b[0], b[1], c[0], c[1], d[0], d[1], d[2], d[3], d[4], d[5], d[6],
        d[7],
    ]
}

/// Why an image is not accepted (or cannot be signed).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Error {
    #[error("not a PE image: {0}")]
    NotPe(String),
    #[error("unsigned (no Authenticode signature)")]
    Unsigned,
    #[error("already signed (strip the old signature first)")]
    AlreadySigned,
    #[error("malformed signature: {0}")]
    Malformed(String),
    #[error("its content does not match its signature (Authenticode SHA-256 {actual}, the signature covers {signed}): the image was changed after signing")]
    Tampered { actual: String, signed: String },
    #[error("signed by {0:?}, which the firmware's db does not trust")]
    Untrusted(String),
    #[error("its hash or signer is in the firmware's dbx (forbidden)")]
    Forbidden,
    #[error("the RSA signature does not verify with {0:?}'s key")]
    BadSignature(String),
    #[error("bad signing key or certificate: {0}")]
    Key(String),
}

type Result<T, E = Error> = std::result::Result<T, E>;

/// Where the parts of a PE image that Authenticode skips are.
struct Pe {
    checksum_at: usize,
    secdir_at: usize,
    size_of_headers: usize,
    /// (file offset, size) of every section with raw data, in file order.
    sections: Vec<(usize, usize)>,
    /// The certificate table (file offset, size); (0, 0) when unsigned.
    certs: (usize, usize),
}

fn u16_at(b: &[u8], at: usize) -> Result<u16> {
    b.get(at..at + 2)
        .map(|s| u16::from_le_bytes([s[0], s[1]]))
        .ok_or_else(|| Error::NotPe(format!("truncated at byte {at}")))
}

fn u32_at(b: &[u8], at: usize) -> Result<u32> {
    b.get(at..at + 4)
        .map(|s| u32::from_le_bytes([s[0], s[1], s[2], s[3]]))
        .ok_or_else(|| Error::NotPe(format!("truncated at byte {at}")))
}

fn parse_pe(pe: &[u8]) -> Result<Pe> {
    if pe.get(0..2) != Some(b"MZ") {
        return Err(Error::NotPe("no MZ header".into()));
    }
    let off = u32_at(pe, 0x3c)? as usize;
    if pe.get(off..off + 4) != Some(b"PE\0\0") {
        return Err(Error::NotPe("no PE signature".into()));
    }
    let nsections = u16_at(pe, off + 6)? as usize;
    let opt_size = u16_at(pe, off + 20)? as usize;
    let opt = off + 24;
    let (ndirs_at, dirs_at) = match u16_at(pe, opt)? {
        0x10b => (opt + 92, opt + 96),
        0x20b => (opt + 108, opt + 112),
        m => {
            return Err(Error::NotPe(format!(
                "unknown optional header magic {m:#x}"
            )))
        }
    };
    if (u32_at(pe, ndirs_at)? as usize) <= SECURITY_DIR {
        return Err(Error::NotPe("no certificate table directory".into()));
    }
    let secdir_at = dirs_at + 8 * SECURITY_DIR;
    let certs = (
        u32_at(pe, secdir_at)? as usize,
        u32_at(pe, secdir_at + 4)? as usize,
    );
    if certs.1 != 0 && certs.0.checked_add(certs.1) != Some(pe.len()) {
        return Err(Error::Malformed(format!(
            "the certificate table ({} bytes at {}) is not at the end of the {}-byte file",
            certs.1,
            certs.0,
            pe.len()
        )));
    }
    let size_of_headers = u32_at(pe, opt + 60)? as usize;
    let table = opt + opt_size;
    if size_of_headers > pe.len() || size_of_headers < table + 40 * nsections {
        return Err(Error::NotPe(format!("bad SizeOfHeaders {size_of_headers}")));
    }
    let mut sections = Vec::with_capacity(nsections);
    for i in 0..nsections {
        let s = table + 40 * i;
        let size = u32_at(pe, s + 16)? as usize;
        let at = u32_at(pe, s + 20)? as usize;
        if size == 0 {
            continue;
        }
        if at.checked_add(size).is_none_or(|end| end > pe.len()) {
            return Err(Error::NotPe(format!(
                "section {i} ({size} bytes at {at}) runs past the end of the file"
            )));
        }
        sections.push((at, size));
    }
    sections.sort_unstable();
    Ok(Pe {
        checksum_at: opt + 64,
        secdir_at,
        size_of_headers,
        sections,
        certs,
    })
}

fn digest_of(pe: &[u8], p: &Pe) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(&pe[..p.checksum_at]);
    h.update(&pe[p.checksum_at + 4..p.secdir_at]);
    h.update(&pe[p.secdir_at + 8..p.size_of_headers]);
    let mut hashed = p.size_of_headers;
    for &(at, size) in &p.sections {
        h.update(&pe[at..at + size]);
        hashed += size;
    }
    // EDK2 hashes from the byte count (not the last section's end) up to the table.
    let end = pe.len() - p.certs.1;
    if end > hashed {
        h.update(&pe[hashed..end]);
    }
    h.finalize().into()
}

/// The Authenticode SHA-256 of a PE image (signed or not).
pub fn image_digest(pe: &[u8]) -> Result<[u8; 32]> {
    let p = parse_pe(pe)?;
    Ok(digest_of(pe, &p))
}

/// The PE checksum (the optional header's `CheckSum`), computed over the image with that field
/// taken as zero.
pub fn pe_checksum(pe: &[u8], checksum_at: usize) -> u32 {
    let mut sum: u64 = 0;
    for (i, word) in pe.chunks(2).enumerate() {
        if i * 2 == checksum_at || i * 2 == checksum_at + 2 {
            continue;
        }
        sum += u64::from(u16::from_le_bytes([word[0], *word.get(1).unwrap_or(&0)]));
        sum = (sum & 0xffff) + (sum >> 16);
    }
    (sum as u32).wrapping_add(pe.len() as u32)
}

// ---- DER, the little of it we write and read ----

fn der(tag: u8, content: &[u8]) -> Vec<u8> {
    let mut out = vec![tag];
    let len = content.len();
    if len < 0x80 {
        out.push(len as u8);
    } else {
        let bytes = len.to_be_bytes();
        let skip = bytes.iter().take_while(|&&b| b == 0).count();
        out.push(0x80 | (bytes.len() - skip) as u8);
        out.extend_from_slice(&bytes[skip..]);
    }
    out.extend_from_slice(content);
    out
}

fn seq(parts: &[&[u8]]) -> Vec<u8> {
    der(0x30, &parts.concat())
}

/// One TLV read from DER: its tag, its whole encoding and its content.
#[derive(Clone, Copy)]
struct Tlv<'a> {
    tag: u8,
    raw: &'a [u8],
    content: &'a [u8],
}

/// Reads the TLV at the start of `b`, returning it and what follows.
fn read_tlv<'a>(b: &'a [u8], what: &str) -> Result<(Tlv<'a>, &'a [u8])> {
    let bad = || Error::Malformed(format!("{what}: bad DER"));
    let tag = *b.first().ok_or_else(bad)?;
    let first = *b.get(1).ok_or_else(bad)?;
    let (len, hdr) = if first < 0x80 {
        (first as usize, 2)
    } else {
        let n = (first & 0x7f) as usize;
        if n == 0 || n > 4 {
            return Err(bad());
        }
        let mut len = 0usize;
        for i in 0..n {
            len = (len << 8) | *b.get(2 + i).ok_or_else(bad)? as usize;
        }
        (len, 2 + n)
    };
    let end = hdr
        .checked_add(len)
        .filter(|&e| e <= b.len())
        .ok_or_else(bad)?;
    Ok((
        Tlv {
            tag,
            raw: &b[..end],
            content: &b[hdr..end],
        },
        &b[end..],
    ))
}

/// The TLVs inside a constructed value.
fn children<'a>(content: &'a [u8], what: &str) -> Result<Vec<Tlv<'a>>> {
    let mut out = Vec::new();
    let mut rest = content;
    while !rest.is_empty() {
        let (t, r) = read_tlv(rest, what)?;
        out.push(t);
        rest = r;
    }
    Ok(out)
}

fn expect<'a>(t: Option<&Tlv<'a>>, tag: u8, what: &str) -> Result<Tlv<'a>> {
    match t {
        Some(t) if t.tag == tag => Ok(*t),
        _ => Err(Error::Malformed(format!("{what} missing"))),
    }
}

/// The parts of an X.509 certificate signing and verifying need.
struct Cert<'a> {
    raw: &'a [u8],
    tbs: &'a [u8],
    serial: &'a [u8],
    issuer: &'a [u8],
    subject: &'a [u8],
    /// `RSAPublicKey` DER (the SubjectPublicKeyInfo's bit string).
    rsa_key: Option<&'a [u8]>,
    sig_alg_oid: &'a [u8],
    signature: &'a [u8],
}

fn parse_cert(der_bytes: &[u8]) -> Result<Cert<'_>> {
    let (c, _) = read_tlv(der_bytes, "certificate")?;
    let top = children(c.content, "certificate")?;
    let tbs = expect(top.first(), 0x30, "tbsCertificate")?;
    let alg = children(
        expect(top.get(1), 0x30, "signatureAlgorithm")?.content,
        "alg",
    )?;
    let sig = expect(top.get(2), 0x03, "signatureValue")?;
    let mut f = children(tbs.content, "tbsCertificate")?;
    if f.first().map(|t| t.tag) == Some(0xa0) {
        f.remove(0);
    }
    let serial = expect(f.first(), 0x02, "serialNumber")?;
    let issuer = expect(f.get(2), 0x30, "issuer")?;
    let subject = expect(f.get(4), 0x30, "subject")?;
    let spki = children(
        expect(f.get(5), 0x30, "subjectPublicKeyInfo")?.content,
        "spki",
    )?;
    let key_alg = children(expect(spki.first(), 0x30, "key algorithm")?.content, "alg")?;
    let bits = expect(spki.get(1), 0x03, "subjectPublicKey")?;
    let rsa_key = (key_alg.first().map(|t| t.content) == Some(OID_RSA))
        .then(|| bits.content.get(1..))
        .flatten();
    Ok(Cert {
        raw: c.raw,
        tbs: tbs.raw,
        serial: serial.raw,
        issuer: issuer.raw,
        subject: subject.raw,
        rsa_key,
        sig_alg_oid: alg.first().map(|t| t.content).unwrap_or_default(),
        signature: sig.content.get(1..).unwrap_or_default(),
    })
}

/// A name's common name (or `?`), for messages.
fn common_name(name: &[u8]) -> String {
    let find = || -> Result<Option<String>> {
        for rdn in children(read_tlv(name, "name")?.0.content, "name")? {
            for atv in children(rdn.content, "rdn")? {
                let parts = children(atv.content, "attribute")?;
                if parts.first().map(|t| t.content) == Some(OID_COMMON_NAME) {
                    if let Some(v) = parts.get(1) {
                        return Ok(Some(String::from_utf8_lossy(v.content).into_owned()));
                    }
                }
            }
        }
        Ok(None)
    };
    find().ok().flatten().unwrap_or_else(|| "?".to_owned())
}

/// Decodes a PEM file's first block of `label` (e.g. `CERTIFICATE`), or returns the input if it
/// is already DER.
pub fn pem_or_der(input: &[u8], labels: &[&str]) -> Result<Vec<u8>> {
    let Ok(text) = std::str::from_utf8(input) else {
        return Ok(input.to_vec());
    };
    for label in labels {
        let begin = format!("-----BEGIN {label}-----");
        let end = format!("-----END {label}-----");
        if let Some(start) = text.find(&begin) {
            let body = &text[start + begin.len()..];
            let stop = body
                .find(&end)
                .ok_or_else(|| Error::Key(format!("no {end} line")))?;
            let b64: String = body[..stop].split_whitespace().collect();
            return base64_decode(&b64).ok_or_else(|| Error::Key(format!("bad base64 in {label}")));
        }
    }
    Err(Error::Key(format!(
        "no PEM block of {}",
        labels.join(" or ")
    )))
}

fn base64_decode(s: &str) -> Option<Vec<u8>> {
    let val = |c: u8| -> Option<u32> {
        Some(match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            _ => return None,
        } as u32)
    };
    let s = s.trim_end_matches('=').as_bytes();
    let mut out = Vec::with_capacity(s.len() * 3 / 4);
    let (mut acc, mut bits) = (0u32, 0);
    for &c in s {
        acc = (acc << 6) | val(c)?;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
        }
    }
    Some(out)
}

/// A signing key and its certificate (PEM or DER; the key PKCS#8 or PKCS#1 RSA).
pub struct Signer {
    key: RsaKeyPair,
    cert: Vec<u8>,
}

impl std::fmt::Debug for Signer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Signer")
            .field("subject", &self.subject())
            .finish()
    }
}

impl Signer {
    pub fn new(key: &[u8], cert: &[u8]) -> Result<Self> {
        let key_der = pem_or_der(key, &["PRIVATE KEY", "RSA PRIVATE KEY"])?;
        let key = RsaKeyPair::from_pkcs8(&key_der)
            .or_else(|_| RsaKeyPair::from_der(&key_der))
            .map_err(|e| Error::Key(format!("the key is not an RSA private key: {e}")))?;
        let cert = pem_or_der(cert, &["CERTIFICATE"])?;
        let c = parse_cert(&cert)?;
        if c.rsa_key != Some(key.public_key().as_ref()) {
            return Err(Error::Key(format!(
                "the certificate ({:?}) is not the key's",
                common_name(c.subject)
            )));
        }
        Ok(Self { key, cert })
    }

    /// The certificate's common name.
    pub fn subject(&self) -> String {
        parse_cert(&self.cert)
            .map(|c| common_name(c.subject))
            .unwrap_or_default()
    }

    /// The certificate, DER.
    pub fn cert_der(&self) -> &[u8] {
        &self.cert
    }

    /// Signs an unsigned PE image: pads it to 8 bytes, appends the certificate table and points
    /// the security directory at it, and fixes the checksum. Same input and key, same bytes.
    pub fn sign(&self, pe: &[u8]) -> Result<Vec<u8>> {
        let p = parse_pe(pe)?;
        if p.certs.1 != 0 {
            return Err(Error::AlreadySigned);
        }
        let mut out = pe.to_vec();
        out.resize(pe.len().next_multiple_of(8), 0);
        let p = parse_pe(&out)?;
        let digest = digest_of(&out, &p);
        let p7 = self.signed_data(&digest)?;
        let len = (8 + p7.len()).next_multiple_of(8);
        let table_at = out.len();
        out.extend_from_slice(&(len as u32).to_le_bytes());
        out.extend_from_slice(&WIN_CERT_REVISION.to_le_bytes());
        out.extend_from_slice(&WIN_CERT_TYPE_PKCS.to_le_bytes());
        out.extend_from_slice(&p7);
        out.resize(table_at + len, 0);
        out[p.secdir_at..p.secdir_at + 4].copy_from_slice(&(table_at as u32).to_le_bytes());
        out[p.secdir_at + 4..p.secdir_at + 8].copy_from_slice(&(len as u32).to_le_bytes());
        let sum = pe_checksum(&out, p.checksum_at);
        out[p.checksum_at..p.checksum_at + 4].copy_from_slice(&sum.to_le_bytes());
        Ok(out)
    }

    fn signed_data(&self, digest: &[u8; 32]) -> Result<Vec<u8>> {
        let cert = parse_cert(&self.cert)?;
        let sha256 = seq(&[&der(0x06, OID_SHA256), &der(0x05, &[])]);
        let idc = seq(&[SPC_PE_IMAGE_DATA, &seq(&[&sha256, &der(0x04, digest)])]);
        let (idc_tlv, _) = read_tlv(&idc, "SpcIndirectDataContent")?;
        let idc_hash: [u8; 32] = Sha256::digest(idc_tlv.content).into();
        // DER SET OF order: contentType (shorter) before messageDigest.
        let attrs = [
            seq(&[
                &der(0x06, OID_CONTENT_TYPE),
                &der(0x31, &der(0x06, OID_SPC_INDIRECT_DATA)),
            ]),
            seq(&[
                &der(0x06, OID_MESSAGE_DIGEST),
                &der(0x31, &der(0x04, &idc_hash)),
            ]),
        ]
        .concat();
        let mut sig = vec![0u8; self.key.public_modulus_len()];
        self.key
            .sign(
                &signature::RSA_PKCS1_SHA256,
                &SystemRandom::new(),
                &der(0x31, &attrs),
                &mut sig,
            )
            .map_err(|e| Error::Key(format!("RSA signing failed: {e}")))?;
        let signer_info = seq(&[
            &der(0x02, &[1]),
            &seq(&[cert.issuer, cert.serial]),
            &sha256,
            &der(0xa0, &attrs),
            &seq(&[&der(0x06, OID_RSA), &der(0x05, &[])]),
            &der(0x04, &sig),
        ]);
        let signed_data = seq(&[
            &der(0x02, &[1]),
            &der(0x31, &sha256),
            &seq(&[&der(0x06, OID_SPC_INDIRECT_DATA), &der(0xa0, &idc)]),
            &der(0xa0, cert.raw),
            &der(0x31, &signer_info),
        ]);
        Ok(seq(&[
            &der(0x06, OID_SIGNED_DATA),
            &der(0xa0, &signed_data),
        ]))
    }
}

/// The firmware's signature databases, as UEFI variables hold them: X.509 certificates and
/// SHA-256 image hashes.
#[derive(Debug, Default, Clone)]
pub struct SignatureDb {
    pub certs: Vec<Vec<u8>>,
    pub sha256: Vec<[u8; 32]>,
}

impl SignatureDb {
    /// Parses a sequence of `EFI_SIGNATURE_LIST`s (a variable's data, without efivarfs' leading
    /// four attribute bytes). Types other than X.509 and SHA-256 are skipped.
    pub fn parse(mut data: &[u8]) -> Result<Self> {
        let mut db = Self::default();
        while !data.is_empty() {
            let bad = |what: &str| Error::Malformed(format!("EFI_SIGNATURE_LIST: {what}"));
            if data.len() < 28 {
                return Err(bad("truncated header"));
            }
            let kind: [u8; 16] = data[..16].try_into().expect("16 bytes");
            let list = u32_at(data, 16)? as usize;
            let header = u32_at(data, 20)? as usize;
            let size = u32_at(data, 24)? as usize;
            if list > data.len() || size <= 16 || 28 + header > list {
                return Err(bad("sizes do not fit"));
            }
            for entry in data[28 + header..list].chunks(size) {
                if entry.len() != size {
                    return Err(bad("a partial entry"));
                }
                let value = &entry[16..];
                if kind == EFI_CERT_X509 {
                    db.certs.push(value.to_vec());
                } else if kind == EFI_CERT_SHA256 && value.len() == 32 {
                    db.sha256.push(value.try_into().expect("32 bytes"));
                }
            }
            data = &data[list..];
        }
        Ok(db)
    }
}

/// What a successful [`verify`] found.
#[derive(Debug, PartialEq, Eq)]
pub struct Verified {
    /// The signer certificate's common name.
    pub signer: String,
}

fn verify_rsa(key: &[u8], msg: &[u8], sig: &[u8]) -> bool {
    UnparsedPublicKey::new(&signature::RSA_PKCS1_2048_8192_SHA256, key)
        .verify(msg, sig)
        .is_ok()
}

/// Checks a PE image's Authenticode signature the way UEFI firmware does: the image hash must
/// match the signed one, neither it nor the signer may be in `dbx`, and some signature must come
/// from a certificate in `db` (or one a `db` certificate issued).
pub fn verify(pe: &[u8], db: &SignatureDb, dbx: &SignatureDb) -> Result<Verified> {
    let p = parse_pe(pe)?;
    let actual = digest_of(pe, &p);
    if dbx.sha256.contains(&actual) {
        return Err(Error::Forbidden);
    }
    if p.certs.1 == 0 {
        return Err(Error::Unsigned);
    }
    // Every WIN_CERTIFICATE in the table; the first trusted one wins, else the first error.
    let mut table = &pe[p.certs.0..p.certs.0 + p.certs.1];
    let mut first_err = None;
    while table.len() >= 8 {
        let len = u32_at(table, 0)? as usize;
        if len < 8 || len > table.len() {
            return Err(Error::Malformed(format!(
                "WIN_CERTIFICATE length {len} in a {}-byte table",
                table.len()
            )));
        }
        if u16_at(table, 4)? == WIN_CERT_REVISION && u16_at(table, 6)? == WIN_CERT_TYPE_PKCS {
            match verify_one(&table[8..len], &actual, db, dbx) {
                Ok(v) => return Ok(v),
                Err(e) => {
                    first_err.get_or_insert(e);
                }
            }
        }
        table = &table[len.next_multiple_of(8).min(table.len())..];
    }
    Err(first_err.unwrap_or(Error::Unsigned))
}

fn verify_one(
    p7: &[u8],
    actual: &[u8; 32],
    db: &SignatureDb,
    dbx: &SignatureDb,
) -> Result<Verified> {
    let (ci, _) = read_tlv(p7, "ContentInfo")?;
    let ci = children(ci.content, "ContentInfo")?;
    if expect(ci.first(), 0x06, "contentType")?.content != OID_SIGNED_DATA {
        return Err(Error::Malformed("not PKCS#7 SignedData".into()));
    }
    let sd = expect(ci.get(1), 0xa0, "content")?;
    let (sd, _) = read_tlv(sd.content, "SignedData")?;
    let sd = children(sd.content, "SignedData")?;
    let content = children(
        expect(sd.get(2), 0x30, "contentInfo")?.content,
        "contentInfo",
    )?;
    if expect(content.first(), 0x06, "contentType")?.content != OID_SPC_INDIRECT_DATA {
        return Err(Error::Malformed(
            "the content is not SpcIndirectDataContent".into(),
        ));
    }
    let (idc, _) = read_tlv(expect(content.get(1), 0xa0, "content")?.content, "idc")?;
    let idc_parts = children(idc.content, "SpcIndirectDataContent")?;
    let digest_info = children(
        expect(idc_parts.get(1), 0x30, "DigestInfo")?.content,
        "DigestInfo",
    )?;
    let alg = children(
        expect(digest_info.first(), 0x30, "digestAlgorithm")?.content,
        "alg",
    )?;
    if alg.first().map(|t| t.content) != Some(OID_SHA256) {
        return Err(Error::Malformed("the image digest is not SHA-256".into()));
    }
    let signed = expect(digest_info.get(1), 0x04, "digest")?.content;
    if signed != actual {
        return Err(Error::Tampered {
            actual: to_hex(actual),
            signed: to_hex(signed),
        });
    }
    let mut rest = &sd[3..];
    let mut certs = Vec::new();
    if let Some(t) = rest.first().filter(|t| t.tag == 0xa0) {
        certs = children(t.content, "certificates")?;
        rest = &rest[1..];
    }
    if rest.first().map(|t| t.tag) == Some(0xa1) {
        rest = &rest[1..];
    }
    let infos = children(
        expect(rest.first(), 0x31, "signerInfos")?.content,
        "signerInfos",
    )?;
    let info = infos
        .first()
        .ok_or_else(|| Error::Malformed("no signer".into()))?;
    let f = children(info.content, "SignerInfo")?;
    let ias = children(
        expect(f.get(1), 0x30, "issuerAndSerialNumber")?.content,
        "ias",
    )?;
    let (issuer, serial) = (
        expect(ias.first(), 0x30, "issuer")?.raw,
        expect(ias.get(1), 0x02, "serial")?.raw,
    );
    let signer = certs
        .iter()
        .filter_map(|c| parse_cert(c.raw).ok())
        .find(|c| c.issuer == issuer && c.serial == serial)
        .ok_or_else(|| {
            Error::Malformed("the signer's certificate is not in the signature".into())
        })?;
    let name = common_name(signer.subject);
    let (message, sig) = match f.get(3) {
        Some(attrs) if attrs.tag == 0xa0 => {
            let mut digest_attr = None;
            for a in children(attrs.content, "attributes")? {
                let parts = children(a.content, "attribute")?;
                if parts.first().map(|t| t.content) == Some(OID_MESSAGE_DIGEST) {
                    let set = expect(parts.get(1), 0x31, "messageDigest")?;
                    digest_attr = Some(read_tlv(set.content, "messageDigest")?.0.content);
                }
            }
            let want: [u8; 32] = Sha256::digest(idc.content).into();
            if digest_attr != Some(&want[..]) {
                return Err(Error::Malformed(
                    "the messageDigest attribute does not match the signed content".into(),
                ));
            }
            let mut set = attrs.raw.to_vec();
            set[0] = 0x31;
            (set, expect(f.get(5), 0x04, "encryptedDigest")?.content)
        }
        _ => (
            idc.content.to_vec(),
            expect(f.get(4), 0x04, "encryptedDigest")?.content,
        ),
    };
    if dbx.certs.iter().any(|c| c == signer.raw) {
        return Err(Error::Forbidden);
    }
    let key = signer
        .rsa_key
        .ok_or_else(|| Error::Malformed(format!("{name:?} has no RSA key")))?;
    let trusted = db.certs.iter().any(|d| {
        d == signer.raw
            || parse_cert(d).is_ok_and(|issuer_cert| {
                issuer_cert.subject == signer.issuer
                    && signer.sig_alg_oid == OID_SHA256_RSA
                    && issuer_cert
                        .rsa_key
                        .is_some_and(|k| verify_rsa(k, signer.tbs, signer.signature))
            })
    });
    if !trusted {
        return Err(Error::Untrusted(name));
    }
    if !verify_rsa(key, &message, sig) {
        return Err(Error::BadSignature(name));
    }
    Ok(Verified { signer: name })
}

#[doc(hidden)]
/// A minimal PE32+ image (for tests, here and in image-build): headers, a `.text` and a `.cmdline` section, then 13 trailing bytes.
pub fn sample_image(cmdline: &[u8]) -> Vec<u8> {
    let mut pe = vec![0u8; 0x400];
    pe[0..2].copy_from_slice(b"MZ");
    pe[0x3c..0x40].copy_from_slice(&0x80u32.to_le_bytes());
    pe[0x80..0x84].copy_from_slice(b"PE\0\0");
    let coff = 0x84;
    pe[coff..coff + 2].copy_from_slice(&0x8664u16.to_le_bytes());
    pe[coff + 2..coff + 4].copy_from_slice(&2u16.to_le_bytes());
    pe[coff + 16..coff + 18].copy_from_slice(&240u16.to_le_bytes());
    let opt = coff + 20;
    pe[opt..opt + 2].copy_from_slice(&0x20bu16.to_le_bytes());
    pe[opt + 60..opt + 64].copy_from_slice(&0x400u32.to_le_bytes());
    pe[opt + 108..opt + 112].copy_from_slice(&16u32.to_le_bytes());
    let table = opt + 240;
    for (i, (name, at, len)) in [
        (&b".text\0\0\0"[..], 0x400u32, 0x200u32),
        (b".cmdline", 0x600, 0x200),
    ]
    .into_iter()
    .enumerate()
    {
        let s = table + 40 * i;
        pe[s..s + 8].copy_from_slice(name);
        pe[s + 16..s + 20].copy_from_slice(&len.to_le_bytes());
        pe[s + 20..s + 24].copy_from_slice(&at.to_le_bytes());
    }
    pe.extend((0..0x200u32).map(|i| (i * 7) as u8));
    let mut c = cmdline.to_vec();
    c.resize(0x200, 0);
    pe.extend(c);
    pe.extend_from_slice(b"trailing data");
    pe
}

fn to_hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

#[cfg(test)]
mod tests;
