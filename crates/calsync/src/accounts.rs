//! `calsync login`, `calsync accounts`, `calsync logout` (issue 26): delegated accounts signed in
//! by the device code flow, their refresh tokens sealed in the database.

use crate::commands::connect_store;
use crate::config::{Config, RawConfig};
use anyhow::Context;
use calsync_graph::GraphClient;
use std::io::Write;

/// Signs `name` in by the device code flow and saves its sealed refresh token; the calendars
/// that name it are asked for a round. Nothing is saved unless the user who signed in is the
/// one its calendars name.
pub async fn login(
    cfg: &Config,
    name: &str,
    shutdown: impl std::future::Future<Output = ()>,
) -> anyhow::Result<()> {
    let Some(vault) = &cfg.vault else {
        anyhow::bail!(
            "accounts.key_file is not set: calsync seals each account's refresh token with that key (make one with `openssl rand -base64 32 > accounts.key`)"
        );
    };
    let named: Vec<_> = cfg
        .tuples
        .iter()
        .filter(|t| t.account.as_deref() == Some(name))
        .collect();
    let store = connect_store(&cfg.database)
        .await?
        .for_deployment(&cfg.ownership.deployment);
    store
        .migrate()
        .await
        .context("cannot apply database migrations")?;
    let graph = GraphClient::new(cfg.graph.clone(), cfg.auth.clone())
        .context("cannot build the Graph client")?;
    let device = graph
        .start_device_login(&cfg.auth)
        .await
        .with_context(|| format!("cannot start a sign-in for account {name}"))?;
    println!("{}", device.instructions());
    println!(
        "(the code is good for {} minutes; waiting for account {name} to sign in…)",
        device.expires_in().as_secs() / 60
    );
    std::io::stdout().flush().ok();
    let signed = tokio::select! {
        r = graph.finish_device_login(&cfg.auth, &device) => {
            r.with_context(|| format!("account {name} did not sign in"))?
        }
        () = shutdown => anyhow::bail!("interrupted: account {name} was not signed in"),
    };
    if let Some(t) = named.iter().find(|t| {
        !t.user.eq_ignore_ascii_case(&signed.user_id)
            && !t.user.eq_ignore_ascii_case(&signed.user_principal)
    }) {
        anyhow::bail!(
            "{} signed in, but calendar '{}' reads account {name} as the mailbox {}; nothing was saved (sign in as that user, or fix the calendar's user)",
            signed.user_principal,
            t.key,
            t.user
        );
    }
    let sealed = vault.seal(name, &signed.refresh)?;
    store
        .save_login(name, &signed.user_id, &signed.user_principal, &sealed)
        .await
        .context("cannot save the account")?;
    println!(
        "account {name}: signed in as {} (id {}); its refresh token is sealed in the database with key {}",
        signed.user_principal,
        signed.user_id,
        vault.key_id()
    );
    let keys: Vec<String> = named.iter().map(|t| t.key.clone()).collect();
    if !keys.is_empty() {
        // A running daemon takes these at once instead of at the calendars' next retry.
        store
            .request_rounds(&keys)
            .await
            .context("cannot ask for the account's rounds")?;
        println!(
            "{} calendar(s) read through {name} will sync at their next round",
            keys.len()
        );
    } else {
        println!("no [[calendars]] entry names account {name} yet");
    }
    Ok(())
}

/// Prints each account: who signed in, when, and whether it must sign in again.
pub async fn list(raw: &RawConfig, json: bool) -> anyhow::Result<()> {
    let store = connect_store(&raw.database_config()?)
        .await?
        .for_deployment(&raw.ownership()?.deployment);
    let accounts = store.accounts().await.context("cannot list accounts")?;
    if json {
        for a in &accounts {
            let v = serde_json::json!({
                "account": a.name,
                "user": a.user_principal,
                "user_id": a.user_id,
                "state": if a.revoked.is_some() { "revoked" } else { "ok" },
                "problem": a.revoked,
                "signed_in_at": a.signed_in_at,
                "rotated_at": a.rotated_at,
                "key_id": a.token.key_id,
            });
            println!("{v}");
        }
        return Ok(());
    }
    if accounts.is_empty() {
        println!("no account has signed in (`calsync login <account>`)");
        return Ok(());
    }
    println!(
        "{:<20} {:<32} {:<8} {:<20} {:<20} {:<16}",
        "ACCOUNT", "USER", "STATE", "SIGNED IN", "TOKEN ROTATED", "SEALED WITH KEY"
    );
    for a in &accounts {
        println!(
            "{:<20} {:<32} {:<8} {:<20} {:<20} {:<16}",
            a.name,
            a.user_principal,
            if a.revoked.is_some() { "revoked" } else { "ok" },
            a.signed_in_at.format("%Y-%m-%d %H:%M:%S"),
            a.rotated_at.format("%Y-%m-%d %H:%M:%S"),
            a.token.key_id,
        );
        if let Some(why) = &a.revoked {
            println!(
                "  must sign in again: run `calsync login {}` ({why})",
                a.name
            );
        }
    }
    Ok(())
}

/// Deletes `name`'s sealed token; its calendars fail with a login hint until it signs in.
pub async fn logout(raw: &RawConfig, name: &str) -> anyhow::Result<()> {
    let store = connect_store(&raw.database_config()?)
        .await?
        .for_deployment(&raw.ownership()?.deployment);
    if !store
        .delete_account(name)
        .await
        .context("cannot delete the account")?
    {
        anyhow::bail!("no account is named '{name}'; `calsync accounts` lists them");
    }
    println!(
        "account {name}: its refresh token is deleted; its calendars stop syncing until `calsync login {name}` (to end the user's sessions at Microsoft too, revoke them in Entra: `Revoke-MgUserSignInSession`)"
    );
    Ok(())
}
