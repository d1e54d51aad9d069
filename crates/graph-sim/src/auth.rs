//! The OAuth2 client-credentials token endpoint and bearer checks, with Azure AD shaped answers;
//! client assertions and the managed identity endpoints are checked in [`crate::assertion`].

use crate::assertion::{
    CertificatePolicy, FederatedCredential, RegisteredCertificate, Replays, TOKEN_EXCHANGE_AUDIENCE,
};
use crate::error::GraphError;
use chrono::{DateTime, Duration, Utc};
use rand::Rng;
use rand::rngs::StdRng;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use std::collections::HashMap;

/// A registered application that may ask for app-only tokens.
#[derive(Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ClientApp {
    /// The app's client id.
    pub client_id: String,
    /// The app's client secret (a test value; the simulator guards nothing real).
    pub client_secret: String,
    /// Certificates registered on the app (client assertions signed with their keys).
    #[serde(default)]
    pub certificates: Vec<RegisteredCertificate>,
    /// Federated identity credentials: whose platform tokens stand for the app.
    #[serde(default)]
    pub federated: Vec<FederatedCredential>,
    /// "Allow public client flows": delegated grants without a credential (device code).
    #[serde(default)]
    pub allow_public_client: bool,
}

impl ClientApp {
    /// An app with a secret and nothing else.
    pub fn with_secret(client_id: &str, client_secret: &str) -> ClientApp {
        ClientApp {
            client_id: client_id.into(),
            client_secret: client_secret.into(),
            certificates: Vec::new(),
            federated: Vec::new(),
            allow_public_client: false,
        }
    }
}

/// The host's managed identities, as the IMDS and App Service endpoints answer for them.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(default)]
pub struct ManagedIdentities {
    /// The host has a system-assigned identity (asked for without a client id).
    pub system_assigned: bool,
    /// The client ids of the user-assigned identities attached to the host.
    pub user_assigned: Vec<String>,
    /// App Service's `IDENTITY_HEADER`: `X-IDENTITY-HEADER` must carry it.
    pub identity_header: String,
}

impl Default for ManagedIdentities {
    fn default() -> Self {
        ManagedIdentities {
            system_assigned: true,
            user_assigned: Vec::new(),
            identity_header: "graph-sim-identity-header".into(),
        }
    }
}

impl std::fmt::Debug for ClientApp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientApp")
            .field("client_id", &self.client_id)
            .field("client_secret", &"<redacted>")
            .field("certificates", &self.certificates.len())
            .field("federated", &self.federated)
            .finish()
    }
}

/// Who a bearer token speaks for: the app itself, or (delegated, `/me`) one user.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Subject {
    /// An app-only token (client credentials), for this client id.
    App(String),
    /// A delegated token for the user at this index (for `/me`).
    User(usize),
}

#[derive(Debug)]
struct Issued {
    expires: DateTime<Utc>,
    subject: Subject,
}

/// The token endpoint and bearer checks: which apps may get tokens, and the tokens issued.
#[derive(Debug)]
pub struct Auth {
    /// The tenant id or domain the token endpoint answers for.
    pub tenant: String,
    /// The registered apps.
    pub clients: Vec<ClientApp>,
    /// How long an access token lives.
    pub lifetime: Duration,
    tokens: HashMap<String, Issued>,
    /// Tokens issued so far.
    pub issued: u64,
    /// The last access tokens minted, newest last, so tests can look for them where they
    /// must never appear (logs, status output).
    minted: std::collections::VecDeque<String>,
    /// The key the simulated platform issuer signs federated tokens with.
    platform_key: [u8; 32],
    replays: Replays,
    /// How certificates are looked up.
    pub certificate_policy: CertificatePolicy,
    /// The host's managed identities.
    pub managed: ManagedIdentities,
    /// Managed identity tokens issued so far.
    pub managed_issued: u64,
    /// The last client assertions presented, newest last, so tests can look for them where
    /// they must never appear.
    presented: std::collections::VecDeque<String>,
    /// Device codes and refresh tokens.
    pub delegated: crate::delegated::Delegated,
}

/// An answer of the token endpoint that is not a token: status and AAD error body.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenError {
    /// The HTTP status.
    pub status: u16,
    /// The JSON body (Azure AD's shape: `error`, `error_description`, …).
    pub body: Value,
}

fn aad_error(
    status: u16,
    error: &str,
    code: u32,
    description: &str,
    now: DateTime<Utc>,
) -> TokenError {
    TokenError {
        status,
        body: json!({
            "error": error,
            "error_description": format!("AADSTS{code}: {description}"),
            "error_codes": [code],
            "timestamp": now.format("%Y-%m-%d %H:%M:%SZ").to_string(),
            "trace_id": "00000000-0000-0000-0000-000000000000",
            "correlation_id": "00000000-0000-0000-0000-000000000000",
            "error_uri": "https://login.microsoftonline.com/error?code=".to_owned() + &code.to_string(),
        }),
    }
}

impl Auth {
    /// An endpoint for `tenant` that knows `clients` and issues tokens living `lifetime`.
    pub fn new(tenant: String, clients: Vec<ClientApp>, lifetime: Duration) -> Self {
        Auth {
            tenant,
            clients,
            lifetime,
            tokens: HashMap::new(),
            issued: 0,
            minted: std::collections::VecDeque::new(),
            platform_key: *b"graph-sim platform issuer key!!!",
            replays: Replays::default(),
            certificate_policy: CertificatePolicy::default(),
            managed: ManagedIdentities::default(),
            managed_issued: 0,
            presented: std::collections::VecDeque::new(),
            delegated: Default::default(),
        }
    }

    /// The last (up to 1,024) client assertions presented, oldest first.
    pub fn presented_assertions(&self) -> Vec<String> {
        self.presented.iter().cloned().collect()
    }

    /// The host's managed identities are `managed`.
    pub fn with_managed(self, managed: ManagedIdentities) -> Auth {
        Auth { managed, ..self }
    }

    /// A platform token for `subject` (e.g. `system:serviceaccount:calsync:calsync`), as the
    /// AKS webhook projects it into `AZURE_FEDERATED_TOKEN_FILE`, valid `lifetime_secs`.
    pub fn platform_token(&self, subject: &str, now: DateTime<Utc>, lifetime_secs: i64) -> String {
        crate::assertion::platform_token(
            &self.platform_key,
            subject,
            TOKEN_EXCHANGE_AUDIENCE,
            now.timestamp(),
            lifetime_secs,
        )
    }

    pub(crate) fn mint(
        &mut self,
        subject: Subject,
        now: DateTime<Utc>,
        rng: &mut StdRng,
    ) -> String {
        let mut raw = [0u8; 32];
        rng.fill(&mut raw[..]);
        let tok = format!(
            "eyJ0eXAiOiJKV1QiLCJhbGciOiJub25lIn0.{}",
            raw.iter().map(|b| format!("{b:02x}")).collect::<String>()
        );
        self.tokens.retain(|_, t| t.expires > now);
        self.tokens.insert(
            tok.clone(),
            Issued {
                expires: now + self.lifetime,
                subject,
            },
        );
        self.issued += 1;
        if self.minted.len() >= 1024 {
            self.minted.pop_front();
        }
        self.minted.push_back(tok.clone());
        tok
    }

    /// The last (up to 1,024) access tokens minted, oldest first.
    pub fn minted_tokens(&self) -> Vec<String> {
        self.minted.iter().cloned().collect()
    }

    /// `POST /{tenant}/oauth2/v2.0/token` with a form body, reached at `endpoint` (the URL a
    /// client assertion's `aud` must name).
    pub fn token_request(
        &mut self,
        tenant: &str,
        form: &HashMap<String, String>,
        endpoint: &str,
        now: DateTime<Utc>,
        rng: &mut StdRng,
    ) -> Result<Value, TokenError> {
        if !tenant.eq_ignore_ascii_case(&self.tenant) {
            return Err(aad_error(
                400,
                "invalid_request",
                90002,
                &format!(
                    "Tenant '{tenant}' not found. Check to make sure you have the correct tenant ID and are signing into the correct cloud."
                ),
                now,
            ));
        }
        match form.get("grant_type").map(String::as_str) {
            None => {
                return Err(aad_error(
                    400,
                    "invalid_request",
                    900144,
                    "The request body must contain the following parameter: 'grant_type'.",
                    now,
                ));
            }
            Some("client_credentials" | "refresh_token" | crate::delegated::DEVICE_CODE_GRANT) => {}
            Some(other) => {
                return Err(aad_error(
                    400,
                    "unsupported_grant_type",
                    70003,
                    &format!("The app requested an unsupported grant type '{other}'."),
                    now,
                ));
            }
        }
        let Some(client_id) = form.get("client_id") else {
            return Err(aad_error(
                400,
                "invalid_request",
                900144,
                "The request body must contain the following parameter: 'client_id'.",
                now,
            ));
        };
        let Some(app) = self.clients.iter().find(|c| &c.client_id == client_id) else {
            return Err(aad_error(
                400,
                "unauthorized_client",
                700016,
                &format!(
                    "Application with identifier '{client_id}' was not found in the directory '{tenant}'."
                ),
                now,
            ));
        };
        let grant_type = form.get("grant_type").map_or("", String::as_str);
        // A delegated grant (device code, refresh token) of a public client carries no
        // credential; "Allow public client flows" is off by default in Entra.
        let public = grant_type != "client_credentials"
            && app.allow_public_client
            && form.get("client_secret").is_none()
            && form.get("client_assertion").is_none();
        if !public {
            match (form.get("client_secret"), form.get("client_assertion")) {
                (Some(s), _) if *s == app.client_secret => {}
                (Some(_), _) => {
                    return Err(aad_error(
                        401,
                        "invalid_client",
                        7000215,
                        &format!(
                            "Invalid client secret provided. Ensure the secret being sent in the request is the client secret value, not the client secret ID, for a secret added to app '{client_id}'."
                        ),
                        now,
                    ));
                }
                (None, Some(assertion)) => {
                    if self.presented.len() >= 1024 {
                        self.presented.pop_front();
                    }
                    self.presented.push_back(assertion.clone());
                    if form.get("client_assertion_type").map(String::as_str)
                        != Some("urn:ietf:params:oauth:client-assertion-type:jwt-bearer")
                    {
                        return Err(aad_error(
                            400,
                            "invalid_request",
                            50027,
                            "JWT token is invalid or malformed: client_assertion_type must be urn:ietf:params:oauth:client-assertion-type:jwt-bearer.",
                            now,
                        ));
                    }
                    let app = app.clone();
                    crate::assertion::verify(
                        assertion,
                        client_id,
                        endpoint,
                        &app.certificates,
                        &app.federated,
                        &self.platform_key,
                        self.certificate_policy,
                        &mut self.replays,
                        now.timestamp(),
                    )
                    .map_err(|r| {
                        let status = if r.error == "invalid_client" {
                            401
                        } else {
                            400
                        };
                        aad_error(status, r.error, r.code, &r.description, now)
                    })?;
                }
                (None, None) => {
                    return Err(aad_error(
                        401,
                        "invalid_client",
                        7000218,
                        "The request body must contain the following parameter: 'client_assertion' or 'client_secret'.",
                        now,
                    ));
                }
            }
        }
        if grant_type != "client_credentials" {
            let client_id = client_id.clone();
            let grant = (self.delegated)
                .redeem_grant(grant_type, &client_id, form, now)
                .map_err(|r| aad_error(r.status, r.error, r.code, &r.description, now))?;
            let token = self.mint(Subject::User(grant.user), now, rng);
            let refresh =
                (self.delegated).issue_refresh(grant.user, &client_id, &grant.scope, now, rng);
            let secs = self.lifetime.num_seconds();
            return Ok(crate::delegated::answer(&grant, token, refresh, secs));
        }
        let scope = form.get("scope").map(String::as_str).unwrap_or("");
        if !scope.ends_with("/.default") {
            return Err(aad_error(
                400,
                "invalid_scope",
                1002012,
                &format!(
                    "The provided value for scope {scope} is not valid. Client credential flows must have a scope value with /.default suffixed to the resource identifier (application ID URI)."
                ),
                now,
            ));
        }
        let client_id = client_id.clone();
        let token = self.mint(Subject::App(client_id), now, rng);
        let secs = self.lifetime.num_seconds();
        Ok(
            json!({"token_type": "Bearer", "expires_in": secs, "ext_expires_in": secs, "access_token": token}),
        )
    }

    /// `POST /{tenant}/oauth2/v2.0/devicecode`: `(status, body)`.
    pub fn device_code_request(
        &mut self,
        tenant: &str,
        form: &HashMap<String, String>,
        now: DateTime<Utc>,
        rng: &mut StdRng,
    ) -> (u16, Value) {
        let client_id = form.get("client_id").map_or("", String::as_str);
        if !tenant.eq_ignore_ascii_case(&self.tenant) {
            let e = aad_error(400, "invalid_request", 90002, "Tenant not found.", now);
            return (e.status, e.body);
        }
        if !self.clients.iter().any(|c| c.client_id == client_id) {
            let m = format!("Application with identifier '{client_id}' was not found.");
            let e = aad_error(400, "unauthorized_client", 700016, &m, now);
            return (e.status, e.body);
        }
        let scope = form.get("scope").map_or("", String::as_str);
        (200, self.delegated.start(client_id, scope, now, rng))
    }

    /// A delegated token for `user`, for `/me` requests (the simulator's stand-in for a
    /// sign-in flow).
    pub fn delegated_token(&mut self, user: usize, now: DateTime<Utc>, rng: &mut StdRng) -> String {
        self.mint(Subject::User(user), now, rng)
    }

    /// Checks `Authorization: Bearer …`; 401 `InvalidAuthenticationToken` when missing, unknown
    /// or expired.
    pub fn check(&self, header: Option<&str>, now: DateTime<Utc>) -> Result<Subject, GraphError> {
        let unauthorized = |m: &str| GraphError::new(401, "InvalidAuthenticationToken", m);
        let Some(h) = header else {
            return Err(unauthorized("Access token is empty."));
        };
        let Some(tok) = h
            .strip_prefix("Bearer ")
            .or_else(|| h.strip_prefix("bearer "))
        else {
            return Err(unauthorized(
                "Access token validation failure. Invalid audience.",
            ));
        };
        match self.tokens.get(tok.trim()) {
            Some(t) if t.expires > now => Ok(t.subject.clone()),
            Some(_) => Err(unauthorized(
                "Access token has expired or is not yet valid.",
            )),
            None => Err(unauthorized(
                "CompactToken parsing failed with error code: 80049217",
            )),
        }
    }

    /// A managed identity endpoint's answer, `(status, body)`, as MSAL's sources read them:
    /// IMDS (`Metadata: true`; `expires_in` a string) or App Service (`X-IDENTITY-HEADER`,
    /// `2019-08-01`; `expires_on` only). An identity the host lacks: 400 "Identity not found".
    pub fn managed_token(
        &mut self,
        app_service: bool,
        query: &HashMap<String, String>,
        headers: &(Option<String>, Option<String>),
        now: DateTime<Utc>,
        rng: &mut StdRng,
    ) -> (u16, Value) {
        let bad = |status: u16, description: &str| {
            (
                status,
                json!({"error": "invalid_request", "error_description": description}),
            )
        };
        if app_service {
            if headers.1.as_deref() != Some(self.managed.identity_header.as_str()) {
                return (
                    401,
                    json!({"statusCode": 401, "message": "X-IDENTITY-HEADER is missing or does not match IDENTITY_HEADER."}),
                );
            }
            if query.get("api-version").map(String::as_str) != Some("2019-08-01") {
                return bad(400, "api-version 2019-08-01 is required.");
            }
        } else {
            if headers.0.as_deref() != Some("true") {
                return bad(400, "Required metadata header not specified");
            }
            if query.get("api-version").is_none() {
                return bad(400, "Required query variable 'api-version' is missing");
            }
        }
        let Some(resource) = query.get("resource").filter(|r| !r.is_empty()) else {
            return bad(400, "Required query variable 'resource' is missing");
        };
        let identity = match query.get("client_id") {
            Some(id) if self.managed.user_assigned.contains(id) => id.clone(),
            None if self.managed.system_assigned => "system-assigned".to_owned(),
            _ => return bad(400, "Identity not found"),
        };
        let token = self.mint(Subject::App(format!("managed:{identity}")), now, rng);
        self.managed_issued += 1;
        let secs = self.lifetime.num_seconds();
        let expires_on = (now.timestamp() + secs).to_string();
        let body = if app_service {
            json!({"access_token": token, "expires_on": expires_on, "resource": resource,
                   "token_type": "Bearer", "client_id": identity})
        } else {
            json!({"access_token": token, "client_id": identity, "expires_in": secs.to_string(),
                   "expires_on": expires_on, "ext_expires_in": secs.to_string(),
                   "not_before": now.timestamp().to_string(), "resource": resource,
                   "token_type": "Bearer"})
        };
        (200, body)
    }

    /// Makes every issued token expire now, as a key rollover or a long pause would.
    pub fn expire_all(&mut self, now: DateTime<Utc>) {
        for t in self.tokens.values_mut() {
            t.expires = now;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    fn form(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn token_endpoint_answers_like_azure_ad() {
        let now = Utc::now();
        let mut rng = StdRng::seed_from_u64(1);
        let mut a = Auth::new(
            "t".into(),
            vec![ClientApp::with_secret("c", "s")],
            Duration::seconds(3599),
        );
        let ok = a
            .token_request(
                "t",
                &form(&[
                    ("grant_type", "client_credentials"),
                    ("client_id", "c"),
                    ("client_secret", "s"),
                    ("scope", "https://graph.microsoft.com/.default"),
                ]),
                "http://sim/t/oauth2/v2.0/token",
                now,
                &mut rng,
            )
            .unwrap();
        assert_eq!(ok["token_type"], "Bearer");
        assert_eq!(ok["expires_in"], 3599);
        let tok = ok["access_token"].as_str().unwrap();
        assert_eq!(
            a.check(Some(&format!("Bearer {tok}")), now),
            Ok(Subject::App("c".into()))
        );
        assert_eq!(
            a.check(Some(&format!("Bearer {tok}")), now + Duration::hours(2))
                .unwrap_err()
                .code,
            "InvalidAuthenticationToken"
        );

        let bad = a
            .token_request(
                "t",
                &form(&[
                    ("grant_type", "client_credentials"),
                    ("client_id", "c"),
                    ("client_secret", "wrong"),
                    ("scope", "https://graph.microsoft.com/.default"),
                ]),
                "http://sim/t/oauth2/v2.0/token",
                now,
                &mut rng,
            )
            .unwrap_err();
        assert_eq!(bad.status, 401);
        assert_eq!(bad.body["error"], "invalid_client");
        assert!(
            bad.body["error_description"]
                .as_str()
                .unwrap()
                .starts_with("AADSTS7000215")
        );
        assert!(!bad.body.to_string().contains("wrong"));

        let scope = a
            .token_request(
                "t",
                &form(&[
                    ("grant_type", "client_credentials"),
                    ("client_id", "c"),
                    ("client_secret", "s"),
                    ("scope", "Calendars.Read"),
                ]),
                "http://sim/t/oauth2/v2.0/token",
                now,
                &mut rng,
            )
            .unwrap_err();
        assert_eq!(scope.body["error"], "invalid_scope");
    }
}
