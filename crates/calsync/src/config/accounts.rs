//! `[accounts]` and `[[calendars]] account` (issue 26): calendars read through a delegated
//! account's `/me`, the key that seals the accounts' refresh tokens, and `auth.kind =
//! "public_client"`, an app good for nothing but accounts.

use super::values::resolve_credential;
use super::{ConfigError, RawAccounts, RawCalendar, bad};
use calsync_engine::{TupleConfig, Vault};
use calsync_graph::{AuthConfig, Credential};
use secrecy::ExposeSecret;
use std::collections::HashMap;

/// Gives `tuples` (one per `calendars` entry, in order) their accounts, checks that the app
/// and the key can serve them, and opens the key: `None` when no key file is set.
pub(super) fn accounts(
    raw: &RawAccounts,
    auth: &AuthConfig,
    calendars: &[RawCalendar],
    tuples: &mut [TupleConfig],
    has_sources: bool,
    deployment: &str,
) -> Result<Option<Vault>, ConfigError> {
    let public = matches!(auth.credential, Credential::Public);
    let mut mailbox_of: HashMap<String, (usize, String)> = HashMap::new();
    let mut first_account = None;
    for (i, (c, t)) in calendars.iter().zip(tuples.iter_mut()).enumerate() {
        let key = format!("calendars[{i}].account");
        let name = c.account.as_deref().map(str::trim).unwrap_or("");
        if name.is_empty() {
            if public {
                return Err(bad(
                    key,
                    "missing: auth.kind = \"public_client\" gets no app-only token, so each calendar names the account that reads it (`calsync login <account>`)",
                ));
            }
            continue;
        }
        let name = super::validate::plain_name(&key, name)?;
        if let Some((j, user)) = mailbox_of.get(&name) {
            if !user.eq_ignore_ascii_case(&t.user) {
                return Err(bad(
                    format!("calendars[{i}].user"),
                    format!(
                        "account {name} reads only its own mailbox through /me: calendars[{j}] names {user}, this one {}",
                        t.user
                    ),
                ));
            }
        } else {
            mailbox_of.insert(name.clone(), (i, t.user.clone()));
        }
        first_account.get_or_insert((i, name.clone()));
        t.account = Some(name);
    }
    if public && has_sources {
        return Err(bad(
            "sources",
            "auth.kind = \"public_client\" gets no app-only token to list the directory with; name each calendar with its account instead",
        ));
    }
    let Some(file) = &raw.key_file else {
        if let Some((i, name)) = first_account {
            return Err(bad(
                "accounts.key_file",
                format!(
                    "missing: calendars[{i}] reads through account {name}, whose refresh token is sealed with this key (make one with `openssl rand -base64 32 > accounts.key`)"
                ),
            ));
        }
        return Ok(None);
    };
    let read = |key: &str, file: &std::path::Path| {
        let path = resolve_credential(file);
        let content = super::values::read_secret_file(key, &path)?;
        Ok::<_, ConfigError>((path.display().to_string(), content))
    };
    let (path, content) = read("accounts.key_file", file)?;
    let mut vault = Vault::from_file_content(&path, content.expose_secret().as_bytes(), deployment)
        .map_err(|e| bad("accounts.key_file", e.to_string()))?;
    for (i, file) in raw.previous_key_files.iter().enumerate() {
        let key = format!("accounts.previous_key_files[{i}]");
        let (path, content) = read(&key, file)?;
        vault = vault
            .with_previous(&path, content.expose_secret().as_bytes())
            .map_err(|e| bad(key, e.to_string()))?;
    }
    Ok(Some(vault))
}
