//! What calsync proves its identity with to Microsoft Entra ID (issue 26): a client secret; a
//! certificate, as a client assertion signed with its key; the platform's federated token
//! (workload identity); or a managed identity, whose local endpoint answers tokens without any
//! credential at all. [`crate::auth::TokenSource`] asks for tokens with one of these.

use crate::error::GraphError;
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use futures_util::future::BoxFuture;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header};
use secrecy::{ExposeSecret, SecretString};
use sha1::Sha1;
use sha2::{Digest, Sha256};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

/// `client_assertion_type` of a JWT client assertion (RFC 7523), for certificates and
/// federated tokens alike.
pub const JWT_BEARER: &str = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer";

/// How long a client assertion is good for: Entra's guidance is "5-10 minutes after `nbf` at
/// most" (Microsoft Learn, "certificate credentials"; Entra does not enforce it).
pub const ASSERTION_LIFETIME: Duration = Duration::from_secs(600);

/// A VM's Instance Metadata Service token endpoint (Microsoft Learn, "How to use managed
/// identities for Azure resources on an Azure VM to acquire an access token").
pub const IMDS_ENDPOINT: &str = "http://169.254.169.254/metadata/identity/oauth2/token";

/// The credential calsync presents.
#[derive(Clone)]
pub enum Credential {
    /// `client_secret`: the app registration's secret.
    Secret(SecretString),
    /// `certificate`: a client assertion signed with the certificate's key.
    Certificate(Arc<Certificate>),
    /// `workload_identity`: the platform's token (Kubernetes' projected service account
    /// token), read from this file at every token request, since the platform rotates it.
    Federated {
        /// `AZURE_FEDERATED_TOKEN_FILE` as the AKS webhook sets it, or as configured.
        token_file: PathBuf,
    },
    /// `managed_identity`: the host's identity endpoint.
    Managed(ManagedIdentity),
    /// `public_client`: none. The app registration is a public client ("Allow public client
    /// flows"), good only for delegated accounts' sign-ins; it gets no app-only token.
    Public,
    /// A delegated account's refresh token, redeemed as the app (`app`) for `/me` tokens.
    Account(AccountGrant),
}

impl Credential {
    /// The kind's name as `auth.kind` spells it.
    pub fn kind(&self) -> &'static str {
        match self {
            Credential::Secret(_) => "client_secret",
            Credential::Certificate(_) => "certificate",
            Credential::Federated { .. } => "workload_identity",
            Credential::Managed(_) => "managed_identity",
            Credential::Public => "public_client",
            Credential::Account(_) => "account",
        }
    }
}

impl std::fmt::Debug for Credential {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Credential::Secret(_) => f.write_str("Secret(<redacted>)"),
            Credential::Certificate(c) => f
                .debug_struct("Certificate")
                .field("file", &c.file)
                .field("signature", &c.signature)
                .field("thumbprint", &c.thumbprint_hex)
                .finish_non_exhaustive(),
            Credential::Federated { token_file } => f
                .debug_struct("Federated")
                .field("token_file", token_file)
                .finish(),
            Credential::Managed(m) => m.fmt(f),
            Credential::Public => f.write_str("Public"),
            Credential::Account(a) => a.fmt(f),
        }
    }
}

/// Where an account's refresh token is kept. Implemented over the store by the engine.
pub trait RefreshStore: Send + Sync {
    /// The current refresh token and its version; [`GraphError::SignInRequired`] when the
    /// account never signed in, logged out or was revoked.
    fn load(&self) -> BoxFuture<'_, Result<Loaded, GraphError>>;
    /// Saves the token Entra rotated to, over `version`. Called before the access token that
    /// came with it is used; an error keeps that access token from being used.
    fn save(&self, version: i64, token: SecretString) -> BoxFuture<'_, Result<(), GraphError>>;
    /// Marks the account revoked (over `version`) for `reason`.
    fn revoke(&self, version: i64, reason: String) -> BoxFuture<'_, Result<(), GraphError>>;
}

/// A refresh token as loaded, with the version a rotation must be saved over.
#[derive(Debug)]
pub struct Loaded {
    /// The refresh token; never logged.
    pub token: SecretString,
    /// The stored version it was read at.
    pub version: i64,
}

/// A delegated account's grant: its name, where its refresh token lives, and what the app
/// proves itself with when it redeems one (nothing for a public client).
#[derive(Clone)]
pub struct AccountGrant {
    /// The account's name, as `calsync login` spells it.
    pub name: String,
    /// Where its refresh token is kept.
    pub store: Arc<dyn RefreshStore>,
    /// The app's credential: a secret, a certificate, a federated token, or [`Credential::Public`].
    pub app: Arc<Credential>,
}

impl std::fmt::Debug for AccountGrant {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Account")
            .field("name", &self.name)
            .field("app", &self.app.kind())
            .finish_non_exhaustive()
    }
}

/// How a client assertion is signed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Signature {
    /// RSASSA-PSS with SHA-256, the certificate named by its SHA-256 thumbprint (`x5t#S256`):
    /// Entra's current guidance, and what MSAL sends for a SHA-256 thumbprint.
    Ps256,
    /// RSASSA-PKCS1-v1_5 with SHA-256, named by the SHA-1 thumbprint (`x5t`): the older form,
    /// still accepted, and the one ADFS needs. A tenant reported to refuse `x5t#S256` with
    /// AADSTS700027 (MicrosoftDocs/entra-docs PR #1301) takes this one.
    Rs256,
}

/// Why a credential cannot be loaded or used.
#[derive(Debug, thiserror::Error)]
pub enum CredentialError {
    /// The file holds no PEM certificate.
    #[error("{file}: no certificate in it (a PEM \"BEGIN CERTIFICATE\" block)")]
    NoCertificate {
        /// The file, as configured.
        file: String,
    },
    /// The file holds no PEM private key.
    #[error(
        "{file}: no private key in it (a PEM \"BEGIN PRIVATE KEY\" or \"BEGIN RSA PRIVATE KEY\" block)"
    )]
    NoKey {
        /// The file, as configured.
        file: String,
    },
    /// The key is encrypted with a passphrase.
    #[error(
        "{file}: the private key is encrypted; calsync reads an unencrypted key from a file only it can read (`openssl pkey -in {file} -out key.pem`)"
    )]
    EncryptedKey {
        /// The file, as configured.
        file: String,
    },
    /// The file is not PEM, or its key is not an RSA key calsync can sign with.
    #[error("{file}: {reason}")]
    Unreadable {
        /// The file, as configured.
        file: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The key does not belong to the certificate.
    #[error(
        "the private key in {key} does not belong to the certificate in {certificate} (a signature made with it does not verify with the certificate's public key)"
    )]
    Mismatch {
        /// The key's file.
        key: String,
        /// The certificate's file.
        certificate: String,
    },
}

/// A certificate and its private key, ready to sign client assertions.
pub struct Certificate {
    file: String,
    key: EncodingKey,
    signature: Signature,
    sha1: String,
    sha256: String,
    thumbprint_hex: String,
}

impl Certificate {
    /// Reads the first certificate of `cert_pem` (from `cert_file`) and the RSA private key
    /// of `key_pem` (from `key_file`; the two may be one file), and checks that they belong
    /// together: a signature made with the key must verify with the certificate.
    pub fn from_pem(
        cert_file: &str,
        cert_pem: &[u8],
        key_file: &str,
        key_pem: &[u8],
        signature: Signature,
    ) -> Result<Certificate, CredentialError> {
        let unreadable = |file: &str, reason: String| CredentialError::Unreadable {
            file: file.to_owned(),
            reason,
        };
        let certs = pem::parse_many(cert_pem)
            .map_err(|e| unreadable(cert_file, format!("not PEM: {e}")))?;
        let cert = certs
            .iter()
            .find(|p| p.tag() == "CERTIFICATE")
            .ok_or_else(|| CredentialError::NoCertificate {
                file: cert_file.to_owned(),
            })?;
        let keys =
            pem::parse_many(key_pem).map_err(|e| unreadable(key_file, format!("not PEM: {e}")))?;
        if keys.iter().any(|p| p.tag().contains("ENCRYPTED")) {
            return Err(CredentialError::EncryptedKey {
                file: key_file.to_owned(),
            });
        }
        let key = keys
            .iter()
            .find(|p| p.tag() == "PRIVATE KEY" || p.tag() == "RSA PRIVATE KEY")
            .ok_or_else(|| CredentialError::NoKey {
                file: key_file.to_owned(),
            })?;
        let key = EncodingKey::from_rsa_pem(pem::encode(key).as_bytes()).map_err(|e| {
            unreadable(
                key_file,
                format!("not an RSA private key calsync can sign with ({e})"),
            )
        })?;
        let public = DecodingKey::from_rsa_pem(pem::encode(cert).as_bytes())
            .map_err(|e| unreadable(cert_file, format!("not an RSA certificate ({e})")))?;
        let probe = b"calsync: does this key belong to this certificate?";
        let signed = jsonwebtoken::crypto::sign(probe, &key, Algorithm::RS256)
            .map_err(|e| unreadable(key_file, format!("cannot sign with this key ({e})")))?;
        if !jsonwebtoken::crypto::verify(&signed, probe, &public, Algorithm::RS256).unwrap_or(false)
        {
            return Err(CredentialError::Mismatch {
                key: key_file.to_owned(),
                certificate: cert_file.to_owned(),
            });
        }
        let der = cert.contents();
        let sha1 = Sha1::digest(der);
        Ok(Certificate {
            file: cert_file.to_owned(),
            key,
            signature,
            sha1: URL_SAFE_NO_PAD.encode(sha1),
            sha256: URL_SAFE_NO_PAD.encode(Sha256::digest(der)),
            thumbprint_hex: sha1.iter().map(|b| format!("{b:02X}")).collect(),
        })
    }

    /// The certificate's SHA-1 thumbprint in hex, as the Entra admin center shows it.
    pub fn thumbprint(&self) -> &str {
        &self.thumbprint_hex
    }

    /// What a refusal names: the certificate's file and thumbprint.
    pub fn describe(&self) -> String {
        format!(
            "the certificate in {} (thumbprint {}, signed {})",
            self.file,
            self.thumbprint_hex,
            match self.signature {
                Signature::Ps256 => "PS256 with x5t#S256",
                Signature::Rs256 => "RS256 with x5t",
            }
        )
    }

    /// A client assertion for `client_id` at the token endpoint `audience`, valid from
    /// `now` (Unix seconds) for [`ASSERTION_LIFETIME`], with a fresh `jti` (Microsoft Learn,
    /// "certificate credentials": `aud`, `exp`, `iss` = `sub` = client id, `jti`, `nbf`,
    /// `iat`).
    pub fn assertion(
        &self,
        client_id: &str,
        audience: &str,
        now: u64,
    ) -> Result<SecretString, GraphError> {
        let mut header = Header::new(match self.signature {
            Signature::Ps256 => Algorithm::PS256,
            Signature::Rs256 => Algorithm::RS256,
        });
        header.typ = Some("JWT".into());
        match self.signature {
            Signature::Ps256 => header.x5t_s256 = Some(self.sha256.clone()),
            Signature::Rs256 => header.x5t = Some(self.sha1.clone()),
        }
        let mut jti = [0u8; 16];
        rand::Rng::fill(&mut rand::thread_rng(), &mut jti[..]);
        let claims = serde_json::json!({
            "aud": audience,
            "iss": client_id,
            "sub": client_id,
            "jti": jti.iter().map(|b| format!("{b:02x}")).collect::<String>(),
            "nbf": now,
            "iat": now,
            "exp": now + ASSERTION_LIFETIME.as_secs(),
        });
        jsonwebtoken::encode(&header, &claims, &self.key)
            .map(SecretString::from)
            .map_err(|e| GraphError::AuthUnavailable {
                reason: format!(
                    "signing a client assertion with {} failed: {e}",
                    self.describe()
                ),
            })
    }
}

impl std::fmt::Debug for Certificate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.describe())
    }
}

/// Where a managed identity's tokens come from.
#[derive(Clone)]
pub enum ManagedEndpoint {
    /// A VM's (or scale set's) Instance Metadata Service: `GET` with `Metadata: true`.
    Imds(url::Url),
    /// App Service, Functions, Container Apps: `IDENTITY_ENDPOINT`, with `IDENTITY_HEADER`'s
    /// value in `X-IDENTITY-HEADER`.
    AppService {
        /// `IDENTITY_ENDPOINT`.
        url: url::Url,
        /// `IDENTITY_HEADER`; a secret of the host.
        header: SecretString,
    },
}

/// A managed identity: the endpoint, and a user-assigned identity's client id (none: the
/// system-assigned identity).
#[derive(Clone)]
pub struct ManagedIdentity {
    /// Where to ask.
    pub endpoint: ManagedEndpoint,
    /// A user-assigned identity's client id.
    pub client_id: Option<String>,
}

impl std::fmt::Debug for ManagedEndpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ManagedEndpoint::Imds(u) => write!(f, "Imds({u})"),
            ManagedEndpoint::AppService { url, .. } => {
                write!(f, "AppService({url}, <header redacted>)")
            }
        }
    }
}

impl std::fmt::Debug for ManagedIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let (kind, url) = match &self.endpoint {
            ManagedEndpoint::Imds(u) => ("imds", u.as_str()),
            ManagedEndpoint::AppService { url, .. } => ("app_service", url.as_str()),
        };
        f.debug_struct("ManagedIdentity")
            .field("endpoint", &kind)
            .field("url", &url)
            .field("client_id", &self.client_id)
            .finish()
    }
}

/// A managed identity's answer: the token and how long it lives. IMDS answers `expires_in`
/// as a string of seconds; App Service (`2019-08-01`) only `expires_on`, Unix seconds as a
/// string (MSAL's managed identity sources read both).
#[derive(serde::Deserialize)]
struct ManagedAnswer {
    access_token: String,
    #[serde(default)]
    expires_in: Option<serde_json::Value>,
    #[serde(default)]
    expires_on: Option<serde_json::Value>,
}

fn seconds(v: &serde_json::Value) -> Option<u64> {
    match v {
        serde_json::Value::Number(n) => n.as_u64(),
        serde_json::Value::String(s) => s.trim().parse().ok(),
        _ => None,
    }
}

impl ManagedIdentity {
    /// Asks the endpoint for a token for `resource` (the scope without `/.default`); IMDS
    /// with API version 2018-02-01 and App Service with 2019-08-01, as MSAL does.
    pub async fn token(
        &self,
        http: &reqwest::Client,
        resource: &str,
        now_unix: u64,
    ) -> Result<(SecretString, Duration), GraphError> {
        let (url, api_version) = match &self.endpoint {
            ManagedEndpoint::Imds(url) => (url, "2018-02-01"),
            ManagedEndpoint::AppService { url, .. } => (url, "2019-08-01"),
        };
        let mut url = url.clone();
        url.query_pairs_mut()
            .append_pair("api-version", api_version)
            .append_pair("resource", resource);
        if let Some(id) = &self.client_id {
            url.query_pairs_mut().append_pair("client_id", id);
        }
        let request = match &self.endpoint {
            ManagedEndpoint::Imds(_) => http.get(url).header("Metadata", "true"),
            ManagedEndpoint::AppService { header, .. } => http
                .get(url)
                .header("X-IDENTITY-HEADER", header.expose_secret()),
        };
        let unavailable = |reason: String| GraphError::AuthUnavailable { reason };
        let resp = request.send().await.map_err(|e| {
            unavailable(format!(
                "the managed identity endpoint: {}",
                e.without_url()
            ))
        })?;
        let status = resp.status();
        let body = resp.bytes().await.map_err(|e| {
            unavailable(format!(
                "the managed identity endpoint: {}",
                e.without_url()
            ))
        })?;
        if !status.is_success() {
            let v: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
            let text = |k: &str| v.get(k).and_then(|x| x.as_str()).unwrap_or("").to_owned();
            let description: String = [text("error_description"), text("message")]
                .concat()
                .chars()
                .take(300)
                .collect();
            // 4xx but throttling: the identity or the request is wrong (an unknown client id,
            // a missing header). 410 (IMDS while the identity is set up), 429 and 5xx pass.
            if status.is_client_error() && status.as_u16() != 429 && status.as_u16() != 410 {
                let error = match text("error") {
                    e if e.is_empty() => format!("managed_identity_{}", status.as_u16()),
                    e => e,
                };
                return Err(GraphError::AuthRejected { error, description });
            }
            return Err(unavailable(format!(
                "the managed identity endpoint answered {status}: {description}"
            )));
        }
        let answer: ManagedAnswer = serde_json::from_slice(&body).map_err(|_| {
            unavailable(format!(
                "the managed identity endpoint answered no token ({} bytes)",
                body.len()
            ))
        })?;
        let lifetime = answer
            .expires_in
            .as_ref()
            .and_then(seconds)
            .or_else(|| {
                answer
                    .expires_on
                    .as_ref()
                    .and_then(seconds)
                    .map(|on| on.saturating_sub(now_unix))
            })
            .unwrap_or(3599);
        Ok((
            SecretString::from(answer.access_token),
            Duration::from_secs(lifetime),
        ))
    }
}

/// The platform's federated token from `file`, read now: Kubernetes rotates the projected
/// token (hourly by default), so it is read at every token request, never cached.
pub async fn federated_token(file: &std::path::Path) -> Result<SecretString, GraphError> {
    let text = tokio::fs::read_to_string(file)
        .await
        .map_err(|e| GraphError::AuthUnavailable {
            reason: format!(
                "the federated token file {} cannot be read: {e}",
                file.display()
            ),
        })?;
    let token = text.trim();
    if token.is_empty() {
        return Err(GraphError::AuthUnavailable {
            reason: format!("the federated token file {} is empty", file.display()),
        });
    }
    Ok(SecretString::from(token.to_owned()))
}
