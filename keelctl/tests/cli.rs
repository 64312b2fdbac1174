//! Runs the keelctl binary against a canned HTTP server on a unix socket: what it sends, what
//! it prints, and its exit codes. (The real server is tested with a fake supervisor in sysd.)

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixListener;
use std::path::PathBuf;
use std::process::{Command, Output, Stdio};
use std::thread::JoinHandle;

/// A server that answers each connection with the next canned response and records requests
/// as `METHOD PATH` followed by the body, if any.
struct Canned {
    _dir: tempfile::TempDir,
    socket: PathBuf,
    server: JoinHandle<Vec<String>>,
}

impl Canned {
    fn new(responses: Vec<String>) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let socket = dir.path().join("sysd.sock");
        let listener = UnixListener::bind(&socket).expect("bind");
        let server = std::thread::spawn(move || {
            let mut requests = Vec::new();
            for response in responses {
                let (stream, _) = listener.accept().expect("accept");
                let mut reader = BufReader::new(stream);
                let mut request_line = String::new();
                reader.read_line(&mut request_line).expect("request line");
                let mut length = 0;
                loop {
                    let mut header = String::new();
                    reader.read_line(&mut header).expect("header");
                    let header = header.trim_end();
                    if header.is_empty() {
                        break;
                    }
                    if let Some(value) = header.strip_prefix("Content-Length: ") {
                        length = value.parse().expect("length");
                    }
                }
                let mut body = vec![0; length];
                reader.read_exact(&mut body).expect("body");
                let mut parts = request_line.split(' ');
                let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
                requests.push(format!("{method} {path}{}", String::from_utf8_lossy(&body)));
                let mut stream = reader.into_inner();
                // A client that stops reading early (a failed test) must not hang the server.
                let _ = stream.write_all(response.as_bytes());
            }
            requests
        });
        Canned {
            _dir: dir,
            socket,
            server,
        }
    }

    fn run(&self, args: &[&str]) -> Output {
        keelctl(&self.socket, args, None)
    }

    fn requests(self) -> Vec<String> {
        self.server.join().expect("server thread")
    }
}

fn keelctl(socket: &std::path::Path, args: &[&str], stdin: Option<&str>) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_keelctl"))
        .args(args)
        .env("KEELSON_SOCKET", socket)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn keelctl");
    if let Some(mut pipe) = child.stdin.take() {
        pipe.write_all(stdin.unwrap_or("").as_bytes())
            .expect("stdin");
    }
    child.wait_with_output().expect("keelctl runs")
}

fn json(status: u16, body: &str) -> String {
    format!(
        "HTTP/1.1 {status} X\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\
         Connection: close\r\n\r\n{body}",
        body.len()
    )
}

fn chunked(lines: &[&str]) -> String {
    let mut out =
        "HTTP/1.1 200 OK\r\nContent-Type: application/x-ndjson\r\nTransfer-Encoding: chunked\r\n\r\n"
            .to_string();
    for line in lines {
        out.push_str(&format!("{:x}\r\n{line}\n\r\n", line.len() + 1));
    }
    out.push_str("0\r\n\r\n");
    out
}

fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

const WEB: &str = r#"{"name":"web","kind":"service","state":"running","health":"healthy","critical":false,"source":"user","image":"nginx:1","pid":42,"started_at_ms":null,"restarts":1,"last_exit":null,"reason":null,"next_restart_ms":null,"spec_hash":"abc"}"#;

#[test]
fn ps_prints_a_table_and_json_on_request() {
    let list = format!("[{WEB}]");
    let server = Canned::new(vec![json(200, &list), json(200, &list)]);
    let table = server.run(&["ps"]);
    assert!(table.status.success(), "{}", stderr(&table));
    assert_eq!(
        stdout(&table),
        "NAME  STATE    HEALTH   PID  RESTARTS  UPTIME  IMAGE\n\
         web   running  healthy  42   1         -       nginx:1\n"
    );
    let raw = server.run(&["-o", "json", "ps"]);
    assert_eq!(stdout(&raw), format!("{list}\n"));
    assert_eq!(server.requests(), ["GET /v1/services", "GET /v1/services"]);
}

#[test]
fn actions_print_the_new_state() {
    let stopping = WEB.replace("running", "stopping");
    let server = Canned::new(vec![json(200, &stopping), json(200, &stopping)]);
    let output = server.run(&["stop", "web"]);
    assert!(output.status.success(), "{}", stderr(&output));
    assert_eq!(stdout(&output), "web: stopping\n");
    let output = server.run(&["kill", "-s", "TERM", "web"]);
    assert_eq!(stdout(&output), "web: stopping\n");
    assert_eq!(
        server.requests(),
        [
            "POST /v1/services/web/stop",
            "POST /v1/services/web/kill?signal=TERM"
        ]
    );
}

#[test]
fn server_errors_are_printed_and_exit_1() {
    let server = Canned::new(vec![json(
        404,
        r#"{"error":"no service named \"nope\" (known: web)"}"#,
    )]);
    let output = server.run(&["status", "nope"]);
    assert_eq!(output.status.code(), Some(1));
    assert_eq!(
        stderr(&output),
        "keelctl: no service named \"nope\" (known: web)\n"
    );
    assert_eq!(server.requests(), ["GET /v1/services/nope"]);
}

#[test]
fn status_of_a_failed_service_ends_with_its_last_output() {
    let failed = r#"{"name":"swarm-join","kind":"oneshot","state":"failed","health":null,"critical":false,"source":"system","image":"/usr/lib/keelson/images/docker","pid":null,"started_at_ms":null,"restarts":0,"last_exit":{"code":1,"signal":null,"oom_killed":false,"at_ms":1795306361124},"reason":"exited with code 1","next_restart_ms":null,"spec_hash":"abc"}"#;
    let server = Canned::new(vec![
        json(200, failed),
        chunked(&[
            r#"{"time_ms":1795306361123,"stream":"stdout","line":"swarm-join: joining the swarm of 10.0.0.11:2377"}"#,
            r#"{"time_ms":1795306361124,"stream":"stderr","line":"Error response from daemon: invalid join token"}"#,
        ]),
        json(200, WEB),
    ]);
    let output = server.run(&["status", "swarm-join"]);
    assert!(output.status.success(), "{}", stderr(&output));
    let text = stdout(&output);
    assert!(
        text.contains("state:        failed\n")
            && text.ends_with(
                "last output:\n  \
                 2026-11-22T00:12:41.123Z swarm-join: joining the swarm of 10.0.0.11:2377\n  \
                 2026-11-22T00:12:41.124Z [stderr] Error response from daemon: invalid join token\n"
            ),
        "{text}"
    );
    // A running service: no logs asked for.
    let output = server.run(&["status", "web"]);
    assert!(!stdout(&output).contains("last output"));
    assert_eq!(
        server.requests(),
        [
            "GET /v1/services/swarm-join",
            "GET /v1/services/swarm-join/logs?tail=5",
            "GET /v1/services/web"
        ]
    );
}

#[test]
fn logs_stream_lines_until_the_server_ends() {
    let server = Canned::new(vec![chunked(&[
        r#"{"time_ms":1795306361123,"stream":"stdout","line":"hello"}"#,
        r#"{"time_ms":1795306361124,"stream":"stderr","line":"oops"}"#,
    ])]);
    let output = server.run(&["logs", "-f", "--tail", "2", "web"]);
    assert!(output.status.success(), "{}", stderr(&output));
    assert_eq!(
        stdout(&output),
        "2026-11-22T00:12:41.123Z hello\n2026-11-22T00:12:41.124Z [stderr] oops\n"
    );
    assert_eq!(
        server.requests(),
        ["GET /v1/services/web/logs?tail=2&follow=1"]
    );
}

#[test]
fn apply_shows_the_diff_then_applies() {
    let plan = |dry: bool| {
        format!(
            r#"{{"start":["web"],"restart":["db"],"stop":["old"],"unchanged":["a"],"dry_run":{dry}}}"#
        )
    };
    let server = Canned::new(vec![json(200, &plan(true)), json(200, &plan(false))]);
    let output = keelctl(&server.socket, &["apply", "-"], Some("[services.web]\n"));
    assert!(output.status.success(), "{}", stderr(&output));
    assert_eq!(
        stdout(&output),
        "+ web (start)\n~ db (restart: spec changed)\n- old (stop)\n= 1 unchanged\n\
         applied: 1 started, 1 restarted, 1 stopped, 1 unchanged\n"
    );
    assert_eq!(
        server.requests(),
        [
            "POST /v1/apply?dry_run=1[services.web]\n",
            "POST /v1/apply[services.web]\n"
        ]
    );
}

#[test]
fn apply_dry_run_and_config_errors() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("services.toml");
    std::fs::write(&file, "[services.web]\nimagee = 1\n").expect("write");
    let file = file.to_str().expect("utf-8 path");
    let server = Canned::new(vec![
        json(
            200,
            r#"{"start":[],"restart":[],"stop":[],"unchanged":["web"],"dry_run":true}"#,
        ),
        json(
            400,
            r#"{"error":"services.toml:2:1: service \"web\": unknown field `imagee`"}"#,
        ),
    ]);
    let dry = server.run(&["apply", "--dry-run", file]);
    assert!(dry.status.success(), "{}", stderr(&dry));
    assert_eq!(stdout(&dry), "= 1 unchanged\ndry run: nothing changed\n");
    let bad = server.run(&["apply", file]);
    assert_eq!(bad.status.code(), Some(1));
    assert_eq!(stdout(&bad), "");
    assert_eq!(
        stderr(&bad),
        "keelctl: services.toml:2:1: service \"web\": unknown field `imagee`\n"
    );
    assert_eq!(
        server.requests().len(),
        2,
        "no apply after a refused dry run"
    );
}

#[test]
fn a_missing_socket_says_what_to_do() {
    let dir = tempfile::tempdir().expect("tempdir");
    let socket = dir.path().join("sysd.sock");
    let output = keelctl(&socket, &["ps"], None);
    assert_eq!(output.status.code(), Some(1));
    assert_eq!(
        stderr(&output),
        format!(
            "keelctl: cannot reach sysd at {}: No such file or directory (is sysd running? \
             keelctl must run on the host or in the admin container with the socket mounted)\n",
            socket.display()
        )
    );
}

#[test]
fn usage_errors_exit_2_and_completions_need_no_server() {
    let nowhere = PathBuf::from("/nonexistent/sysd.sock");
    assert_eq!(
        keelctl(&nowhere, &["frobnicate"], None).status.code(),
        Some(2)
    );
    assert_eq!(keelctl(&nowhere, &["logs"], None).status.code(), Some(2));
    let bash = keelctl(&nowhere, &["completions", "bash"], None);
    assert!(bash.status.success());
    assert!(stdout(&bash).contains("keelctl"));
}

#[test]
fn pull_shows_progress_and_fails_with_the_pull() {
    let ok = chunked(&[
        r#"{"type":"resolved","reference":"r:5000/app:v1","manifest":"sha256:aaaaaaaaaaaaaaaa","layers":2,"total_bytes":2097152}"#,
        r#"{"type":"exists","digest":"sha256:bbbbbbbbbbbbbbbb","size":1024}"#,
        r#"{"type":"downloading","digest":"sha256:cccccccccccccccc","done":1048576,"size":2097152,"resumed_at":524288}"#,
        r#"{"type":"retrying","digest":"sha256:cccccccccccccccc","attempt":1,"reason":"connection reset"}"#,
        r#"{"type":"verified","digest":"sha256:cccccccccccccccc","size":2097152}"#,
        r#"{"type":"done","reference":"r:5000/app:v1","manifest":"sha256:aaaaaaaaaaaaaaaa","downloaded_bytes":1572864,"elapsed_ms":1500}"#,
    ]);
    let failed = chunked(&[
        r#"{"type":"error","message":"pulling r:5000/app:v2: blob sha256:dd: content does not match its digest"}"#,
    ]);
    let server = Canned::new(vec![ok, failed]);
    let out = server.run(&["pull", "r:5000/app:v1"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stdout(&out);
    assert!(
        text.contains("r:5000/app:v1: manifest aaaaaaaaaaaa, 2 layers"),
        "{text}"
    );
    assert!(
        text.contains("cccccccccccc: 1M / 2M (50%, resumed at 512K)"),
        "{text}"
    );
    assert!(
        text.contains("attempt 1 failed: connection reset; retrying"),
        "{text}"
    );
    assert!(
        text.contains("r:5000/app:v1: pulled sha256:aaaaaaaaaaaaaaaa"),
        "{text}"
    );
    let out = server.run(&["pull", "r:5000/app:v2"]);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("content does not match its digest"),
        "{}",
        stderr(&out)
    );
    assert_eq!(
        server.requests(),
        [
            "POST /v1/images/pull?reference=r%3A5000%2Fapp%3Av1",
            "POST /v1/images/pull?reference=r%3A5000%2Fapp%3Av2"
        ]
    );
}

#[test]
fn images_list_remove_and_prune() {
    let list = r#"[{"reference":"r:5000/app:v1","digest":"sha256:aaaaaaaaaaaaaaaaaaaa","manifest":"sha256:aaaaaaaaaaaaaaaaaaaa","size":2097152,"unique_size":1048576,"layers":2,"unpacked":true,"used_by":["web"],"pulled_ms":0}]"#;
    let removed =
        r#"{"removed":["r:5000/old:v1"],"blobs":3,"rootfs":1,"layers":2,"freed_bytes":3145728}"#;
    let in_use =
        r#"{"error":"image r:5000/app:v1 is used by web: change or remove that service first"}"#;
    let server = Canned::new(vec![
        json(200, list),
        json(200, removed),
        json(409, in_use),
        json(200, removed),
    ]);
    let out = server.run(&["images"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stdout(&out);
    assert!(text.starts_with("REFERENCE"), "{text}");
    assert!(
        text.contains("r:5000/app:v1") && text.contains("web"),
        "{text}"
    );
    let out = server.run(&["images", "rm", "r:5000/old:v1"]);
    assert_eq!(
        stdout(&out),
        "removed r:5000/old:v1\n3 blobs, 1 unpacked images and 2 layers deleted, 3M freed\n"
    );
    let out = server.run(&["images", "rm", "r:5000/app:v1"]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("used by web"), "{}", stderr(&out));
    let out = server.run(&["images", "prune"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(
        server.requests(),
        [
            "GET /v1/images",
            "POST /v1/images/remove?reference=r%3A5000%2Fold%3Av1",
            "POST /v1/images/remove?reference=r%3A5000%2Fapp%3Av1",
            "POST /v1/images/prune"
        ]
    );
}
