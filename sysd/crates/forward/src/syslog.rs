//! RFC 5424 messages in RFC 6587 octet-counted frames (`LEN SP SYSLOG-MSG`), which is also
//! RFC 5425's framing inside TLS.
//!
//! `<PRI>1 TIMESTAMP HOSTNAME APP-NAME - MSGID [keelson@32473 ...] MSG`: a service's line has
//! the service as APP-NAME, `stdout`/`stderr` as MSGID and `service`, `stream` in the
//! structured data; sysd's events have APP-NAME `sysd`, the event kind as MSGID and `kind`,
//! `seq` (and `service` when it is about one) in the structured data.
//!
//! The SD-ID `keelson@32473` uses 32473, the Private Enterprise Number IANA reserves for
//! documentation (RFC 5612): Keelson has none of its own, and an `@`-SD-ID needs one.

use std::fmt::Write;

use keelson_common::api::format_time_ms;

/// The structured-data ID of every message.
pub const SD_ID: &str = "keelson@32473";

/// Longest MSG sent (a longer line is cut at a character boundary): rsyslog's default
/// `maxMessageSize` is 8 KiB for the whole message.
pub const MAX_MSG: usize = 7 * 1024;

/// Syslog facilities used.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Facility {
    /// 1: a service's output.
    User = 1,
    /// 3: sysd's events.
    Daemon = 3,
}

/// Severities used.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Severity {
    Warning = 4,
    Notice = 5,
    Info = 6,
}

/// One message before framing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message<'a> {
    pub facility: Facility,
    pub severity: Severity,
    pub time_ms: u64,
    pub hostname: &'a str,
    pub app_name: &'a str,
    pub msg_id: &'a str,
    pub params: &'a [(&'a str, &'a str)],
    pub msg: &'a str,
}

/// A header field: printable US-ASCII without spaces, at most `max` characters, `-` if empty.
fn field(out: &mut String, value: &str, max: usize) {
    let mut n = 0;
    for c in value.chars() {
        if n == max {
            break;
        }
        out.push(if c.is_ascii_graphic() { c } else { '_' });
        n += 1;
    }
    if n == 0 {
        out.push('-');
    }
}

/// The whole frame, `LEN SP SYSLOG-MSG`.
pub fn frame(m: &Message<'_>) -> Vec<u8> {
    let mut s = String::with_capacity(128 + m.msg.len());
    let pri = (m.facility as u8) * 8 + m.severity as u8;
    let _ = write!(s, "<{pri}>1 {} ", format_time_ms(m.time_ms));
    field(&mut s, m.hostname, 255);
    s.push(' ');
    field(&mut s, m.app_name, 48);
    s.push_str(" - ");
    field(&mut s, m.msg_id, 32);
    s.push_str(" [");
    s.push_str(SD_ID);
    for (name, value) in m.params {
        let _ = write!(s, " {name}=\"");
        for c in value.chars() {
            if matches!(c, '"' | '\\' | ']') {
                s.push('\\');
            }
            s.push(c);
        }
        s.push('"');
    }
    s.push(']');
    if !m.msg.is_empty() {
        s.push(' ');
        let mut end = m.msg.len().min(MAX_MSG);
        while !m.msg.is_char_boundary(end) {
            end -= 1;
        }
        s.push_str(&m.msg[..end]);
    }
    let mut out = format!("{} ", s.len()).into_bytes();
    out.extend_from_slice(s.as_bytes());
    out
}

/// Bytes that do not start with `LEN SP` (a damaged buffer file).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("not an octet-counted frame")]
pub struct NotAFrame;

/// The length of the frame at the start of `buf`, when `buf` holds all of it; `Err` when the
/// bytes are not a frame (a damaged buffer file).
pub fn frame_len(buf: &[u8]) -> Result<Option<usize>, NotAFrame> {
    let Some(space) = buf.iter().take(8).position(|b| *b == b' ') else {
        return if buf.len() >= 8 || buf.iter().any(|b| !b.is_ascii_digit()) {
            Err(NotAFrame)
        } else {
            Ok(None)
        };
    };
    let len: usize = std::str::from_utf8(&buf[..space])
        .ok()
        .and_then(|t| t.parse().ok())
        .filter(|n| *n > 0)
        .ok_or(NotAFrame)?;
    let total = space + 1 + len;
    Ok((buf.len() >= total).then_some(total))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_service_line() {
        let f = frame(&Message {
            facility: Facility::User,
            severity: Severity::Info,
            time_ms: 1_795_306_361_123,
            hostname: "node-1",
            app_name: "web",
            msg_id: "stdout",
            params: &[("service", "web"), ("stream", "stdout")],
            msg: "GET / 200",
        });
        let text = String::from_utf8(f.clone()).unwrap();
        let body = "<14>1 2026-11-22T00:12:41.123Z node-1 web - stdout [keelson@32473 service=\"web\" stream=\"stdout\"] GET / 200";
        assert_eq!(text, format!("{} {body}", body.len()));
        assert_eq!(frame_len(&f), Ok(Some(f.len())));
        assert_eq!(frame_len(&f[..f.len() - 1]), Ok(None));
        assert_eq!(frame_len(b"12"), Ok(None));
        assert_eq!(frame_len(b"x2 abc"), Err(NotAFrame));
        assert_eq!(frame_len(b"123456789"), Err(NotAFrame));
    }

    #[test]
    fn escaping_limits_and_empty_fields() {
        let long_app = "a".repeat(60);
        let msg = "é".repeat(MAX_MSG);
        let f = frame(&Message {
            facility: Facility::Daemon,
            severity: Severity::Warning,
            time_ms: 0,
            hostname: "",
            app_name: &long_app,
            msg_id: "with space",
            params: &[("kind", "a\"b]c\\")],
            msg: &msg,
        });
        let text = String::from_utf8(f).unwrap();
        let (len, body) = text.split_once(' ').unwrap();
        assert_eq!(len.parse::<usize>().unwrap(), body.len());
        assert!(body.starts_with(&format!(
            "<28>1 1970-01-01T00:00:00.000Z - {} - with_space [keelson@32473 kind=\"a\\\"b\\]c\\\\\"] é",
            "a".repeat(48)
        )), "{body}");
        assert!(body.len() < MAX_MSG + 200);
    }
}
