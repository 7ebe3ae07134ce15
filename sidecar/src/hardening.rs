//! Process hardening shared by both binaries: a crash must not leave secrets
//! in a core file, and other processes of the same UID must not read this
//! one's memory.

use rustix::process::{DumpableBehavior, Resource, Rlimit, set_dumpable_behavior, setrlimit};

/// Disables core dumps (`RLIMIT_CORE` = 0) and marks the process
/// non-dumpable, which also blocks `ptrace` and `/proc/<pid>/mem` from other
/// processes of the same UID. Returns what could not be done, for a warning.
pub fn disable_core_dumps() -> Result<(), String> {
    let limit = Rlimit {
        current: Some(0),
        maximum: Some(0),
    };
    let mut failed = Vec::new();
    if let Err(e) = setrlimit(Resource::Core, limit) {
        failed.push(format!("RLIMIT_CORE: {e}"));
    }
    if let Err(e) = set_dumpable_behavior(DumpableBehavior::NotDumpable) {
        failed.push(format!("PR_SET_DUMPABLE: {e}"));
    }
    if failed.is_empty() {
        Ok(())
    } else {
        Err(failed.join(", "))
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn core_limit_is_zero_afterwards() {
        super::disable_core_dumps().unwrap();
        let lim = rustix::process::getrlimit(rustix::process::Resource::Core);
        assert_eq!(lim.current, Some(0));
    }
}
