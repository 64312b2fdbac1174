//! Value types of the service spec that validate while they deserialize, so a bad value is
//! reported by the TOML parser itself with its file position and key path
//! (`services.web.resources.memory_max`).

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use crate::Invalid;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

macro_rules! string_serde {
    ($ty:ty, $expecting:literal) => {
        impl<'de> Deserialize<'de> for $ty {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let s = String::deserialize(d)?;
                s.parse().map_err(serde::de::Error::custom)
            }
        }
        impl Serialize for $ty {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.collect_str(self)
            }
        }
        impl $ty {
            #[allow(dead_code)]
            pub const EXPECTING: &'static str = $expecting;
        }
    };
}

/// A duration written as `500ms`, `2s`, `1m30s`, `1h`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Span(pub Duration);

impl FromStr for Span {
    type Err = Invalid;
    fn from_str(s: &str) -> Result<Self, Invalid> {
        let bad = || format!("invalid duration {s:?} (expected e.g. \"500ms\", \"2s\", \"1m30s\")");
        let mut total = Duration::ZERO;
        let mut rest = s.trim();
        if rest.is_empty() {
            return Err(Invalid::from(bad()));
        }
        while !rest.is_empty() {
            let digits = rest
                .find(|c: char| !c.is_ascii_digit())
                .unwrap_or(rest.len());
            if digits == 0 {
                return Err(Invalid::from(bad()));
            }
            let n: u64 = rest[..digits].parse().map_err(|_| bad())?;
            rest = &rest[digits..];
            let unit_len = rest
                .find(|c: char| c.is_ascii_digit())
                .unwrap_or(rest.len());
            let part = match &rest[..unit_len] {
                "ms" => Duration::from_millis(n),
                "s" => Duration::from_secs(n),
                "m" => Duration::from_secs(n.saturating_mul(60)),
                "h" => Duration::from_secs(n.saturating_mul(3600)),
                _ => return Err(Invalid::from(bad())),
            };
            total = total.saturating_add(part);
            rest = &rest[unit_len..];
        }
        Ok(Span(total))
    }
}

impl fmt::Display for Span {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ms = self.0.as_millis();
        if ms % 1000 == 0 {
            write!(f, "{}s", ms / 1000)
        } else {
            write!(f, "{ms}ms")
        }
    }
}
string_serde!(Span, "a duration");

/// A size in bytes: an integer, or a string with a binary suffix (`64M`, `1G`, `512KiB`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Size(pub u64);

impl FromStr for Size {
    type Err = Invalid;
    fn from_str(s: &str) -> Result<Self, Invalid> {
        let bad =
            || format!("invalid size {s:?} (expected bytes or e.g. \"512K\", \"64M\", \"2G\")");
        let t = s.trim();
        let digits = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
        if digits == 0 {
            return Err(Invalid::from(bad()));
        }
        let n: u64 = t[..digits].parse().map_err(|_| bad())?;
        let shift = match t[digits..].trim() {
            "" | "B" => 0,
            "K" | "k" | "KiB" | "KB" => 10,
            "M" | "MiB" | "MB" => 20,
            "G" | "GiB" | "GB" => 30,
            "T" | "TiB" | "TB" => 40,
            _ => return Err(Invalid::from(bad())),
        };
        n.checked_mul(1u64 << shift)
            .map(Size)
            .ok_or_else(|| Invalid(bad()))
    }
}

impl fmt::Display for Size {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

impl<'de> Deserialize<'de> for Size {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Int(u64),
            Text(String),
        }
        match Raw::deserialize(d) {
            Ok(Raw::Int(n)) => Ok(Size(n)),
            Ok(Raw::Text(s)) => s.parse().map_err(serde::de::Error::custom),
            Err(_) => Err(serde::de::Error::custom(
                "invalid size (expected bytes or e.g. \"512K\", \"64M\", \"2G\")",
            )),
        }
    }
}

impl Serialize for Size {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(self.0)
    }
}

/// A signal by name (`SIGTERM`, `TERM`) or number.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SignalName(pub nix::sys::signal::Signal);

impl FromStr for SignalName {
    type Err = Invalid;
    fn from_str(s: &str) -> Result<Self, Invalid> {
        use nix::sys::signal::Signal;
        let t = s.trim().to_ascii_uppercase();
        if let Ok(n) = t.parse::<i32>() {
            return Signal::try_from(n)
                .map(SignalName)
                .map_err(|_| Invalid(format!("invalid signal number {n}")));
        }
        let name = if t.starts_with("SIG") {
            t
        } else {
            format!("SIG{t}")
        };
        Signal::from_str(&name).map(SignalName).map_err(|_| {
            Invalid::from(format!(
                "unknown signal {s:?} (expected e.g. \"SIGTERM\", \"SIGINT\", \"SIGQUIT\")"
            ))
        })
    }
}

impl fmt::Display for SignalName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.0.as_str())
    }
}
string_serde!(SignalName, "a signal");

/// A Linux capability, normalised to `CAP_NAME`; `ALL` stands for every capability.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Capability(pub String);

impl FromStr for Capability {
    type Err = Invalid;
    fn from_str(s: &str) -> Result<Self, Invalid> {
        let up = s.trim().to_ascii_uppercase();
        if up == "ALL" {
            return Ok(Capability(up));
        }
        let name = if up.starts_with("CAP_") {
            up
        } else {
            format!("CAP_{up}")
        };
        if keelson_common::caps::ALL_CAPS.contains(&name.as_str()) {
            Ok(Capability(name))
        } else {
            Err(Invalid::from(format!("unknown capability {s:?} (expected e.g. \"NET_ADMIN\" or \"CAP_NET_ADMIN\", or \"ALL\")")))
        }
    }
}

impl fmt::Display for Capability {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}
string_serde!(Capability, "a capability");

/// CPU quota as a share of one CPU: `"50%"` (half a CPU), `"200%"` (two CPUs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CpuQuota(pub u32);

impl FromStr for CpuQuota {
    type Err = Invalid;
    fn from_str(s: &str) -> Result<Self, Invalid> {
        let bad = || {
            format!("invalid cpu quota {s:?} (expected a percentage of one CPU, e.g. \"50%\" or \"200%\")")
        };
        let pct = s.trim().strip_suffix('%').ok_or_else(bad)?;
        let n: u32 = pct.trim().parse().map_err(|_| bad())?;
        if n == 0 || n > 100_000 {
            return Err(Invalid::from(bad()));
        }
        Ok(CpuQuota(n))
    }
}

impl fmt::Display for CpuQuota {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}%", self.0)
    }
}
string_serde!(CpuQuota, "a cpu quota");

/// RFC 1123 host name: dot-separated labels of letters, digits and inner hyphens.
pub fn check_hostname(name: &str) -> Result<(), Invalid> {
    let label_ok = |l: &str| {
        !l.is_empty()
            && l.len() <= 63
            && l.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
            && !l.starts_with('-')
            && !l.ends_with('-')
    };
    if name.is_empty() || name.len() > 64 || !name.split('.').all(label_ok) {
        return Err(Invalid::from(format!(
            "`{name}` is not a valid host name (letters, digits and `-`, dot-separated labels, \
             at most 64 characters in all: the kernel's limit)"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(
            "500ms".parse::<Span>().unwrap().0,
            Duration::from_millis(500)
        );
        assert_eq!("1m30s".parse::<Span>().unwrap().0, Duration::from_secs(90));
        assert_eq!("2h".parse::<Span>().unwrap().0, Duration::from_secs(7200));
        for bad in ["", "5", "s", "5 seconds", "-1s", "1.5s"] {
            assert!(bad.parse::<Span>().is_err(), "{bad}");
        }
    }

    #[test]
    fn sizes() {
        assert_eq!("64M".parse::<Size>().unwrap().0, 64 << 20);
        assert_eq!("512KiB".parse::<Size>().unwrap().0, 512 << 10);
        assert_eq!("4096".parse::<Size>().unwrap().0, 4096);
        for bad in ["", "M", "12XB", "1.5G", "99999999999999T"] {
            assert!(bad.parse::<Size>().is_err(), "{bad}");
        }
    }

    #[test]
    fn signals_and_caps() {
        assert_eq!("TERM".parse::<SignalName>().unwrap().to_string(), "SIGTERM");
        assert_eq!("9".parse::<SignalName>().unwrap().to_string(), "SIGKILL");
        assert!("SIGFOO".parse::<SignalName>().is_err());
        assert_eq!(
            "net_admin".parse::<Capability>().unwrap().0,
            "CAP_NET_ADMIN"
        );
        assert_eq!("all".parse::<Capability>().unwrap().0, "ALL");
        assert!("CAP_FLY".parse::<Capability>().is_err());
        assert_eq!("150%".parse::<CpuQuota>().unwrap().0, 150);
        assert!("0.5".parse::<CpuQuota>().is_err());
    }
}
