//! The sidecar as an application sees it: files and a template rendered in
//! one generation, the local gRPC API on a Unix socket (peer-UID checked), a
//! watch that reports each new version once, notifications (HTTP POST, a
//! command, a signal) only after the swap, and leases released on shutdown.

use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use secrets_broker::dev::issuer::Workload;
use secrets_broker_e2e::{AUDIENCE, Proc, Tmpfs, World, bin, out_text, wait_for};

const ROLES: &str = r#"
[[roles]]
name = "payments"
namespaces = ["payments"]
service_accounts = ["api"]
secrets = ["payments/*"]
ttl = "20s"
max_ttl = "1h"
"#;

const LONG: Duration = Duration::from_secs(60);

fn value(i: usize) -> String {
    format!("v{i:04}-{}", "x".repeat(4000))
}

/// A loopback HTTP server that records, for every POST, what the secret file
/// held at that moment.
fn notify_server(file: PathBuf) -> (u16, Arc<Mutex<Vec<String>>>) {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let record = seen.clone();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { continue };
            let mut buf = [0u8; 4096];
            let _ = conn.read(&mut buf);
            let content = std::fs::read_to_string(&file).unwrap_or_default();
            record
                .lock()
                .unwrap()
                .push(content.get(..5).unwrap_or_default().to_owned());
            let _ = conn.write_all(b"HTTP/1.1 204 No Content\r\nconnection: close\r\n\r\n");
        }
    });
    (port, seen)
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| o.stdout.starts_with(b"0\n"))
        .unwrap_or(false)
}

#[test]
fn an_application_sees_whole_generations_once_and_is_notified_after_each() {
    let world = World::new(ROLES).unwrap();
    world.put("payments/a", &value(1)).unwrap();
    world.put("payments/user", "app-user").unwrap();
    let _broker = world.start_broker("broker.log").unwrap();
    let tmpfs = Tmpfs::new().unwrap();
    let file = tmpfs.path.join("a");
    // The socket lives where any UID can reach it: the UID check must decide.
    let sockdir = tempfile::Builder::new()
        .prefix("sb-sock-")
        .tempdir_in("/tmp")
        .unwrap();
    std::fs::set_permissions(
        sockdir.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    let socket = sockdir.path().join("sidecar.sock");
    let (port, posts) = notify_server(file.clone());
    let cmdlog = world.path("command.log");
    let hup_log = world.path("hup.log");
    let pid_file = world.path("app.pid");
    // An "application" that appends a line per SIGHUP. The trap is set
    // before the pid file appears: a SIGHUP that came first would kill it.
    // SIGHUP back to its default first: a shell cannot trap a signal ignored
    // when it started, as it is under `nohup`.
    let mut app = Command::new("env")
        .args(["--default-signal=HUP", "sh", "-c"])
        .arg(format!(
            "trap 'echo hup >> {log}' HUP; echo $$ > {pid}; while :; do sleep 0.05; done",
            pid = pid_file.display(),
            log = hup_log.display()
        ))
        .spawn()
        .unwrap();
    wait_for("app pid file", LONG, || pid_file.exists().then_some(())).unwrap();

    let extra = format!(
        r#"
[local_api]
socket = "{socket}"
allowed_uids = [0, {me}]

[notify]
debounce = "100ms"
signal = "HUP"
pid_file = "{pid}"
command = ["/bin/sh", "-c", "head -c 5 {file} >> {cmdlog}; echo >> {cmdlog}"]
http_post = "http://127.0.0.1:{port}/-/reload"

[[templates]]
file = "a.json"
source = '{{{{ {{"user": secrets["payments/user"], "a": secrets["payments/a"]}} | tojson }}}}'
mode = "0440"
"#,
        socket = socket.display(),
        me = rustix_uid(),
        pid = pid_file.display(),
        file = file.display(),
        cmdlog = cmdlog.display(),
    );
    let token = world
        .token_file("api.token", &Workload::new("payments", "api", AUDIENCE))
        .unwrap();
    let mut cfg_text = std::fs::read_to_string(
        world
            .sidecar_config("s.toml", &token, &tmpfs.path, "", &[("payments/a", "a")])
            .unwrap(),
    )
    .unwrap();
    // Top-level keys first, then tables.
    cfg_text = cfg_text.replacen("[[secrets]]", &format!("{extra}\n[[secrets]]"), 1);
    cfg_text.push_str("[[secrets]]\nname = \"payments/user\"\ntemplate_only = true\n");
    std::fs::write(world.path("s.toml"), cfg_text).unwrap();
    let sidecar = Proc::spawn(
        Command::new(bin("secrets-sidecar"))
            .args(["run", "--config"])
            .arg(world.path("s.toml")),
        world.path("sidecar.log"),
    )
    .unwrap();
    wait_for("first generation", LONG, || file.exists().then_some(()))
        .unwrap_or_else(|e| panic!("{e}\n{}", sidecar.log_text()));
    assert!(
        !tmpfs.path.join("user").exists(),
        "template_only secrets get no file"
    );
    let json_mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(tmpfs.path.join("a.json"))
            .unwrap()
            .permissions(),
    );
    assert_eq!(json_mode & 0o777, 0o440);

    // The application: a watcher on the socket, and a reader hammering the files.
    let mut watcher = Command::new(bin("secrets-sidecar"))
        .args(["watch", "--socket"])
        .arg(&socket)
        .arg("payments/a")
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let lines = Arc::new(Mutex::new(Vec::<String>::new()));
    {
        let lines = lines.clone();
        let out = watcher.stdout.take().unwrap();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                lines.lock().unwrap().push(line);
            }
        });
    }
    let stop = Arc::new(AtomicBool::new(false));
    let reader = {
        let (stop, dir) = (stop.clone(), tmpfs.path.clone());
        std::thread::spawn(move || {
            let mut reads = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let a = std::fs::read_to_string(dir.join("a"))
                    .expect("the secret file is always there");
                assert!(
                    a.len() == 4006 && a.starts_with('v') && a.ends_with('x'),
                    "partial secret file: {} bytes",
                    a.len()
                );
                let j = std::fs::read_to_string(dir.join("a.json"))
                    .expect("the template is always there");
                let v: serde_json::Value =
                    serde_json::from_str(&j).expect("the template is always whole JSON");
                assert_eq!(v["user"], "app-user");
                reads += 1;
            }
            reads
        })
    };

    let rotations = 30;
    for i in 2..=rotations + 1 {
        world.put("payments/a", &value(i)).unwrap();
        wait_for("the watcher to see the version", LONG, || {
            lines
                .lock()
                .unwrap()
                .iter()
                .any(|l| *l == format!("updated payments/a {i}"))
                .then_some(())
        })
        .unwrap_or_else(|e| panic!("{e}\n{:?}\n{}", lines.lock().unwrap(), sidecar.log_text()));
        assert!(
            std::fs::read_to_string(&file)
                .unwrap()
                .starts_with(&format!("v{i:04}"))
        );
    }
    stop.store(true, Ordering::Relaxed);
    let reads = reader
        .join()
        .expect("the reader never saw a partial generation");
    assert!(reads > 100, "the reader hammered the files ({reads} reads)");

    // Each version exactly once, in order.
    let seen = lines.lock().unwrap().clone();
    let expected: Vec<String> = (1..=rotations + 1)
        .map(|i| format!("updated payments/a {i}"))
        .collect();
    assert_eq!(seen, expected);

    // Notifications came after the swap: every POST saw a whole, current file,
    // the command ran, and the application got its SIGHUPs.
    wait_for("notifications", LONG, || {
        (posts.lock().unwrap().len() >= 2).then_some(())
    })
    .unwrap();
    for p in posts.lock().unwrap().iter() {
        assert!(
            p.starts_with('v') && p.len() == 5,
            "POST before the file was complete: {p:?}"
        );
    }
    wait_for("command ran", LONG, || {
        std::fs::read_to_string(&cmdlog)
            .ok()
            .filter(|t| t.contains(&format!("v{:04}", rotations + 1)))
    })
    .unwrap();
    wait_for("SIGHUP delivered", LONG, || {
        std::fs::read_to_string(&hup_log)
            .ok()
            .filter(|t| t.lines().count() >= 2)
    })
    .unwrap();

    // The local API: allowed UIDs get the value; any other UID is refused.
    let out = Command::new(bin("secrets-sidecar"))
        .args(["get", "--socket"])
        .arg(&socket)
        .arg("payments/a")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", out_text(&out));
    assert_eq!(String::from_utf8_lossy(&out.stdout), value(rotations + 1));
    let out = Command::new(bin("secrets-sidecar"))
        .args(["get", "--socket"])
        .arg(&socket)
        .arg("payments/zzz")
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("is not configured in this sidecar"),
        "{}",
        out_text(&out)
    );
    if is_root() {
        // The build directory may be private (CI builds under /root): run a
        // copy from the world-readable socket directory.
        let client = sockdir.path().join("secrets-sidecar");
        std::fs::copy(bin("secrets-sidecar"), &client).unwrap();
        std::fs::set_permissions(&client, std::os::unix::fs::PermissionsExt::from_mode(0o755))
            .unwrap();
        let out = Command::new("runuser")
            .args(["-u", "nobody", "--"])
            .arg(&client)
            .args(["get", "--socket"])
            .arg(&socket)
            .arg("payments/a")
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(1), "{}", out_text(&out));
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains("may not read secrets from this sidecar"),
            "{err}"
        );
        assert!(!String::from_utf8_lossy(&out.stdout).contains("xxxx"));
    }

    let _ = watcher.kill();
    let _ = watcher.wait();
    let _ = app.kill();
    let _ = app.wait();
}

fn rustix_uid() -> u32 {
    String::from_utf8_lossy(&Command::new("id").arg("-u").output().unwrap().stdout)
        .trim()
        .parse()
        .unwrap()
}

#[test]
fn revoke_on_shutdown_releases_the_pods_leases() {
    let world = World::new(ROLES).unwrap();
    world.put("payments/a", "v").unwrap();
    let _broker = world.start_broker("broker.log").unwrap();
    let tmpfs = Tmpfs::new().unwrap();
    let token = world
        .token_file("t", &Workload::new("payments", "api", AUDIENCE))
        .unwrap();
    let cfg = world
        .sidecar_config(
            "s.toml",
            &token,
            &tmpfs.path,
            "revoke_on_shutdown = true",
            &[("payments/a", "a")],
        )
        .unwrap();
    let mut sidecar = Proc::spawn(
        Command::new(bin("secrets-sidecar"))
            .args(["run", "--config"])
            .arg(&cfg),
        world.path("sidecar.log"),
    )
    .unwrap();
    wait_for("file", LONG, || tmpfs.path.join("a").exists().then_some(())).unwrap();
    let leases = |w: &World| {
        let o = w
            .brokerctl(
                Some("viewer"),
                &[
                    "--output",
                    "json",
                    "leases",
                    "list",
                    "--namespace",
                    "payments",
                ],
            )
            .unwrap();
        let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        v["leases"].as_array().unwrap().len()
    };
    assert_eq!(leases(&world), 1);
    sidecar.signal("TERM");
    assert!(sidecar.wait_exit(LONG).unwrap().success());
    assert!(
        sidecar.log_text().contains("leases released at the broker"),
        "{}",
        sidecar.log_text()
    );
    assert_eq!(leases(&world), 0, "the pod's lease ended at shutdown");
    assert!(!Path::new(&tmpfs.path.join("a")).exists());
}
