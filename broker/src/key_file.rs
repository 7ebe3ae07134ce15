//! Key files as the store key and the audit key share them: one key a line,
//! `<key-id> <base64 key>`, the first line the key in use and the others
//! still read; `#` comments and blank lines ignored. A file readable by group
//! or others is used with a warning. Key bytes are zeroized and never appear
//! in a message.

use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use tracing::warn;
use zeroize::Zeroizing;

/// One line of a key file: where it is (for messages), its ID and its bytes.
pub struct KeyLine {
    pub lineno: usize,
    pub id: String,
    pub bytes: Zeroizing<Vec<u8>>,
}

/// The keys of the file at `path`, in order, each ID checked and once;
/// `what` names the file in the permission warning ("store key file").
/// Errors are messages without the path (the caller adds it).
pub fn read(path: &Path, what: &str) -> Result<Vec<KeyLine>, String> {
    let meta = std::fs::metadata(path).map_err(|e| e.to_string())?;
    if meta.permissions().mode() & 0o077 != 0 {
        warn!(path = %path.display(), "{what} is readable by group or others; chmod 600 it");
    }
    let text = Zeroizing::new(std::fs::read_to_string(path).map_err(|e| e.to_string())?);
    let mut keys: Vec<KeyLine> = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let lineno = i + 1;
        let (id, b64) = line
            .split_once(char::is_whitespace)
            .ok_or_else(|| format!("line {lineno}: expected `<key-id> <base64 key>`"))?;
        if id.is_empty()
            || id.len() > 64
            || !id
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
        {
            return Err(format!(
                "line {lineno}: key id must be 1-64 of a-z A-Z 0-9 - _ ."
            ));
        }
        if keys.iter().any(|k| k.id == id) {
            return Err(format!("line {lineno}: duplicate key id {id:?}"));
        }
        let bytes = Zeroizing::new(
            STANDARD
                .decode(b64.trim())
                .map_err(|_| format!("line {lineno}: key is not valid base64"))?,
        );
        keys.push(KeyLine {
            lineno,
            id: id.to_owned(),
            bytes,
        });
    }
    Ok(keys)
}

/// Writes a new key file (mode 0600, failing when it exists) holding one
/// fresh random 32-byte key under `key_id`, after the comment `header`.
pub fn generate(path: &Path, key_id: &str, header: &str) -> std::io::Result<()> {
    let mut key = Zeroizing::new([0u8; 32]);
    aws_lc_rs::rand::fill(&mut *key).map_err(|_| std::io::Error::other("no randomness"))?;
    let line = Zeroizing::new(format!("# {header}\n{key_id} {}\n", STANDARD.encode(*key)));
    let mut f = std::fs::OpenOptions::new()
        .create_new(true)
        .write(true)
        .mode(0o600)
        .open(path)?;
    f.write_all(line.as_bytes())
}
