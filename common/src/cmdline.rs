//! The kernel command line, and the keys Keelson puts on it.
//!
//! | key | meaning |
//! |---|---|
//! | `keelson.slot=a\|b` | the A/B slot this UKI boots; selects `root-<slot>` and `root-<slot>-verity` |
//! | `roothash=<hex>` | the dm-verity root hash of that slot (systemd's name for it) |
//! | `keelson.fatal=halt\|reboot\|poweroff` | what init does after a fatal boot error (default `halt`) |
//! | `keelson.disk_timeout=<seconds>` | how long stage 1 waits for the boot disk (default 10) |

/// Key naming the slot.
pub const SLOT: &str = "keelson.slot";
/// Key carrying the dm-verity root hash.
pub const ROOTHASH: &str = "roothash";
/// Key selecting the reaction to a fatal boot error.
pub const FATAL: &str = "keelson.fatal";
/// Key overriding the boot-disk wait.
pub const DISK_TIMEOUT: &str = "keelson.disk_timeout";

/// A parsed kernel command line: `key=value` pairs and bare flags, in order.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Cmdline {
    params: Vec<(String, Option<String>)>,
}

impl Cmdline {
    /// Parses a command line the way the kernel splits it: on whitespace, with double quotes
    /// grouping a value that contains spaces (`key="a b"`).
    pub fn parse(text: &str) -> Self {
        let mut params = Vec::new();
        let mut current = String::new();
        let mut in_quotes = false;
        let mut push = |word: &mut String| {
            if word.is_empty() {
                return;
            }
            let param = match word.split_once('=') {
                Some((k, v)) => (k.to_owned(), Some(v.to_owned())),
                None => (word.clone(), None),
            };
            params.push(param);
            word.clear();
        };
        for c in text.chars() {
            match c {
                '"' => in_quotes = !in_quotes,
                c if c.is_whitespace() && !in_quotes => push(&mut current),
                c => current.push(c),
            }
        }
        push(&mut current);
        Self { params }
    }

    /// The value of the last `key=value` for `key` (the kernel's rule: the last one wins).
    pub fn get(&self, key: &str) -> Option<&str> {
        self.params
            .iter()
            .rev()
            .find(|(k, _)| k == key)
            .and_then(|(_, v)| v.as_deref())
    }

    /// Whether `flag` appears, bare or with a value.
    pub fn has(&self, flag: &str) -> bool {
        self.params.iter().any(|(k, _)| k == flag)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_values_flags_and_quotes() {
        let c = Cmdline::parse("console=ttyS0 quiet keelson.slot=a x=\"a b\" keelson.slot=b\n");
        assert_eq!(c.get("console"), Some("ttyS0"));
        assert!(c.has("quiet"));
        assert_eq!(c.get("quiet"), None);
        assert_eq!(c.get("x"), Some("a b"));
        assert_eq!(c.get(SLOT), Some("b"));
        assert_eq!(c.get("missing"), None);
    }
}
