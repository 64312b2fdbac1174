//! User data bytes → a recognised format, with the limits and encoding checks done first.
//!
//! Whatever the datasource, user data arrives as bytes. Before anything is parsed:
//! - the raw size is capped at [`MAX_RAW`] (16 KiB, EC2's limit, so data that works here works
//!   there); gzip is detected by its magic number and inflated through a reader capped at
//!   [`MAX_INFLATED`], so a small gzip bomb fails as cleanly as a big file;
//! - the text must be UTF-8: a UTF-16 byte order mark, a NUL byte or an invalid sequence is named
//!   with its line and byte offset (editors on other systems save user data in every encoding).
//!
//! The first line selects the format, as cloud-init does: `#cloud-config` is the YAML subset of
//! [`super::cloudconfig`]; `#!` (a shell script) and cloud-init's other part types (MIME
//! multipart, `#include`, boothooks, jinja templates) are refused by name; anything else is
//! Keelson TOML, validated by the same parser as every other config file. Scripts are refused
//! on purpose: the host has no shell, and a script that runs once is configuration nobody can
//! read back — a service does the same job declaratively and is visible in `keelctl ps`.

use std::fmt;
use std::io::Read;

/// Largest user data accepted as delivered (EC2's limit: compress to go beyond it).
pub const MAX_RAW: usize = 16 * 1024;
/// Largest user data after gzip inflation (the API's own limit for `apply`).
pub const MAX_INFLATED: usize = 1024 * 1024;

/// The formats user data can be in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UserData {
    /// Empty or only whitespace and comments: nothing to apply.
    Empty,
    /// `#cloud-config` YAML (the text, first line included).
    CloudConfig(String),
    /// Keelson's own TOML.
    Toml(String),
}

/// Why user data was refused, phrased for the person who wrote it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UserDataError(pub String);

impl fmt::Display for UserDataError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for UserDataError {}

impl UserData {
    /// Decodes user data from `origin` (named in every error).
    pub fn decode(raw: &[u8], origin: &str) -> Result<UserData, UserDataError> {
        let err = |msg: String| UserDataError(format!("{origin}: {msg}"));
        if raw.len() > MAX_RAW {
            return Err(err(format!(
                "user data is {} bytes, more than the {MAX_RAW}-byte limit (EC2's); \
                 gzip it or move services into a file written with write_files",
                raw.len()
            )));
        }
        let inflated;
        let bytes = if raw.starts_with(&[0x1f, 0x8b]) {
            inflated = inflate(raw).map_err(err)?;
            &inflated[..]
        } else {
            raw
        };
        let text = utf8(bytes).map_err(err)?;
        let first = text
            .lines()
            .map(str::trim_end)
            .find(|l| !l.is_empty())
            .unwrap_or("");
        if first.is_empty() {
            return Ok(UserData::Empty);
        }
        if first == "#cloud-config" {
            return Ok(UserData::CloudConfig(text.to_owned()));
        }
        if let Some(kind) = unsupported_kind(first) {
            return Err(err(format!(
                "{kind} user data is not supported: use #cloud-config or Keelson TOML \
                 (scripts: a oneshot service does the same job; see docs/first-boot.md)"
            )));
        }
        if text
            .lines()
            .all(|l| l.trim().is_empty() || l.trim_start().starts_with('#'))
        {
            return Ok(UserData::Empty);
        }
        Ok(UserData::Toml(text.to_owned()))
    }
}

/// Names cloud-init part types Keelson does not take, from their first line.
fn unsupported_kind(first: &str) -> Option<&'static str> {
    let lower = first.to_ascii_lowercase();
    if first.starts_with("#!") {
        Some("script (#!)")
    } else if lower.starts_with("content-type:") || lower.starts_with("mime-version:") {
        Some("MIME multipart")
    } else if first.starts_with("#include") {
        Some("#include")
    } else if first.starts_with("#cloud-boothook") {
        Some("#cloud-boothook")
    } else if first.starts_with("#cloud-config-archive") {
        Some("#cloud-config-archive")
    } else if first.starts_with("#part-handler") {
        Some("#part-handler")
    } else if lower.starts_with("## template:") {
        Some("jinja template")
    } else if first.starts_with("#cloud-config") {
        // `#cloud-config` followed by something else on the line (cloud-init ignores the part).
        Some("mis-headed cloud-config (the first line must be exactly `#cloud-config`)")
    } else {
        None
    }
}

fn inflate(raw: &[u8]) -> Result<Vec<u8>, String> {
    let mut out = Vec::new();
    let mut reader = flate2::read::GzDecoder::new(raw).take(MAX_INFLATED as u64 + 1);
    reader.read_to_end(&mut out).map_err(|e| {
        format!("user data looks gzip-compressed (1f 8b) but does not inflate: {e}")
    })?;
    if out.len() > MAX_INFLATED {
        return Err(format!(
            "gzip-compressed user data inflates to more than {MAX_INFLATED} bytes (the limit)"
        ));
    }
    Ok(out)
}

fn utf8(bytes: &[u8]) -> Result<&str, String> {
    if bytes.starts_with(&[0xff, 0xfe]) || bytes.starts_with(&[0xfe, 0xff]) {
        return Err(
            "user data is UTF-16 (it starts with a byte order mark); save it as UTF-8".into(),
        );
    }
    let bytes = bytes.strip_prefix(b"\xef\xbb\xbf").unwrap_or(bytes);
    let text = std::str::from_utf8(bytes).map_err(|e| {
        let at = e.valid_up_to();
        format!(
            "user data is not UTF-8: invalid byte 0x{:02x} at line {}, byte offset {at}",
            bytes[at],
            line_of(bytes, at)
        )
    })?;
    if let Some(at) = text.find('\0') {
        return Err(format!(
            "user data contains a NUL byte at line {}, byte offset {at} (binary data?)",
            line_of(bytes, at)
        ));
    }
    Ok(text)
}

fn line_of(bytes: &[u8], at: usize) -> usize {
    bytes[..at].iter().filter(|&&b| b == b'\n').count() + 1
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn gzip(data: &[u8]) -> Vec<u8> {
        let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
        enc.write_all(data).unwrap();
        enc.finish().unwrap()
    }

    fn decode(raw: &[u8]) -> Result<UserData, String> {
        UserData::decode(raw, "fw_cfg").map_err(|e| e.0)
    }

    #[test]
    fn recognises_formats() {
        assert_eq!(decode(b"").unwrap(), UserData::Empty);
        assert_eq!(decode(b"\n  \n# nothing\n").unwrap(), UserData::Empty);
        let cc = "#cloud-config\r\nhostname: a\n";
        assert_eq!(
            decode(cc.as_bytes()).unwrap(),
            UserData::CloudConfig(cc.into())
        );
        let toml = "version = 1\n";
        assert_eq!(
            decode(toml.as_bytes()).unwrap(),
            UserData::Toml(toml.into())
        );
        // A byte order mark is tolerated.
        assert_eq!(
            decode(b"\xef\xbb\xbf#cloud-config\n").unwrap(),
            UserData::CloudConfig("#cloud-config\n".into())
        );
    }

    #[test]
    fn gzip_is_inflated_and_bounded() {
        let cc = b"#cloud-config\nhostname: zipped\n";
        assert_eq!(
            decode(&gzip(cc)).unwrap(),
            UserData::CloudConfig(String::from_utf8(cc.to_vec()).unwrap())
        );
        // 4 MiB of zeros compress to a few KiB: under the raw limit, over the inflated one.
        let bomb = gzip(&vec![b'a'; 4 * 1024 * 1024]);
        assert!(bomb.len() < MAX_RAW);
        let e = decode(&bomb).unwrap_err();
        assert!(e.contains("inflates to more than 1048576 bytes"), "{e}");
        let e = decode(&[0x1f, 0x8b, 1, 2, 3]).unwrap_err();
        assert!(e.contains("does not inflate"), "{e}");
    }

    #[test]
    fn oversized_and_badly_encoded_data_is_named() {
        let e = decode(&vec![b'#'; MAX_RAW + 1]).unwrap_err();
        assert!(
            e.starts_with("fw_cfg: user data is 16385 bytes, more than the 16384-byte"),
            "{e}"
        );
        let e = decode(b"\xff\xfe#\0c\0").unwrap_err();
        assert!(e.contains("UTF-16"), "{e}");
        let e = decode(b"version = 1\nname = \"caf\xe9\"\n").unwrap_err();
        assert_eq!(
            e,
            "fw_cfg: user data is not UTF-8: invalid byte 0xe9 at line 2, byte offset 23"
        );
        let e = decode(b"version = 1\n\0").unwrap_err();
        assert!(e.contains("NUL byte at line 2"), "{e}");
    }

    #[test]
    fn other_cloud_init_formats_are_refused_by_name() {
        for (data, kind) in [
            ("#!/bin/sh\necho hi\n", "script (#!)"),
            (
                "Content-Type: multipart/mixed; boundary=x\n",
                "MIME multipart",
            ),
            ("#include\nhttp://x\n", "#include"),
            ("## template: jinja\n#cloud-config\n", "jinja template"),
            ("#cloud-config-archive\n- a\n", "#cloud-config-archive"),
            ("#cloud-configs\nhostname: a\n", "mis-headed cloud-config"),
        ] {
            let e = decode(data.as_bytes()).unwrap_err();
            assert!(e.starts_with(&format!("fw_cfg: {kind}")), "{data:?}: {e}");
        }
    }
}
