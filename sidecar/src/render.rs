//! Templates: files rendered from several secrets (an env file, JSON, a
//! `.properties` file, a PEM bundle, an AWS credentials file…) with
//! `minijinja`. Templates are compiled at start, so a syntax error stops the
//! sidecar with the template's name and line. Rendering is strict (an unknown
//! secret is an error, never an empty string). A template that cannot be
//! rendered (say, one of its secrets was revoked) is left out of the
//! generation: its file disappears with the swap, never half-written and
//! never left behind with revoked content.
//!
//! In a template, `secrets["payments/db-password"]` is the secret's value as
//! text; every secret a template uses must be listed in `[[secrets]]`.

use std::collections::{BTreeMap, HashMap};

use minijinja::{Environment, UndefinedBehavior, Value};
use zeroize::Zeroizing;

use crate::config::TemplateSpec;

/// A template problem, naming the template and, when known, the line.
#[derive(Debug, thiserror::Error)]
#[error("template {file:?}{}: {message}", line.map(|l| format!(" line {l}")).unwrap_or_default())]
pub struct RenderError {
    pub file: String,
    pub line: Option<usize>,
    pub message: String,
}

impl RenderError {
    fn from_minijinja(file: &str, e: &minijinja::Error) -> RenderError {
        RenderError {
            file: file.to_owned(),
            line: e.line(),
            message: match e.detail() {
                Some(d) => format!("{}: {d}", e.kind()),
                None => e.kind().to_string(),
            },
        }
    }
}

/// One template's output, or why it could not be rendered.
pub type Rendered = Result<Zeroizing<Vec<u8>>, RenderError>;

/// The compiled templates of a sidecar.
pub struct Templates {
    env: Environment<'static>,
    specs: Vec<TemplateSpec>,
}

impl Templates {
    /// Compiles every template; the first error stops the start.
    pub fn new(specs: &[TemplateSpec]) -> Result<Templates, RenderError> {
        let mut env = Environment::new();
        env.set_undefined_behavior(UndefinedBehavior::Strict);
        // Files end exactly as their templates do; blocks don't leave blank lines.
        let syntax = minijinja::syntax::SyntaxConfig::builder()
            .keep_trailing_newline(true)
            .trim_blocks(true)
            .build()
            .map_err(|e| RenderError::from_minijinja("(syntax)", &e))?;
        env.set_syntax(syntax);
        // Output is data, not HTML: no auto-escaping.
        env.set_auto_escape_callback(|_| minijinja::AutoEscape::None);
        for spec in specs {
            env.add_template_owned(spec.file.clone(), spec.source.clone())
                .map_err(|e| RenderError::from_minijinja(&spec.file, &e))?;
        }
        Ok(Templates {
            env,
            specs: specs.to_vec(),
        })
    }

    pub fn is_empty(&self) -> bool {
        self.specs.is_empty()
    }

    /// Renders every template from `secrets` (name → value): each one's
    /// output, or why it could not be rendered.
    pub fn render(&self, secrets: &HashMap<&str, &[u8]>) -> Vec<(&TemplateSpec, Rendered)> {
        let map: BTreeMap<&str, Zeroizing<String>> = secrets
            .iter()
            .map(|(k, v)| (*k, Zeroizing::new(String::from_utf8_lossy(v).into_owned())))
            .collect();
        let pairs = Value::from_pairs(
            map.iter()
                .map(|(k, v)| (*k, Value::from(v.as_str())))
                .collect::<Vec<_>>(),
        );
        let ctx = minijinja::context! { secrets => pairs };
        self.specs
            .iter()
            .map(|spec| {
                let rendered = self
                    .env
                    .get_template(&spec.file)
                    .and_then(|t| t.render(&ctx))
                    .map(|text| Zeroizing::new(text.into_bytes()))
                    .map_err(|e| RenderError::from_minijinja(&spec.file, &e));
                (spec, rendered)
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(file: &str, source: &str) -> TemplateSpec {
        TemplateSpec {
            file: file.into(),
            source: source.into(),
            mode: None,
            uid: None,
            gid: None,
        }
    }

    #[test]
    fn renders_common_formats() {
        let t = Templates::new(&[
            spec("db.env", "DB_USER=app\nDB_PASSWORD={{ secrets['db/password'] }}\n"),
            spec("db.json", "{{ {'password': secrets['db/password']} | tojson }}"),
            spec(
                "credentials",
                "[default]\naws_access_key_id = {{ secrets['aws/id'] }}\naws_secret_access_key = {{ secrets['aws/key'] }}\n",
            ),
        ])
        .unwrap();
        let values: HashMap<&str, &[u8]> = [
            ("db/password", &b"p\"w"[..]),
            ("aws/id", b"AKIA1"),
            ("aws/key", b"k2"),
        ]
        .into();
        let out: Vec<Zeroizing<Vec<u8>>> = t
            .render(&values)
            .into_iter()
            .map(|(_, r)| r.unwrap())
            .collect();
        assert_eq!(out[0].as_slice(), b"DB_USER=app\nDB_PASSWORD=p\"w\n");
        assert_eq!(out[1].as_slice(), br#"{"password": "p\"w"}"#);
        assert!(String::from_utf8_lossy(&out[2]).contains("aws_secret_access_key = k2"));
    }

    #[test]
    fn syntax_errors_name_template_and_line() {
        let err = Templates::new(&[spec("bad.env", "A=1\nB={{ secrets['x'] \n")])
            .err()
            .unwrap();
        assert_eq!(err.file, "bad.env");
        assert_eq!(err.line, Some(2), "{err}");
        assert!(
            err.to_string().starts_with("template \"bad.env\" line 2: "),
            "{err}"
        );
    }

    #[test]
    fn unknown_secrets_are_errors_not_empty_strings() {
        let t = Templates::new(&[spec("a", "X={{ secrets['missing'] }}")]).unwrap();
        let err = t.render(&HashMap::new()).pop().unwrap().1.unwrap_err();
        assert!(err.to_string().contains("undefined"), "{err}");
    }
}
