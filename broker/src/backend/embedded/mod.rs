//! The embedded secrets store, the default backend: rows in the broker's
//! database (SQLite, or PostgreSQL shared by replicas), every value sealed
//! with AES-256-GCM under a key from a key file.
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

pub mod config;
mod source;
pub use source::EmbeddedSource;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use aws_lc_rs::aead::{AES_256_GCM, Aad, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};
use secrecy::SecretSlice;
use sqlx::Row;
use zeroize::Zeroizing;

use super::{MAX_SECRET_BYTES, SecretVersion, validate_secret_name};
use crate::clock::unix_now;
use crate::db::{Db, on_db};

/// What can go wrong in the embedded store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The key file is missing, unreadable or malformed.
    #[error("store key file {path}: {message}")]
    KeyFile { path: PathBuf, message: String },
    /// The database failed (unreachable, permissions, disk full, locked).
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

/// The PostgreSQL channel a write of the embedded store is announced on, so
/// every replica pushes the new version at once instead of at its next poll.
pub const VERSIONS_CHANNEL: &str = "secrets_broker_versions";

/// The embedded store. Cheap to clone.
#[derive(Clone)]
pub struct EmbeddedStore {
    db: Db,
    keys: std::sync::Arc<Vec<SealKey>>,
    changed: std::sync::Arc<tokio::sync::Notify>,
}

impl EmbeddedStore {
    /// A store on `db` (already migrated) with the keys in `key_file`.
    pub fn new(db: Db, key_file: &Path) -> Result<EmbeddedStore, StoreError> {
        Ok(EmbeddedStore {
            db,
            keys: std::sync::Arc::new(load_keys(key_file)?),
            changed: std::sync::Arc::default(),
        })
    }

    /// The associated data of a row: its name, key ID and (since `aad` 2)
    /// version, so a ciphertext copied to another name, key or version (an
    /// old value replayed as a "rotation") fails authentication.
    fn aad(name: &str, key_id: &str, version: Option<u64>) -> Vec<u8> {
        let mut aad = Vec::with_capacity(name.len() + key_id.len() + 10);
        aad.extend_from_slice(name.as_bytes());
        aad.push(0);
        aad.extend_from_slice(key_id.as_bytes());
        if let Some(v) = version {
            aad.push(0);
            aad.extend_from_slice(&v.to_be_bytes());
        }
        aad
    }

    /// Seals `value` for row (`name`, `version`) with the newest key.
    fn seal(&self, name: &str, version: u64, value: &[u8]) -> Result<Sealed, StoreError> {
        let seal = &self.keys[0];
        let mut nonce = [0u8; NONCE_LEN];
        aws_lc_rs::rand::fill(&mut nonce)
            .map_err(|_| StoreError::Invalid("no randomness".into()))?;
        let mut sealed = Zeroizing::new(value.to_vec());
        seal.key
            .seal_in_place_append_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(Self::aad(name, &seal.id, Some(version))),
                &mut *sealed,
            )
            .map_err(|_| StoreError::Invalid("encryption failed".into()))?;
        Ok(Sealed {
            key_id: seal.id.clone(),
            nonce,
            ciphertext: sealed,
        })
    }

    /// Seals again, with the version bound, every row written before the
    /// associated data carried it (`aad` 1). Run at start; a row another
    /// replica re-sealed meanwhile is left as that replica wrote it.
    pub async fn reseal_legacy(&self) -> Result<u64, StoreError> {
        const LEGACY: &str =
            "SELECT name, version, key_id, nonce, ciphertext FROM secret_versions WHERE aad = 1";
        let rows = on_db!(&self.db, pool => sqlx::query(LEGACY).fetch_all(pool).await.map(|rows| {
            rows.into_iter()
                .map(|r| (r.get::<String, _>(0), r.get::<i64, _>(1) as u64, r.get::<String, _>(2), r.get::<Vec<u8>, _>(3), r.get::<Vec<u8>, _>(4)))
                .collect::<Vec<_>>()
        }))?;
        let mut resealed = 0;
        for (name, version, key_id, nonce, ciphertext) in rows {
            // A row that does not open (its key gone, or tampered with) is
            // left for a read to report.
            let Ok(value) = self.open_row(&name, version, &key_id, &nonce, ciphertext, 1) else {
                continue;
            };
            let Sealed {
                key_id,
                nonce,
                ciphertext: sealed,
            } = self.seal(&name, version, value.value())?;
            const RESEAL: &str =
                "UPDATE secret_versions SET key_id = $1, nonce = $2, ciphertext = $3, aad = 2
                 WHERE name = $4 AND version = $5 AND aad = 1";
            on_db!(&self.db, pool => sqlx::query(RESEAL)
                .bind(&key_id)
                .bind(&nonce[..])
                .bind(&sealed[..])
                .bind(&name)
                .bind(version as i64)
                .execute(pool)
                .await
                .map(|_| ()))?;
            resealed += 1;
        }
        Ok(resealed)
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
        // The version is sealed into the row, so it is chosen first; two
        // writers racing for the same one collide on the primary key, and
        // the loser seals again for the next.
        const NEXT: &str =
            "SELECT COALESCE(MAX(version), 0) + 1 FROM secret_versions WHERE name = $1";
        const PUT: &str = "INSERT INTO secret_versions (name, version, key_id, nonce, ciphertext, created_at, aad)
             VALUES ($1, $2, $3, $4, $5, $6, 2)";
        let mut attempt = 0;
        loop {
            let version = on_db!(&self.db, pool => sqlx::query_scalar::<_, i64>(NEXT)
                .bind(name)
                .fetch_one(pool)
                .await)? as u64;
            let Sealed {
                key_id,
                nonce,
                ciphertext: sealed,
            } = self.seal(name, version, value)?;
            let result = on_db!(&self.db, pool => sqlx::query(PUT)
                .bind(name)
                .bind(version as i64)
                .bind(&key_id)
                .bind(&nonce[..])
                .bind(&sealed[..])
                .bind(unix_now())
                .execute(pool)
                .await
                .map(|_| ()));
            match result {
                Ok(()) => {
                    self.announce().await;
                    return Ok(version);
                }
                Err(sqlx::Error::Database(e)) if e.is_unique_violation() && attempt < 10 => {
                    attempt += 1
                }
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// Deletes every version of `name`; returns how many there were.
    pub async fn delete(&self, name: &str) -> Result<u64, StoreError> {
        let done = on_db!(&self.db, pool => sqlx::query("DELETE FROM secret_versions WHERE name = $1")
            .bind(name)
            .execute(pool)
            .await
            .map(|r| r.rows_affected()))?;
        self.announce().await;
        Ok(done)
    }

    /// Wakes this process's version poller and the other replicas'.
    async fn announce(&self) {
        self.changed.notify_one();
        self.db.notify(VERSIONS_CHANNEL).await;
    }

    /// Resolves at the next write through this process (or at once, when
    /// one happened since the last wait).
    pub async fn changed(&self) {
        self.changed.notified().await;
    }

    /// The database the store lives in.
    pub fn db(&self) -> &Db {
        &self.db
    }

    /// The latest version of `name`, or `None` when it does not exist.
    pub async fn get(&self, name: &str) -> Result<Option<SecretVersion>, StoreError> {
        const GET: &str = "SELECT version, key_id, nonce, ciphertext, aad FROM secret_versions
             WHERE name = $1 ORDER BY version DESC LIMIT 1";
        let row = on_db!(&self.db, pool => sqlx::query(GET).bind(name).fetch_optional(pool).await.map(|row| {
            row.map(|r| (r.get::<i64, _>(0), r.get::<String, _>(1), r.get::<Vec<u8>, _>(2), r.get::<Vec<u8>, _>(3), r.get::<i64, _>(4)))
        }))?;
        let Some((version, key_id, nonce, ciphertext, aad)) = row else {
            return Ok(None);
        };
        let version = version as u64;
        self.open_row(name, version, &key_id, &nonce, ciphertext, aad)
            .map(Some)
    }

    fn open_row(
        &self,
        name: &str,
        version: u64,
        key_id: &str,
        nonce: &[u8],
        ciphertext: Vec<u8>,
        aad: i64,
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
            .open_in_place(
                nonce,
                Aad::from(Self::aad(name, key_id, (aad >= 2).then_some(version))),
                &mut buf,
            )
            .map_err(|_| tampered())?;
        Ok(SecretVersion {
            name: name.to_owned(),
            version,
            value: SecretSlice::from(plain.to_vec()),
        })
    }

    /// The latest version number of every secret.
    pub async fn latest_versions(&self) -> Result<HashMap<String, u64>, StoreError> {
        const LATEST: &str = "SELECT name, MAX(version) FROM secret_versions GROUP BY name";
        let rows = on_db!(&self.db, pool => sqlx::query(LATEST).fetch_all(pool).await.map(|rows| {
            rows.into_iter()
                .map(|r| (r.get::<String, _>(0), r.get::<i64, _>(1) as u64))
                .collect::<HashMap<_, _>>()
        }))?;
        Ok(rows)
    }
}

/// A value sealed for one row: the key that sealed it, the nonce, and the
/// ciphertext with its tag.
struct Sealed {
    key_id: String,
    nonce: [u8; NONCE_LEN],
    ciphertext: Zeroizing<Vec<u8>>,
}

fn load_keys(path: &Path) -> Result<Vec<SealKey>, StoreError> {
    let err = |message: String| StoreError::KeyFile {
        path: path.to_owned(),
        message,
    };
    let mut keys: Vec<SealKey> = Vec::new();
    for line in crate::key_file::read(path, "store key file").map_err(err)? {
        if line.bytes.len() != 32 {
            return Err(err(format!(
                "line {}: key must be 32 bytes (AES-256), got {}",
                line.lineno,
                line.bytes.len()
            )));
        }
        let key = UnboundKey::new(&AES_256_GCM, &line.bytes).map_err(|_| err("bad key".into()))?;
        keys.push(SealKey {
            id: line.id,
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
    crate::key_file::generate(
        path,
        key_id,
        "secrets-broker store key: the first line seals new versions",
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn store(dir: &Path) -> EmbeddedStore {
        let key = dir.join("store.key");
        if !key.exists() {
            generate_key_file(&key, "k1").unwrap();
        }
        EmbeddedStore::new(Db::sqlite_in(dir).await, &key).unwrap()
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
        assert_eq!(s.delete("a/b").await.unwrap(), 2);
        assert!(s.get("a/b").await.unwrap().is_none());
    }

    #[tokio::test]
    async fn values_are_encrypted_at_rest_and_key_rotation_keeps_old_rows() {
        let dir = tempfile::tempdir().unwrap();
        let s = store(dir.path()).await;
        s.put("db/password", b"plaintext-marker-123").await.unwrap();
        s.db.close().await;
        assert!(
            dir.path().join("state.db").exists(),
            "the test reads the real file"
        );
        for file in ["state.db", "state.db-wal"] {
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
        s.db.close().await;
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
        .execute(match &s.db {
            Db::Sqlite(pool) => pool,
            Db::Postgres(_) => unreachable!(),
        })
        .await
        .unwrap();
        let err = s.get("a").await.unwrap_err().to_string();
        assert!(err.contains("fails authentication"), "{err}");
        assert!(!err.contains("value-"), "{err}");
    }

    #[tokio::test]
    async fn an_old_version_replayed_as_a_new_one_fails_authentication() {
        let dir = tempfile::tempdir().unwrap();
        let s = store(dir.path()).await;
        s.put("a", b"old-value").await.unwrap();
        s.put("a", b"new-value").await.unwrap();
        let pool = match &s.db {
            Db::Sqlite(pool) => pool,
            Db::Postgres(_) => unreachable!(),
        };
        // A database writer copies version 1's row as version 3.
        sqlx::query(
            "INSERT INTO secret_versions (name, version, key_id, nonce, ciphertext, created_at, aad)
             SELECT name, 3, key_id, nonce, ciphertext, created_at, aad FROM secret_versions
             WHERE name = 'a' AND version = 1",
        )
        .execute(pool)
        .await
        .unwrap();
        let err = s.get("a").await.unwrap_err().to_string();
        assert!(err.contains("fails authentication"), "{err}");
        assert!(!err.contains("old-value"), "{err}");
    }

    #[tokio::test]
    async fn rows_sealed_before_the_version_was_bound_open_and_are_sealed_again() {
        let dir = tempfile::tempdir().unwrap();
        let s = store(dir.path()).await;
        let pool = match &s.db {
            Db::Sqlite(pool) => pool.clone(),
            Db::Postgres(_) => unreachable!(),
        };
        // A row as an older broker wrote it: name and key ID bound, not the version.
        let key = &s.keys[0];
        let nonce = [7u8; NONCE_LEN];
        let mut sealed = b"legacy-value".to_vec();
        key.key
            .seal_in_place_append_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(EmbeddedStore::aad("l", &key.id, None)),
                &mut sealed,
            )
            .unwrap();
        sqlx::query("INSERT INTO secret_versions (name, version, key_id, nonce, ciphertext, created_at) VALUES ('l', 1, $1, $2, $3, 0)")
            .bind(&key.id)
            .bind(&nonce[..])
            .bind(&sealed[..])
            .execute(&pool)
            .await
            .unwrap();
        assert_eq!(s.get("l").await.unwrap().unwrap().value(), b"legacy-value");
        assert_eq!(s.reseal_legacy().await.unwrap(), 1);
        let aad: i64 = sqlx::query_scalar("SELECT aad FROM secret_versions WHERE name = 'l'")
            .fetch_one(&pool)
            .await
            .unwrap();
        assert_eq!(aad, 2);
        assert_eq!(s.get("l").await.unwrap().unwrap().value(), b"legacy-value");
        assert_eq!(s.reseal_legacy().await.unwrap(), 0);
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
