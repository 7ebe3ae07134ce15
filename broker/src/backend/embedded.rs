//! The embedded secrets store, the default backend: SQLite through `sqlx`,
//! every value sealed with AES-256-GCM under a key from a key file.
//!
//! The key file holds one key per line, `<key-id> <base64 of 32 bytes>`; `#`
//! starts a comment. The first key seals new versions; the others still open
//! what they sealed, so a key is rotated by putting a new line on top. Each
//! row records the ID of the key that sealed it. The associated data binds a
//! ciphertext to its secret's name and key ID, so rows cannot be swapped
//! between secrets.
//!
//! Versions only grow: a `put` adds version N+1, which is a rotation for every
//! reader.

use std::collections::HashMap;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use aws_lc_rs::aead::{AES_256_GCM, Aad, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};
use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use secrecy::SecretSlice;
use sqlx::Row;
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions};
use tracing::warn;
use zeroize::Zeroizing;

use super::{MAX_SECRET_BYTES, SecretVersion, validate_secret_name};

/// What can go wrong in the embedded store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The key file is missing, unreadable or malformed.
    #[error("store key file {path}: {message}")]
    KeyFile { path: PathBuf, message: String },
    /// SQLite failed (file permissions, disk full, locked database).
    #[error("store database: {0}")]
    Database(#[from] sqlx::Error),
    /// A row was sealed with a key that is no longer in the key file.
    #[error(
        "secret {name:?} version {version} is sealed with key {key_id:?}, which is not in the key file"
    )]
    MissingKey {
        name: String,
        version: u64,
        key_id: String,
    },
    /// A ciphertext failed authentication: the row was altered, or the key
    /// with that ID is not the one that sealed it.
    #[error(
        "secret {name:?} version {version} fails authentication: the row was altered or the key differs"
    )]
    Tampered { name: String, version: u64 },
    /// The name or value is not acceptable.
    #[error("{0}")]
    Invalid(String),
}

struct SealKey {
    id: String,
    key: LessSafeKey,
}

/// The embedded store. Cheap to clone.
#[derive(Clone)]
pub struct EmbeddedStore {
    pool: SqlitePool,
    keys: std::sync::Arc<Vec<SealKey>>,
}

const SCHEMA: &str = "CREATE TABLE IF NOT EXISTS secret_versions (
    name TEXT NOT NULL,
    version INTEGER NOT NULL,
    key_id TEXT NOT NULL,
    nonce BLOB NOT NULL,
    ciphertext BLOB NOT NULL,
    created_at INTEGER NOT NULL,
    PRIMARY KEY (name, version)
)";

impl EmbeddedStore {
    /// Opens (creating if needed) the database at `path` with the keys in `key_file`.
    pub async fn open(path: &Path, key_file: &Path) -> Result<EmbeddedStore, StoreError> {
        let keys = load_keys(key_file)?;
        if !path.exists() {
            // Created 0600 before SQLite opens it: the file holds ciphertexts only,
            // but nobody else needs to read them.
            std::fs::OpenOptions::new()
                .create(true)
                .write(true)
                .truncate(false)
                .mode(0o600)
                .open(path)
                .map_err(|e| {
                    StoreError::Invalid(format!("cannot create {}: {e}", path.display()))
                })?;
        }
        let options = SqliteConnectOptions::from_str("sqlite://")?
            .filename(path)
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .busy_timeout(Duration::from_secs(10));
        let pool = SqlitePoolOptions::new()
            .max_connections(4)
            .connect_with(options)
            .await?;
        sqlx::query(SCHEMA).execute(&pool).await?;
        Ok(EmbeddedStore {
            pool,
            keys: std::sync::Arc::new(keys),
        })
    }

    fn aad(name: &str, key_id: &str) -> Vec<u8> {
        let mut aad = Vec::with_capacity(name.len() + key_id.len() + 1);
        aad.extend_from_slice(name.as_bytes());
        aad.push(0);
        aad.extend_from_slice(key_id.as_bytes());
        aad
    }

    /// Stores a new version of `name`; returns its version number.
    pub async fn put(&self, name: &str, value: &[u8]) -> Result<u64, StoreError> {
        validate_secret_name(name).map_err(StoreError::Invalid)?;
        if value.len() > MAX_SECRET_BYTES {
            return Err(StoreError::Invalid(format!(
                "secret value is {} bytes, larger than the {MAX_SECRET_BYTES}-byte limit",
                value.len()
            )));
        }
        let seal = &self.keys[0];
        let mut nonce = [0u8; NONCE_LEN];
        aws_lc_rs::rand::fill(&mut nonce)
            .map_err(|_| StoreError::Invalid("no randomness".into()))?;
        let mut sealed = Zeroizing::new(value.to_vec());
        seal.key
            .seal_in_place_append_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(Self::aad(name, &seal.id)),
                &mut *sealed,
            )
            .map_err(|_| StoreError::Invalid("encryption failed".into()))?;
        // One statement, so concurrent writers (several processes) get distinct versions.
        let row = sqlx::query(
            "INSERT INTO secret_versions (name, version, key_id, nonce, ciphertext, created_at)
             SELECT ?1, COALESCE(MAX(version), 0) + 1, ?2, ?3, ?4, unixepoch()
             FROM secret_versions WHERE name = ?1
             RETURNING version",
        )
        .bind(name)
        .bind(&seal.id)
        .bind(&nonce[..])
        .bind(&sealed[..])
        .fetch_one(&self.pool)
        .await?;
        Ok(row.get::<i64, _>(0) as u64)
    }

    /// The latest version of `name`, or `None` when it does not exist.
    pub async fn get(&self, name: &str) -> Result<Option<SecretVersion>, StoreError> {
        let row = sqlx::query(
            "SELECT version, key_id, nonce, ciphertext FROM secret_versions
             WHERE name = ?1 ORDER BY version DESC LIMIT 1",
        )
        .bind(name)
        .fetch_optional(&self.pool)
        .await?;
        let Some(row) = row else { return Ok(None) };
        let version = row.get::<i64, _>(0) as u64;
        let key_id: String = row.get(1);
        let nonce: Vec<u8> = row.get(2);
        let ciphertext: Vec<u8> = row.get(3);
        self.open_row(name, version, &key_id, &nonce, ciphertext)
            .map(Some)
    }

    fn open_row(
        &self,
        name: &str,
        version: u64,
        key_id: &str,
        nonce: &[u8],
        ciphertext: Vec<u8>,
    ) -> Result<SecretVersion, StoreError> {
        let key =
            self.keys
                .iter()
                .find(|k| k.id == key_id)
                .ok_or_else(|| StoreError::MissingKey {
                    name: name.to_owned(),
                    version,
                    key_id: key_id.to_owned(),
                })?;
        let tampered = || StoreError::Tampered {
            name: name.to_owned(),
            version,
        };
        let nonce = Nonce::try_assume_unique_for_key(nonce).map_err(|_| tampered())?;
        let mut buf = Zeroizing::new(ciphertext);
        let plain = key
            .key
            .open_in_place(nonce, Aad::from(Self::aad(name, key_id)), &mut buf)
            .map_err(|_| tampered())?;
        Ok(SecretVersion {
            name: name.to_owned(),
            version,
            value: SecretSlice::from(plain.to_vec()),
        })
    }

    /// The latest version number of every secret.
    pub async fn latest_versions(&self) -> Result<HashMap<String, u64>, StoreError> {
        let rows = sqlx::query("SELECT name, MAX(version) FROM secret_versions GROUP BY name")
            .fetch_all(&self.pool)
            .await?;
        Ok(rows
            .into_iter()
            .map(|r| (r.get::<String, _>(0), r.get::<i64, _>(1) as u64))
            .collect())
    }

    /// Cheap liveness check of the database.
    pub async fn ping(&self) -> Result<(), StoreError> {
        sqlx::query("SELECT 1").execute(&self.pool).await?;
        Ok(())
    }

    pub async fn close(&self) {
        self.pool.close().await;
    }
}

fn load_keys(path: &Path) -> Result<Vec<SealKey>, StoreError> {
    let err = |message: String| StoreError::KeyFile {
        path: path.to_owned(),
        message,
    };
    let meta = std::fs::metadata(path).map_err(|e| err(e.to_string()))?;
    if meta.permissions().mode() & 0o077 != 0 {
        warn!(path = %path.display(), "store key file is readable by group or others; chmod 600 it");
    }
    let text = Zeroizing::new(std::fs::read_to_string(path).map_err(|e| err(e.to_string()))?);
    let mut keys: Vec<SealKey> = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let lineno = i + 1;
        let (id, b64) = line
            .split_once(char::is_whitespace)
            .ok_or_else(|| err(format!("line {lineno}: expected `<key-id> <base64 key>`")))?;
        if id.is_empty()
            || id.len() > 64
            || !id
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
        {
            return Err(err(format!(
                "line {lineno}: key id must be 1-64 of a-z A-Z 0-9 - _ ."
            )));
        }
        if keys.iter().any(|k| k.id == id) {
            return Err(err(format!("line {lineno}: duplicate key id {id:?}")));
        }
        let bytes = Zeroizing::new(
            STANDARD
                .decode(b64.trim())
                .map_err(|_| err(format!("line {lineno}: key is not valid base64")))?,
        );
        if bytes.len() != 32 {
            return Err(err(format!(
                "line {lineno}: key must be 32 bytes (AES-256), got {}",
                bytes.len()
            )));
        }
        let key = UnboundKey::new(&AES_256_GCM, &bytes).map_err(|_| err("bad key".into()))?;
        keys.push(SealKey {
            id: id.to_owned(),
            key: LessSafeKey::new(key),
        });
    }
    if keys.is_empty() {
        return Err(err(
            "no key found; generate one with `secrets-broker store keygen`".into(),
        ));
    }
    Ok(keys)
}

/// Writes a new key file (mode 0600) holding one fresh random key.
pub fn generate_key_file(path: &Path, key_id: &str) -> std::io::Result<()> {
    let mut key = Zeroizing::new([0u8; 32]);
    aws_lc_rs::rand::fill(&mut *key).map_err(|_| std::io::Error::other("no randomness"))?;
    let line = Zeroizing::new(format!(
        "# secrets-broker store key: the first line seals new versions\n{key_id} {}\n",
        STANDARD.encode(*key)
    ));
    let mut f = std::fs::OpenOptions::new()
        .create_new(true)
        .write(true)
        .mode(0o600)
        .open(path)?;
    f.write_all(line.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn store(dir: &Path) -> EmbeddedStore {
        let key = dir.join("store.key");
        if !key.exists() {
            generate_key_file(&key, "k1").unwrap();
        }
        EmbeddedStore::open(&dir.join("store.db"), &key)
            .await
            .unwrap()
    }

    #[tokio::test]
    async fn versions_grow_and_values_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let s = store(dir.path()).await;
        assert!(s.get("a/b").await.unwrap().is_none());
        assert_eq!(s.put("a/b", b"one").await.unwrap(), 1);
        assert_eq!(s.put("a/b", b"two").await.unwrap(), 2);
        assert_eq!(s.put("c", b"x").await.unwrap(), 1);
        let got = s.get("a/b").await.unwrap().unwrap();
        assert_eq!((got.version, got.value()), (2, &b"two"[..]));
        let versions = s.latest_versions().await.unwrap();
        assert_eq!(versions.get("a/b"), Some(&2));
        assert!(s.put("../x", b"v").await.is_err());
    }

    #[tokio::test]
    async fn values_are_encrypted_at_rest_and_key_rotation_keeps_old_rows() {
        let dir = tempfile::tempdir().unwrap();
        let s = store(dir.path()).await;
        s.put("db/password", b"plaintext-marker-123").await.unwrap();
        s.close().await;
        for file in ["store.db", "store.db-wal"] {
            if let Ok(bytes) = std::fs::read(dir.path().join(file)) {
                assert!(
                    !bytes.windows(20).any(|w| w == b"plaintext-marker-123"),
                    "{file} holds the value in clear"
                );
            }
        }
        // Rotate: a new key on top, the old one kept below.
        let key = dir.path().join("store.key");
        let old = std::fs::read_to_string(&key).unwrap();
        std::fs::remove_file(&key).unwrap();
        generate_key_file(&key, "k2").unwrap();
        let new = std::fs::read_to_string(&key).unwrap();
        std::fs::write(&key, format!("{new}{old}")).unwrap();
        let s = store(dir.path()).await;
        assert_eq!(
            s.get("db/password").await.unwrap().unwrap().value(),
            b"plaintext-marker-123"
        );
        s.put("db/password", b"v2").await.unwrap();
        s.close().await;
        // Without the old key, old rows are reported, new ones still open.
        std::fs::write(&key, &new).unwrap();
        let s = store(dir.path()).await;
        assert_eq!(s.get("db/password").await.unwrap().unwrap().value(), b"v2");
    }

    #[tokio::test]
    async fn tampering_is_detected() {
        let dir = tempfile::tempdir().unwrap();
        let s = store(dir.path()).await;
        s.put("a", b"value-a").await.unwrap();
        s.put("b", b"value-b").await.unwrap();
        // Move b's ciphertext onto a: the associated data no longer matches.
        sqlx::query(
            "UPDATE secret_versions SET nonce = (SELECT nonce FROM secret_versions WHERE name='b'),
             ciphertext = (SELECT ciphertext FROM secret_versions WHERE name='b') WHERE name='a'",
        )
        .execute(&s.pool)
        .await
        .unwrap();
        let err = s.get("a").await.unwrap_err().to_string();
        assert!(err.contains("fails authentication"), "{err}");
        assert!(!err.contains("value-"), "{err}");
    }

    #[test]
    fn bad_key_files_are_explained() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k");
        for (text, want) in [
            ("", "no key found"),
            ("k1\n", "expected `<key-id> <base64 key>`"),
            ("k1 !!!\n", "not valid base64"),
            ("k1 AAAA\n", "must be 32 bytes"),
        ] {
            std::fs::write(&path, text).unwrap();
            let err = load_keys(&path).err().expect("must fail").to_string();
            assert!(err.contains(want), "{text:?}: {err}");
        }
    }
}
