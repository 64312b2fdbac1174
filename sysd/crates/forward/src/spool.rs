//! The on-disk buffer between the intake and the receiver: framed messages appended to
//! segment files (`<seq>.seg`) in a directory on /var, read back in order, and deleted once the
//! receiver has acknowledged every message in them. `cursor` records the first message not yet
//! acknowledged, so a restarted sysd resumes there (a message may be sent twice after a crash,
//! never skipped). The total is bounded: a message that does not fit is refused (the caller
//! counts it as dropped), so what the receiver gets is always an unbroken, ordered run.

use std::collections::VecDeque;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use crate::syslog::frame_len;

/// A place in the spool: a segment and a byte offset in it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default)]
pub struct Position {
    pub seq: u64,
    pub offset: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> Error + '_ {
    move |source| Error::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// The buffer.
#[derive(Debug)]
pub struct Spool {
    dir: PathBuf,
    max_bytes: u64,
    segment_bytes: u64,
    /// (seq, size) of every segment, oldest first; never empty.
    segments: VecDeque<(u64, u64)>,
    writer: Option<File>,
    reader: Option<(u64, File)>,
    /// The first byte not yet acknowledged.
    cursor: Position,
    /// The next byte to send (at or after `cursor`).
    read: Position,
}

impl Spool {
    /// Opens (or creates) the spool in `dir`, holding at most `max_bytes` unacknowledged.
    pub fn open(dir: &Path, max_bytes: u64) -> Result<Spool, Error> {
        fs::create_dir_all(dir).map_err(io_err(dir))?;
        let mut seqs: Vec<u64> = fs::read_dir(dir)
            .map_err(io_err(dir))?
            .filter_map(|e| {
                let name = e.ok()?.file_name();
                name.to_str()?.strip_suffix(".seg")?.parse().ok()
            })
            .collect();
        seqs.sort_unstable();
        let cursor_file = dir.join("cursor");
        let cursor = fs::read_to_string(&cursor_file)
            .ok()
            .and_then(|t| {
                let (s, o) = t.trim().split_once(' ')?;
                Some(Position {
                    seq: s.parse().ok()?,
                    offset: o.parse().ok()?,
                })
            })
            .unwrap_or_default();
        let mut spool = Spool {
            dir: dir.to_path_buf(),
            max_bytes,
            segment_bytes: (max_bytes / 8).clamp(64 << 10, 4 << 20),
            segments: VecDeque::new(),
            writer: None,
            reader: None,
            cursor,
            read: cursor,
        };
        for seq in seqs {
            let path = spool.path(seq);
            if seq < cursor.seq {
                fs::remove_file(&path).map_err(io_err(&path))?;
                continue;
            }
            let size = fs::metadata(&path).map_err(io_err(&path))?.len();
            spool.segments.push_back((seq, size));
        }
        // The cursor's segment may be gone (everything before was acknowledged): start at the
        // oldest remaining segment, or a fresh one.
        match spool.segments.front() {
            Some(&(seq, _)) if seq != cursor.seq => {
                spool.cursor = Position { seq, offset: 0 };
            }
            None => spool.segments.push_back((cursor.seq, 0)),
            _ => {}
        }
        spool.read = spool.cursor;
        spool.repair_tail()?;
        Ok(spool)
    }

    fn path(&self, seq: u64) -> PathBuf {
        self.dir.join(format!("{seq:020}.seg"))
    }

    /// A crash mid-append leaves a partial frame at the end of the newest segment: cut it off
    /// so appends continue on a frame boundary.
    fn repair_tail(&mut self) -> Result<(), Error> {
        let Some(&(seq, size)) = self.segments.back() else {
            return Ok(());
        };
        let path = self.path(seq);
        let data = match fs::read(&path) {
            Ok(d) => d,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(io_err(&path)(e)),
        };
        let mut good = 0;
        while let Ok(Some(n)) = frame_len(&data[good..]) {
            good += n;
        }
        if good as u64 != size {
            tracing::warn!(
                "forward: {}: cut {} bytes of a partial message",
                path.display(),
                size - good as u64
            );
            let f = OpenOptions::new()
                .write(true)
                .open(&path)
                .map_err(io_err(&path))?;
            f.set_len(good as u64).map_err(io_err(&path))?;
            if let Some(last) = self.segments.back_mut() {
                last.1 = good as u64;
            }
        }
        Ok(())
    }

    /// Bytes on disk: what is not acknowledged yet, and the acknowledged head of the oldest
    /// segment (deleted once the whole segment is). The bound applies to this, so the spool
    /// never takes more of /var than its size.
    pub fn used(&self) -> u64 {
        self.segments.iter().map(|(_, s)| s).sum::<u64>()
    }

    /// Appends one frame; `Ok(false)` when it does not fit (the caller counts a drop).
    pub fn push(&mut self, frame: &[u8]) -> Result<bool, Error> {
        let len = frame.len() as u64;
        if self.used() + len > self.max_bytes {
            return Ok(false);
        }
        let (seq, size) = *self.segments.back().unwrap_or(&(self.cursor.seq, 0));
        if size > 0 && size + len > self.segment_bytes {
            self.writer = None;
            self.segments.push_back((seq + 1, 0));
        }
        let seq = self.segments.back().map_or(seq, |s| s.0);
        if self.writer.is_none() {
            let path = self.path(seq);
            self.writer = Some(
                OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(&path)
                    .map_err(io_err(&path))?,
            );
        }
        if let Some(w) = &mut self.writer {
            if let Err(e) = w.write_all(frame) {
                self.writer = None;
                // What reached the file before the error is cut at the next open; until then
                // the size we know is the last good one.
                return Err(io_err(&self.path(seq))(e));
            }
        }
        if let Some(last) = self.segments.back_mut() {
            last.1 += len;
        }
        Ok(true)
    }

    /// Up to `max` bytes of whole frames from the read position, the position after them and
    /// how many frames they are; `None` when everything was read.
    pub fn read_batch(&mut self, max: usize) -> Result<Option<(Vec<u8>, Position, u64)>, Error> {
        loop {
            let Some(idx) = self.segments.iter().position(|(s, _)| *s == self.read.seq) else {
                return Ok(None);
            };
            let size = self.segments[idx].1;
            if self.read.offset >= size {
                match self.segments.get(idx + 1) {
                    Some(&(next, _)) => {
                        self.read = Position {
                            seq: next,
                            offset: 0,
                        };
                        continue;
                    }
                    None => return Ok(None),
                }
            }
            let path = self.path(self.read.seq);
            if self
                .reader
                .as_ref()
                .is_none_or(|(s, _)| *s != self.read.seq)
            {
                let f = File::open(&path).map_err(io_err(&path))?;
                self.reader = Some((self.read.seq, f));
            }
            let Some((_, file)) = &mut self.reader else {
                return Ok(None);
            };
            let want = ((size - self.read.offset) as usize).min(max.max(64 << 10));
            let mut buf = vec![0u8; want];
            file.seek(SeekFrom::Start(self.read.offset))
                .map_err(io_err(&path))?;
            file.read_exact(&mut buf).map_err(io_err(&path))?;
            let (mut good, mut frames) = (0, 0);
            loop {
                match frame_len(&buf[good..]) {
                    Ok(Some(n)) if good + n <= max || good == 0 => {
                        good += n;
                        frames += 1;
                    }
                    Ok(_) => break,
                    Err(crate::syslog::NotAFrame) => {
                        tracing::warn!(
                            "forward: {}: damaged at byte {}, skipping the rest of it",
                            path.display(),
                            self.read.offset + good as u64
                        );
                        self.read.offset = size;
                        break;
                    }
                }
            }
            if good == 0 {
                if self.read.offset >= size {
                    continue;
                }
                // A frame larger than the read window: read exactly it.
                return Ok(None);
            }
            buf.truncate(good);
            self.read.offset += good as u64;
            return Ok(Some((buf, self.read, frames)));
        }
    }

    /// Everything after the last acknowledged position is to be sent again (a new connection).
    pub fn rewind(&mut self) {
        self.read = self.cursor;
    }

    /// The receiver has everything before `pos`: segments wholly before it are deleted and the
    /// cursor is recorded.
    pub fn commit(&mut self, pos: Position) -> Result<(), Error> {
        if pos <= self.cursor {
            return Ok(());
        }
        self.cursor = pos;
        while self.segments.len() > 1 && self.segments[0].0 < pos.seq {
            let (seq, _) = self.segments.pop_front().unwrap_or_default();
            let path = self.path(seq);
            if self.reader.as_ref().is_some_and(|(s, _)| *s == seq) {
                self.reader = None;
            }
            fs::remove_file(&path).map_err(io_err(&path))?;
        }
        // When the cursor sits at the end of a segment that has a successor, move it there.
        if let Some(&(seq, size)) = self.segments.front() {
            if seq == pos.seq && pos.offset >= size && self.segments.len() > 1 {
                self.segments.pop_front();
                let path = self.path(seq);
                fs::remove_file(&path).map_err(io_err(&path))?;
                if let Some(&(next, _)) = self.segments.front() {
                    self.cursor = Position {
                        seq: next,
                        offset: 0,
                    };
                }
            }
        }
        // Everything acknowledged: the last segment goes too, and appends start a new one.
        if let [(seq, size)] = *self.segments.make_contiguous() {
            if size > 0 && self.cursor == (Position { seq, offset: size }) {
                let path = self.path(seq);
                self.writer = None;
                self.reader = None;
                fs::remove_file(&path).map_err(io_err(&path))?;
                self.segments = VecDeque::from([(seq + 1, 0)]);
                self.cursor = Position {
                    seq: seq + 1,
                    offset: 0,
                };
            }
        }
        // The read position may have been at the end of a segment just deleted.
        self.read = self.read.max(self.cursor);
        let file = self.dir.join("cursor");
        let tmp = self.dir.join("cursor.tmp");
        fs::write(
            &tmp,
            format!("{} {}\n", self.cursor.seq, self.cursor.offset),
        )
        .and_then(|()| fs::rename(&tmp, &file))
        .map_err(io_err(&file))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::syslog::{frame, Facility, Message, Severity};

    fn msg(i: usize) -> Vec<u8> {
        let text = format!("line {i:05} {}", "x".repeat(100));
        frame(&Message {
            facility: Facility::User,
            severity: Severity::Info,
            time_ms: 0,
            hostname: "h",
            app_name: "a",
            msg_id: "stdout",
            params: &[],
            msg: &text,
        })
    }

    fn drain(s: &mut Spool) -> Vec<String> {
        let mut out = Vec::new();
        while let Some((buf, pos, _)) = s.read_batch(1000).unwrap() {
            let mut at = 0;
            while let Ok(Some(n)) = frame_len(&buf[at..]) {
                let t = String::from_utf8_lossy(&buf[at..at + n]).into_owned();
                out.push(t.split(" - stdout [keelson@32473] ").nth(1).unwrap()[..10].to_string());
                at += n;
            }
            s.commit(pos).unwrap();
        }
        out
    }

    #[test]
    fn in_order_across_segments_bounded_and_resumed() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = Spool::open(dir.path(), 1 << 20).unwrap();
        assert_eq!(s.segment_bytes, 128 << 10);
        let one = msg(0).len() as u64;
        let fit = (1 << 20) / one;
        let mut pushed = 0;
        for i in 0..fit as usize + 50 {
            if s.push(&msg(i)).unwrap() {
                pushed += 1;
            }
        }
        assert_eq!(pushed, fit, "only what fits is kept");
        assert!(s.segments.len() > 4);
        // Half is sent and acknowledged, then sysd restarts.
        let mut sent = 0;
        while sent < 1000 {
            let (_, pos, n) = s.read_batch(10_000).unwrap().unwrap();
            sent += n;
            s.commit(pos).unwrap();
        }
        // Sent but never acknowledged: resent after the restart.
        s.read_batch(10_000).unwrap().unwrap();
        drop(s);
        let mut s = Spool::open(dir.path(), 1 << 20).unwrap();
        let rest = drain(&mut s);
        assert_eq!(rest.len() as u64, fit - sent);
        assert_eq!(rest[0], format!("line {sent:05}"));
        assert_eq!(rest.last().unwrap(), &format!("line {:05}", fit - 1));
        assert_eq!(s.used(), 0);
        let files = fs::read_dir(dir.path()).unwrap().count();
        assert!(
            files <= 3,
            "acknowledged segments are deleted ({files} files)"
        );
        // Room again.
        assert!(s.push(&msg(7)).unwrap());
        assert_eq!(drain(&mut s), ["line 00007"]);
    }

    #[test]
    fn rewind_resends_unacknowledged_and_a_torn_tail_is_cut() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = Spool::open(dir.path(), 1 << 20).unwrap();
        for i in 0..3 {
            assert!(s.push(&msg(i)).unwrap());
        }
        let (_, _, n) = s.read_batch(100_000).unwrap().unwrap();
        assert_eq!(n, 3);
        assert!(s.read_batch(100_000).unwrap().is_none());
        s.rewind();
        assert_eq!(drain(&mut s), ["line 00000", "line 00001", "line 00002"]);
        assert!(s.push(&msg(3)).unwrap());
        drop(s);
        // A crash in the middle of an append.
        let seg = dir.path().join(format!("{:020}.seg", 1));
        let mut f = OpenOptions::new().append(true).open(&seg).unwrap();
        f.write_all(&msg(4)[..50]).unwrap();
        drop(f);
        let mut s = Spool::open(dir.path(), 1 << 20).unwrap();
        assert!(s.push(&msg(5)).unwrap());
        assert_eq!(drain(&mut s), ["line 00003", "line 00005"]);
    }
}
