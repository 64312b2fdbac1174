//! The guest's serial console as a list of timestamped lines, and pattern matching over it.
//!
//! QEMU writes the serial port to a plain file. A background thread (see [`crate::guest`]) tails
//! that file and feeds the new bytes to a [`SerialLog`], stamping each line with the moment its
//! first byte was seen, relative to QEMU's spawn. This module is the part without any I/O, so the
//! matching rules can be unit-tested without a VM:
//!
//! - A [`Cursor`] remembers where the previous match ended (line and byte column). Waiting for
//!   `"login:"` twice therefore needs two occurrences: matches are *consumed*, which is what a
//!   test reading a boot sequence step by step wants (`"Reached target"` after a reboot must not
//!   match the first boot's line again).
//! - The unterminated last line is searched too: prompts such as `login: ` never end in a newline.
//!   Because the cursor records a column, a match in that partial line is not found again when
//!   the line is completed later.
//! - Bytes are kept per line and decoded lossily only when read, so a UTF-8 sequence split across
//!   two reads of the file is not mangled.

use std::time::Duration;

/// Where the next search starts: a line index and a byte offset in that line's text.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Cursor {
    /// Index into the log's lines (the partial line has index `complete lines`).
    pub line: usize,
    /// Byte offset into that line's (lossily decoded) text.
    pub col: usize,
}

/// A successful search.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Match {
    /// Which of the patterns matched (the first one in the list, if several match the same line).
    pub pattern: usize,
    /// The whole line that contained the match (without its line ending).
    pub line: String,
    /// When the line's first byte was seen, relative to QEMU's spawn.
    pub at: Duration,
    /// Where the next search continues: right after the match.
    pub next: Cursor,
}

/// Timestamped serial lines, fed incrementally.
#[derive(Debug, Default)]
pub struct SerialLog {
    lines: Vec<(Duration, Vec<u8>)>,
    /// Bytes after the last newline, and when the first of them arrived.
    partial: Option<(Duration, Vec<u8>)>,
}

impl SerialLog {
    /// An empty log.
    pub fn new() -> Self {
        Self::default()
    }

    /// Appends bytes read at `elapsed` (time since spawn).
    pub fn push(&mut self, elapsed: Duration, bytes: &[u8]) {
        for chunk in bytes.split_inclusive(|&b| b == b'\n') {
            let (_, buf) = self.partial.get_or_insert_with(|| (elapsed, Vec::new()));
            if let Some(body) = chunk.strip_suffix(b"\n") {
                buf.extend_from_slice(body);
                let (at, mut line) = self.partial.take().unwrap_or_default();
                // Serial consoles end lines with CRLF; the CR is noise for matching and printing.
                if line.last() == Some(&b'\r') {
                    line.pop();
                }
                self.lines.push((at, line));
            } else {
                buf.extend_from_slice(chunk);
            }
        }
    }

    /// Number of complete lines.
    pub fn complete_lines(&self) -> usize {
        self.lines.len()
    }

    /// All lines with their timestamps, the unterminated last one included if non-empty.
    pub fn lines_with_times(&self) -> Vec<(Duration, String)> {
        self.iter_from(0).collect()
    }

    /// The whole log as text, `\n`-separated.
    pub fn text(&self) -> String {
        let mut out = String::new();
        for (_, line) in self.iter_from(0) {
            out.push_str(&line);
            out.push('\n');
        }
        out
    }

    /// The last `n` lines (partial one included), for error messages.
    pub fn tail(&self, n: usize) -> String {
        let all: Vec<String> = self.iter_from(0).map(|(_, l)| l).collect();
        let start = all.len().saturating_sub(n);
        all[start..].join("\n")
    }

    /// The cursor just past everything received so far (to skip output already seen).
    pub fn end(&self) -> Cursor {
        match &self.partial {
            Some((_, bytes)) => Cursor {
                line: self.lines.len(),
                col: String::from_utf8_lossy(bytes).len(),
            },
            None => Cursor {
                line: self.lines.len(),
                col: 0,
            },
        }
    }

    /// Searches for the first line at or after `from` that contains any of `patterns`.
    pub fn find(&self, from: Cursor, patterns: &[&str]) -> Option<Match> {
        for (index, (at, text)) in self.iter_from(from.line).enumerate() {
            let line_no = from.line + index;
            // The column only applies to the line the cursor is on; `get` guards against a column
            // that no longer falls on a char boundary (a partial line's lossy tail changed).
            let start = if line_no == from.line { from.col } else { 0 };
            let Some(rest) = text.get(start..) else {
                continue;
            };
            // Earliest match position wins, so consecutive waits see events in serial order.
            let best = patterns
                .iter()
                .enumerate()
                .filter_map(|(i, p)| rest.find(p).map(|pos| (pos, i, p.len())))
                .min_by_key(|&(pos, i, _)| (pos, i));
            if let Some((pos, pattern, len)) = best {
                return Some(Match {
                    pattern,
                    next: Cursor {
                        line: line_no,
                        col: start + pos + len,
                    },
                    line: text,
                    at,
                });
            }
        }
        None
    }

    /// Lines from index `first` on, the partial line last.
    fn iter_from(&self, first: usize) -> impl Iterator<Item = (Duration, String)> + '_ {
        self.lines
            .iter()
            .skip(first)
            .chain(
                self.partial
                    .iter()
                    .filter(|(_, b)| !b.is_empty())
                    .filter(move |_| first <= self.lines.len()),
            )
            .map(|(at, bytes)| (*at, String::from_utf8_lossy(bytes).into_owned()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn splits_lines_strips_cr_and_keeps_first_byte_time() {
        let mut log = SerialLog::new();
        log.push(ms(1), b"BdsDxe: loading\r");
        log.push(ms(5), b"\nsecond\r\nthi");
        log.push(ms(9), b"rd");
        assert_eq!(
            log.lines_with_times(),
            vec![
                (ms(1), "BdsDxe: loading".to_string()),
                (ms(5), "second".to_string()),
                (ms(5), "third".to_string()),
            ]
        );
        assert_eq!(log.complete_lines(), 2);
        assert_eq!(log.text(), "BdsDxe: loading\nsecond\nthird\n");
        assert_eq!(log.tail(2), "second\nthird");
    }

    #[test]
    fn matches_are_consumed() {
        let mut log = SerialLog::new();
        log.push(ms(0), b"a login: x\nb\nlogin: y login: z\n");
        let m1 = log.find(Cursor::default(), &["login:"]).unwrap();
        assert_eq!(m1.line, "a login: x");
        assert_eq!(m1.next, Cursor { line: 0, col: 8 });
        let m2 = log.find(m1.next, &["login:"]).unwrap();
        assert_eq!(m2.line, "login: y login: z");
        let m3 = log.find(m2.next, &["login:"]).unwrap();
        assert_eq!(m3.next, Cursor { line: 2, col: 15 });
        assert!(log.find(m3.next, &["login:"]).is_none());
        // From the start, the first occurrence is found again.
        assert_eq!(log.find(Cursor::default(), &["login:"]).unwrap(), m1);
    }

    #[test]
    fn partial_line_matches_once() {
        let mut log = SerialLog::new();
        log.push(ms(0), b"boot\nkeelson login: ");
        let m = log.find(Cursor::default(), &["login:"]).unwrap();
        assert_eq!(m.line, "keelson login: ");
        assert_eq!(m.next, Cursor { line: 1, col: 14 });
        // The line completes later: the same prompt must not match again.
        log.push(ms(3), b"root\r\n");
        assert!(log.find(m.next, &["login:"]).is_none());
        log.push(ms(4), b"keelson login: ");
        let again = log.find(m.next, &["login:"]).unwrap();
        assert_eq!(again.next.line, 2);
        assert_eq!(again.at, ms(4));
    }

    #[test]
    fn wait_for_any_picks_earliest_then_list_order() {
        let mut log = SerialLog::new();
        log.push(ms(0), b"nothing\nPANIC then OK\nOK\n");
        let m = log.find(Cursor::default(), &["OK", "PANIC"]).unwrap();
        assert_eq!((m.pattern, m.next.line), (1, 1));
        let m = log.find(m.next, &["OK", "PANIC"]).unwrap();
        assert_eq!((m.pattern, m.next.line), (0, 1));
        let m = log.find(m.next, &["OK", "PANIC"]).unwrap();
        assert_eq!((m.pattern, m.next.line), (0, 2));
        let mut log = SerialLog::new();
        log.push(ms(0), b"xyz\n");
        assert_eq!(
            log.find(Cursor::default(), &["y", "xyz"]).unwrap().pattern,
            1
        );
        assert_eq!(
            log.find(Cursor::default(), &["xyz", "x"]).unwrap().pattern,
            0
        );
    }

    #[test]
    fn end_cursor_skips_existing_output() {
        let mut log = SerialLog::new();
        log.push(ms(0), b"ready\nready");
        let end = log.end();
        assert!(log.find(end, &["ready"]).is_none());
        log.push(ms(1), b" ready\n");
        assert_eq!(log.find(end, &["ready"]).unwrap().line, "ready ready");
    }

    #[test]
    fn utf8_split_across_reads() {
        let mut log = SerialLog::new();
        let text = "température ✓\n".as_bytes();
        log.push(ms(0), &text[..4]);
        log.push(ms(1), &text[4..13]);
        log.push(ms(2), &text[13..]);
        assert_eq!(log.text(), "température ✓\n");
        assert!(log.find(Cursor::default(), &["✓"]).is_some());
    }

    #[test]
    fn cursor_beyond_end_finds_nothing() {
        let mut log = SerialLog::new();
        log.push(ms(0), b"a\nb\n");
        assert!(log.find(Cursor { line: 7, col: 0 }, &["a", "b"]).is_none());
        assert!(log.find(Cursor { line: 0, col: 99 }, &["a"]).is_none());
    }
}
