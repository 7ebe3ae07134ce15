//! `secrets-sidecar exec [--config FILE] -- CMD [ARGS…]`: secrets as
//! environment variables of a supervised command.
//!
//! [`exec`] runs the keeper of `run` ([`crate::run_observed`]: files, local
//! API, renewals, rotations, revocations as configured) and, beside it, one
//! supervision loop that reads top to bottom:
//!
//! 1. **Wait** until every configured secret is held (a failed first fetch
//!    is retried as `run` does, for at most `--timeout`; then exec exits 1
//!    with the reason, without ever starting the command).
//! 2. **Start** the command with the `[[env]]` values added to exec's own
//!    environment (or, with `env_clean`, as its whole environment).
//! 3. **On a new generation** — debounced by `on_change_debounce`, and only
//!    ever looking at a generation already complete on disk, since the
//!    keeper shows it only then — render the environment again; when a value
//!    changed (or, when there are files, when the files did), apply
//!    `on_change`: `restart` (`restart_signal`, wait `restart_grace`,
//!    SIGKILL, start again with the new environment), `signal:SIG`, `none`.
//! 4. **On a revocation**, at once: `on_revoke = "stop"` stops the command
//!    the same way and exec exits 1; `"keep"` leaves it running.
//! 5. **As PID 1**: SIGTERM, SIGINT, SIGHUP, SIGQUIT, SIGUSR1 and SIGUSR2
//!    go to the command; every child that exits is reaped; when the command
//!    exits on its own, exec stops the keeper (files removed as configured)
//!    and exits with its status (128 + the signal when a signal killed it).
//!
//! Reaping, without `unsafe`: the command is started with
//! `std::process::Command` (its `Child` handle is never waited on) and exec
//! collects every exited child itself with `waitpid(-1, WNOHANG)` (rustix)
//! each time SIGCHLD arrives (a tokio signal stream, so signals that
//! coalesce are still all collected). That reaps orphans reparented to exec
//! when it is PID 1 exactly like its own command, and needs nothing of
//! tokio's child handling, which would race with it for the same children
//! (so exec refuses `[notify] command`, a child tokio would wait for).
//!
//! Where the values are: in exec's memory in zeroizing types, in the
//! command's environment (so in its `/proc/<pid>/environ`, readable by its
//! UID and root), and briefly in the `std::process::Command` that starts it,
//! whose copies are freed but not zeroed. Never in exec's own environment,
//! argv or logs: exec logs variable names, never values. The command inherits
//! exec's `RLIMIT_CORE` of 0, so a crash does not write its environment to a
//! core file.

use std::collections::HashMap;
use std::ffi::{OsStr, OsString};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rustix::process::{Pid, Signal, WaitOptions};
use tokio::sync::{oneshot, watch};
use tokio::time::Instant;
use tracing::{debug, error, info, warn};
use zeroize::Zeroizing;

use crate::config::{CONFIG_ENV, Config, EnvSource, EnvSpec, OnChange, OnRevoke, TemplateSpec};
use crate::{SidecarError, State, StateSecret};

/// Variables of exec's own environment that the command does not get: the
/// sidecar's config (how the injector configures exec) and its log format.
pub const OWN_ENV: &[&str] = &[CONFIG_ENV, "SECRETS_SIDECAR_LOG_FORMAT"];

/// What `exec` runs and how long it waits for the first secrets.
#[derive(Debug, Clone)]
pub struct ExecOptions {
    /// The command and its arguments; `argv[0]` is looked up in `PATH`
    /// unless it contains a `/`.
    pub argv: Vec<OsString>,
    /// How long to retry the first login and fetch before giving up.
    pub first_fetch_timeout: Duration,
}

/// Why `exec` stopped without an exit status of its command.
#[derive(Debug, thiserror::Error)]
pub enum ExecError {
    /// A config setting that exec cannot honour.
    #[error("{0}")]
    Config(String),
    /// The command does not exist (exit 127, as a shell).
    #[error("cannot run {program:?}: {message}")]
    NotFound { program: String, message: String },
    /// The command exists but cannot be run: permissions, not an executable
    /// (exit 126, as a shell).
    #[error("cannot run {program:?}: {message}")]
    CannotRun { program: String, message: String },
    /// The secrets never were all there, so the command was never started.
    #[error("the command was not started: no complete set of secrets after {}: {reason}", humantime::format_duration(*.timeout))]
    FirstFetch { timeout: Duration, reason: String },
    /// The environment cannot be made from the secrets (a NUL byte, a
    /// template that does not render).
    #[error("the command was not started: {0}")]
    Env(#[from] EnvError),
    /// An operator revoked access and `on_revoke = "stop"`.
    #[error(
        "access revoked (rule {rules}) for {secrets}: stopped the command (on_revoke = \"stop\"); exiting non-zero so the container restarts and waits in login until the rule is lifted"
    )]
    Revoked { rules: String, secrets: String },
    /// The keeper stopped with an error that no retry fixes.
    #[error(transparent)]
    Sidecar(#[from] SidecarError),
    /// A signal handler could not be installed.
    #[error("cannot handle signals: {0}")]
    Setup(std::io::Error),
}

impl ExecError {
    /// exec's exit status for this error: 2 for config, 126/127 as a shell
    /// for a command that cannot run, 1 otherwise.
    pub fn exit_code(&self) -> u8 {
        match self {
            ExecError::Config(_) => 2,
            ExecError::NotFound { .. } => 127,
            ExecError::CannotRun { .. } => 126,
            _ => 1,
        }
    }
}

/// The command's variables, in config order. The values zeroize on drop;
/// `Debug` shows the names only.
#[derive(Clone, PartialEq, Eq, Default)]
pub struct Environment(Vec<(String, Zeroizing<Vec<u8>>)>);

impl std::fmt::Debug for Environment {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_map()
            .entries(self.0.iter().map(|(name, _)| (name, "[redacted]")))
            .finish()
    }
}

impl Environment {
    /// The variable names, for logs.
    pub fn names(&self) -> Vec<&str> {
        self.0.iter().map(|(n, _)| n.as_str()).collect()
    }
}

/// Why the environment cannot be made from what is held. Never a value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EnvError {
    /// The secret is not held: not fetched yet, revoked, or its lease ended.
    #[error("environment variable {name}: secret {secret:?} is not held")]
    Missing { name: String, secret: String },
    /// A value with a NUL byte, which no environment variable can carry.
    #[error(
        "environment variable {name}: the value contains a NUL byte, which an environment variable cannot hold"
    )]
    Nul { name: String },
    /// A template that does not render (a secret it uses is missing…).
    #[error("environment variable {name}: {message}")]
    Template { name: String, message: String },
}

/// Renders `[[env]]` from held secrets.
pub struct EnvRenderer {
    specs: Vec<EnvSpec>,
    templates: crate::render::Templates,
}

impl EnvRenderer {
    pub fn new(specs: &[EnvSpec]) -> Result<EnvRenderer, EnvError> {
        let template_specs: Vec<TemplateSpec> = specs
            .iter()
            .filter_map(|s| match &s.source {
                EnvSource::Template(t) => Some(TemplateSpec {
                    file: s.name.clone(),
                    source: t.clone(),
                    mode: None,
                    uid: None,
                    gid: None,
                }),
                EnvSource::Secret(_) => None,
            })
            .collect();
        let templates =
            crate::render::Templates::new(&template_specs).map_err(|e| EnvError::Template {
                name: e.file.clone(),
                message: e.to_string(),
            })?;
        Ok(EnvRenderer {
            specs: specs.to_vec(),
            templates,
        })
    }

    /// The environment from `secrets`, or the first variable that cannot be made.
    pub fn render(&self, secrets: &HashMap<String, StateSecret>) -> Result<Environment, EnvError> {
        let mut rendered: HashMap<String, Result<Zeroizing<Vec<u8>>, String>> = HashMap::new();
        if !self.templates.is_empty() {
            let values: HashMap<&str, &[u8]> = secrets
                .iter()
                .map(|(k, s)| (k.as_str(), s.value.as_slice()))
                .collect();
            for (spec, result) in self.templates.render(&values) {
                rendered.insert(spec.file.clone(), result.map_err(|e| e.to_string()));
            }
        }
        let mut out = Vec::with_capacity(self.specs.len());
        for spec in &self.specs {
            let value = match &spec.source {
                EnvSource::Secret(secret) => match secrets.get(secret) {
                    Some(s) => s.value.clone(),
                    None => {
                        return Err(EnvError::Missing {
                            name: spec.name.clone(),
                            secret: secret.clone(),
                        });
                    }
                },
                EnvSource::Template(_) => match rendered.remove(&spec.name) {
                    Some(Ok(v)) => v,
                    other => {
                        return Err(EnvError::Template {
                            name: spec.name.clone(),
                            message: other
                                .and_then(Result::err)
                                .unwrap_or_else(|| "not rendered".into()),
                        });
                    }
                },
            };
            if value.contains(&0) {
                return Err(EnvError::Nul {
                    name: spec.name.clone(),
                });
            }
            out.push((spec.name.clone(), value));
        }
        Ok(Environment(out))
    }
}

/// exec's exit status for a child that exited with `code` or was killed by
/// `signal`: the code, or 128 + the signal (as a shell reports it).
pub fn exit_code(code: Option<i32>, signal: Option<i32>) -> u8 {
    match (code, signal) {
        (Some(c), _) => (c & 0xff) as u8,
        (None, Some(s)) => (128 + s).clamp(0, 255) as u8,
        (None, None) => 1,
    }
}

/// Finds `program` as a shell would: as given when it contains a `/`, else
/// in the directories of `path` (exec's own `PATH`).
pub fn resolve_program(program: &OsStr, path: Option<&OsStr>) -> Result<PathBuf, ExecError> {
    let shown = program.to_string_lossy().into_owned();
    if program.is_empty() {
        return Err(ExecError::NotFound {
            program: shown,
            message: "empty command".into(),
        });
    }
    let check = |p: &Path| -> Result<(), ExecError> {
        match std::fs::metadata(p) {
            Ok(m) if m.is_file() && m.permissions().mode() & 0o111 != 0 => Ok(()),
            Ok(m) if m.is_dir() => Err(ExecError::CannotRun {
                program: shown.clone(),
                message: format!("{} is a directory", p.display()),
            }),
            Ok(_) => Err(ExecError::CannotRun {
                program: shown.clone(),
                message: format!("{} is not executable", p.display()),
            }),
            Err(e) => Err(ExecError::NotFound {
                program: shown.clone(),
                message: format!("{}: {e}", p.display()),
            }),
        }
    };
    if program.as_bytes().contains(&b'/') {
        let p = PathBuf::from(program);
        check(&p)?;
        return Ok(p);
    }
    let path = path.unwrap_or(OsStr::new("/usr/local/bin:/usr/bin:/bin"));
    let mut last = None;
    for dir in std::env::split_paths(path) {
        let candidate = dir.join(program);
        match check(&candidate) {
            Ok(()) => return Ok(candidate),
            Err(e @ ExecError::CannotRun { .. }) => last = Some(e),
            Err(_) => {}
        }
    }
    Err(last.unwrap_or(ExecError::NotFound {
        program: shown,
        message: "not found in PATH".into(),
    }))
}

/// How to start the command.
struct Launcher {
    program: PathBuf,
    argv: Vec<OsString>,
    env_clean: bool,
}

impl Launcher {
    fn spawn(&self, env: &Environment) -> Result<Pid, ExecError> {
        let mut cmd = std::process::Command::new(&self.program);
        cmd.arg0(&self.argv[0]).args(&self.argv[1..]);
        if self.env_clean {
            cmd.env_clear();
        } else {
            for name in OWN_ENV {
                cmd.env_remove(name);
            }
        }
        for (name, value) in &env.0 {
            cmd.env(name, OsStr::from_bytes(value));
        }
        let shown = self.argv[0].to_string_lossy().into_owned();
        // The `Child` is dropped unwaited: its status comes from `reap`.
        let child = cmd.spawn().map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => ExecError::NotFound {
                program: shown.clone(),
                message: e.to_string(),
            },
            _ => ExecError::CannotRun {
                program: shown.clone(),
                message: e.to_string(),
            },
        })?;
        Pid::from_raw(child.id() as i32).ok_or_else(|| ExecError::CannotRun {
            program: shown,
            message: "no process ID".into(),
        })
    }
}

/// The signals exec handles: the six it forwards, and SIGCHLD.
struct Signals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
    hup: tokio::signal::unix::Signal,
    quit: tokio::signal::unix::Signal,
    usr1: tokio::signal::unix::Signal,
    usr2: tokio::signal::unix::Signal,
    chld: tokio::signal::unix::Signal,
}

enum Got {
    Forward(Signal),
    Child,
}

impl Signals {
    fn new() -> std::io::Result<Signals> {
        use tokio::signal::unix::{SignalKind, signal};
        Ok(Signals {
            term: signal(SignalKind::terminate())?,
            int: signal(SignalKind::interrupt())?,
            hup: signal(SignalKind::hangup())?,
            quit: signal(SignalKind::quit())?,
            usr1: signal(SignalKind::user_defined1())?,
            usr2: signal(SignalKind::user_defined2())?,
            chld: signal(SignalKind::child())?,
        })
    }

    async fn next(&mut self) -> Got {
        tokio::select! {
            Some(()) = self.chld.recv() => Got::Child,
            Some(()) = self.term.recv() => Got::Forward(Signal::TERM),
            Some(()) = self.int.recv() => Got::Forward(Signal::INT),
            Some(()) = self.hup.recv() => Got::Forward(Signal::HUP),
            Some(()) = self.quit.recv() => Got::Forward(Signal::QUIT),
            Some(()) = self.usr1.recv() => Got::Forward(Signal::USR1),
            Some(()) = self.usr2.recv() => Got::Forward(Signal::USR2),
        }
    }
}

/// A signal's name for logs (`SIGTERM`).
pub fn signal_name(sig: Signal) -> &'static str {
    match sig {
        Signal::TERM => "SIGTERM",
        Signal::INT => "SIGINT",
        Signal::HUP => "SIGHUP",
        Signal::QUIT => "SIGQUIT",
        Signal::USR1 => "SIGUSR1",
        Signal::USR2 => "SIGUSR2",
        Signal::KILL => "SIGKILL",
        _ => "a signal",
    }
}

/// Signals that ask exec to end (forwarded, and no restart after them).
fn is_terminating(sig: Signal) -> bool {
    matches!(sig, Signal::TERM | Signal::INT | Signal::QUIT)
}

/// The command as exec last started it or acted for it.
struct Running {
    pid: Pid,
    /// What `on_change` last acted on: a change is measured from here.
    env: Environment,
    generation: u64,
}

/// What happens once a stopping command has exited.
enum Then {
    /// Start it again with this environment (of this generation), unless
    /// a terminating signal came meanwhile (then exit with its status).
    Restart(Environment, u64),
    /// Exit with this error.
    Fail(ExecError),
}

enum Phase {
    /// Not started yet: waiting for every secret, at most until the deadline.
    Waiting {
        deadline: Instant,
    },
    Running(Running),
    /// Sent `restart_signal`; SIGKILL at `kill_at` if still there.
    Stopping {
        child: Running,
        kill_at: Option<Instant>,
        then: Then,
    },
}

impl Phase {
    fn pid(&self) -> Option<Pid> {
        match self {
            Phase::Waiting { .. } => None,
            Phase::Running(r) | Phase::Stopping { child: r, .. } => Some(r.pid),
        }
    }
}

fn send(pid: Pid, sig: Signal) {
    if let Err(e) = rustix::process::kill_process(pid, sig) {
        // ESRCH: it exited already; SIGCHLD tells.
        debug!(pid = pid.as_raw_nonzero().get(), signal = signal_name(sig), error = %e, "cannot signal the command");
    }
}

/// Reaps every exited child (the command, and orphans when exec is PID 1);
/// returns the command's exit status if it is among them.
fn reap(command: Option<Pid>) -> Option<u8> {
    let mut status = None;
    loop {
        match rustix::process::waitpid(None, WaitOptions::NOHANG) {
            Ok(Some((pid, s))) => {
                let code = exit_code(s.exit_status(), s.terminating_signal());
                if Some(pid) == command {
                    status = Some(code);
                } else {
                    debug!(
                        pid = pid.as_raw_nonzero().get(),
                        status = code,
                        "reaped an orphaned process"
                    );
                }
            }
            // None: children remain, none exited; ECHILD: no children at all.
            Ok(None) | Err(_) => return status,
        }
    }
}

/// The supervisor's view of the configuration.
struct Supervisor {
    cfg: Config,
    renderer: EnvRenderer,
    launcher: Launcher,
    /// Whether a generation writes files (then a new one is a change even
    /// when the environment is the same).
    has_files: bool,
    timeout: Duration,
    /// A terminating signal arrived: no restart after it.
    ending: bool,
}

enum Step {
    Continue,
    Done(Result<u8, ExecError>),
}

impl Supervisor {
    fn complete(&self, state: &State) -> bool {
        self.cfg
            .secrets
            .iter()
            .all(|s| state.secrets.contains_key(&s.name))
    }

    /// Why the set is not complete, for the error after `--timeout`.
    fn missing_reason(&self, state: &State) -> String {
        let mut parts = Vec::new();
        if let Some(e) = &state.last_error {
            parts.push(e.clone());
        }
        if !state.revoked.is_empty() {
            parts.push(revoked_text(state));
        }
        let missing: Vec<&str> = self
            .cfg
            .secrets
            .iter()
            .filter(|s| {
                !state.secrets.contains_key(&s.name) && !state.revoked.contains_key(&s.name)
            })
            .map(|s| s.name.as_str())
            .collect();
        if parts.is_empty() && !missing.is_empty() {
            parts.push(format!("not fetched yet: {}", missing.join(", ")));
        }
        parts.join("; ")
    }

    /// Starts the command with `env`.
    fn start(&self, env: Environment, generation: u64) -> Result<Phase, ExecError> {
        let pid = self.launcher.spawn(&env)?;
        info!(
            pid = pid.as_raw_nonzero().get(),
            command = %self.launcher.program.display(),
            env = ?env.names(),
            "started the command"
        );
        Ok(Phase::Running(Running {
            pid,
            env,
            generation,
        }))
    }

    /// Asks the command to stop (`restart_signal`, SIGKILL after `restart_grace`).
    fn stop(&self, child: Running, then: Then) -> Phase {
        send(child.pid, self.cfg.exec.restart_signal);
        Phase::Stopping {
            child,
            kill_at: Some(Instant::now() + self.cfg.exec.restart_grace),
            then,
        }
    }

    /// A new state from the keeper.
    fn on_state(
        &self,
        phase: Phase,
        state: &State,
        debounce_at: &mut Option<Instant>,
    ) -> (Phase, Step) {
        let revoked = !state.revoked.is_empty();
        let stop_on_revoke = revoked && self.cfg.exec.on_revoke == OnRevoke::Stop;
        match phase {
            Phase::Waiting { deadline } => {
                if !self.complete(state) {
                    return (Phase::Waiting { deadline }, Step::Continue);
                }
                match self.renderer.render(&state.secrets) {
                    Err(e) => (Phase::Waiting { deadline }, Step::Done(Err(e.into()))),
                    Ok(env) => match self.start(env, state.generations) {
                        Ok(p) => (p, Step::Continue),
                        Err(e) => (Phase::Waiting { deadline }, Step::Done(Err(e))),
                    },
                }
            }
            Phase::Running(child) if stop_on_revoke => {
                warn!(revoked = %revoked_text(state), "access revoked: stopping the command (on_revoke = \"stop\")");
                let then = Then::Fail(revoked_error(state));
                (self.stop(child, then), Step::Continue)
            }
            Phase::Running(child) => {
                if revoked {
                    warn!(revoked = %revoked_text(state), "access revoked: the command keeps running with the environment it has (on_revoke = \"keep\")");
                }
                *debounce_at = Some(Instant::now() + self.cfg.exec.debounce);
                (Phase::Running(child), Step::Continue)
            }
            Phase::Stopping {
                child,
                kill_at,
                then,
            } => {
                let then = match then {
                    Then::Restart(..) if stop_on_revoke => {
                        warn!(revoked = %revoked_text(state), "access revoked while restarting: the command is not started again (on_revoke = \"stop\")");
                        Then::Fail(revoked_error(state))
                    }
                    other => other,
                };
                (
                    Phase::Stopping {
                        child,
                        kill_at,
                        then,
                    },
                    Step::Continue,
                )
            }
        }
    }

    /// The debounce ran out: act on the latest generation if it changed
    /// what the command was given.
    fn on_settled(&self, mut child: Running, state: &State) -> Phase {
        if !self.complete(state) {
            debug!("the secrets are not all held; the command keeps what it has");
            return Phase::Running(child);
        }
        let env = match self.renderer.render(&state.secrets) {
            Ok(env) => env,
            Err(e) => {
                warn!(error = %e, "the new generation does not make an environment; the command keeps the one it has");
                return Phase::Running(child);
            }
        };
        let env_changed = env != child.env;
        let files_changed = self.has_files && state.generations != child.generation;
        if !env_changed && !files_changed {
            child.generation = state.generations;
            return Phase::Running(child);
        }
        let what = match (env_changed, files_changed) {
            (true, true) => "its environment and files",
            (true, false) => "its environment",
            _ => "its files",
        };
        let pid = child.pid.as_raw_nonzero().get();
        match self.cfg.exec.on_change {
            OnChange::Restart => {
                info!(pid, changed = what, signal = signal_name(self.cfg.exec.restart_signal), grace = ?self.cfg.exec.restart_grace, "a new generation changed what the command was given: restarting it");
                let then = Then::Restart(env, state.generations);
                self.stop(child, then)
            }
            OnChange::Signal(sig) => {
                info!(
                    pid,
                    changed = what,
                    signal = signal_name(sig),
                    "a new generation changed what the command was given: signalling it"
                );
                send(child.pid, sig);
                child.env = env;
                child.generation = state.generations;
                Phase::Running(child)
            }
            OnChange::None => {
                info!(
                    pid,
                    changed = what,
                    "a new generation changed what the command was given; on_change = \"none\": leaving it be"
                );
                child.env = env;
                child.generation = state.generations;
                Phase::Running(child)
            }
        }
    }

    /// The command exited with `code`.
    fn on_exit(&self, phase: Phase, code: u8, debounce_at: &mut Option<Instant>) -> (Phase, Step) {
        match phase {
            Phase::Running(r) => {
                info!(
                    pid = r.pid.as_raw_nonzero().get(),
                    status = code,
                    "the command exited"
                );
                (Phase::Running(r), Step::Done(Ok(code)))
            }
            Phase::Stopping { child, then, .. } => match then {
                Then::Fail(e) => (Phase::Running(child), Step::Done(Err(e))),
                Then::Restart(..) if self.ending => (Phase::Running(child), Step::Done(Ok(code))),
                Then::Restart(env, generation) => {
                    debug!(
                        pid = child.pid.as_raw_nonzero().get(),
                        status = code,
                        "the command stopped for its restart"
                    );
                    match self.start(env, generation) {
                        Ok(p) => {
                            // A newer generation may have come meanwhile.
                            *debounce_at = Some(Instant::now() + self.cfg.exec.debounce);
                            (p, Step::Continue)
                        }
                        Err(e) => (Phase::Running(child), Step::Done(Err(e))),
                    }
                }
            },
            w @ Phase::Waiting { .. } => (w, Step::Continue),
        }
    }
}

fn revoked_text(state: &State) -> String {
    let mut v: Vec<String> = state
        .revoked
        .iter()
        .map(|(name, rule)| format!("{name} (rule {rule})"))
        .collect();
    v.sort();
    v.join(", ")
}

fn revoked_error(state: &State) -> ExecError {
    let mut rules: Vec<&str> = state.revoked.values().map(String::as_str).collect();
    rules.sort();
    rules.dedup();
    let mut secrets: Vec<&str> = state.revoked.keys().map(String::as_str).collect();
    secrets.sort();
    ExecError::Revoked {
        rules: rules.join(", "),
        secrets: secrets.join(", "),
    }
}

async fn sleep_until_opt(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// Runs `opts.argv` under supervision as the module doc says; returns the
/// command's exit status (128 + signal when a signal killed it).
pub async fn exec(cfg: Config, opts: ExecOptions) -> Result<u8, ExecError> {
    if cfg.notify.command.is_some() {
        return Err(ExecError::Config(
            "key `notify.command`: not with exec, which reaps every child process itself; use on_change (\"restart\", \"signal:HUP\") or notify.http_post".into(),
        ));
    }
    let Some(argv0) = opts.argv.first() else {
        return Err(ExecError::NotFound {
            program: String::new(),
            message: "give the command after --".into(),
        });
    };
    let program = resolve_program(argv0, std::env::var_os("PATH").as_deref())?;
    let renderer = EnvRenderer::new(&cfg.exec.env)?;
    // Before anything is started, so no SIGCHLD or SIGTERM goes unseen.
    let mut signals = Signals::new().map_err(ExecError::Setup)?;
    let sup = Supervisor {
        has_files: cfg.secrets.iter().any(|s| s.file.is_some()) || !cfg.templates.is_empty(),
        renderer,
        launcher: Launcher {
            program,
            argv: opts.argv.clone(),
            env_clean: cfg.exec.env_clean,
        },
        timeout: opts.first_fetch_timeout,
        ending: false,
        cfg: cfg.clone(),
    };
    let mut sup = sup;
    info!(
        command = %sup.launcher.program.display(),
        env = ?cfg.exec.env.iter().map(|e| e.name.as_str()).collect::<Vec<_>>(),
        secrets = cfg.secrets.len(),
        "exec: fetching the secrets before starting the command"
    );
    let (state_tx, mut state_rx) = watch::channel(Arc::new(State::default()));
    let (stop_tx, stop_rx) = oneshot::channel::<()>();
    let keeper = crate::run_observed(
        cfg,
        async {
            let _ = stop_rx.await;
        },
        Some(state_tx),
    );
    tokio::pin!(keeper);
    let mut keeper_done = false;
    let mut phase = Phase::Waiting {
        deadline: Instant::now() + sup.timeout,
    };
    let mut debounce_at: Option<Instant> = None;

    let outcome: Result<u8, ExecError> = loop {
        let deadline = match &phase {
            Phase::Waiting { deadline } => Some(*deadline),
            _ => None,
        };
        let kill_at = match &phase {
            Phase::Stopping { kill_at, .. } => *kill_at,
            _ => None,
        };
        let settle_at = match &phase {
            Phase::Running(_) => debounce_at,
            _ => None,
        };
        let step = tokio::select! {
            result = &mut keeper, if !keeper_done => {
                keeper_done = true;
                let e = match result {
                    Err(e) => ExecError::Sidecar(e),
                    Ok(()) => ExecError::Config("the sidecar stopped".into()),
                };
                if phase.pid().is_some() {
                    error!(error = %e, "the sidecar stopped: stopping the command");
                }
                match std::mem::replace(&mut phase, Phase::Waiting { deadline: Instant::now() }) {
                    Phase::Waiting { .. } => Step::Done(Err(e)),
                    Phase::Running(child) => {
                        phase = sup.stop(child, Then::Fail(e));
                        Step::Continue
                    }
                    Phase::Stopping { child, kill_at, then } => {
                        let then = match then {
                            Then::Restart(..) => Then::Fail(e),
                            other => other,
                        };
                        phase = Phase::Stopping { child, kill_at, then };
                        Step::Continue
                    }
                }
            }
            changed = state_rx.changed(), if !keeper_done => {
                if changed.is_err() {
                    Step::Continue
                } else {
                    let state = state_rx.borrow_and_update().clone();
                    let current = std::mem::replace(&mut phase, Phase::Waiting { deadline: Instant::now() });
                    let (next, step) = sup.on_state(current, &state, &mut debounce_at);
                    phase = next;
                    step
                }
            }
            got = signals.next() => match got {
                Got::Child => match reap(phase.pid()) {
                    Some(code) => {
                        let current = std::mem::replace(&mut phase, Phase::Waiting { deadline: Instant::now() });
                        let (next, step) = sup.on_exit(current, code, &mut debounce_at);
                        phase = next;
                        step
                    }
                    None => Step::Continue,
                },
                Got::Forward(sig) => {
                    if is_terminating(sig) {
                        sup.ending = true;
                    }
                    match phase.pid() {
                        Some(pid) => {
                            info!(signal = signal_name(sig), pid = pid.as_raw_nonzero().get(), "forwarding a signal to the command");
                            send(pid, sig);
                            Step::Continue
                        }
                        None if is_terminating(sig) => {
                            info!(signal = signal_name(sig), "stopping before the command was started");
                            Step::Done(Ok(exit_code(None, Some(sig.as_raw()))))
                        }
                        None => Step::Continue,
                    }
                }
            },
            _ = sleep_until_opt(deadline) => {
                let state = state_rx.borrow().clone();
                Step::Done(Err(ExecError::FirstFetch {
                    timeout: sup.timeout,
                    reason: sup.missing_reason(&state),
                }))
            }
            _ = sleep_until_opt(settle_at) => {
                debounce_at = None;
                let state = state_rx.borrow().clone();
                if let Phase::Running(child) = std::mem::replace(&mut phase, Phase::Waiting { deadline: Instant::now() }) {
                    phase = sup.on_settled(child, &state);
                }
                Step::Continue
            }
            _ = sleep_until_opt(kill_at) => {
                if let Phase::Stopping { child, then, .. } = std::mem::replace(&mut phase, Phase::Waiting { deadline: Instant::now() }) {
                    warn!(pid = child.pid.as_raw_nonzero().get(), grace = ?sup.cfg.exec.restart_grace, "the command did not stop within restart_grace: SIGKILL");
                    send(child.pid, Signal::KILL);
                    phase = Phase::Stopping { child, kill_at: None, then };
                }
                Step::Continue
            }
        };
        if let Step::Done(result) = step {
            break result;
        }
    };

    // The keeper stops as `run` does on SIGTERM (leases released when
    // configured, files removed), then exec exits.
    let _ = stop_tx.send(());
    if !keeper_done && let Err(e) = (&mut keeper).await {
        warn!(error = %e, "the sidecar stopped with an error");
    }
    // Whatever else exited meanwhile.
    let _ = reap(None);
    outcome
}

#[cfg(test)]
mod tests {
    use super::*;

    fn held(pairs: &[(&str, &[u8])]) -> HashMap<String, StateSecret> {
        pairs
            .iter()
            .map(|(k, v)| {
                (
                    (*k).to_owned(),
                    StateSecret {
                        version: 1,
                        value: Zeroizing::new(v.to_vec()),
                    },
                )
            })
            .collect()
    }

    fn spec(name: &str, source: EnvSource) -> EnvSpec {
        EnvSpec {
            name: name.into(),
            source,
        }
    }

    #[test]
    fn environment_from_secrets_and_templates_in_order() {
        let r = EnvRenderer::new(&[
            spec("DB_PASSWORD", EnvSource::Secret("db/pw".into())),
            spec(
                "DB_URL",
                EnvSource::Template(
                    "postgres://{{ secrets['db/user'] }}:{{ secrets['db/pw'] }}@db".into(),
                ),
            ),
        ])
        .unwrap();
        let env = r
            .render(&held(&[("db/pw", b"hunter2"), ("db/user", b"app")]))
            .unwrap();
        assert_eq!(env.names(), ["DB_PASSWORD", "DB_URL"]);
        assert_eq!(env.0[0].1.as_slice(), b"hunter2");
        assert_eq!(env.0[1].1.as_slice(), b"postgres://app:hunter2@db");
        // Debug shows names, never values.
        let shown = format!("{env:?}");
        assert!(
            shown.contains("DB_URL") && !shown.contains("hunter2"),
            "{shown}"
        );
    }

    #[test]
    fn missing_nul_and_bad_templates_are_refused_without_the_value() {
        let r = EnvRenderer::new(&[
            spec("A", EnvSource::Secret("a".into())),
            spec("B", EnvSource::Template("x{{ secrets['b'] }}".into())),
        ])
        .unwrap();
        assert_eq!(
            r.render(&held(&[("b", b"1")])).unwrap_err(),
            EnvError::Missing {
                name: "A".into(),
                secret: "a".into()
            }
        );
        let e = r
            .render(&held(&[("a", b"sec\0ret"), ("b", b"1")]))
            .unwrap_err();
        assert_eq!(e, EnvError::Nul { name: "A".into() });
        assert!(!e.to_string().contains("sec"), "{e}");
        let e = r.render(&held(&[("a", b"1")])).unwrap_err();
        assert!(
            matches!(&e, EnvError::Template { name, .. } if name == "B"),
            "{e}"
        );
        let e = r.render(&held(&[("a", b"1"), ("b", b"p\0w")])).unwrap_err();
        assert_eq!(e, EnvError::Nul { name: "B".into() });
    }

    #[test]
    fn exit_codes_are_a_shells() {
        assert_eq!(exit_code(Some(0), None), 0);
        assert_eq!(exit_code(Some(3), None), 3);
        assert_eq!(exit_code(None, Some(15)), 143);
        assert_eq!(exit_code(None, Some(9)), 137);
        let e = ExecError::NotFound {
            program: "x".into(),
            message: "m".into(),
        };
        assert_eq!(e.exit_code(), 127);
        assert_eq!(ExecError::Config("c".into()).exit_code(), 2);
    }

    #[test]
    fn programs_are_found_as_a_shell_finds_them() {
        let path = OsStr::new("/nonexistent:/bin:/usr/bin");
        let sh = resolve_program(OsStr::new("sh"), Some(path)).unwrap();
        assert!(sh.ends_with("sh"), "{}", sh.display());
        assert!(matches!(
            resolve_program(OsStr::new("no-such-command-here"), Some(path)),
            Err(ExecError::NotFound { .. })
        ));
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("data");
        std::fs::write(&file, "x").unwrap();
        let e = resolve_program(file.as_os_str(), None).unwrap_err();
        assert_eq!(e.exit_code(), 126, "{e}");
        assert!(e.to_string().contains("not executable"), "{e}");
        assert_eq!(
            resolve_program(dir.path().as_os_str(), None)
                .unwrap_err()
                .exit_code(),
            126
        );
    }
}
