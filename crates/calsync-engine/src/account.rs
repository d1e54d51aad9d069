//! Delegated accounts as the engine runs them (issue 26): each account's refresh token sealed
//! with AES-256-GCM ([`Vault`]: the key from a credential file, never in the database; the
//! associated data names the deployment and the account, so a row copied to another name does
//! not open), kept in the store through [`StoredAccount`], and one Graph client per account
//! ([`Engine::graph_for`]) that reads `/me` with the account's tokens.

use crate::Engine;
use crate::tuple::Tuple;
use aes_gcm::aead::{Aead, KeyInit, Payload};
use aes_gcm::{Aes256Gcm, Nonce};
use base64::Engine as _;
use calsync_graph::{
    AccountGrant, AuthConfig, Credential, GraphClient, GraphError, Loaded, RefreshStore,
};
use calsync_store::Store;
use calsync_store::accounts::Sealed;
use futures_util::future::BoxFuture;
use rand::RngCore;
use secrecy::{ExposeSecret, SecretString};
use sha2::{Digest, Sha256};
use std::sync::Arc;

/// Why an accounts key cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum VaultError {
    /// The key file does not hold 32 bytes in base64.
    #[error(
        "{file}: not an accounts key: it must hold 32 random bytes in base64 (make one with `openssl rand -base64 32`), {reason}"
    )]
    BadKey {
        /// The file, as configured.
        file: String,
        /// What is wrong (never the content).
        reason: String,
    },
}

/// One AES-256-GCM key and its id.
#[derive(Clone)]
struct Key {
    cipher: Aes256Gcm,
    id: String,
}

impl Key {
    /// A key from a key file's content (`file` names it in errors).
    fn read(file: &str, content: &[u8]) -> Result<Key, VaultError> {
        let bad = |reason: &str| VaultError::BadKey {
            file: file.to_owned(),
            reason: reason.to_owned(),
        };
        let text = std::str::from_utf8(content).map_err(|_| bad("it is not text"))?;
        let key = base64::engine::general_purpose::STANDARD
            .decode(text.trim())
            .map_err(|_| bad("it is not base64"))?;
        if key.len() != 32 {
            return Err(bad(&format!("it decodes to {} bytes", key.len())));
        }
        let cipher = Aes256Gcm::new_from_slice(&key).map_err(|_| bad("it is not an AES key"))?;
        let digest = Sha256::digest(&key);
        let id = digest[..8].iter().map(|b| format!("{b:02x}")).collect();
        Ok(Key { cipher, id })
    }
}

/// The key that seals accounts' refresh tokens, and earlier keys that still open the tokens
/// they sealed (a key rotation: each account is sealed again with the current key at its next
/// token rotation, within the hour for an active one). Never printed: `Debug` shows ids only.
#[derive(Clone)]
pub struct Vault {
    current: Key,
    previous: Vec<Key>,
    deployment: String,
}

impl std::fmt::Debug for Vault {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let previous: Vec<&str> = self.previous.iter().map(|k| k.id.as_str()).collect();
        write!(f, "Vault(key {}, previous {previous:?})", self.current.id)
    }
}

impl Vault {
    /// A vault from a key file's content (`file` names it in errors), for `deployment`.
    pub fn from_file_content(
        file: &str,
        content: &[u8],
        deployment: &str,
    ) -> Result<Vault, VaultError> {
        Ok(Vault {
            current: Key::read(file, content)?,
            previous: Vec::new(),
            deployment: deployment.to_owned(),
        })
    }

    /// This vault, also opening what the key in `file` (`content`) sealed; it seals nothing.
    pub fn with_previous(mut self, file: &str, content: &[u8]) -> Result<Vault, VaultError> {
        self.previous.push(Key::read(file, content)?);
        Ok(self)
    }

    /// The current key's id: the first 8 bytes of its SHA-256, in hex.
    pub fn key_id(&self) -> &str {
        &self.current.id
    }

    /// The ids of every key it opens with, the current one first.
    pub fn key_ids(&self) -> Vec<&str> {
        std::iter::once(&self.current)
            .chain(&self.previous)
            .map(|k| k.id.as_str())
            .collect()
    }

    fn aad(&self, account: &str) -> Vec<u8> {
        format!("calsync account v1\n{}\n{account}", self.deployment).into_bytes()
    }

    /// Seals `token` for `account` with the current key under a fresh random nonce.
    pub fn seal(&self, account: &str, token: &SecretString) -> Result<Sealed, GraphError> {
        let mut nonce = [0u8; 12];
        rand::rngs::OsRng.fill_bytes(&mut nonce);
        let aad = self.aad(account);
        let sealed = self
            .current
            .cipher
            .encrypt(
                Nonce::from_slice(&nonce),
                Payload {
                    msg: token.expose_secret().as_bytes(),
                    aad: &aad,
                },
            )
            .map_err(|_| GraphError::AuthUnavailable {
                reason: "cannot seal a refresh token".into(),
            })?;
        Ok(Sealed {
            nonce: nonce.to_vec(),
            sealed,
            key_id: self.current.id.clone(),
        })
    }

    /// Opens `account`'s sealed token with the key that sealed it; `None` if no key of the
    /// vault did, or it was tampered with (or copied from another account or deployment).
    pub fn open(&self, account: &str, sealed: &Sealed) -> Option<SecretString> {
        if sealed.nonce.len() != 12 {
            return None;
        }
        let key = std::iter::once(&self.current)
            .chain(&self.previous)
            .find(|k| k.id == sealed.key_id)?;
        let aad = self.aad(account);
        let plain = key
            .cipher
            .decrypt(
                Nonce::from_slice(&sealed.nonce),
                Payload {
                    msg: &sealed.sealed,
                    aad: &aad,
                },
            )
            .ok()?;
        String::from_utf8(plain).ok().map(SecretString::from)
    }
}

/// An account's refresh token in the store, sealed by the vault; and the mailbox its
/// calendars name, which the signed-in user must be.
#[derive(Debug)]
pub struct StoredAccount {
    name: String,
    user: String,
    store: Store,
    vault: Option<Vault>,
}

impl StoredAccount {
    /// `name`'s token in `store`, opened with `vault` (`None`: no `accounts.key_file`), for
    /// calendars of `user`.
    pub fn new(name: &str, user: &str, store: Store, vault: Option<Vault>) -> Self {
        StoredAccount {
            name: name.to_owned(),
            user: user.to_owned(),
            store,
            vault,
        }
    }

    fn sign_in(&self, reason: impl Into<String>) -> GraphError {
        GraphError::SignInRequired {
            account: self.name.clone(),
            reason: reason.into(),
        }
    }

    fn unavailable(&self, what: &str, e: impl std::fmt::Display) -> GraphError {
        GraphError::AuthUnavailable {
            reason: format!("account {}: {what}: {e}", self.name),
        }
    }
}

impl RefreshStore for StoredAccount {
    fn load(&self) -> BoxFuture<'_, Result<Loaded, GraphError>> {
        Box::pin(async move {
            let Some(vault) = &self.vault else {
                return Err(self.sign_in(
                    "accounts.key_file is not configured, so no account's token can be opened",
                ));
            };
            let account = self
                .store
                .account(&self.name)
                .await
                .map_err(|e| self.unavailable("cannot read it", e))?
                .ok_or_else(|| self.sign_in("it has not signed in, or logged out"))?;
            if let Some(why) = account.revoked {
                return Err(self.sign_in(why));
            }
            let own = |u: &str| {
                u.eq_ignore_ascii_case(&account.user_id)
                    || u.eq_ignore_ascii_case(&account.user_principal)
            };
            if !own(&self.user) {
                return Err(self.sign_in(format!(
                    "it is signed in as {}, but its calendars name the mailbox {}; an account reads only its own mailbox",
                    account.user_principal, self.user
                )));
            }
            let token = vault.open(&self.name, &account.token).ok_or_else(|| {
                self.sign_in(if vault.key_ids().contains(&account.token.key_id.as_str()) {
                    "its sealed token does not open with its key: altered, or copied from another account or deployment".to_owned()
                } else {
                    format!(
                        "its token was sealed with key {}, but accounts.key_file holds key {} (an earlier key can be kept in accounts.previous_key_files while accounts are sealed again)",
                        account.token.key_id,
                        vault.key_id()
                    )
                })
            })?;
            Ok(Loaded {
                token,
                version: account.version,
            })
        })
    }

    fn save(&self, version: i64, token: SecretString) -> BoxFuture<'_, Result<(), GraphError>> {
        Box::pin(async move {
            let vault = self
                .vault
                .as_ref()
                .ok_or_else(|| self.sign_in("accounts.key_file is not configured"))?;
            let sealed = vault.seal(&self.name, &token)?;
            // `false`: a login or another replica's rotation came first; its token is kept
            // (Entra leaves earlier refresh tokens valid).
            self.store
                .save_rotation(&self.name, version, &sealed)
                .await
                .map_err(|e| self.unavailable("cannot save its rotated refresh token", e))?;
            Ok(())
        })
    }

    fn revoke(&self, version: i64, reason: String) -> BoxFuture<'_, Result<(), GraphError>> {
        Box::pin(async move {
            tracing::warn!(account = %self.name, reason = %reason, "an account must sign in again");
            self.store
                .revoke_account(&self.name, version, &reason)
                .await
                .map_err(|e| self.unavailable("cannot mark it revoked", e))
        })
    }
}

/// What the engine needs to run accounts: the app's token settings and the vault.
#[derive(Debug, Clone)]
pub struct AccountSettings {
    /// The app registration's token endpoint, client id, credential and resource.
    pub auth: AuthConfig,
    /// The key that opens the accounts' tokens; `None` when `accounts.key_file` is not set.
    pub vault: Option<Vault>,
}

impl Engine {
    /// Runs delegated accounts with `settings` (once; later calls are ignored).
    pub fn with_accounts(&self, settings: AccountSettings) {
        let _ = self.inner.accounts.set(settings);
    }

    /// The Graph client for `tuple`: the app's, or its account's (`/me` with the account's
    /// tokens), one per (account, mailbox) and kept.
    pub fn graph_for(&self, tuple: &Tuple) -> GraphClient {
        match &tuple.account {
            Some(name) => self.account_client(name, &tuple.user),
            None => self.inner.graph.clone(),
        }
    }

    /// The client of account `name` reading the mailbox `user` (its own, by id or UPN).
    pub fn account_client(&self, name: &str, user: &str) -> GraphClient {
        let key = (name.to_owned(), user.to_owned());
        let mut clients = self
            .inner
            .account_clients
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if let Some(c) = clients.get(&key) {
            return c.clone();
        }
        let (auth, vault) = match self.inner.accounts.get() {
            Some(s) => (s.auth.clone(), s.vault.clone()),
            None => (self.inner.graph.tokens().config().clone(), None),
        };
        let grant = AccountGrant {
            name: name.to_owned(),
            store: Arc::new(StoredAccount::new(
                name,
                user,
                self.inner.store.clone(),
                vault,
            )),
            app: Arc::new(match &auth.credential {
                Credential::Account(_) => Credential::Public,
                other => other.clone(),
            }),
        };
        let client = self.inner.graph.for_account(&auth, grant);
        clients.insert(key, client.clone());
        client
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vault(deployment: &str) -> Vault {
        Vault::from_file_content(
            "k",
            b"MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWY=\n",
            deployment,
        )
        .unwrap()
    }

    /// AES-256-GCM with the deployment and account as associated data: a token opens only
    /// for the account and deployment it was sealed for, and only with its key; every seal
    /// has its own nonce.
    #[test]
    fn a_sealed_token_opens_only_for_its_account_deployment_and_key() {
        let v = vault("prod");
        let token = SecretString::from("0.AAAA-refresh".to_owned());
        let a = v.seal("alice", &token).unwrap();
        let b = v.seal("alice", &token).unwrap();
        assert_ne!(a.nonce, b.nonce);
        assert_ne!(a.sealed, b.sealed);
        assert!(!a.sealed.windows(6).any(|w| w == b"refresh"));
        assert_eq!(
            v.open("alice", &a).unwrap().expose_secret(),
            "0.AAAA-refresh"
        );
        assert!(v.open("bob", &a).is_none());
        assert!(vault("staging").open("alice", &a).is_none());
        let other =
            Vault::from_file_content("k", b"ZmVkY2JhOTg3NjU0MzIxMGZlZGNiYTk4NzY1NDMyMTA=", "prod")
                .unwrap();
        assert_ne!(other.key_id(), v.key_id());
        assert!(other.open("alice", &a).is_none());
        let mut tampered = a.clone();
        tampered.sealed[0] ^= 1;
        assert!(v.open("alice", &tampered).is_none());
        assert!(!format!("{v:?}").contains("MDEy"));
    }

    /// A key rotation: the new key seals, the previous one still opens what it sealed (by the
    /// id stored with each token), and nothing else does.
    #[test]
    fn a_previous_key_opens_what_it_sealed_and_the_current_one_seals() {
        let old = vault("prod");
        let sealed_before = old
            .seal("alice", &SecretString::from("before".to_owned()))
            .unwrap();
        let rotated =
            Vault::from_file_content("k", b"ZmVkY2JhOTg3NjU0MzIxMGZlZGNiYTk4NzY1NDMyMTA=", "prod")
                .unwrap()
                .with_previous("old", b"MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWY=")
                .unwrap();
        assert_eq!(rotated.key_ids(), [rotated.key_id(), old.key_id()]);
        assert_eq!(
            rotated
                .open("alice", &sealed_before)
                .unwrap()
                .expose_secret(),
            "before"
        );
        let sealed_after = rotated
            .seal("alice", &SecretString::from("after".to_owned()))
            .unwrap();
        assert_eq!(sealed_after.key_id, rotated.key_id());
        assert!(old.open("alice", &sealed_after).is_none());
    }

    #[test]
    fn a_key_file_must_hold_32_bytes_in_base64() {
        for (content, says) in [
            (&b"not base64!"[..], "not base64"),
            (b"c2hvcnQ=", "decodes to 5 bytes"),
            (b"\xff\xfe", "not text"),
        ] {
            let e = Vault::from_file_content("/etc/calsync/accounts.key", content, "d")
                .unwrap_err()
                .to_string();
            assert!(e.contains("/etc/calsync/accounts.key"), "{e}");
            assert!(e.contains(says), "{e}");
            assert!(e.contains("openssl rand -base64 32"), "{e}");
        }
    }
}
