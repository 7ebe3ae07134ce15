//! `secrets-sidecar exec -- CMD` with real processes: a child shell script
//! that records its environment and the signals it traps sees the secrets
//! as environment variables; a rotation restarts it with the new value
//! (`restart`) or signals it (`signal:HUP`); signals sent to exec reach it
//! and exec exits with its status; a revocation stops it (`on_revoke =
//! "stop"`) or not (`"keep"`); a failed first fetch never starts it; as PID 1
//! exec reaps orphans; no value is in exec's own environment, command line
//! or logs; and `copy-to` (the injector's init container) copies the binary.

use std::path::{Path, PathBuf};
use std::process::Command;
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

/// A command that records what it is given: traps first (a signal that came
/// before them would kill it), then one `start PID DB_PASSWORD` line and
/// its whole environment in `env.PID`; one line per HUP, USR1 and TERM
/// (which it exits on, with status 7). It also ends when exec is gone.
fn child_script(world: &World) -> PathBuf {
    child_script_on_term(world, "exit 7")
}

/// [`child_script`] whose TERM trap runs `on_term` after logging.
fn child_script_on_term(world: &World, on_term: &str) -> PathBuf {
    let path = world.path("child.sh");
    let log = world.path("child.log");
    let dir = world.path("");
    std::fs::write(
        &path,
        format!(
            r#"trap 'echo "hup $$" >> {log}' HUP
trap 'echo "usr1 $$" >> {log}' USR1
trap 'echo "term $$" >> {log}; {on_term}' TERM
env > {dir}/env.$$
echo "start $$ $DB_PASSWORD" >> {log}
while kill -0 $PPID 2>/dev/null; do sleep 0.05; done
"#,
            log = log.display(),
            dir = dir.display(),
        ),
    )
    .unwrap();
    path
}

fn child_log(world: &World) -> Vec<String> {
    std::fs::read_to_string(world.path("child.log"))
        .unwrap_or_default()
        .lines()
        .map(str::to_owned)
        .collect()
}

/// Waits for the `n`-th `start` line; returns (pid, DB_PASSWORD).
fn nth_start(world: &World, n: usize, exec: &Proc) -> (u32, String) {
    wait_for(&format!("start #{n} of the command"), LONG, || {
        let starts: Vec<(u32, String)> = child_log(world)
            .iter()
            .filter_map(|l| {
                let mut w = l.splitn(3, ' ');
                (w.next()? == "start").then_some(())?;
                Some((w.next()?.parse().ok()?, w.next().unwrap_or("").to_owned()))
            })
            .collect();
        starts.get(n - 1).cloned()
    })
    .unwrap_or_else(|e| {
        panic!(
            "{e}\nchild: {:?}\nexec: {}",
            child_log(world),
            exec.log_text()
        )
    })
}

fn env_of(world: &World, pid: u32) -> String {
    std::fs::read_to_string(world.path(&format!("env.{pid}"))).unwrap_or_default()
}

/// An exec config for `payments/api`: `top` (top-level keys) and `tables`
/// (`[[env]]`, `[[secrets]]`…) after the usual keys.
/// A world whose broker serves `payments/db-password` = `value`, and a tmpfs
/// for the sidecar's files.
fn started(value: &str) -> (World, Proc, Tmpfs) {
    let world = World::new(ROLES).unwrap();
    world.put("payments/db-password", value).unwrap();
    let broker = world.start_broker("broker.log").unwrap();
    (world, broker, Tmpfs::new().unwrap())
}

fn exec_config(world: &World, tmpfs: &Tmpfs, top: &str, tables: &str) -> PathBuf {
    let token = world
        .token_file("api.token", &Workload::new("payments", "api", AUDIENCE))
        .unwrap();
    let cfg = world
        .sidecar_config("exec.toml", &token, &tmpfs.path, top, &[])
        .unwrap();
    let mut text = std::fs::read_to_string(&cfg).unwrap();
    text.push_str(tables);
    std::fs::write(&cfg, text).unwrap();
    cfg
}

fn start_exec(world: &World, cfg: &Path, args: &[&str], command: &[&str]) -> Proc {
    Proc::spawn(
        Command::new(bin("secrets-sidecar"))
            .arg("exec")
            .arg("--config")
            .arg(cfg)
            .args(args)
            .arg("--")
            .args(command)
            .env("INHERITED", "from-exec"),
        world.path("exec.log"),
    )
    .unwrap()
}

const ENV_TABLES: &str = r#"
[[secrets]]
name = "payments/user"
template_only = true

[[env]]
name = "DB_PASSWORD"
secret = "payments/db-password"

[[env]]
name = "DB_URL"
template = "postgres://{{ secrets['payments/user'] }}:{{ secrets['payments/db-password'] }}@db/app"
"#;

#[test]
fn the_command_sees_secrets_as_env_and_a_rotation_restarts_it_with_the_new_value() {
    let world = World::new(ROLES).unwrap();
    world.put("payments/db-password", "pw-one-8d1f").unwrap();
    world.put("payments/user", "app").unwrap();
    let _broker = world.start_broker("broker.log").unwrap();
    let tmpfs = Tmpfs::new().unwrap();
    let cfg = exec_config(
        &world,
        &tmpfs,
        "on_change_debounce = \"100ms\"\nrestart_grace = \"20s\"",
        ENV_TABLES,
    );
    let script = child_script(&world);
    let mut exec = start_exec(&world, &cfg, &[], &["sh", script.to_str().unwrap()]);

    let (pid1, pw) = nth_start(&world, 1, &exec);
    assert_eq!(pw, "pw-one-8d1f");
    let env = env_of(&world, pid1);
    assert!(
        env.contains("\nDB_URL=postgres://app:pw-one-8d1f@db/app\n"),
        "{env}"
    );
    assert!(
        env.contains("\nINHERITED=from-exec\n"),
        "exec's environment is passed on: {env}"
    );
    assert!(!env.contains("SECRETS_SIDECAR_"), "{env}");

    // No value in exec's own environment or command line.
    let exec_pid = exec.child.id();
    for what in ["environ", "cmdline"] {
        let bytes = std::fs::read(format!("/proc/{exec_pid}/{what}")).unwrap();
        let text = String::from_utf8_lossy(&bytes);
        assert!(!text.contains("pw-one"), "/proc/{exec_pid}/{what}: {text}");
        assert!(
            !text.contains("DB_PASSWORD"),
            "/proc/{exec_pid}/{what}: {text}"
        );
    }
    // The command's own environment holds it (the README says so).
    let child_environ = std::fs::read(format!("/proc/{pid1}/environ")).unwrap();
    assert!(String::from_utf8_lossy(&child_environ).contains("DB_PASSWORD=pw-one-8d1f"));

    // A rotation: the command is stopped (restart_signal TERM), then started
    // again with the new value — never both at once, never the old value.
    world.put("payments/db-password", "pw-two-5c2e").unwrap();
    let (pid2, pw) = nth_start(&world, 2, &exec);
    assert_eq!(pw, "pw-two-5c2e");
    assert_ne!(pid1, pid2);
    assert!(env_of(&world, pid2).contains("\nDB_URL=postgres://app:pw-two-5c2e@db/app\n"));
    let log = child_log(&world);
    let term = log.iter().position(|l| *l == format!("term {pid1}"));
    let start2 = log
        .iter()
        .position(|l| l.starts_with(&format!("start {pid2} ")));
    assert!(term.is_some() && term < start2, "{log:?}");

    // A second rotation of another secret used by a template restarts it too.
    world.put("payments/user", "app2").unwrap();
    let (pid3, _) = nth_start(&world, 3, &exec);
    assert!(env_of(&world, pid3).contains("\nDB_URL=postgres://app2:pw-two-5c2e@db/app\n"));

    // SIGTERM to exec reaches the command, and exec exits with its status.
    exec.signal("TERM");
    let status = exec.wait_exit(LONG).unwrap();
    assert_eq!(status.code(), Some(7), "{}", exec.log_text());
    assert!(child_log(&world).contains(&format!("term {pid3}")));

    // The logs (debug level) name the variables, never a value.
    let text = exec.log_text();
    assert!(text.contains("started the command"), "{text}");
    for value in ["pw-one", "pw-two", "app2@", ":pw-"] {
        assert!(!text.contains(value), "{value} in exec's log:\n{text}");
    }
}

#[test]
fn a_command_that_ignores_the_restart_signal_is_killed_after_restart_grace() {
    let (world, _broker, tmpfs) = started("pw-a");
    let cfg = exec_config(
        &world,
        &tmpfs,
        "on_change_debounce = \"0s\"\nrestart_grace = \"1s\"",
        "[[env]]\nname = \"DB_PASSWORD\"\nsecret = \"payments/db-password\"\n",
    );
    // Its TERM trap logs and carries on.
    let script = child_script_on_term(&world, "true");
    let mut exec = start_exec(&world, &cfg, &[], &["sh", script.to_str().unwrap()]);
    let (pid1, _) = nth_start(&world, 1, &exec);
    world.put("payments/db-password", "pw-b").unwrap();
    let (pid2, pw) = nth_start(&world, 2, &exec);
    assert_eq!(pw, "pw-b");
    assert!(child_log(&world).contains(&format!("term {pid1}")));
    assert!(
        exec.log_text()
            .contains("the command did not stop within restart_grace: SIGKILL"),
        "{}",
        exec.log_text()
    );
    assert!(
        !Path::new(&format!("/proc/{pid1}")).exists(),
        "killed and reaped"
    );
    // exec's own SIGTERM is forwarded; this command ignores it, and exec
    // waits for it (Kubernetes kills the pod after its grace period).
    exec.signal("TERM");
    wait_for("TERM forwarded", LONG, || {
        child_log(&world)
            .contains(&format!("term {pid2}"))
            .then_some(())
    })
    .unwrap();
    assert!(exec.child.try_wait().unwrap().is_none());
    Command::new("kill")
        .args(["-KILL", &pid2.to_string()])
        .status()
        .unwrap();
    assert_eq!(exec.wait_exit(LONG).unwrap().code(), Some(137));
}

#[test]
fn signal_mode_signals_the_command_which_keeps_running_and_rereads_its_files() {
    let (world, _broker, tmpfs) = started("pw-1");
    let cfg = exec_config(
        &world,
        &tmpfs,
        "on_change = \"signal:HUP\"\non_change_debounce = \"100ms\"",
        "[[secrets]]\nname = \"payments/db-password\"\nfile = \"db-password\"\n\n\
         [[env]]\nname = \"DB_PASSWORD\"\nsecret = \"payments/db-password\"\n",
    );
    let script = child_script(&world);
    let mut exec = start_exec(&world, &cfg, &[], &["sh", script.to_str().unwrap()]);
    let (pid, pw) = nth_start(&world, 1, &exec);
    assert_eq!(pw, "pw-1");
    let file = tmpfs.path.join("db-password");
    assert_eq!(std::fs::read_to_string(&file).unwrap(), "pw-1");

    world.put("payments/db-password", "pw-2").unwrap();
    wait_for("SIGHUP to the command", LONG, || {
        child_log(&world)
            .contains(&format!("hup {pid}"))
            .then_some(())
    })
    .unwrap_or_else(|e| panic!("{e}\n{:?}\n{}", child_log(&world), exec.log_text()));
    // The files were complete before the signal; the process is the same one.
    assert_eq!(std::fs::read_to_string(&file).unwrap(), "pw-2");
    assert_eq!(
        child_log(&world)
            .iter()
            .filter(|l| l.starts_with("start "))
            .count(),
        1
    );
    exec.signal("TERM");
    assert_eq!(exec.wait_exit(LONG).unwrap().code(), Some(7));
    assert!(!file.exists(), "files removed when exec stops");
}

#[test]
fn signals_reach_the_command_and_exec_exits_with_its_status() {
    let (world, _broker, tmpfs) = started("pw");
    let cfg = exec_config(
        &world,
        &tmpfs,
        "",
        "[[env]]\nname = \"DB_PASSWORD\"\nsecret = \"payments/db-password\"\n",
    );
    let script = child_script(&world);

    // HUP and USR1 are forwarded; the command keeps running.
    let mut exec = start_exec(&world, &cfg, &[], &["sh", script.to_str().unwrap()]);
    let (pid, _) = nth_start(&world, 1, &exec);
    for (sig, line) in [("HUP", "hup"), ("USR1", "usr1")] {
        exec.signal(sig);
        wait_for(&format!("{sig} forwarded"), LONG, || {
            child_log(&world)
                .contains(&format!("{line} {pid}"))
                .then_some(())
        })
        .unwrap_or_else(|e| panic!("{e}\n{}", exec.log_text()));
    }
    assert!(
        exec.child.try_wait().unwrap().is_none(),
        "exec keeps running"
    );
    exec.signal("TERM");
    assert_eq!(exec.wait_exit(LONG).unwrap().code(), Some(7));

    // A command that exits 3 makes exec exit 3.
    let mut exec = start_exec(&world, &cfg, &[], &["sh", "-c", "exit 3"]);
    assert_eq!(
        exec.wait_exit(LONG).unwrap().code(),
        Some(3),
        "{}",
        exec.log_text()
    );
    // One killed by a signal: 128 + the signal, as a shell reports it.
    let mut exec = start_exec(&world, &cfg, &[], &["sh", "-c", "kill -KILL $$"]);
    assert_eq!(exec.wait_exit(LONG).unwrap().code(), Some(137));
    // A command that does not exist: 127, before any login.
    let mut exec = start_exec(&world, &cfg, &[], &["no-such-command-anywhere"]);
    assert_eq!(exec.wait_exit(LONG).unwrap().code(), Some(127));
    assert!(
        exec.log_text()
            .contains("cannot run \"no-such-command-anywhere\""),
        "{}",
        exec.log_text()
    );
    // exec refuses a [notify] command (it reaps every child itself).
    let bad = exec_config(
        &world,
        &tmpfs,
        "",
        "[notify]\ncommand = [\"/bin/true\"]\n[[env]]\nname = \"A\"\nsecret = \"payments/db-password\"\n",
    );
    let mut exec = start_exec(&world, &bad, &[], &["true"]);
    assert_eq!(exec.wait_exit(LONG).unwrap().code(), Some(2));
    assert!(exec.log_text().contains("notify.command"));
}

#[test]
fn a_failed_first_fetch_exits_non_zero_and_never_starts_the_command() {
    let world = World::new(ROLES).unwrap();
    // No broker: every login fails.
    let tmpfs = Tmpfs::new().unwrap();
    let cfg = exec_config(
        &world,
        &tmpfs,
        "",
        "[[env]]\nname = \"DB_PASSWORD\"\nsecret = \"payments/db-password\"\n",
    );
    let marker = world.path("started");
    let mut exec = start_exec(
        &world,
        &cfg,
        &["--timeout", "2s"],
        &["sh", "-c", &format!("touch {}", marker.display())],
    );
    let status = exec.wait_exit(LONG).unwrap();
    let log = exec.log_text();
    assert_eq!(status.code(), Some(1), "{log}");
    assert!(
        log.contains("the command was not started: no complete set of secrets after 2s: "),
        "{log}"
    );
    assert!(log.contains("broker"), "the reason is named: {log}");
    assert!(!marker.exists(), "the command never ran");

    // A secret the broker does not have: the reason says so.
    world.put("payments/other", "x").unwrap();
    let _broker = world.start_broker("broker.log").unwrap();
    let mut exec = start_exec(
        &world,
        &cfg,
        &["--timeout", "3s"],
        &["sh", "-c", &format!("touch {}", marker.display())],
    );
    assert_eq!(exec.wait_exit(LONG).unwrap().code(), Some(1));
    assert!(exec.log_text().contains("NOT_FOUND"), "{}", exec.log_text());
    assert!(!marker.exists());
}

fn revoke_api(world: &World) -> String {
    let o = world
        .brokerctl(
            Some("revoker"),
            &[
                "--output",
                "json",
                "revoke",
                "--namespace",
                "payments",
                "--service-account",
                "api",
                "--reason",
                "compromised",
            ],
        )
        .unwrap();
    assert!(o.status.success(), "{}", out_text(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    v["rule"]["id"].as_str().unwrap().to_owned()
}

#[test]
fn a_revocation_stops_the_command_under_on_revoke_stop_and_not_under_keep() {
    let (world, _broker, tmpfs) = started("pw");
    let tables = "[[env]]\nname = \"DB_PASSWORD\"\nsecret = \"payments/db-password\"\n";

    // keep: the command runs on with what it has.
    let cfg = exec_config(&world, &tmpfs, "on_revoke = \"keep\"", tables);
    let script = child_script(&world);
    let mut exec = start_exec(&world, &cfg, &[], &["sh", script.to_str().unwrap()]);
    let (pid, _) = nth_start(&world, 1, &exec);
    let rule = revoke_api(&world);
    wait_for("the revocation reaches exec", LONG, || {
        exec.log_text()
            .contains("the command keeps running with the environment it has")
            .then_some(())
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", exec.log_text()));
    assert!(exec.child.try_wait().unwrap().is_none());
    assert!(!child_log(&world).contains(&format!("term {pid}")));
    exec.signal("TERM");
    assert_eq!(exec.wait_exit(LONG).unwrap().code(), Some(7));
    let o = world
        .brokerctl(Some("revoker"), &["revocations", "delete", &rule])
        .unwrap();
    assert!(o.status.success(), "{}", out_text(&o));

    // stop (the default): the command is stopped and exec exits non-zero.
    let cfg = exec_config(&world, &tmpfs, "", tables);
    let _ = std::fs::remove_file(world.path("child.log"));
    let mut exec = start_exec(&world, &cfg, &[], &["sh", script.to_str().unwrap()]);
    let (pid, _) = nth_start(&world, 1, &exec);
    let rule = revoke_api(&world);
    let status = exec.wait_exit(LONG).unwrap();
    let log = exec.log_text();
    assert_eq!(status.code(), Some(1), "{log}");
    assert!(
        child_log(&world).contains(&format!("term {pid}")),
        "the command got restart_signal: {:?}",
        child_log(&world)
    );
    assert!(
        log.contains(&format!(
            "access revoked (rule {rule}) for payments/db-password: stopped the command"
        )),
        "{log}"
    );
    // Restarted (as Kubernetes would) while the rule holds: it waits in
    // login, and gives up after --timeout without starting the command.
    let mut again = start_exec(
        &world,
        &cfg,
        &["--timeout", "3s"],
        &["sh", script.to_str().unwrap()],
    );
    assert_eq!(again.wait_exit(LONG).unwrap().code(), Some(1));
    assert!(
        again.log_text().contains("PERMISSION_DENIED"),
        "{}",
        again.log_text()
    );
    assert_eq!(
        child_log(&world)
            .iter()
            .filter(|l| l.starts_with("start "))
            .count(),
        1
    );
}

#[test]
fn env_clean_gives_the_command_only_its_variables() {
    let (world, _broker, tmpfs) = started("pw-clean");
    let cfg = exec_config(
        &world,
        &tmpfs,
        "env_clean = true",
        "[[env]]\nname = \"DB_PASSWORD\"\nsecret = \"payments/db-password\"\n",
    );
    let out = world.path("clean-env");
    let mut exec = start_exec(
        &world,
        &cfg,
        &[],
        &[
            "/bin/sh",
            "-c",
            &format!("/usr/bin/env > {}", out.display()),
        ],
    );
    assert_eq!(
        exec.wait_exit(LONG).unwrap().code(),
        Some(0),
        "{}",
        exec.log_text()
    );
    let env = std::fs::read_to_string(&out).unwrap();
    assert!(env.contains("DB_PASSWORD=pw-clean\n"), "{env}");
    assert!(
        !env.contains("INHERITED") && !env.contains("RUST_LOG"),
        "{env}"
    );
}

#[test]
fn copy_to_puts_a_runnable_binary_in_a_directory_again_and_again() {
    // The init container of the injector's mode exec, run twice (a pod
    // restart keeps the emptyDir).
    let dir = tempfile::tempdir().unwrap();
    for _ in 0..2 {
        let out = Command::new(bin("secrets-sidecar"))
            .arg("copy-to")
            .arg(dir.path())
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", out_text(&out));
    }
    let copy = dir.path().join("secrets-sidecar");
    let mode =
        std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&copy).unwrap().permissions());
    assert_eq!(mode & 0o777, 0o555);
    let out = Command::new(&copy).arg("--version").output().unwrap();
    assert!(
        String::from_utf8_lossy(&out.stdout).starts_with("secrets-sidecar "),
        "{}",
        out_text(&out)
    );
    let names: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names, ["secrets-sidecar"], "no temporary file left");
}

/// The processes whose parent is `ppid`: (pid, state letter).
fn children_of(ppid: u32) -> Vec<(u32, char)> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        let Some((_, rest)) = stat.rsplit_once(')') else {
            continue;
        };
        let fields: Vec<&str> = rest.split_whitespace().collect();
        if fields.get(1).and_then(|p| p.parse::<u32>().ok()) == Some(ppid) {
            out.push((pid, fields[0].chars().next().unwrap_or('?')));
        }
    }
    out
}

#[test]
fn as_pid_1_exec_forwards_sigterm_and_reaps_orphans() {
    let is_root = Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| o.stdout.starts_with(b"0\n"));
    if !is_root {
        eprintln!("skipped: a PID namespace needs root (CI runs the tests as root)");
        return;
    }
    let (world, _broker, tmpfs) = started("pw");
    let cfg = exec_config(
        &world,
        &tmpfs,
        "",
        "[[env]]\nname = \"DB_PASSWORD\"\nsecret = \"payments/db-password\"\n",
    );
    let marker = world.path("orphans-made");
    // The command leaves three orphans (their parent subshells exit at
    // once), which the kernel gives to PID 1: exec. Then it sleeps.
    let script = format!(
        "(sleep 0.2 &); (sleep 0.3 &); (sleep 0.4 &); touch {}; exec sleep 300",
        marker.display()
    );
    let mut unshare = Proc::spawn(
        Command::new("unshare")
            .args(["--pid", "--fork", "--mount-proc"])
            .arg(bin("secrets-sidecar"))
            .args(["exec", "--config"])
            .arg(&cfg)
            .args(["--", "sh", "-c", &script]),
        world.path("exec.log"),
    )
    .unwrap();
    let exec_pid = wait_for("exec as PID 1", LONG, || {
        children_of(unshare.child.id()).first().map(|c| c.0)
    })
    .unwrap();
    wait_for("the orphans", LONG, || marker.exists().then_some(()))
        .unwrap_or_else(|e| panic!("{e}\n{}", unshare.log_text()));
    wait_for("three orphans reaped", LONG, || {
        (unshare
            .log_text()
            .matches("reaped an orphaned process")
            .count()
            >= 3)
            .then_some(())
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", unshare.log_text()));
    let kids = children_of(exec_pid);
    assert!(
        kids.iter().all(|(_, state)| *state != 'Z'),
        "zombies under exec: {kids:?}"
    );
    assert_eq!(kids.len(), 1, "only the command is left: {kids:?}");
    // SIGTERM to PID 1 reaches the command (sleep dies of it): 128 + 15.
    Command::new("kill")
        .args(["-TERM", &exec_pid.to_string()])
        .status()
        .unwrap();
    assert_eq!(
        unshare.wait_exit(LONG).unwrap().code(),
        Some(143),
        "{}",
        unshare.log_text()
    );
}
