//! App-only tokens for Graph: fetched with the `oauth2` crate (client credentials, with a
//! secret or a client assertion) or from a managed identity's endpoint, cached, renewed before
//! they expire, and renewed once per expiry however many requests notice it.

use crate::credential::{Credential, JWT_BEARER};
use crate::error::GraphError;
use oauth2::basic::BasicClient;
use oauth2::{AuthType, ClientId, Scope, TokenResponse, TokenUrl};
use secrecy::{ExposeSecret, SecretString};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;
use tokio::sync::Mutex;
use tokio::time::Instant;

/// Where and how to ask for tokens.
#[derive(Clone)]
pub struct AuthConfig {
    /// The tenant's OAuth 2.0 token endpoint (`.../oauth2/v2.0/token`).
    pub token_url: url::Url,
    /// The app registration's client id (unused by a managed identity, which has its own).
    pub client_id: String,
    /// What calsync proves its identity with; never logged or `Debug`-printed but by kind.
    pub credential: Credential,
    /// The scope asked for, e.g. `https://graph.microsoft.com/.default`.
    pub scope: String,
}

impl std::fmt::Debug for AuthConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuthConfig")
            .field("token_url", &self.token_url.as_str())
            .field("client_id", &self.client_id)
            .field("credential", &self.credential)
            .field("scope", &self.scope)
            .finish()
    }
}

/// An access token and the generation it belongs to, so a 401 invalidates only that one.
#[derive(Clone)]
pub struct AccessToken {
    /// The bearer token; never logged or `Debug`-printed.
    pub secret: SecretString,
    /// Bumped each time a new token is fetched.
    pub generation: u64,
}

impl std::fmt::Debug for AccessToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "AccessToken(generation {}, <redacted>)", self.generation)
    }
}

struct Cached {
    token: AccessToken,
    renew_at: Instant,
}

/// The last failed fetch, answered to every caller until `until`.
struct Held {
    error: GraphError,
    until: Instant,
    failures: u32,
}

/// The first hold after a failed token fetch; it doubles per failure up to [`MAX_HOLD`].
pub const MIN_HOLD: Duration = Duration::from_secs(1);
/// The longest hold after repeated failed token fetches.
pub const MAX_HOLD: Duration = Duration::from_secs(300);

/// Fetches and caches app-only tokens (client credentials), renewing them before expiry; concurrent callers share one fetch, and a failed fetch is held and answered to all for a while.
pub struct TokenSource {
    cfg: AuthConfig,
    http: reqwest::Client,
    cached: Mutex<Option<Cached>>,
    /// Behind the same lock as `cached` in effect: only touched while `cached` is held.
    held: std::sync::Mutex<Option<Held>>,
    generation: AtomicU64,
    renewals: AtomicU64,
}

impl std::fmt::Debug for TokenSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenSource")
            .field("cfg", &self.cfg)
            .field("renewals", &self.renewals.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

impl TokenSource {
    /// A source asking `cfg`'s token endpoint through `http`.
    pub fn new(cfg: AuthConfig, http: reqwest::Client) -> Self {
        TokenSource {
            cfg,
            http,
            cached: Mutex::new(None),
            held: std::sync::Mutex::new(None),
            generation: AtomicU64::new(0),
            renewals: AtomicU64::new(0),
        }
    }

    /// Where and how it asks for tokens.
    pub fn config(&self) -> &AuthConfig {
        &self.cfg
    }

    /// How many tokens were fetched so far.
    pub fn renewals(&self) -> u64 {
        self.renewals.load(Ordering::Relaxed)
    }

    fn held(&self) -> std::sync::MutexGuard<'_, Option<Held>> {
        self.held.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A valid token: the cached one, or a new one when it is near expiry or was invalidated.
    /// Concurrent callers wait for one fetch instead of each starting their own. After a
    /// failed fetch the same error is answered, without asking again, for a hold that
    /// doubles per consecutive failure (1 s … 5 min): thousands of tuples cause one token
    /// request per hold, not a storm.
    pub async fn token(&self) -> Result<AccessToken, GraphError> {
        let mut cached = self.cached.lock().await;
        if let Some(c) = cached.as_ref() {
            if Instant::now() < c.renew_at {
                return Ok(c.token.clone());
            }
        }
        if let Some(h) = self.held().as_ref() {
            if Instant::now() < h.until {
                return Err(h.error.clone());
            }
        }
        let (secret, lifetime) = match self.fetch().await {
            Ok(t) => {
                *self.held() = None;
                t
            }
            // Answered from the store without asking Entra: not held, so a new sign-in is
            // seen at the next round.
            Err(error @ GraphError::SignInRequired { .. }) => return Err(error),
            Err(error) => {
                let mut held = self.held();
                let failures = held.as_ref().map_or(0, |h| h.failures) + 1;
                let hold = MIN_HOLD
                    .saturating_mul(1u32 << (failures - 1).min(16))
                    .min(MAX_HOLD);
                *held = Some(Held {
                    error: error.clone(),
                    until: Instant::now() + hold,
                    failures,
                });
                return Err(error);
            }
        };
        let generation = self.generation.fetch_add(1, Ordering::Relaxed) + 1;
        // Renew at 90% of the lifetime, at most five minutes early (Azure AD: 3599 s tokens).
        let margin = (lifetime / 10).min(Duration::from_secs(300));
        let token = AccessToken { secret, generation };
        *cached = Some(Cached {
            token: token.clone(),
            renew_at: Instant::now() + lifetime.saturating_sub(margin),
        });
        Ok(token)
    }

    /// Forgets `token` after Graph answered 401 to it; a newer token is kept.
    pub async fn invalidate(&self, token: &AccessToken) {
        let mut cached = self.cached.lock().await;
        if cached
            .as_ref()
            .is_some_and(|c| c.token.generation == token.generation)
        {
            *cached = None;
        }
    }

    async fn fetch(&self) -> Result<(SecretString, Duration), GraphError> {
        let now = crate::grant::unix_now();
        match &self.cfg.credential {
            Credential::Managed(m) => {
                let resource = crate::grant::resource(&self.cfg.scope);
                let token = m.token(&self.http, resource, now).await?;
                self.renewals.fetch_add(1, Ordering::Relaxed);
                return Ok(token);
            }
            Credential::Account(grant) => {
                let token = crate::grant::redeem(
                    &self.cfg.token_url,
                    &self.cfg.client_id,
                    &self.cfg.scope,
                    &self.http,
                    grant,
                )
                .await?;
                self.renewals.fetch_add(1, Ordering::Relaxed);
                return Ok(token);
            }
            Credential::Public => {
                return Err(GraphError::AuthRejected {
                    error: "no_app_credential".into(),
                    description: "auth.kind = \"public_client\" gets no app-only token: only calendars with an `account` are synced".into(),
                });
            }
            Credential::Secret(_) | Credential::Certificate(_) | Credential::Federated { .. } => {}
        }
        let (secret, assertion) = crate::grant::client_auth(
            &self.cfg.credential,
            &self.cfg.client_id,
            self.cfg.token_url.as_str(),
            now,
        )
        .await?;
        let mut client = BasicClient::new(ClientId::new(self.cfg.client_id.clone()))
            .set_token_uri(TokenUrl::from_url(self.cfg.token_url.clone()))
            .set_auth_type(AuthType::RequestBody);
        if let Some(s) = secret {
            client = client.set_client_secret(s);
        }
        let mut request = client
            .exchange_client_credentials()
            .add_scope(Scope::new(self.cfg.scope.clone()));
        if let Some(a) = &assertion {
            request = request
                .add_extra_param("client_assertion_type", JWT_BEARER)
                .add_extra_param("client_assertion", a.expose_secret().to_owned());
        }
        match request.request_async(&self.http).await {
            Ok(resp) => {
                self.renewals.fetch_add(1, Ordering::Relaxed);
                let lifetime = resp.expires_in().unwrap_or(Duration::from_secs(3599));
                Ok((
                    SecretString::from(resp.access_token().secret().to_owned()),
                    lifetime,
                ))
            }
            Err(e) => Err(match crate::grant::refused(e) {
                // Name what calsync presented, so a refusal says which key or file to fix.
                GraphError::AuthRejected { error, description } => {
                    let description = match &self.cfg.credential {
                        Credential::Certificate(c) => {
                            format!("{description} (calsync signed with {})", c.describe())
                        }
                        Credential::Federated { token_file } => format!(
                            "{description} (calsync presented the federated token in {})",
                            token_file.display()
                        ),
                        _ => description,
                    };
                    GraphError::AuthRejected { error, description }
                }
                other => other,
            }),
        }
    }
}
