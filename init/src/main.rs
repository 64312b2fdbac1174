//! keelson-init: Keelson's PID 1. The same binary runs twice per boot: as `/init` in the
//! initramfs (stage 1: find and verify the root, mount /var, switch root) and as `/usr/sbin/init`
//! in the real root (stage 2: render /etc, supervise sysd, own shutdown). It tells the two apart
//! by `/etc/initrd-release`, systemd's marker of an initrd.

mod bootargs;
mod disk;
mod etc;
mod ext4;
mod fatal;
mod log;
mod modules;
mod mounts;
mod power_button;
mod random_seed;
mod shutdown;
mod stage1;
mod stage2;
mod state;
mod supervise;
mod switch_root;
mod watchdog;

use std::path::Path;

fn main() {
    if std::process::id() != 1 {
        eprintln!(
            "keelson-init is Keelson's PID 1 and only runs as process 1.\n\
             usage: boot a Keelson image; the kernel starts it as /init (initramfs, stage 1)\n\
             and stage 1 execs it as /usr/sbin/init (real root, stage 2).\n\
             To shut down: kill -TERM 1 (reboot), -USR1 (halt), -USR2 or -PWR (power off)."
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
