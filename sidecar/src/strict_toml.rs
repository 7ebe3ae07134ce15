//! Strict TOML for the config files of every binary (sidecar, broker,
//! injector): one readable line per problem, with the dotted key it is about
//! (`roles[0].ttl`), the line it is on, and for an unknown key the valid
//! keys of its table and a "did you mean" when exactly one is close.
//!
//! [`load`] and [`parse`] are how every binary reads its file, and
//! [`ConfigError`] how each reports a problem with it, so all word config
//! errors alike (`config file F: key K: …`).

use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;

/// A configuration problem, reported before a binary serves anything; the
/// message names the file and, when there is one, the key.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read: usually a wrong path or a missing mount.
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    /// The text is not TOML, or a problem that is about no single key.
    #[error("config file {path}: {message}")]
    Parse { path: PathBuf, message: String },
    /// A key is unknown, or its value is of the wrong type or out of bounds.
    #[error("config file {path}: key `{key}`: {message}")]
    Invalid {
        path: PathBuf,
        key: String,
        message: String,
    },
}

impl ConfigError {
    /// The error for a problem [`from_str`] found in the file at `path`.
    pub fn from_toml(path: &Path, problem: Problem) -> ConfigError {
        let path = path.to_owned();
        match problem.key {
            Some(key) => ConfigError::Invalid {
                path,
                key,
                message: problem.message,
            },
            None => ConfigError::Parse {
                path,
                message: problem.message,
            },
        }
    }
}

/// Reads the config file at `path` and hands its text to `parse` (a
/// binary's `Config::parse`), so a file that cannot be read is reported the
/// same way by every binary.
pub fn load<T>(
    path: &Path,
    parse: impl FnOnce(&str, &Path) -> Result<T, ConfigError>,
) -> Result<T, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_owned(),
        source,
    })?;
    parse(&text, path)
}

/// Parses config text into `R`, the file as written (whose structs deny
/// unknown fields); errors name `path` and the key.
pub fn parse<R: DeserializeOwned>(text: &str, path: &Path) -> Result<R, ConfigError> {
    from_str(text).map_err(|p| ConfigError::from_toml(path, p))
}

/// What is wrong with a config text: the key it is about, when there is one,
/// and a one-line message (never the source line it quotes).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub key: Option<String>,
    pub message: String,
}

/// Parses `text` into `T` (whose structs deny unknown fields).
pub fn from_str<T: DeserializeOwned>(text: &str) -> Result<T, Problem> {
    let de = toml::Deserializer::parse(text).map_err(|e| Problem {
        key: None,
        message: format!("{}{}", one_line(e.message()), at(text, e.span())),
    })?;
    serde_path_to_error::deserialize(de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        let message = one_line(inner.message());
        let parent = (path != ".").then_some(path);
        let place = at(text, inner.span());
        match unknown_field(&message) {
            Some((field, expected)) => {
                // The path ends with the unknown key itself.
                let key = parent.unwrap_or_else(|| field.to_owned());
                let table = match key.strip_suffix(field).and_then(|t| t.strip_suffix('.')) {
                    Some(t) => format!("`{t}`"),
                    None => "the top level".to_owned(),
                };
                let hint = match close_to(field, &expected) {
                    Some(k) => format!("; did you mean `{k}`?"),
                    None => String::new(),
                };
                let valid = if expected.is_empty() {
                    format!("{table} takes no keys")
                } else {
                    let list: Vec<String> = expected.iter().map(|k| format!("`{k}`")).collect();
                    format!("the keys of {table} are {}", list.join(", "))
                };
                Problem {
                    key: Some(key),
                    message: format!("unknown key{place}{hint} ({valid})"),
                }
            }
            None => Problem {
                key: parent,
                message: format!("{message}{place}"),
            },
        }
    })
}

/// Splits serde's "unknown field `x`, expected one of `a`, `b`" (or "expected
/// `a`", or "there are no fields") into the field and the valid names.
fn unknown_field(message: &str) -> Option<(&str, Vec<&str>)> {
    let rest = message.strip_prefix("unknown field `")?;
    let (field, rest) = rest.split_once('`')?;
    let expected = rest
        .split('`')
        .skip(1)
        .step_by(2)
        .filter(|s| !s.is_empty())
        .collect();
    Some((field, expected))
}

/// The one valid key close enough to `field` to be what was meant, if there
/// is exactly one.
fn close_to<'a>(field: &str, valid: &[&'a str]) -> Option<&'a str> {
    let mut close = valid
        .iter()
        .filter(|k| strsim::normalized_damerau_levenshtein(field, k) >= 0.6);
    match (close.next(), close.next()) {
        (Some(k), None) => Some(k),
        _ => None,
    }
}

fn one_line(message: &str) -> String {
    message.trim_end().replace('\n', " ")
}

/// " (line L, column C)" for a byte span of `text`.
fn at(text: &str, span: Option<std::ops::Range<usize>>) -> String {
    let Some(span) = span else {
        return String::new();
    };
    let before = text.get(..span.start).unwrap_or(text);
    let line = before.matches('\n').count() + 1;
    let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    format!(" (line {line}, column {column})")
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Top {
        name: String,
        store: Store,
        #[serde(default)]
        roles: Vec<Role>,
    }
    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Store {
        key_file: String,
        poll_interval: Option<u32>,
    }
    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Role {
        ttl: u32,
    }

    fn problem(text: &str) -> Problem {
        from_str::<Top>(text).unwrap_err()
    }

    #[test]
    fn an_unknown_key_is_named_with_its_table_and_a_close_match() {
        let p = problem("name = \"a\"\n[store]\nkey_fiel = \"k\"\n");
        assert_eq!(p.key.as_deref(), Some("store.key_fiel"));
        assert_eq!(
            p.message,
            "unknown key (line 3, column 1); did you mean `key_file`? \
             (the keys of `store` are `key_file`, `poll_interval`)"
        );
    }

    #[test]
    fn no_suggestion_when_nothing_or_several_are_close() {
        let p = problem("name = \"a\"\nzzzzzz = 1\n[store]\nkey_file = \"k\"\n");
        assert_eq!(p.key.as_deref(), Some("zzzzzz"));
        assert!(!p.message.contains("did you mean"), "{}", p.message);
        assert!(
            p.message.contains("the keys of the top level are"),
            "{}",
            p.message
        );
    }

    #[test]
    fn keys_in_arrays_of_tables_carry_their_index() {
        let p = problem(
            "name = \"a\"\n[store]\nkey_file = \"k\"\n[[roles]]\nttl = 1\n[[roles]]\nttl = \"x\"\n",
        );
        assert_eq!(p.key.as_deref(), Some("roles[1].ttl"));
        assert!(p.message.contains("line 7"), "{}", p.message);
        assert!(!p.message.contains('\n'), "{}", p.message);
    }

    #[test]
    fn a_syntax_error_is_one_line_with_its_place_and_no_key() {
        let p = problem("name = \"a\"\n[store\n");
        assert_eq!(p.key, None);
        assert!(p.message.contains("line 2"), "{}", p.message);
        assert!(!p.message.contains('\n'), "{}", p.message);
    }

    #[test]
    fn a_missing_table_is_named() {
        let p = problem("name = \"a\"\n");
        assert!(p.message.contains("store"), "{p:?}");
    }

    #[test]
    fn load_and_parse_name_the_file() {
        let missing = std::path::Path::new("/nonexistent/sb.toml");
        let err = load(missing, parse::<Top>).unwrap_err().to_string();
        assert!(
            err.starts_with("cannot read config file /nonexistent/sb.toml: "),
            "{err}"
        );
        let err = parse::<Top>("name = \"a\"\n[store]\nkey_fiel = \"k\"\n", missing)
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with("config file /nonexistent/sb.toml: key `store.key_fiel`: unknown key"),
            "{err}"
        );
    }

    #[test]
    fn valid_text_parses() {
        let t: Top = from_str("name = \"a\"\n[store]\nkey_file = \"k\"\n").unwrap();
        assert_eq!(t.store.key_file, "k");
    }
}
