//! The ACPI power button: finding its evdev nodes and recognising a press in `struct input_event`
//! records, so a button press (or QEMU's `system_powerdown`) powers the machine off cleanly.

use std::fs::File;
use std::io::Read;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

/// `sizeof(struct input_event)` on 64-bit: a 16-byte timeval, type, code, value.
pub const EVENT_SIZE: usize = 24;
const EV_KEY: u16 = 1;
const KEY_POWER: u16 = 116;
const NAME: &str = "Power Button";

/// Opens every /dev/input/eventN whose device is named "Power Button", non-blocking.
pub fn open_all() -> Vec<(String, File)> {
    let mut found = Vec::new();
    let Ok(entries) = std::fs::read_dir("/dev/input") else {
        return found;
    };
    let mut names: Vec<String> = entries
        .filter_map(Result::ok)
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|n| n.starts_with("event"))
        .collect();
    names.sort();
    for name in names {
        let sys = Path::new("/sys/class/input")
            .join(&name)
            .join("device/name");
        let is_button = std::fs::read_to_string(sys).is_ok_and(|s| s.trim() == NAME);
        if !is_button {
            continue;
        }
        let path = format!("/dev/input/{name}");
        match std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(&path)
        {
            Ok(f) => found.push((path, f)),
            Err(e) => crate::say!("power button: cannot open {path}: {e}"),
        }
    }
    found
}

/// Whether one input_event record is the power key going down.
pub fn is_power_press(event: &[u8]) -> bool {
    let u16_at = |o: usize| {
        event
            .get(o..o + 2)
            .map(|b| u16::from_ne_bytes([b[0], b[1]]))
            .unwrap_or(0)
    };
    let value = event
        .get(20..24)
        .map(|b| i32::from_ne_bytes([b[0], b[1], b[2], b[3]]))
        .unwrap_or(0);
    event.len() >= EVENT_SIZE && u16_at(16) == EV_KEY && u16_at(18) == KEY_POWER && value == 1
}

/// Drains pending events from a button; true if any was a press.
pub fn read_press(file: &mut File) -> bool {
    let mut buf = [0u8; EVENT_SIZE * 16];
    let mut pressed = false;
    // The fd is non-blocking: read until EAGAIN (or any error, after which poll reports again).
    while let Ok(n) = file.read(&mut buf) {
        if n == 0 {
            break;
        }
        let got = buf.get(..n).unwrap_or(&[]);
        pressed |= got.chunks_exact(EVENT_SIZE).any(is_power_press);
    }
    pressed
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(ty: u16, code: u16, value: i32) -> [u8; EVENT_SIZE] {
        let mut e = [0u8; EVENT_SIZE];
        e[0..8].copy_from_slice(&12345i64.to_ne_bytes());
        e[16..18].copy_from_slice(&ty.to_ne_bytes());
        e[18..20].copy_from_slice(&code.to_ne_bytes());
        e[20..24].copy_from_slice(&value.to_ne_bytes());
        e
    }

    #[test]
    fn recognises_only_the_press() {
        assert!(is_power_press(&event(1, 116, 1)));
        assert!(!is_power_press(&event(1, 116, 0)), "release");
        assert!(!is_power_press(&event(1, 116, 2)), "autorepeat");
        assert!(!is_power_press(&event(0, 0, 0)), "EV_SYN");
        assert!(!is_power_press(&event(1, 30, 1)), "KEY_A");
        assert!(!is_power_press(&event(1, 116, 1)[..20]), "short");
    }
}
