//! Mode exec: what the pod must be like for the injector to wrap one
//! container's command in `secrets-sidecar exec --`.

use k8s_openapi::api::core::v1::PodSpec;

use super::annotations::{AnnotationError, full};
use super::layout::{BIN_DIR, TOKEN_DIR};

/// Mode exec wraps exactly one container's command, which must be given in
/// the pod spec.
pub(super) fn check_exec(
    spec: &PodSpec,
    app: &[usize],
    app_inits: &[usize],
    mount_path: &str,
) -> Result<(), String> {
    let inits = spec.init_containers.as_deref().unwrap_or_default();
    if let Some(&i) = app_inits.first() {
        return Err(AnnotationError::invalid(
            "containers",
            format!(
                "{:?} is an init container: mode exec wraps the command of one container of spec.containers",
                inits[i].name
            ),
        )
        .to_string());
    }
    if app.len() != 1 {
        let names: Vec<&str> = app
            .iter()
            .map(|&i| spec.containers[i].name.as_str())
            .collect();
        return Err(format!(
            "mode exec wraps one container's command, and the pod has {} ({}): name the one with {}",
            names.len(),
            names.join(", "),
            full("containers")
        ));
    }
    let c = &spec.containers[app[0]];
    if c.command.as_ref().is_none_or(Vec::is_empty) {
        return Err(format!(
            "container {:?} sets no command: mode exec runs secrets-sidecar exec -- <command>, and the image's entrypoint is not known at admission (the injector never asks a registry); set command (and args) in the pod spec, or build the image with secrets-sidecar exec as its ENTRYPOINT and use {}: native",
            c.name,
            full("mode")
        ));
    }
    if let Some(e) = c
        .env
        .iter()
        .flatten()
        .find(|e| e.name == secrets_sidecar::config::CONFIG_ENV)
    {
        return Err(format!(
            "container {:?} already sets {}, which mode exec sets to the sidecar's config",
            c.name, e.name
        ));
    }
    for dir in [BIN_DIR, TOKEN_DIR] {
        if let Some(m) = c
            .volume_mounts
            .iter()
            .flatten()
            .find(|m| m.mount_path == dir)
        {
            return Err(format!(
                "container {:?} already mounts {:?} at {dir}, where mode exec mounts its own volume",
                c.name, m.name
            ));
        }
    }
    if mount_path == BIN_DIR || mount_path.starts_with(&format!("{BIN_DIR}/")) {
        return Err(AnnotationError::invalid(
            "mount-path",
            format!("{mount_path:?} overlaps {BIN_DIR}, where mode exec puts the sidecar binary"),
        )
        .to_string());
    }
    Ok(())
}
