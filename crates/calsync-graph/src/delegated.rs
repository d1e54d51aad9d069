//! Delegated accounts (issue 26): a user signs in once by the device code flow (RFC 8628 as
//! Microsoft Entra serves it: Microsoft Learn, "OAuth 2.0 device authorization grant"), and
//! calsync keeps the refresh token it got (through a [`crate::RefreshStore`]: sealed in
//! PostgreSQL by the caller; this crate knows no SQL). An account's client
//! ([`crate::GraphClient::for_account`]) reads `/me` with access tokens redeemed from it.

use crate::auth::AuthConfig;
use crate::credential::{AccountGrant, Credential};
use crate::error::GraphError;
use crate::grant::{aadsts_code, delegated_scopes, refused, resource};
use oauth2::basic::BasicClient;
use oauth2::{
    AuthType, ClientId, DeviceAuthorizationResponse, DeviceAuthorizationUrl,
    ExtraDeviceAuthorizationFields, TokenResponse, TokenUrl,
};
use secrecy::{ExposeSecret, SecretString};
use std::sync::Arc;
use std::time::Duration;

/// Entra's device authorization answer also carries `message`, the text to show the user.
#[derive(Debug, Clone, serde::Deserialize, serde::Serialize)]
pub struct EntraDeviceFields {
    /// "To sign in, use a web browser to open the page … and enter the code … to authenticate."
    #[serde(default)]
    pub message: Option<String>,
}

impl ExtraDeviceAuthorizationFields for EntraDeviceFields {}

/// A device code sign-in in progress: show [`DeviceLogin::instructions`] to the user, then
/// wait with [`crate::GraphClient::finish_device_login`].
pub struct DeviceLogin {
    pub(crate) response: DeviceAuthorizationResponse<EntraDeviceFields>,
}

impl std::fmt::Debug for DeviceLogin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeviceLogin")
            .field("verification_uri", &self.verification_uri())
            .field("user_code", &self.user_code())
            .finish_non_exhaustive()
    }
}

impl DeviceLogin {
    /// The page where the user enters the code.
    pub fn verification_uri(&self) -> &str {
        self.response.verification_uri().as_str()
    }

    /// The code the user enters (short-lived, shown to them; not a secret of calsync's).
    pub fn user_code(&self) -> &str {
        self.response.user_code().secret()
    }

    /// How long the code is good for (Entra: 15 minutes).
    pub fn expires_in(&self) -> Duration {
        self.response.expires_in()
    }

    /// What to tell the user: Entra's own message when it sent one.
    pub fn instructions(&self) -> String {
        match &self.response.extra_fields().message {
            Some(m) if !m.is_empty() => m.clone(),
            _ => format!(
                "To sign in, use a web browser to open the page {} and enter the code {} to authenticate.",
                self.verification_uri(),
                self.user_code()
            ),
        }
    }
}

/// A completed sign-in: who signed in and their first tokens.
pub struct SignedIn {
    /// The directory object id `/me` answered.
    pub user_id: String,
    /// The UPN `/me` answered.
    pub user_principal: String,
    /// The refresh token to keep (sealed); never logged.
    pub refresh: SecretString,
}

impl std::fmt::Debug for SignedIn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SignedIn")
            .field("user_id", &self.user_id)
            .field("user_principal", &self.user_principal)
            .finish_non_exhaustive()
    }
}

/// The device code endpoint beside a v2.0 token endpoint (`…/oauth2/v2.0/token` →
/// `…/oauth2/v2.0/devicecode`).
pub fn device_code_url(token_url: &url::Url) -> Result<url::Url, GraphError> {
    let path = token_url.path();
    match path.strip_suffix("/token") {
        Some(base) => {
            let mut u = token_url.clone();
            u.set_path(&format!("{base}/devicecode"));
            Ok(u)
        }
        None => Err(GraphError::AuthUnavailable {
            reason: format!(
                "{path}: not a token endpoint ending in /token; no device code endpoint beside it"
            ),
        }),
    }
}

/// The secret a sign-in is made with: the app's client secret, or none for a public client
/// (the only two kinds `start_device_login` signs in as).
fn login_secret(auth: &AuthConfig) -> Option<oauth2::ClientSecret> {
    match &auth.credential {
        Credential::Secret(s) => Some(oauth2::ClientSecret::new(s.expose_secret().to_owned())),
        _ => None,
    }
}

/// A refused sign-in, said so the user knows what to do: declined, expired, or blocked by
/// Conditional Access (Entra's device code errors: `authorization_declined`, `expired_token`,
/// `bad_verification_code`; Microsoft Learn, "OAuth 2.0 device authorization grant").
pub(crate) fn sign_in_hint(e: GraphError) -> GraphError {
    match e {
        GraphError::AuthRejected { error, description } => {
            let hint = match error.as_str() {
                "authorization_declined" | "access_denied" => " (the user declined the sign-in)",
                "expired_token" => {
                    " (the code expired before the user signed in: run calsync login again)"
                }
                _ if aadsts_code(&description).is_some_and(|c| c == 53003 || c == 530033) => {
                    " (the tenant's Conditional Access blocks this sign-in, often the device code flow itself: an admin must exclude this app or allow the flow; Microsoft Learn, \"Block authentication flows with Conditional Access\")"
                }
                _ => "",
            };
            GraphError::AuthRejected {
                error,
                description: format!("{description}{hint}"),
            }
        }
        other => other,
    }
}

impl crate::GraphClient {
    /// A client for the account `grant` names: the same connections, budget and origin
    /// checks, its own tokens (redeemed from the account's refresh token, with `auth`'s token
    /// endpoint, client id and resource) and `/me` paths. Its replays are never batched.
    pub fn for_account(&self, auth: &AuthConfig, grant: AccountGrant) -> crate::GraphClient {
        let cfg = AuthConfig {
            credential: Credential::Account(grant),
            ..auth.clone()
        };
        crate::GraphClient {
            inner: self.inner.clone(),
            account: Some(Arc::new(crate::TokenSource::new(
                cfg,
                self.inner.http.clone(),
            ))),
        }
    }

    /// Whether this is an account's client (`/me`, delegated tokens).
    pub fn is_account(&self) -> bool {
        self.account.is_some()
    }

    /// Whether this client can replay `link`. The app's client cannot replay a `/me/…` link
    /// (Graph answers `/me` to delegated tokens alone: a link saved while the calendar was
    /// read through an account, whose round then starts afresh). An account's client replays
    /// either form: Graph serves `/users/{id}/…` of the user's own mailbox to their delegated
    /// token, and its links have been seen to change form (`/calendarView` became
    /// `/calendar/calendarView` in a deltaLink: microsoft-graph-docs-contrib#7691).
    pub fn link_fits(&self, link: &str) -> bool {
        let me = match link.strip_prefix(self.inner.root_slash.as_str()) {
            Some(rest) => rest.get(..3).is_some_and(|p| p.eq_ignore_ascii_case("me/")),
            None => {
                let base = self.inner.cfg.base_url.path().trim_end_matches('/');
                url::Url::parse(link).is_ok_and(|u| {
                    u.path()
                        .strip_prefix(base)
                        .is_some_and(|p| p.to_ascii_lowercase().starts_with("/me/"))
                })
            }
        };
        !me || self.account.is_some()
    }

    /// Starts a device code sign-in as the app `auth` describes (`POST …/devicecode`): a
    /// public client, or a confidential one by its secret. An app that proves itself by
    /// assertion is refused: the poll would re-send one assertion many times, and Entra may
    /// refuse a replayed one.
    pub async fn start_device_login(&self, auth: &AuthConfig) -> Result<DeviceLogin, GraphError> {
        if !matches!(auth.credential, Credential::Secret(_) | Credential::Public) {
            return Err(GraphError::AuthUnavailable {
                reason: format!(
                    "calsync login signs in as a public client or with a client secret, not with auth.kind = {}",
                    auth.credential.kind()
                ),
            });
        }
        let url = device_code_url(&auth.token_url)?;
        let mut client = BasicClient::new(ClientId::new(auth.client_id.clone()))
            .set_device_authorization_url(DeviceAuthorizationUrl::from_url(url))
            .set_auth_type(AuthType::RequestBody);
        if let Some(s) = login_secret(auth) {
            client = client.set_client_secret(s);
        }
        let response = client
            .exchange_device_code()
            .add_scopes(delegated_scopes(resource(&auth.scope)))
            .request_async(&self.inner.http)
            .await
            .map_err(|e| sign_in_hint(refused(e)))?;
        Ok(DeviceLogin { response })
    }

    /// Waits for the user to complete `login` (polling as Entra asks: `authorization_pending`,
    /// `slow_down`), then asks `/me` who signed in.
    pub async fn finish_device_login(
        &self,
        auth: &AuthConfig,
        login: &DeviceLogin,
    ) -> Result<SignedIn, GraphError> {
        let mut client = BasicClient::new(ClientId::new(auth.client_id.clone()))
            .set_token_uri(TokenUrl::from_url(auth.token_url.clone()))
            .set_auth_type(AuthType::RequestBody);
        if let Some(s) = login_secret(auth) {
            client = client.set_client_secret(s);
        }
        let sleep = |d: Duration| tokio::time::sleep(d);
        let tokens = client
            .exchange_device_access_token(&login.response)
            .request_async(&self.inner.http, sleep, None)
            .await
            .map_err(|e| sign_in_hint(refused(e)))?;
        let refresh = tokens
            .refresh_token()
            .map(|r| SecretString::from(r.secret().to_owned()))
            .ok_or_else(|| GraphError::AuthRejected {
                error: "no_refresh_token".into(),
                description: "Entra answered the sign-in without a refresh token; the app registration must allow offline_access".into(),
            })?;
        let access = crate::auth::AccessToken {
            secret: SecretString::from(tokens.access_token().secret().to_owned()),
            generation: 0,
        };
        let mut url = self.inner.cfg.base_url.clone();
        if let Ok(mut segs) = url.path_segments_mut() {
            segs.pop_if_empty().push("me");
        }
        url.query_pairs_mut()
            .append_pair("$select", "id,userPrincipalName");
        let answer = self
            .exchange(self.inner.http.get(url), &access, 1024 * 1024)
            .await?;
        if answer.status != 200 {
            return Err(crate::classify(
                answer.status,
                answer.retry_after,
                &answer.body,
            ));
        }
        #[derive(serde::Deserialize)]
        #[serde(rename_all = "camelCase")]
        struct Me {
            id: String,
            user_principal_name: Option<String>,
        }
        let me: Me = serde_json::from_slice(&answer.body).map_err(|e| GraphError::Malformed {
            reason: format!("/me is not a user: {e}"),
        })?;
        Ok(SignedIn {
            user_principal: me.user_principal_name.unwrap_or_else(|| me.id.clone()),
            user_id: me.id,
            refresh,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_aadsts_code_is_read_from_an_entra_description() {
        assert_eq!(
            aadsts_code("AADSTS50173: The provided grant has expired due to it being revoked"),
            Some(50173)
        );
        assert_eq!(aadsts_code("AADSTS700082: expired"), Some(700082));
        assert_eq!(aadsts_code("something else"), None);
    }

    #[test]
    fn a_refused_sign_in_says_what_to_do() {
        let said = |error: &str, description: &str| {
            sign_in_hint(GraphError::AuthRejected {
                error: error.into(),
                description: description.into(),
            })
            .to_string()
        };
        assert!(
            said("authorization_declined", "AADSTS70000: declined")
                .contains("declined the sign-in")
        );
        assert!(said("expired_token", "AADSTS70020: expired").contains("run calsync login again"));
        assert!(
            said(
                "invalid_grant",
                "AADSTS53003: Access has been blocked by Conditional Access policies."
            )
            .contains("Conditional Access blocks")
        );
        assert!(said("invalid_client", "AADSTS7000215: bad secret").ends_with("bad secret"));
    }

    #[test]
    fn the_device_code_endpoint_sits_beside_the_token_endpoint() {
        let t: url::Url = "https://login.microsoftonline.com/t/oauth2/v2.0/token"
            .parse()
            .unwrap();
        assert_eq!(
            device_code_url(&t).unwrap().as_str(),
            "https://login.microsoftonline.com/t/oauth2/v2.0/devicecode"
        );
        let odd: url::Url = "https://example.com/x".parse().unwrap();
        assert!(device_code_url(&odd).is_err());
    }

    #[test]
    fn delegated_scopes_ask_for_a_refresh_token_calendars_and_the_user() {
        let s: Vec<String> = delegated_scopes("https://graph.microsoft.com/")
            .into_iter()
            .map(|s| s.to_string())
            .collect();
        assert_eq!(
            s,
            [
                "offline_access",
                "https://graph.microsoft.com/Calendars.Read",
                "https://graph.microsoft.com/User.Read"
            ]
        );
    }
}
