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
//! `fromjson` parses a JSON value: `{{ (secrets["payments/db"] | fromjson).password }}`.

use std::collections::{BTreeMap, HashMap};

use minijinja::{Environment, UndefinedBehavior, Value};
use zeroize::Zeroizing;

use crate::spec::TemplateSpec;

/// A template problem, naming the template and, when known, the line.
#[derive(Debug, thiserror::Error)]
#[error("template {file:?}{}: {message}", line.map(|l| format!(" line {l}")).unwrap_or_default())]
pub struct RenderError {
    pub file: String,
    pub line: Option<usize>,
    pub message: String,
}

impl RenderError {
    /// A compile error: its detail quotes the template (config, not secret).
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

    /// A render error: minijinja's detail may quote a value (a secret used
    /// as a template name, say), so only the kind and line go out, and the
    /// message of our own `fromjson`, which names a position only.
    fn from_render(file: &str, e: &minijinja::Error) -> RenderError {
        RenderError {
            file: file.to_owned(),
            line: e.line(),
            message: match e.detail() {
                Some(d) if d.starts_with("fromjson:") => format!("{}: {d}", e.kind()),
                _ => e.kind().to_string(),
            },
        }
    }
}

/// Tags that load another template by name: a name computed from a secret
/// would put the secret into an error, and a sidecar's templates need none.
const REFUSED_TAGS: [&str; 4] = ["include", "import", "from", "extends"];

/// The first refused tag in `source` and its line.
fn refused_tag(source: &str) -> Option<(&'static str, usize)> {
    let mut rest = source;
    let mut offset = 0;
    while let Some(at) = rest.find("{%") {
        let tag = rest[at + 2..].trim_start_matches(['-', '+']).trim_start();
        let word: String = tag
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect();
        if let Some(t) = REFUSED_TAGS.iter().find(|t| **t == word) {
            let line = source[..offset + at].matches('\n').count() + 1;
            return Some((t, line));
        }
        offset += at + 2;
        rest = &rest[at + 2..];
    }
    None
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
        // `fromjson` turns a JSON secret (Vault database credentials, a PKI
        // bundle, a KV map) into a value: `(secrets["db"] | fromjson).username`.
        env.add_filter(
            "fromjson",
            |text: &str| -> Result<Value, minijinja::Error> {
                serde_json::from_str::<serde_json::Value>(text)
                    .map(|v| json_value(&v))
                    .map_err(|e| {
                        // Name the position only: the text may be a secret.
                        minijinja::Error::new(
                            minijinja::ErrorKind::InvalidOperation,
                            format!(
                                "fromjson: not JSON (line {}, column {})",
                                e.line(),
                                e.column()
                            ),
                        )
                    })
            },
        );
        // Output is data, not HTML: no auto-escaping.
        env.set_auto_escape_callback(|_| minijinja::AutoEscape::None);
        for spec in specs {
            if let Some((tag, line)) = refused_tag(&spec.source) {
                return Err(RenderError {
                    file: spec.file.clone(),
                    line: Some(line),
                    message: format!(
                        "`{{% {tag} %}}` is not allowed: a template renders only the secrets it names"
                    ),
                });
            }
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
                    .map_err(|e| RenderError::from_render(&spec.file, &e));
                (spec, rendered)
            })
            .collect()
    }
}

/// A parsed JSON value as a template value.
fn json_value(v: &serde_json::Value) -> Value {
    use serde_json::Value as J;
    match v {
        J::Null => Value::from(()),
        J::Bool(b) => Value::from(*b),
        J::Number(n) => match (n.as_i64(), n.as_f64()) {
            (Some(i), _) => Value::from(i),
            (None, Some(f)) => Value::from(f),
            _ => Value::from(n.to_string()),
        },
        J::String(s) => Value::from(s.as_str()),
        J::Array(a) => Value::from(a.iter().map(json_value).collect::<Vec<_>>()),
        J::Object(o) => Value::from_pairs(
            o.iter()
                .map(|(k, v)| (k.as_str(), json_value(v)))
                .collect::<Vec<_>>(),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fromjson_reads_fields_and_hides_bad_text() {
        let t = Templates::new(&[
            spec("user", "{{ (secrets['db'] | fromjson).username }}"),
            spec("bad", "{{ (secrets['x'] | fromjson).a }}"),
        ])
        .unwrap();
        let secrets = HashMap::from([
            ("db", &br#"{"username":"v-app-1","password":"pw-123"}"#[..]),
            ("x", &b"hunter2-not-json"[..]),
        ]);
        let out = t.render(&secrets);
        assert_eq!(&out[0].1.as_ref().unwrap()[..], b"v-app-1");
        let err = out[1].1.as_ref().unwrap_err().to_string();
        assert!(err.contains("fromjson: not JSON"), "{err}");
        assert!(!err.contains("hunter2"), "{err}");
    }

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
    fn tags_that_load_templates_are_refused_at_compile() {
        for source in [
            "{% include secrets['demo/greeting'] %}",
            "a\n{%- import 'x' as y %}",
            "{% from 'x' import y %}",
            "{%+ extends 'base' %}",
        ] {
            let err = Templates::new(&[spec("t", source)])
                .err()
                .unwrap()
                .to_string();
            assert!(err.contains("is not allowed"), "{source}: {err}");
        }
        assert!(Templates::new(&[spec("t", "{% if true %}{% endif %}{# include #}")]).is_ok());
    }

    #[test]
    fn render_errors_never_quote_a_value() {
        // What minijinja says of an include named by a secret (refused at
        // compile above; here as a render error would carry it).
        let mut env = Environment::new();
        env.add_template_owned("t", "{% include secrets['a'] %}".to_owned())
            .unwrap();
        let ctx = minijinja::context! {
            secrets => Value::from_pairs(vec![("a", Value::from("hunter2"))])
        };
        let e = env.get_template("t").unwrap().render(&ctx).unwrap_err();
        assert!(format!("{e:?}").contains("hunter2"), "minijinja quotes it");
        let err = RenderError::from_render("t", &e).to_string();
        assert!(!err.contains("hunter2"), "{err}");
        assert!(err.starts_with("template \"t\" line 1: "), "{err}");
    }

    #[test]
    fn unknown_secrets_are_errors_not_empty_strings() {
        let t = Templates::new(&[spec("a", "X={{ secrets['missing'] }}")]).unwrap();
        let err = t.render(&HashMap::new()).pop().unwrap().1.unwrap_err();
        assert!(err.to_string().contains("undefined"), "{err}");
    }
}
