//! The README's first command as a newcomer runs it from a script: `./dev run` with stdin
//! closed builds the image, boots it, and prints an ssh command; that command, run from another
//! shell, reaches the admin container, whose `keelctl ps` lists the running services. The whole
//! of `./dev run` (and so the node's user networking) lives in a network namespace of this
//! test's own.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use qemu_tests::{workspace_root, NetNs};

/// Kills `./dev run` (its process group: bash and QEMU) however the test ends.
struct DevRun(Child);

impl Drop for DevRun {
    fn drop(&mut self) {
        // SAFETY: kill(2) with a negative pid signals the process group; no memory is touched.
        unsafe { libc::kill(-(self.0.id() as i32), libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.0.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        // SAFETY: as above.
        unsafe { libc::kill(-(self.0.id() as i32), libc::SIGKILL) };
        let _ = self.0.wait();
    }
}

#[test]
fn dev_run_with_stdin_closed_prints_an_ssh_command_that_reaches_the_admin_container() {
    use std::os::unix::process::CommandExt;
    let ns = NetNs::new().unwrap();
    let root = workspace_root();
    let mut child = ns
        .command(root.join("dev"))
        .args(["run", "--ssh-port", "2222"])
        .current_dir(&root)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .spawn()
        .expect("./dev run");
    let (tx, rx) = mpsc::channel::<String>();
    for pipe in [
        Box::new(child.stdout.take().unwrap()) as Box<dyn std::io::Read + Send>,
        Box::new(child.stderr.take().unwrap()),
    ] {
        let tx = tx.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(pipe).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
    }
    drop(tx);
    let run = DevRun(child);

    // The build (mostly cached by the images tier) and a TCG boot to the admin container.
    let deadline = Instant::now() + Duration::from_secs(900);
    let mut seen = Vec::new();
    let ssh = loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(line) => {
                if let Some(cmd) = line.split("get in:").nth(1) {
                    break cmd.trim().to_string();
                }
                seen.push(line);
            }
            Err(e) => panic!(
                "./dev run printed no ssh command ({e}); its output:\n{}\nconsole:\n{}",
                seen.join("\n"),
                console_tail()
            ),
        }
    };
    assert!(
        ssh.starts_with("ssh -i out/")
            && ssh.contains("-p 2222 ")
            && ssh.ends_with("root@127.0.0.1"),
        "{ssh}"
    );

    // From another shell, in the same namespace: the admin container answers and keelctl works.
    let out = ns
        .command("sh")
        .arg("-c")
        .arg(format!(
            "{ssh} -o BatchMode=yes -o ConnectTimeout=30 'hostname; keelctl ps'"
        ))
        .current_dir(&root)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{ssh}: {}\n{stdout}\n{}\nconsole:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr),
        console_tail()
    );
    let mut lines = stdout.lines();
    let hostname = lines.next().unwrap_or_default();
    // The node's name (machine-id or DHCP), not the container's service name.
    assert!(
        !hostname.is_empty() && hostname != "admin",
        "hostname {hostname:?}"
    );
    let ps: Vec<&str> = lines.collect();
    for service in ["admin", "timesync"] {
        assert!(
            ps.iter()
                .any(|l| l.split_whitespace().next() == Some(service) && l.contains("running")),
            "keelctl ps does not list {service} running:\n{stdout}"
        );
    }
    drop(run);
}

fn console_tail() -> String {
    let log = workspace_root().join("out/vm-run/console.log");
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(40)..].join("\n")
}

#[test]
fn dev_run_refuses_bad_input_with_one_clear_line() {
    let root = workspace_root();
    let dev = |args: &[&str]| {
        let out = Command::new(root.join("dev"))
            .arg("run")
            .args(args)
            .current_dir(&root)
            .stdin(Stdio::null())
            .output()
            .unwrap();
        assert!(!out.status.success(), "{args:?} succeeded");
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let err = dev(&["--config", "configs/no-such.toml"]);
    assert!(
        err.contains("no image config configs/no-such.toml"),
        "{err}"
    );
    let err = dev(&["--memory", "lots"]);
    assert!(err.contains("take whole numbers"), "{err}");
    // A port that is taken, in a namespace of the test's own.
    let ns = NetNs::new().unwrap();
    let out = ns
        .command("sh")
        .arg("-c")
        .arg("busybox nc -l -p 2299 & nc=$!; sleep 0.5; ./dev run --ssh-port 2299; rc=$?; kill $nc 2>/dev/null; exit $rc")
        .current_dir(&root)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("port 2299 on 127.0.0.1 is already in use"),
        "{err}"
    );
}
