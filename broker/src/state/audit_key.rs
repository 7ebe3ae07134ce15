//! The audit key: the secret, kept outside the database, that makes the
//! audit chain and its exported checkpoints tamper-evident against someone
//! who can write the database.
//!
//! The key file has the store key file's format (one `<key-id> <base64
//! key>` per line, at least 32 random bytes each; the first line chains new
//! records, the others still verify records they chained). Three keys are
//! derived from each line, one per use, so that a value made for one use
//! can never pass for another: the chain's HMAC, the checkpoints'
//! signature, and the retention anchor's signature.

use std::path::{Path, PathBuf};

use aws_lc_rs::hmac;
use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

/// The `kind` of an exported checkpoint line.
pub const CHECKPOINT_KIND: &str = "audit_checkpoint";

/// Labels of the derived keys.
const CHAIN_LABEL: &[u8] = b"secrets-broker audit chain v1";
const CHECKPOINT_LABEL: &[u8] = b"secrets-broker audit checkpoint v1";
const ANCHOR_LABEL: &[u8] = b"secrets-broker audit anchor v1";

/// Why the audit key file cannot be used.
#[derive(Debug, thiserror::Error)]
#[error("audit.key_file {path}: {message}")]
pub struct AuditKeyError {
    pub path: PathBuf,
    pub message: String,
}

/// One line of the key file, as the three keys derived from it.
struct AuditKey {
    id: String,
    chain: hmac::Key,
    checkpoint: hmac::Key,
    anchor: hmac::Key,
}

/// The audit keys: the first chains new records and signs checkpoints and
/// anchors; every one verifies what it made. Prints only the key IDs.
pub struct AuditKeys {
    keys: Vec<AuditKey>,
}

impl std::fmt::Debug for AuditKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let ids: Vec<&str> = self.keys.iter().map(|k| k.id.as_str()).collect();
        write!(f, "AuditKeys({ids:?}, [redacted])")
    }
}

/// Fields as one byte string, each prefixed by its length: no two different
/// field lists give the same input.
pub(crate) fn encode(fields: &[&[u8]]) -> Vec<u8> {
    let mut input = Vec::with_capacity(fields.iter().map(|f| f.len() + 8).sum());
    for field in fields {
        input.extend_from_slice(&(field.len() as u64).to_be_bytes());
        input.extend_from_slice(field);
    }
    input
}

fn derive(raw: &[u8], label: &[u8]) -> hmac::Key {
    let root = hmac::Key::new(hmac::HMAC_SHA256, raw);
    let tag = hmac::sign(&root, label);
    let bytes = Zeroizing::new(tag.as_ref().to_vec());
    hmac::Key::new(hmac::HMAC_SHA256, &bytes)
}

/// Equal in constant time (hex strings of MACs).
fn same(a: &str, b: &str) -> bool {
    aws_lc_rs::constant_time::verify_slices_are_equal(a.as_bytes(), b.as_bytes()).is_ok()
}

/// A checkpoint as exported: the chain's head at one moment, signed.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Checkpoint {
    /// Always [`CHECKPOINT_KIND`], so a log shipper's stream can be searched.
    pub kind: String,
    /// Sequence number of the chain's last record.
    pub seq: i64,
    /// Records in the log then (from the chain's first kept record to `seq`).
    pub count: i64,
    /// The hash of record `seq`.
    pub head: String,
    /// When it was made (Unix milliseconds).
    pub at_ms: i64,
    /// The audit key that signed it.
    pub key_id: String,
    /// The broker process that made it (random per start): the last
    /// checkpoint of every run is worth checking, not only the latest.
    #[serde(default)]
    pub run: String,
    /// HMAC-SHA256 (hex) of the fields above under the checkpoint key.
    pub sig: String,
}

impl Checkpoint {
    fn signed_input(&self) -> Vec<u8> {
        encode(&[
            CHECKPOINT_KIND.as_bytes(),
            self.seq.to_string().as_bytes(),
            self.count.to_string().as_bytes(),
            self.head.as_bytes(),
            self.at_ms.to_string().as_bytes(),
            self.key_id.as_bytes(),
            self.run.as_bytes(),
        ])
    }

    /// A checkpoint from one line of a sink, or `None` when the line is
    /// something else (a log shipper's stream holds other lines; a
    /// timestamp or other prefix before the JSON is skipped).
    pub fn from_line(line: &str) -> Option<Checkpoint> {
        let start = line.find('{')?;
        let cp: Checkpoint = serde_json::from_str(line[start..].trim_end()).ok()?;
        (cp.kind == CHECKPOINT_KIND).then_some(cp)
    }

    /// The checkpoint as one line of JSON, newline included.
    pub fn to_line(&self) -> String {
        let mut line = serde_json::to_string(self).unwrap_or_default();
        line.push('\n');
        line
    }
}

/// Where the chain starts after records were pruned: the first kept
/// record's sequence number and the hash it links to, signed.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Anchor {
    pub seq: i64,
    pub prev_hash: String,
    pub at_ms: i64,
    pub key_id: String,
    pub sig: String,
}

impl Anchor {
    fn signed_input(&self) -> Vec<u8> {
        encode(&[
            b"audit_anchor",
            self.seq.to_string().as_bytes(),
            self.prev_hash.as_bytes(),
            self.at_ms.to_string().as_bytes(),
            self.key_id.as_bytes(),
        ])
    }
}

impl AuditKeys {
    /// Reads the key file; a file readable by group or others is used with
    /// a warning, as the store key file is.
    pub fn load(path: &Path) -> Result<AuditKeys, AuditKeyError> {
        let err = |message: String| AuditKeyError {
            path: path.to_owned(),
            message,
        };
        let mut keys: Vec<AuditKey> = Vec::new();
        for line in crate::key_file::read(path, "audit key file").map_err(err)? {
            if line.bytes.len() < 32 {
                return Err(err(format!(
                    "line {}: key must be at least 32 random bytes, got {}",
                    line.lineno,
                    line.bytes.len()
                )));
            }
            keys.push(AuditKey {
                id: line.id,
                chain: derive(&line.bytes, CHAIN_LABEL),
                checkpoint: derive(&line.bytes, CHECKPOINT_LABEL),
                anchor: derive(&line.bytes, ANCHOR_LABEL),
            });
        }
        if keys.is_empty() {
            return Err(err(
                "no key found; generate one with `secrets-broker store keygen --out FILE --key-id audit-1` (same format)".into(),
            ));
        }
        Ok(AuditKeys { keys })
    }

    fn key(&self, id: &str) -> Option<&AuditKey> {
        self.keys.iter().find(|k| k.id == id)
    }

    /// ID of the key that chains and signs now.
    pub fn current_id(&self) -> &str {
        &self.keys[0].id
    }

    /// The chain MAC (hex) of `input` under key `id`; `None` when the key
    /// is not in the file.
    pub(crate) fn chain_mac(&self, id: &str, input: &[u8]) -> Option<String> {
        self.key(id)
            .map(|k| hex::encode(hmac::sign(&k.chain, input)))
    }

    /// Signs a checkpoint with the current key (sets `key_id` and `sig`).
    pub fn sign_checkpoint(&self, cp: &mut Checkpoint) {
        let k = &self.keys[0];
        cp.key_id = k.id.clone();
        cp.sig = hex::encode(hmac::sign(&k.checkpoint, &cp.signed_input()));
    }

    /// Checks a checkpoint's signature; the error says why it fails.
    pub fn verify_checkpoint(&self, cp: &Checkpoint) -> Result<(), String> {
        let k = self.key(&cp.key_id).ok_or_else(|| {
            format!(
                "it is signed with audit key {:?}, which is not in audit.key_file",
                cp.key_id
            )
        })?;
        let want = hex::encode(hmac::sign(&k.checkpoint, &cp.signed_input()));
        if same(&want, &cp.sig) {
            Ok(())
        } else {
            Err(
                "its signature does not verify (the line was altered, or another key signed it)"
                    .into(),
            )
        }
    }

    /// An anchor at `seq` linking to `prev_hash`, signed with the current key.
    pub fn anchor(&self, seq: i64, prev_hash: String, at_ms: i64) -> Anchor {
        let k = &self.keys[0];
        let mut a = Anchor {
            seq,
            prev_hash,
            at_ms,
            key_id: k.id.clone(),
            sig: String::new(),
        };
        a.sig = hex::encode(hmac::sign(&k.anchor, &a.signed_input()));
        a
    }

    /// Checks an anchor's signature; the error says why it fails.
    pub fn verify_anchor(&self, a: &Anchor) -> Result<(), String> {
        let k = self.key(&a.key_id).ok_or_else(|| {
            format!(
                "it is signed with audit key {:?}, which is not in audit.key_file",
                a.key_id
            )
        })?;
        let want = hex::encode(hmac::sign(&k.anchor, &a.signed_input()));
        if same(&want, &a.sig) {
            Ok(())
        } else {
            Err("its signature does not verify".into())
        }
    }
}

/// Writes a new audit key file (mode 0600) holding one fresh random 32-byte
/// key; fails when the file exists.
pub fn generate_key_file(path: &Path, key_id: &str) -> std::io::Result<()> {
    crate::key_file::generate(
        path,
        key_id,
        "secrets-broker audit key: the first line chains new records and signs checkpoints",
    )
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    /// Keys from a fresh key file in `dir` named `name` (the ID too).
    pub(crate) fn keys_in(dir: &Path, name: &str) -> AuditKeys {
        let path = dir.join(name);
        if !path.exists() {
            generate_key_file(&path, name).unwrap();
        }
        AuditKeys::load(&path).unwrap()
    }

    fn checkpoint() -> Checkpoint {
        Checkpoint {
            kind: CHECKPOINT_KIND.into(),
            seq: 7,
            count: 7,
            head: "ab".repeat(32),
            at_ms: 1_700_000_000_000,
            key_id: String::new(),
            run: "r1".into(),
            sig: String::new(),
        }
    }

    #[test]
    fn a_checkpoint_verifies_only_unaltered_and_under_its_own_key() {
        let dir = tempfile::tempdir().unwrap();
        let keys = keys_in(dir.path(), "a1");
        let mut cp = checkpoint();
        keys.sign_checkpoint(&mut cp);
        assert_eq!(cp.key_id, "a1");
        keys.verify_checkpoint(&cp).unwrap();
        // The line round-trips, even behind a log shipper's timestamp.
        let line = format!("2026-01-01T00:00:00Z stdout F {}", cp.to_line());
        assert_eq!(Checkpoint::from_line(&line), Some(cp.clone()));
        assert_eq!(Checkpoint::from_line("broker started"), None);
        assert_eq!(Checkpoint::from_line(r#"{"kind":"other"}"#), None);

        for altered in [
            Checkpoint {
                seq: 6,
                ..cp.clone()
            },
            Checkpoint {
                count: 8,
                ..cp.clone()
            },
            Checkpoint {
                head: "cd".repeat(32),
                ..cp.clone()
            },
            Checkpoint {
                at_ms: 1,
                ..cp.clone()
            },
            Checkpoint {
                run: "r2".into(),
                ..cp.clone()
            },
        ] {
            let e = keys.verify_checkpoint(&altered).unwrap_err();
            assert!(e.contains("does not verify"), "{e}");
        }
        // Another key (another broker's, or an attacker's) does not pass.
        let other = keys_in(dir.path(), "a2");
        let e = other.verify_checkpoint(&cp).unwrap_err();
        assert!(e.contains("\"a1\", which is not in audit.key_file"), "{e}");
        let mut forged = checkpoint();
        other.sign_checkpoint(&mut forged);
        forged.key_id = "a1".into();
        assert!(keys.verify_checkpoint(&forged).is_err());
    }

    #[test]
    fn derived_keys_are_separate() {
        let dir = tempfile::tempdir().unwrap();
        let keys = keys_in(dir.path(), "a1");
        let a = keys.anchor(5, "ab".repeat(32), 1);
        keys.verify_anchor(&a).unwrap();
        assert!(
            keys.verify_anchor(&Anchor {
                seq: 4,
                ..a.clone()
            })
            .is_err()
        );
        // The chain MAC of the anchor's input is not its signature.
        assert_ne!(keys.chain_mac("a1", &a.signed_input()), Some(a.sig.clone()));
    }

    #[test]
    fn bad_key_files_are_explained_and_keys_never_printed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k");
        for (text, want) in [
            ("", "no key found"),
            ("k1\n", "expected `<key-id> <base64 key>`"),
            ("k1 !!!\n", "not valid base64"),
            ("k1 AAAA\n", "at least 32 random bytes, got 3"),
        ] {
            std::fs::write(&path, text).unwrap();
            let err = AuditKeys::load(&path).expect_err("must fail").to_string();
            assert!(err.starts_with("audit.key_file "), "{err}");
            assert!(err.contains(want), "{text:?}: {err}");
        }
        let missing = AuditKeys::load(&dir.path().join("nope")).unwrap_err();
        assert!(missing.to_string().contains("nope"), "{missing}");

        let keys = keys_in(dir.path(), "a1");
        let text = std::fs::read_to_string(dir.path().join("a1")).unwrap();
        let b64 = text
            .lines()
            .last()
            .unwrap()
            .split_whitespace()
            .nth(1)
            .unwrap();
        let shown = format!("{keys:?}");
        assert!(shown.contains("a1") && !shown.contains(b64), "{shown}");
        let mode = std::fs::metadata(dir.path().join("a1"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }
}
