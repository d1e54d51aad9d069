//! What every token request shares, whatever the grant: how the app authenticates (a secret, a
//! client assertion, or nothing for a public client) and what a refusal means; and the
//! refresh-token grant of a delegated account (Entra rotates the token at every redemption:
//! Microsoft Learn, "Refresh tokens in the Microsoft identity platform"), each rotation saved
//! before the access token that came with it is used, `invalid_grant` marking it revoked.

use crate::credential::{AccountGrant, Credential, JWT_BEARER, federated_token};
use crate::error::GraphError;
use oauth2::basic::BasicClient;
use oauth2::{
    AuthType, ClientId, ClientSecret, ErrorResponseType, RefreshToken, RequestTokenError, Scope,
    StandardErrorResponse, TokenResponse, TokenUrl,
};
use secrecy::{ExposeSecret, SecretString};
use std::time::Duration;

/// The resource of an app-only scope (`https://graph.microsoft.com/.default` → the URL).
pub(crate) fn resource(scope: &str) -> &str {
    scope.trim_end_matches("/.default")
}

/// How the app authenticates a token request: a secret, a client assertion, or nothing (a
/// public client).
pub(crate) async fn client_auth(
    app: &Credential,
    client_id: &str,
    token_url: &str,
    now: u64,
) -> Result<(Option<ClientSecret>, Option<SecretString>), GraphError> {
    Ok(match app {
        Credential::Secret(s) => (Some(ClientSecret::new(s.expose_secret().to_owned())), None),
        Credential::Certificate(c) => (None, Some(c.assertion(client_id, token_url, now)?)),
        Credential::Federated { token_file } => (None, Some(federated_token(token_file).await?)),
        Credential::Managed(_) | Credential::Public | Credential::Account(_) => (None, None),
    })
}

/// Seconds since the Unix epoch (0 if the clock is before it).
pub(crate) fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// A failed token request as a [`GraphError`]: the endpoint's refusal (its `error` and the
/// first 300 characters of its description), or why there was no answer.
pub(crate) fn refused<T>(
    e: RequestTokenError<oauth2::HttpClientError<reqwest::Error>, StandardErrorResponse<T>>,
) -> GraphError
where
    T: ErrorResponseType + AsRef<str> + std::fmt::Display,
{
    match e {
        RequestTokenError::ServerResponse(r) => GraphError::AuthRejected {
            error: r.error().as_ref().to_owned(),
            description: r
                .error_description()
                .cloned()
                .unwrap_or_default()
                .chars()
                .take(300)
                .collect(),
        },
        RequestTokenError::Request(e) => GraphError::AuthUnavailable {
            reason: match e {
                oauth2::HttpClientError::Reqwest(r) => r.without_url().to_string(),
                other => other.to_string(),
            },
        },
        RequestTokenError::Parse(_, body) => GraphError::AuthUnavailable {
            reason: format!("unreadable answer ({} bytes)", body.len()),
        },
        RequestTokenError::Other(m) => GraphError::AuthUnavailable { reason: m },
    }
}

/// The delegated scopes calsync asks for, on `resource` (e.g. `https://graph.microsoft.com`):
/// `offline_access` (a refresh token), `Calendars.Read` (the user's calendars) and `User.Read`
/// (`/me`'s id and UPN at sign-in). Microsoft Learn, "Microsoft Graph permissions reference".
pub fn delegated_scopes(resource: &str) -> Vec<Scope> {
    let resource = resource.trim_end_matches('/');
    vec![
        Scope::new("offline_access".into()),
        Scope::new(format!("{resource}/Calendars.Read")),
        Scope::new(format!("{resource}/User.Read")),
    ]
}

/// The AADSTS code at the head of an Entra error description (`AADSTS50173: The provided
/// grant has expired …`), if any.
pub fn aadsts_code(description: &str) -> Option<u32> {
    let rest = description.trim_start().strip_prefix("AADSTS")?;
    let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
    digits.parse().ok()
}

/// Redeems `grant`'s refresh token for an access token (and its lifetime), saving the rotated
/// refresh token first. `invalid_grant` marks the account revoked.
pub(crate) async fn redeem(
    token_url: &url::Url,
    client_id: &str,
    scope: &str,
    http: &reqwest::Client,
    grant: &AccountGrant,
) -> Result<(SecretString, Duration), GraphError> {
    let loaded = grant.store.load().await?;
    let (secret, assertion) =
        client_auth(&grant.app, client_id, token_url.as_str(), unix_now()).await?;
    let mut client = BasicClient::new(ClientId::new(client_id.to_owned()))
        .set_token_uri(TokenUrl::from_url(token_url.clone()))
        .set_auth_type(AuthType::RequestBody);
    if let Some(s) = secret {
        client = client.set_client_secret(s);
    }
    let refresh = RefreshToken::new(loaded.token.expose_secret().to_owned());
    let mut request = client
        .exchange_refresh_token(&refresh)
        .add_scopes(delegated_scopes(resource(scope)));
    if let Some(a) = &assertion {
        request = request
            .add_extra_param("client_assertion_type", JWT_BEARER)
            .add_extra_param("client_assertion", a.expose_secret().to_owned());
    }
    match request.request_async(http).await {
        Ok(resp) => {
            if let Some(next) = resp.refresh_token() {
                grant
                    .store
                    .save(loaded.version, SecretString::from(next.secret().to_owned()))
                    .await?;
            }
            let lifetime = resp.expires_in().unwrap_or(Duration::from_secs(3599));
            Ok((
                SecretString::from(resp.access_token().secret().to_owned()),
                lifetime,
            ))
        }
        Err(e) => match refused(e) {
            GraphError::AuthRejected { error, description } if error == "invalid_grant" => {
                let reason = format!("Entra refused its refresh token: {description}");
                grant.store.revoke(loaded.version, reason.clone()).await?;
                Err(GraphError::SignInRequired {
                    account: grant.name.clone(),
                    reason,
                })
            }
            other => Err(other),
        },
    }
}
