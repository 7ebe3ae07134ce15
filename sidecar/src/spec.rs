//! What a sidecar is asked to keep: the validated `[[secrets]]` and
//! `[[templates]]` entries. A leaf: [`crate::config`] builds them;
//! [`crate::render`], [`crate::aws_endpoint`] and the keeper read them.

/// One secret to keep fresh and the file it lands in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SecretSpec {
    pub name: String,
    /// `None` for a secret used by templates only.
    pub file: Option<String>,
}

/// One file rendered from secrets (see [`crate::render`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TemplateSpec {
    pub file: String,
    /// The template text (from `source`, or read from `template_file` at start).
    pub source: String,
    pub mode: Option<u32>,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
}
