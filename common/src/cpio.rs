//! A deterministic `newc` cpio writer (initramfs images; test guests): entries in the order given (callers
//! sort), inode numbers counted from 1, every timestamp the same, owner root.

use std::io::Write;

/// One archive member.
pub enum Entry<'a> {
    Dir {
        path: &'a str,
        mode: u32,
    },
    File {
        path: &'a str,
        mode: u32,
        data: &'a [u8],
    },
    CharDev {
        path: &'a str,
        mode: u32,
        major: u32,
        minor: u32,
    },
}

/// Writes `newc` archives.
pub struct Writer<W: Write> {
    out: W,
    mtime: u32,
    ino: u32,
    written: u64,
}

impl<W: Write> Writer<W> {
    pub fn new(out: W, mtime: u32) -> Self {
        Writer {
            out,
            mtime,
            ino: 0,
            written: 0,
        }
    }

    fn raw(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.out.write_all(bytes)?;
        self.written += bytes.len() as u64;
        Ok(())
    }

    fn pad4(&mut self) -> std::io::Result<()> {
        let pad = (4 - self.written % 4) % 4;
        self.raw(&[0u8; 3][..pad as usize])
    }

    fn header(
        &mut self,
        path: &str,
        mode: u32,
        size: usize,
        rdev: (u32, u32),
    ) -> std::io::Result<()> {
        self.ino += 1;
        let nlink = if mode & 0o170000 == 0o040000 { 2 } else { 1 };
        let name_len = path.len() + 1;
        let h = format!(
            "070701{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}",
            self.ino, mode, 0, 0, nlink, self.mtime, size, 0, 0, rdev.0, rdev.1, name_len, 0
        );
        self.raw(h.as_bytes())?;
        self.raw(path.as_bytes())?;
        self.raw(&[0])?;
        self.pad4()
    }

    /// Appends one entry.
    pub fn add(&mut self, e: &Entry<'_>) -> std::io::Result<()> {
        match *e {
            Entry::Dir { path, mode } => self.header(path, 0o040000 | mode, 0, (0, 0)),
            Entry::File { path, mode, data } => {
                self.header(path, 0o100000 | mode, data.len(), (0, 0))?;
                self.raw(data)?;
                self.pad4()
            }
            Entry::CharDev {
                path,
                mode,
                major,
                minor,
            } => self.header(path, 0o020000 | mode, 0, (major, minor)),
        }
    }

    /// Writes the trailer and returns the inner writer.
    pub fn finish(mut self) -> std::io::Result<W> {
        self.ino = 0;
        self.header("TRAILER!!!", 0, 0, (0, 0))?;
        Ok(self.out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_is_aligned_and_deterministic() {
        let build = || {
            let mut w = Writer::new(Vec::new(), 42);
            w.add(&Entry::Dir {
                path: "etc",
                mode: 0o755,
            })
            .unwrap();
            w.add(&Entry::File {
                path: "init",
                mode: 0o755,
                data: b"abc",
            })
            .unwrap();
            w.add(&Entry::CharDev {
                path: "dev/console",
                mode: 0o600,
                major: 5,
                minor: 1,
            })
            .unwrap();
            w.finish().unwrap()
        };
        let a = build();
        assert_eq!(a, build());
        assert_eq!(a.len() % 4, 0);
        assert!(a.starts_with(b"070701"));
        let text = String::from_utf8_lossy(&a);
        assert!(text.contains("init\0"));
        assert!(text.contains("TRAILER!!!"));
    }
}
