//! keelson-init: Keelson's PID 1. The same binary runs twice per boot: as `/init` in the
//! initramfs (stage 1: find and verify the root, mount /var, switch root) and as `/usr/sbin/init`
//! in the real root (stage 2: render /etc, supervise sysd, own shutdown). It tells the two apart
//! by `/etc/initrd-release`, systemd's marker of an initrd.

use std::path::Path;

use keelson_init::{fatal, stage1, stage2, supervise};

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if std::process::id() != 1 && args.first().map(String::as_str) == Some("supervise") {
        supervise::host_main(&args[1..]);
    }
    if std::process::id() != 1 {
        eprintln!(
            "keelson-init is Keelson's PID 1 and only runs as process 1.\n\
             usage: boot a Keelson image; the kernel starts it as /init (initramfs, stage 1)\n\
             and stage 1 execs it as /usr/sbin/init (real root, stage 2).\n\
             To shut down: kill -TERM 1 (reboot), -USR1 (halt), -USR2 or -PWR (power off).\n\
             keelson-init supervise [--] PROGRAM ARGS... runs init's supervision of sysd\n\
             (notify channel, FD store, orphan exits) on a host, for tests and benchmarks."
        );
        std::process::exit(2);
    }
    fatal::install_panic_hook();
    if Path::new("/etc/initrd-release").exists() {
        stage1::run()
    } else {
        stage2::run()
    }
}
