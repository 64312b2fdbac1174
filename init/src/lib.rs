//! keelson-init's modules, as a library so that what PID 1 parses (the kernel command line,
//! the GPT and the verity superblock through `keelson-common`) is reachable from the fuzz
//! targets in `fuzz/`; the binary (`main.rs`) is the only other user.

pub mod bootargs;
pub mod disk;
pub mod etc;
pub mod ext4;
pub mod fatal;
pub mod log;
pub mod modules;
pub mod mounts;
pub mod power_button;
pub mod random_seed;
pub mod shutdown;
pub mod stage1;
pub mod stage2;
pub mod state;
pub mod supervise;
pub mod switch_root;
pub mod watchdog;
