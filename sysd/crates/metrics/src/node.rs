//! The node's figures, named and labelled as node_exporter names them (so its dashboards
//! apply): CPU time per CPU and mode from `/proc/stat`, memory from `/proc/meminfo`, the /var
//! file system from statvfs(2) and the mount table, bytes and packets per link from
//! `/proc/net/dev`, boot time, the clock and the load average. Every file is read under a root
//! (`/` on a node), so the parsers are tested on fixtures.

use std::path::{Path, PathBuf};

use crate::exposition::{Type, Writer};

/// Where the node's figures are read.
#[derive(Debug, Clone)]
pub struct NodeSources {
    /// `/proc`.
    pub proc_dir: PathBuf,
    /// The mount point reported as `node_filesystem_*` (`/var`: everything writable).
    pub filesystems: Vec<PathBuf>,
}

impl Default for NodeSources {
    fn default() -> Self {
        NodeSources {
            proc_dir: PathBuf::from("/proc"),
            filesystems: vec![PathBuf::from("/var")],
        }
    }
}

/// `/proc/stat`'s per-CPU times (in USER_HZ ticks) and boot time.
#[derive(Debug, Default, PartialEq)]
struct ProcStat {
    /// (cpu index, [(mode, ticks)]).
    cpus: Vec<(String, Vec<(&'static str, u64)>)>,
    btime: Option<u64>,
}

/// node_exporter's mode names, in `/proc/stat`'s column order (guest time is inside user).
const MODES: [&str; 8] = [
    "user", "nice", "system", "idle", "iowait", "irq", "softirq", "steal",
];

fn parse_stat(text: &str) -> ProcStat {
    let mut out = ProcStat::default();
    for line in text.lines() {
        let mut fields = line.split_whitespace();
        match fields.next() {
            Some("btime") => out.btime = fields.next().and_then(|v| v.parse().ok()),
            Some(cpu) if cpu.starts_with("cpu") && cpu.len() > 3 => {
                let times = MODES
                    .iter()
                    .zip(fields.by_ref())
                    .filter_map(|(m, v)| Some((*m, v.parse().ok()?)))
                    .collect();
                out.cpus.push((cpu[3..].to_string(), times));
            }
            _ => {}
        }
    }
    out
}

/// `/proc/meminfo` lines as (name, bytes); node_exporter's names (`(anon)` → `_anon`).
fn parse_meminfo(text: &str) -> Vec<(String, u64)> {
    text.lines()
        .filter_map(|line| {
            let (key, rest) = line.split_once(':')?;
            let mut parts = rest.split_whitespace();
            let value: u64 = parts.next()?.parse().ok()?;
            let bytes = if parts.next() == Some("kB") {
                value * 1024
            } else {
                value
            };
            let key = key.replace('(', "_").replace(')', "");
            Some((key, bytes))
        })
        .collect()
}

/// One link's counters from `/proc/net/dev`.
#[derive(Debug, PartialEq)]
struct NetDev {
    device: String,
    rx_bytes: u64,
    rx_packets: u64,
    rx_errs: u64,
    rx_drop: u64,
    tx_bytes: u64,
    tx_packets: u64,
    tx_errs: u64,
    tx_drop: u64,
}

fn parse_net_dev(text: &str) -> Vec<NetDev> {
    text.lines()
        .skip(2)
        .filter_map(|line| {
            let (dev, rest) = line.split_once(':')?;
            let v: Vec<u64> = rest
                .split_whitespace()
                .map(|f| f.parse().unwrap_or(0))
                .collect();
            (v.len() >= 16).then(|| NetDev {
                device: dev.trim().to_string(),
                rx_bytes: v[0],
                rx_packets: v[1],
                rx_errs: v[2],
                rx_drop: v[3],
                tx_bytes: v[8],
                tx_packets: v[9],
                tx_errs: v[10],
                tx_drop: v[11],
            })
        })
        .collect()
}

/// A `/proc/net/dev` family: name, help, the field.
type Counter = (&'static str, &'static str, fn(&NetDev) -> u64);

/// The device and file system type mounted at `mountpoint` (the last such mount wins, as the
/// kernel's view does), from `/proc/self/mountinfo`.
fn mount_of(mountinfo: &str, mountpoint: &Path) -> Option<(String, String)> {
    let want = mountpoint.to_str()?;
    mountinfo.lines().rev().find_map(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        let sep = fields.iter().position(|f| *f == "-")?;
        (fields.get(4) == Some(&want))
            .then(|| {
                Some((
                    fields.get(sep + 2)?.to_string(),
                    fields.get(sep + 1)?.to_string(),
                ))
            })
            .flatten()
    })
}

fn clock_ticks() -> f64 {
    // SAFETY: sysconf with a valid name only reads a constant.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if hz > 0 {
        hz as f64
    } else {
        100.0
    }
}

fn now_seconds() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// Writes every node family. A file that cannot be read leaves its families out (a scrape
/// never fails because one figure is missing).
pub fn write(w: &mut Writer, src: &NodeSources) {
    let read = |rel: &str| std::fs::read_to_string(src.proc_dir.join(rel)).ok();
    let stat = read("stat").map(|t| parse_stat(&t)).unwrap_or_default();
    if !stat.cpus.is_empty() {
        let hz = clock_ticks();
        let mut f = w.family(
            "node_cpu_seconds_total",
            Type::Counter,
            "Seconds the CPUs spent in each mode.",
        );
        for (cpu, times) in &stat.cpus {
            for (mode, ticks) in times {
                f.sample(&[("cpu", cpu), ("mode", mode)], *ticks as f64 / hz);
            }
        }
    }
    if let Some(btime) = stat.btime {
        w.family(
            "node_boot_time_seconds",
            Type::Gauge,
            "Node boot time, in unixtime.",
        )
        .sample(&[], btime as f64);
    }
    w.family(
        "node_time_seconds",
        Type::Gauge,
        "System time in seconds since epoch (1970).",
    )
    .sample(&[], now_seconds());
    if let Some(load) = read("loadavg") {
        let mut parts = load.split_whitespace().map(|p| p.parse::<f64>().ok());
        for name in ["node_load1", "node_load5", "node_load15"] {
            if let Some(Some(v)) = parts.next() {
                w.family(name, Type::Gauge, "Load average.").sample(&[], v);
            }
        }
    }
    if let Some(mem) = read("meminfo") {
        let mem = parse_meminfo(&mem);
        for (key, name, help) in [
            (
                "MemTotal",
                "node_memory_MemTotal_bytes",
                "Memory information field MemTotal_bytes.",
            ),
            (
                "MemFree",
                "node_memory_MemFree_bytes",
                "Memory information field MemFree_bytes.",
            ),
            (
                "MemAvailable",
                "node_memory_MemAvailable_bytes",
                "Memory information field MemAvailable_bytes.",
            ),
            (
                "Buffers",
                "node_memory_Buffers_bytes",
                "Memory information field Buffers_bytes.",
            ),
            (
                "Cached",
                "node_memory_Cached_bytes",
                "Memory information field Cached_bytes.",
            ),
            (
                "SwapTotal",
                "node_memory_SwapTotal_bytes",
                "Memory information field SwapTotal_bytes.",
            ),
            (
                "SwapFree",
                "node_memory_SwapFree_bytes",
                "Memory information field SwapFree_bytes.",
            ),
        ] {
            if let Some((_, v)) = mem.iter().find(|(k, _)| k == key) {
                w.family(name, Type::Gauge, help).sample(&[], *v as f64);
            }
        }
    }
    filesystems(w, src, read("self/mountinfo").as_deref().unwrap_or(""));
    if let Some(dev) = read("net/dev") {
        let links = parse_net_dev(&dev);
        let fields: [Counter; 8] = [
            (
                "node_network_receive_bytes_total",
                "Network device statistic receive_bytes.",
                |d| d.rx_bytes,
            ),
            (
                "node_network_receive_packets_total",
                "Network device statistic receive_packets.",
                |d| d.rx_packets,
            ),
            (
                "node_network_receive_errs_total",
                "Network device statistic receive_errs.",
                |d| d.rx_errs,
            ),
            (
                "node_network_receive_drop_total",
                "Network device statistic receive_drop.",
                |d| d.rx_drop,
            ),
            (
                "node_network_transmit_bytes_total",
                "Network device statistic transmit_bytes.",
                |d| d.tx_bytes,
            ),
            (
                "node_network_transmit_packets_total",
                "Network device statistic transmit_packets.",
                |d| d.tx_packets,
            ),
            (
                "node_network_transmit_errs_total",
                "Network device statistic transmit_errs.",
                |d| d.tx_errs,
            ),
            (
                "node_network_transmit_drop_total",
                "Network device statistic transmit_drop.",
                |d| d.tx_drop,
            ),
        ];
        for (name, help, get) in fields {
            let mut f = w.family(name, Type::Counter, help);
            for d in &links {
                f.sample(&[("device", &d.device)], get(d) as f64);
            }
        }
    }
}

fn filesystems(w: &mut Writer, src: &NodeSources, mountinfo: &str) {
    let found: Vec<_> = src
        .filesystems
        .iter()
        .filter_map(|mp| {
            let vfs = nix::sys::statvfs::statvfs(mp).ok()?;
            let (device, fstype) =
                mount_of(mountinfo, mp).unwrap_or_else(|| ("none".into(), "unknown".into()));
            let frag = vfs.fragment_size() as f64;
            Some((
                mp.display().to_string(),
                device,
                fstype,
                [
                    vfs.blocks() as f64 * frag,
                    vfs.blocks_available() as f64 * frag,
                    vfs.blocks_free() as f64 * frag,
                    vfs.files() as f64,
                    vfs.files_free() as f64,
                ],
            ))
        })
        .collect();
    if found.is_empty() {
        return;
    }
    for (i, (name, help)) in [
        ("node_filesystem_size_bytes", "Filesystem size in bytes."),
        (
            "node_filesystem_avail_bytes",
            "Filesystem space available to non-root users in bytes.",
        ),
        (
            "node_filesystem_free_bytes",
            "Filesystem free space in bytes.",
        ),
        ("node_filesystem_files", "Filesystem total file nodes."),
        (
            "node_filesystem_files_free",
            "Filesystem total free file nodes.",
        ),
    ]
    .into_iter()
    .enumerate()
    {
        let mut f = w.family(name, Type::Gauge, help);
        for (mp, device, fstype, values) in &found {
            f.sample(
                &[("device", device), ("fstype", fstype), ("mountpoint", mp)],
                values[i],
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proc_stat() {
        let s = parse_stat(
            "cpu  10 0 5 100 1 0 0 0 0 0\ncpu0 6 0 3 50 1 0 0 0 0 0\ncpu1 4 0 2 50 0 0 0 2 0 0\nintr 1 2\nbtime 1700000000\n",
        );
        assert_eq!(s.btime, Some(1_700_000_000));
        assert_eq!(s.cpus.len(), 2);
        assert_eq!(s.cpus[1].0, "1");
        assert_eq!(s.cpus[1].1[7], ("steal", 2));
        assert_eq!(s.cpus[0].1[3], ("idle", 50));
    }

    #[test]
    fn meminfo_and_net_dev() {
        let m = parse_meminfo(
            "MemTotal:        2000 kB\nActive(anon):  8 kB\nHugePages_Total:       0\n",
        );
        assert_eq!(
            m,
            [
                ("MemTotal".to_string(), 2_048_000),
                ("Active_anon".to_string(), 8192),
                ("HugePages_Total".to_string(), 0)
            ]
        );
        let d = parse_net_dev("Inter-|   Receive |  Transmit\n face |bytes packets errs drop fifo frame compressed multicast|bytes packets errs drop fifo colls carrier compressed\n    lo: 100 2 0 0 0 0 0 0 100 2 0 0 0 0 0 0\n  eth0: 5000 40 1 2 0 0 0 0 700 7 3 4 0 0 0 0\n");
        assert_eq!(d.len(), 2);
        assert_eq!(
            d[1],
            NetDev {
                device: "eth0".into(),
                rx_bytes: 5000,
                rx_packets: 40,
                rx_errs: 1,
                rx_drop: 2,
                tx_bytes: 700,
                tx_packets: 7,
                tx_errs: 3,
                tx_drop: 4
            }
        );
    }

    #[test]
    fn mountinfo() {
        let mi = "22 1 254:0 / / ro,relatime - erofs /dev/dm-0 ro\n30 22 253:6 / /var rw,relatime shared:5 - ext4 /dev/vda6 rw\n";
        assert_eq!(
            mount_of(mi, Path::new("/var")),
            Some(("/dev/vda6".into(), "ext4".into()))
        );
        assert_eq!(mount_of(mi, Path::new("/srv")), None);
    }

    #[test]
    fn writes_this_hosts_figures() {
        let mut w = Writer::new();
        write(
            &mut w,
            &NodeSources {
                proc_dir: "/proc".into(),
                filesystems: vec!["/".into()],
            },
        );
        let text = w.finish();
        for needle in [
            "node_cpu_seconds_total{cpu=\"0\",mode=\"idle\"} ",
            "node_memory_MemTotal_bytes ",
            "node_boot_time_seconds ",
            "node_network_receive_bytes_total{device=\"lo\"} ",
            "node_filesystem_avail_bytes{device=",
        ] {
            assert!(text.contains(needle), "{needle} missing in\n{text}");
        }
    }
}
