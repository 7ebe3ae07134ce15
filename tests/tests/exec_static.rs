//! The injector's exec mode runs the sidecar binary inside the app's own
//! image, which may have no C library at all (`scratch`, distroless
//! `static`) or another one (Alpine's musl). The image builds it with
//! `crt-static`, and so does the test command (`scripts/test.sh`); this test
//! copies that binary with `copy-to` (as the init container does) into a root
//! holding nothing but it, a static app, `/etc/hosts` and the config, and
//! runs `secrets-sidecar exec -- /bin/app` there under `chroot`.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use secrets_broker::dev::issuer::Workload;
use secrets_broker_e2e::{AUDIENCE, Tmpfs, World, bin, out_text};

const ROLES: &str = r#"
[[roles]]
name = "payments"
namespaces = ["payments"]
service_accounts = ["api"]
secrets = ["payments/*"]
"#;

/// The static sidecar `scripts/test.sh` builds:
/// `<target>/<arch>-unknown-linux-gnu/debug/secrets-sidecar`.
fn static_sidecar() -> PathBuf {
    let debug = bin("secrets-sidecar");
    let target = debug
        .parent()
        .and_then(Path::parent)
        .expect("target directory");
    let triple = format!("{}-unknown-linux-gnu", std::env::consts::ARCH);
    let path = target.join(triple).join("debug").join("secrets-sidecar");
    assert!(
        path.exists(),
        "{} is missing: scripts/test.sh builds it (RUSTFLAGS=\"-C target-feature=+crt-static\" cargo build -p secrets-sidecar --target {}-unknown-linux-gnu)",
        path.display(),
        std::env::consts::ARCH
    );
    path
}

/// Whether an ELF file asks for a program interpreter (a dynamic loader):
/// a `PT_INTERP` program header.
fn has_interpreter(path: &Path) -> bool {
    let elf = std::fs::read(path).unwrap();
    assert_eq!(
        &elf[..4],
        b"\x7fELF",
        "{} is not an ELF file",
        path.display()
    );
    assert_eq!(elf[4], 2, "a 64-bit ELF file");
    let u16_at = |o: usize| u16::from_le_bytes([elf[o], elf[o + 1]]) as usize;
    let phoff = u64::from_le_bytes(elf[0x20..0x28].try_into().unwrap()) as usize;
    let (size, count) = (u16_at(0x36), u16_at(0x38));
    (0..count).any(|i| {
        let at = phoff + i * size;
        u32::from_le_bytes(elf[at..at + 4].try_into().unwrap()) == 3
    })
}

#[test]
fn the_static_sidecar_runs_exec_in_a_root_without_any_c_library() {
    let sidecar = static_sidecar();
    assert!(
        !has_interpreter(&sidecar),
        "{} is dynamically linked",
        sidecar.display()
    );
    assert!(
        has_interpreter(&bin("secrets-sidecar")),
        "the check sees a dynamic binary"
    );

    let world = World::new(ROLES).unwrap();
    world.put("payments/db-password", "pw-static-71c3").unwrap();
    let _broker = world.start_broker("broker.log").unwrap();

    // The root: a tmpfs (the secrets written in it stay off disk).
    let root = Tmpfs::with_size("512m").unwrap();
    let r = |p: &str| root.path.join(p);
    for dir in ["bin", "etc", "run", "out", "secrets"] {
        std::fs::create_dir_all(r(dir)).unwrap();
    }
    std::fs::write(r("etc/hosts"), "127.0.0.1 localhost\n").unwrap();

    // The app: a static program that writes what it was given and exits.
    let src = world.path("app.rs");
    std::fs::write(
        &src,
        r#"fn main() {
    let pw = std::env::var("DB_PASSWORD").unwrap_or_default();
    std::fs::write("/out/app.txt", format!("DB_PASSWORD={pw}\n")).unwrap();
}
"#,
    )
    .unwrap();
    let rustc = std::env::var("RUSTC").unwrap_or_else(|_| "rustc".into());
    let out = Command::new(rustc)
        .args([
            "--edition",
            "2024",
            "-C",
            "target-feature=+crt-static",
            "-o",
        ])
        .arg(r("bin/app"))
        .arg(&src)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", out_text(&out));
    assert!(!has_interpreter(&r("bin/app")));

    // The init container's step: copy the binary into the shared volume.
    let out = Command::new(&sidecar)
        .arg("copy-to")
        .arg(r("bin"))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", out_text(&out));

    // Token, CA and config as the root sees them.
    let token = world
        .token_file("api.token", &Workload::new("payments", "api", AUDIENCE))
        .unwrap();
    std::fs::copy(&token, r("run/token")).unwrap();
    std::fs::copy(&world.tls.ca, r("run/ca.pem")).unwrap();
    std::fs::write(
        r("run/exec.toml"),
        format!(
            r#"broker_url = "https://localhost:{port}"
ca_file = "/run/ca.pem"
token_file = "/run/token"
dir = "/secrets"
retry_initial = "100ms"
retry_max = "1s"
request_timeout = "5s"
health_listen = "off"

[[env]]
name = "DB_PASSWORD"
secret = "payments/db-password"
"#,
            port = world.broker_port
        ),
    )
    .unwrap();

    // Found before the environment is cleared (`env_clear` drops PATH).
    let chroot = ["/usr/sbin/chroot", "/usr/bin/chroot", "/sbin/chroot"]
        .into_iter()
        .find(|p| Path::new(p).exists())
        .expect("chroot (coreutils) is installed");
    let mut child = Command::new(chroot)
        .arg(&root.path)
        .args([
            "/bin/secrets-sidecar",
            "exec",
            "--config",
            "/run/exec.toml",
            "--",
            "/bin/app",
        ])
        .env_clear()
        .env("NO_COLOR", "1")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("chroot (the test command runs as root)");
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while child.try_wait().unwrap().is_none() && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    if child.try_wait().unwrap().is_none() {
        let _ = child.kill();
    }
    let out = child.wait_with_output().unwrap();
    let log = out_text(&out);
    assert!(out.status.success(), "exec in the bare root: {log}");
    assert_eq!(
        std::fs::read_to_string(r("out/app.txt")).unwrap_or_default(),
        "DB_PASSWORD=pw-static-71c3\n",
        "{log}"
    );
    assert!(!log.contains("pw-static"), "the value in exec's log: {log}");
    let entries: Vec<String> = std::fs::read_dir(&root.path)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(
        !entries.iter().any(|e| e.starts_with("lib")),
        "no library directory in the root: {entries:?}"
    );
}
