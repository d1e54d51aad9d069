//! Delegated accounts (migration `0012_accounts.sql`): who signed in, and their refresh token as
//! the caller sealed it. The store never sees a token in the clear: it keeps bytes.

use crate::Store;
use crate::error::{StoreError, db};
use chrono::{DateTime, Utc};

/// An account's refresh token as sealed by its owner (nonce, ciphertext and tag, the key's id).
#[derive(Clone, PartialEq, Eq)]
pub struct Sealed {
    /// The AES-GCM nonce.
    pub nonce: Vec<u8>,
    /// The ciphertext with its tag.
    pub sealed: Vec<u8>,
    /// Which key sealed it: a short fingerprint, never the key.
    pub key_id: String,
}

impl std::fmt::Debug for Sealed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Sealed(key {}, {} bytes)",
            self.key_id,
            self.sealed.len()
        )
    }
}

/// One stored account.
#[derive(Debug, Clone)]
pub struct Account {
    /// The account's name as `calsync login` and `[[calendars]] account` spell it.
    pub name: String,
    /// The signed-in user's directory object id.
    pub user_id: String,
    /// The signed-in user's UPN.
    pub user_principal: String,
    /// The sealed refresh token.
    pub token: Sealed,
    /// Bumped by every rotation and login.
    pub version: i64,
    /// `Some(why)` when Entra refused the grant: the account must sign in again.
    pub revoked: Option<String>,
    /// When the user last signed in.
    pub signed_in_at: DateTime<Utc>,
    /// When the refresh token was last rotated.
    pub rotated_at: DateTime<Utc>,
}

type Row = (
    String,
    String,
    String,
    Vec<u8>,
    Vec<u8>,
    String,
    i64,
    String,
    Option<String>,
    DateTime<Utc>,
    DateTime<Utc>,
);

const COLUMNS: &str = "name, user_id, user_principal, token_nonce, token_sealed, key_id, version, \
                       state, problem, signed_in_at, rotated_at";

fn account(r: Row) -> Account {
    let (name, user_id, user_principal, nonce, sealed, key_id, version, state, problem, si, ro) = r;
    Account {
        name,
        user_id,
        user_principal,
        token: Sealed {
            nonce,
            sealed,
            key_id,
        },
        version,
        revoked: (state == "revoked").then(|| problem.unwrap_or_default()),
        signed_in_at: si,
        rotated_at: ro,
    }
}

impl Store {
    /// Saves a new sign-in of `name` (replacing any earlier one, revoked or not).
    pub async fn save_login(
        &self,
        name: &str,
        user_id: &str,
        user_principal: &str,
        token: &Sealed,
    ) -> Result<(), StoreError> {
        let query = sqlx::query(
            "INSERT INTO accounts (deployment, name, user_id, user_principal, token_nonce, \
             token_sealed, key_id) VALUES ($1, $2, $3, $4, $5, $6, $7) \
             ON CONFLICT (deployment, name) DO UPDATE SET user_id = EXCLUDED.user_id, \
             user_principal = EXCLUDED.user_principal, token_nonce = EXCLUDED.token_nonce, \
             token_sealed = EXCLUDED.token_sealed, key_id = EXCLUDED.key_id, \
             version = accounts.version + 1, state = 'ok', problem = NULL, \
             signed_in_at = now(), rotated_at = now()",
        )
        .bind(self.deployment())
        .bind(name)
        .bind(user_id)
        .bind(user_principal)
        .bind(&token.nonce)
        .bind(&token.sealed)
        .bind(&token.key_id)
        .execute(&self.pool);
        self.bounded("saving a sign-in", async { query.await.map_err(db) })
            .await?;
        Ok(())
    }

    /// The account `name`, if it signed in.
    pub async fn account(&self, name: &str) -> Result<Option<Account>, StoreError> {
        let sql = format!("SELECT {COLUMNS} FROM accounts WHERE deployment = $1 AND name = $2");
        let query = sqlx::query_as::<_, Row>(&sql)
            .bind(self.deployment())
            .bind(name)
            .fetch_optional(&self.pool);
        let row = self
            .bounded("reading an account", async { query.await.map_err(db) })
            .await?;
        Ok(row.map(account))
    }

    /// Every account of this deployment, by name.
    pub async fn accounts(&self) -> Result<Vec<Account>, StoreError> {
        let sql = format!("SELECT {COLUMNS} FROM accounts WHERE deployment = $1 ORDER BY name");
        let query = sqlx::query_as::<_, Row>(&sql)
            .bind(self.deployment())
            .fetch_all(&self.pool);
        let rows = self
            .bounded("listing accounts", async { query.await.map_err(db) })
            .await?;
        Ok(rows.into_iter().map(account).collect())
    }

    /// Saves the refresh token Entra rotated to, if the account is still at `version` (no login
    /// or other rotation came between). `false`: it moved on, and its token is kept (both are
    /// valid: Entra does not revoke a refresh token when it issues the next).
    pub async fn save_rotation(
        &self,
        name: &str,
        version: i64,
        token: &Sealed,
    ) -> Result<bool, StoreError> {
        let query = sqlx::query(
            "UPDATE accounts SET token_nonce = $4, token_sealed = $5, key_id = $6, \
             version = version + 1, rotated_at = now() \
             WHERE deployment = $1 AND name = $2 AND version = $3 AND state = 'ok'",
        )
        .bind(self.deployment())
        .bind(name)
        .bind(version)
        .bind(&token.nonce)
        .bind(&token.sealed)
        .bind(&token.key_id)
        .execute(&self.pool);
        let done = self
            .bounded("saving a rotated refresh token", async {
                query.await.map_err(db)
            })
            .await?;
        Ok(done.rows_affected() == 1)
    }

    /// Marks `name` revoked for `problem`, unless a login came after `version`.
    pub async fn revoke_account(
        &self,
        name: &str,
        version: i64,
        problem: &str,
    ) -> Result<(), StoreError> {
        let query = sqlx::query(
            "UPDATE accounts SET state = 'revoked', problem = $4 \
             WHERE deployment = $1 AND name = $2 AND version = $3",
        )
        .bind(self.deployment())
        .bind(name)
        .bind(version)
        .bind(problem)
        .execute(&self.pool);
        self.bounded("marking an account revoked", async {
            query.await.map_err(db)
        })
        .await?;
        Ok(())
    }

    /// Deletes `name` and its token; `false` if there was none.
    pub async fn delete_account(&self, name: &str) -> Result<bool, StoreError> {
        let query = sqlx::query("DELETE FROM accounts WHERE deployment = $1 AND name = $2")
            .bind(self.deployment())
            .bind(name)
            .execute(&self.pool);
        let done = self
            .bounded("deleting an account", async { query.await.map_err(db) })
            .await?;
        Ok(done.rows_affected() == 1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sealed(b: u8) -> Sealed {
        Sealed {
            nonce: vec![b; 12],
            sealed: vec![b; 40],
            key_id: "k".into(),
        }
    }

    /// A rotation saves only over the version it read; a login replaces a revoked account and
    /// clears its problem; logout deletes.
    #[sqlx::test(migrations = false)]
    async fn rotations_are_version_checked_and_a_login_clears_a_revocation(pool: sqlx::PgPool) {
        let store = Store::from_pool(pool);
        store.migrate().await.unwrap();
        assert!(store.account("alice").await.unwrap().is_none());
        store
            .save_login("alice", "id-1", "alice@x", &sealed(1))
            .await
            .unwrap();
        let a = store.account("alice").await.unwrap().unwrap();
        assert_eq!((a.version, a.token.clone()), (1, sealed(1)));
        assert!(store.save_rotation("alice", 1, &sealed(2)).await.unwrap());
        assert!(!store.save_rotation("alice", 1, &sealed(3)).await.unwrap());
        let a = store.account("alice").await.unwrap().unwrap();
        assert_eq!((a.version, a.token.clone()), (2, sealed(2)));

        store.revoke_account("alice", 1, "stale").await.unwrap();
        assert!(
            store
                .account("alice")
                .await
                .unwrap()
                .unwrap()
                .revoked
                .is_none()
        );
        store
            .revoke_account("alice", 2, "AADSTS50173")
            .await
            .unwrap();
        let a = store.account("alice").await.unwrap().unwrap();
        assert_eq!(a.revoked.as_deref(), Some("AADSTS50173"));
        assert!(!store.save_rotation("alice", 2, &sealed(4)).await.unwrap());

        store
            .save_login("alice", "id-1", "alice@x", &sealed(5))
            .await
            .unwrap();
        let a = store.account("alice").await.unwrap().unwrap();
        assert_eq!((a.version, a.revoked.clone()), (3, None));
        assert_eq!(store.accounts().await.unwrap().len(), 1);
        assert!(
            store
                .clone()
                .for_deployment("other")
                .accounts()
                .await
                .unwrap()
                .is_empty()
        );
        assert!(store.delete_account("alice").await.unwrap());
        assert!(!store.delete_account("alice").await.unwrap());
    }
}
