//! KV v2 mappings: each is read by its poller every `poll_interval` and
//! served from memory (see [`crate::backend::polled`]).

use std::sync::Arc;

use secrecy::SecretSlice;
use serde_json::Value;
use vaultrs::api::kv2::requests::ReadSecretRequest;

use super::config::{Mapping, MappingKind};
use super::{Vault, VaultError, wipe_json};
use crate::backend::SecretVersion;
use crate::backend::polled::Polled;

impl Vault {
    /// Reads a KV v2 mapping from Vault (one request: data and version).
    pub(super) async fn read_kv(&self, m: &Mapping) -> Result<SecretVersion, VaultError> {
        let MappingKind::Kv { path, key, .. } = &m.kind else {
            unreachable!("read_kv on a dynamic mapping")
        };
        let location = m.location();
        let resp = self
            .call(&location, |c| {
                let req = ReadSecretRequest::builder()
                    .mount(m.mount.clone())
                    .path(path.clone())
                    .build()
                    .expect("all fields set");
                async move { vaultrs::api::exec_with_result(&*c, req).await }
            })
            .await?;
        if resp.metadata.destroyed || !resp.metadata.deletion_time.is_empty() {
            return Err(VaultError::NotFound { location });
        }
        let mut data = resp.data;
        let value = kv_value(&data, key.as_deref());
        wipe_json(&mut data);
        let value: Vec<u8> = match value {
            Some(v) => v,
            None => {
                return Err(VaultError::NotFound {
                    location: format!(
                        "{location} (no such key in version {})",
                        resp.metadata.version
                    ),
                });
            }
        };
        Ok(SecretVersion {
            name: m.name.clone(),
            version: resp.metadata.version,
            value: SecretSlice::from(value),
        })
    }

    /// The KV mapping `name` and its polled value.
    fn kv_slot(&self, name: &str) -> Option<(&Mapping, &Polled<VaultError>)> {
        let i = *self.by_name.get(name)?;
        Some((&self.cfg.secrets[i], self.kv[i].as_ref()?))
    }

    /// The value of a KV mapping: from memory when the poller has it (and it
    /// is not older than `max_stale`), else one read shared by every caller.
    pub async fn kv_get(&self, name: &str) -> Result<Arc<SecretVersion>, VaultError> {
        let (m, slot) = self.kv_slot(name).expect("kv_get on a KV mapping");
        slot.get(|_| async { self.read_kv(m).await.map(|v| (v, String::new())) })
            .await
    }

    /// The version of a KV mapping as last read, if any.
    pub fn kv_version(&self, name: &str) -> Option<u64> {
        self.kv_slot(name)?.1.version()
    }

    /// KV mappings that cannot be served now, with the reason (Vault's
    /// answer, or the login's failure).
    pub fn problems(&self) -> Vec<String> {
        self.kv
            .iter()
            .flatten()
            .filter_map(Polled::problem)
            .collect()
    }
}

/// The bytes served for a KV map: one key's value (text as is, anything
/// else as JSON), or the whole map as JSON. `None`: the key is missing.
fn kv_value(data: &Value, key: Option<&str>) -> Option<Vec<u8>> {
    match key {
        None => Some(serde_json::to_vec(data).unwrap_or_default()),
        Some(k) => match data.get(k)? {
            Value::String(s) => Some(s.as_bytes().to_vec()),
            other => Some(serde_json::to_vec(other).unwrap_or_default()),
        },
    }
}
