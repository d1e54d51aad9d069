//! Credentials other than a client secret, as Microsoft Entra ID checks them (issue 26):
//! certificate client assertions, federated tokens (workload identity) and the managed
//! identity endpoints (a VM's IMDS, App Service's `IDENTITY_ENDPOINT`).
//!
//! Sources: Microsoft Learn, "certificate credentials" (the assertion's header and claims);
//! the Azure SDK's identity troubleshooting guide (AADSTS700021, 700023, 50027); reports of
//! AADSTS700027 (keycloak#19425, msal-js#8339: "not registered on application ... Thumbprint
//! of key used by client"; passport-azure-ad#453: "contains an invalid signature"), of
//! AADSTS700024/700211-700213 from workload identity federation; MSAL's managed identity
//! sources (IMDS `2018-02-01` with `Metadata: true`, App Service `2019-08-01` with
//! `X-IDENTITY-HEADER`).

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use sha1::Sha1;
use sha2::{Digest, Sha256};
use std::collections::HashMap;

/// The audience a federated token must carry for Entra (its default federated credential).
pub const TOKEN_EXCHANGE_AUDIENCE: &str = "api://AzureADTokenExchange";

/// The issuer of the platform tokens the simulator mints (`/_sim/federated-token`), standing
/// in for a Kubernetes cluster's OIDC issuer.
pub const PLATFORM_ISSUER: &str = "https://oidc.graph-sim.invalid/cluster";

/// A certificate registered on an app (its `keyCredentials`).
#[derive(Clone, Serialize, Deserialize, PartialEq, Eq, Debug)]
pub struct RegisteredCertificate {
    /// The certificate, PEM.
    pub pem: String,
}

/// A federated identity credential of an app: whose tokens it accepts.
#[derive(Clone, Serialize, Deserialize, PartialEq, Eq, Debug)]
pub struct FederatedCredential {
    /// The token issuer (a cluster's OIDC issuer URL).
    pub issuer: String,
    /// The token subject (`system:serviceaccount:<namespace>:<name>`).
    pub subject: String,
    /// The audience; Entra's default is `api://AzureADTokenExchange`.
    #[serde(default = "default_audience")]
    pub audience: String,
}

fn default_audience() -> String {
    TOKEN_EXCHANGE_AUDIENCE.to_owned()
}

/// Why an assertion was refused: the AADSTS code and its text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    /// The AADSTS number.
    pub code: u32,
    /// The OAuth error (`invalid_client`, `invalid_request`).
    pub error: &'static str,
    /// The description after `AADSTS{code}: `.
    pub description: String,
}

fn refuse(code: u32, error: &'static str, description: impl Into<String>) -> Refusal {
    Refusal {
        code,
        error,
        description: description.into(),
    }
}

/// A certificate as the verifier uses it: its key and both thumbprints.
struct Known {
    key: DecodingKey,
    sha1: String,
    sha256: String,
    sha1_hex: String,
}

fn known(c: &RegisteredCertificate) -> Option<Known> {
    let block = pem::parse_many(c.pem.as_bytes())
        .ok()?
        .into_iter()
        .find(|p| p.tag() == "CERTIFICATE")?;
    let key = DecodingKey::from_rsa_pem(pem::encode(&block).as_bytes()).ok()?;
    let der = block.contents();
    let sha1 = Sha1::digest(der);
    Some(Known {
        key,
        sha1: URL_SAFE_NO_PAD.encode(sha1),
        sha256: URL_SAFE_NO_PAD.encode(Sha256::digest(der)),
        sha1_hex: sha1.iter().map(|b| format!("{b:02X}")).collect(),
    })
}

/// The assertions seen, so a `jti` is accepted once (RFC 7523 §3 lets the server refuse a
/// replayed one; Entra documents no behaviour, so the simulator holds calsync to the stricter).
#[derive(Debug, Default)]
pub struct Replays {
    seen: HashMap<String, i64>,
}

/// Clock skew tolerated on `nbf` and `exp`, as token validators commonly allow.
const SKEW_SECS: i64 = 300;

fn claims_unverified(assertion: &str) -> Result<Value, Refusal> {
    let malformed = || {
        refuse(
            50027,
            "invalid_request",
            "JWT token is invalid or malformed.",
        )
    };
    let payload = assertion.split('.').nth(1).ok_or_else(malformed)?;
    let bytes = URL_SAFE_NO_PAD.decode(payload).map_err(|_| malformed())?;
    serde_json::from_slice(&bytes).map_err(|_| malformed())
}

/// A string claim, or empty.
fn claim(claims: &Value, k: &str) -> String {
    claims
        .get(k)
        .and_then(Value::as_str)
        .unwrap_or("")
        .to_owned()
}

fn within_time(claims: &Value, now: i64) -> Result<(), Refusal> {
    let exp = claims.get("exp").and_then(Value::as_i64).unwrap_or(0);
    let nbf = claims
        .get("nbf")
        .and_then(Value::as_i64)
        .unwrap_or(i64::MIN);
    if exp + SKEW_SECS < now || nbf - SKEW_SECS > now {
        return Err(refuse(
            700024,
            "invalid_client",
            format!(
                "Client assertion is not within its valid time range. Current time: {now}, assertion valid from {nbf}, expiry time of assertion {exp}."
            ),
        ));
    }
    Ok(())
}

impl Replays {
    fn once(&mut self, jti: &str, exp: i64, now: i64) -> Result<(), Refusal> {
        self.seen.retain(|_, e| *e + SKEW_SECS >= now);
        if self.seen.insert(jti.to_owned(), exp).is_some() {
            return Err(refuse(
                50027,
                "invalid_request",
                format!(
                    "JWT token is invalid or malformed. The assertion with jti '{jti}' was already used."
                ),
            ));
        }
        Ok(())
    }
}

/// How strictly certificates are matched.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CertificatePolicy {
    /// Look certificates up by the SHA-1 `x5t` only, as a tenant reported in
    /// MicrosoftDocs/entra-docs PR #1301 did (`x5t#S256` answered AADSTS700027). Off by
    /// default: Entra's guidance and MSAL send `x5t#S256`.
    pub sha1_thumbprints_only: bool,
}

/// Checks a client assertion presented for `client_id` at the token endpoint `endpoint`:
/// the app's own (a certificate's, `iss` = the client id) or a federated token. `Ok` if Entra
/// would take it.
#[allow(clippy::too_many_arguments)]
pub fn verify(
    assertion: &str,
    client_id: &str,
    endpoint: &str,
    certificates: &[RegisteredCertificate],
    federated: &[FederatedCredential],
    platform_key: &[u8],
    policy: CertificatePolicy,
    replays: &mut Replays,
    now: i64,
) -> Result<(), Refusal> {
    let claims = claims_unverified(assertion)?;
    let text = |k: &str| claim(&claims, k);
    let (iss, sub) = (text("iss"), text("sub"));
    if iss != client_id {
        return verify_federated(assertion, &claims, client_id, federated, platform_key, now);
    }
    if sub != client_id {
        return Err(refuse(
            700021,
            "invalid_client",
            "Client assertion application identifier doesn't match 'client_id' parameter. Review the documentation at https://learn.microsoft.com/entra/identity-platform/certificate-credentials.",
        ));
    }
    // One audience, the token endpoint itself (an array was refused: openid-client#348).
    if claims.get("aud").and_then(Value::as_str) != Some(endpoint) {
        return Err(refuse(
            700023,
            "invalid_client",
            "Client assertion audience claim does not match Realm issuer. Review the documentation at https://learn.microsoft.com/entra/identity-platform/certificate-credentials.",
        ));
    }
    let header = jsonwebtoken::decode_header(assertion).map_err(|_| {
        refuse(
            50027,
            "invalid_request",
            "JWT token is invalid or malformed.",
        )
    })?;
    let certs: Vec<Known> = certificates.iter().filter_map(known).collect();
    let by_sha256 = header
        .x5t_s256
        .as_ref()
        .filter(|_| !policy.sha1_thumbprints_only)
        .and_then(|t| certs.iter().find(|c| &c.sha256 == t));
    let by_sha1 = header
        .x5t
        .as_ref()
        .and_then(|t| certs.iter().find(|c| &c.sha1 == t));
    let presented = header
        .x5t
        .clone()
        .or(header.x5t_s256.clone())
        .map(|t| {
            URL_SAFE_NO_PAD
                .decode(t)
                .map(|b| b.iter().map(|x| format!("{x:02X}")).collect::<String>())
                .unwrap_or_default()
        })
        .unwrap_or_default();
    let Some(cert) = by_sha256.or(by_sha1) else {
        return Err(refuse(
            700027,
            "invalid_client",
            format!(
                "The certificate with identifier used to sign the client assertion is not registered on application. [Reason - The key was not found., Thumbprint of key used by client: '{presented}', Please visit the Azure Portal, Graph Explorer or directly use MS Graph to see configured keys for app Id '{client_id}'.]"
            ),
        ));
    };
    if !matches!(header.alg, Algorithm::PS256 | Algorithm::RS256) {
        return Err(refuse(
            50027,
            "invalid_request",
            "JWT token is invalid or malformed.",
        ));
    }
    let mut validation = Validation::new(header.alg);
    validation.validate_exp = false;
    validation.validate_aud = false;
    validation.required_spec_claims.clear();
    if jsonwebtoken::decode::<Value>(assertion, &cert.key, &validation).is_err() {
        return Err(refuse(
            700027,
            "invalid_client",
            format!(
                "Client assertion contains an invalid signature. [Reason - The provided signature value did not match the expected signature value., Thumbprint of key used by client: '{}', Found key 'Start=..., End=...']",
                cert.sha1_hex
            ),
        ));
    }
    within_time(&claims, now)?;
    let exp = claims.get("exp").and_then(Value::as_i64).unwrap_or(0);
    replays.once(&text("jti"), exp, now)
}

/// A federated token: signed by the platform issuer the simulator stands in for, and matched
/// by issuer, subject and audience against the app's federated credentials.
fn verify_federated(
    assertion: &str,
    claims: &Value,
    client_id: &str,
    federated: &[FederatedCredential],
    platform_key: &[u8],
    now: i64,
) -> Result<(), Refusal> {
    let text = |k: &str| claim(claims, k);
    let (iss, sub) = (text("iss"), text("sub"));
    let audiences: Vec<String> = match claims.get("aud") {
        Some(Value::String(a)) => vec![a.clone()],
        Some(Value::Array(a)) => a
            .iter()
            .filter_map(|x| x.as_str().map(str::to_owned))
            .collect(),
        _ => Vec::new(),
    };
    let mut validation = Validation::new(Algorithm::HS256);
    validation.validate_exp = false;
    validation.validate_aud = false;
    validation.required_spec_claims.clear();
    let signed_by_platform = iss == PLATFORM_ISSUER
        && jsonwebtoken::decode::<Value>(
            assertion,
            &DecodingKey::from_secret(platform_key),
            &validation,
        )
        .is_ok();
    let of_issuer: Vec<&FederatedCredential> =
        federated.iter().filter(|f| f.issuer == iss).collect();
    if of_issuer.is_empty() || !signed_by_platform {
        return Err(refuse(
            700211,
            "invalid_request",
            format!(
                "No matching federated identity record found for presented assertion issuer '{iss}'. Please check your federated identity credential Subject, Audience and Issuer against the presented assertion. App '{client_id}'."
            ),
        ));
    }
    let of_subject: Vec<&&FederatedCredential> =
        of_issuer.iter().filter(|f| f.subject == sub).collect();
    if of_subject.is_empty() {
        return Err(refuse(
            700213,
            "invalid_request",
            format!(
                "No matching federated identity record found for presented assertion subject '{sub}'. Please check your federated identity credential Subject, Audience and Issuer against the presented assertion. App '{client_id}'."
            ),
        ));
    }
    if !of_subject.iter().any(|f| audiences.contains(&f.audience)) {
        return Err(refuse(
            700212,
            "invalid_request",
            format!(
                "No matching federated identity record found for presented assertion audience '{}'. Please check your federated identity credential Subject, Audience and Issuer against the presented assertion. App '{client_id}'.",
                audiences.join(",")
            ),
        ));
    }
    within_time(claims, now)
}

/// A platform token (as a Kubernetes cluster's issuer would sign for a service account) for
/// `subject` with `audience`, valid `lifetime_secs` from `now`: what the AKS webhook projects
/// into `AZURE_FEDERATED_TOKEN_FILE`.
pub fn platform_token(
    platform_key: &[u8],
    subject: &str,
    audience: &str,
    now: i64,
    lifetime_secs: i64,
) -> String {
    let claims = json!({
        "iss": PLATFORM_ISSUER, "sub": subject, "aud": [audience],
        "iat": now, "nbf": now, "exp": now + lifetime_secs,
    });
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(Algorithm::HS256),
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(platform_key),
    )
    .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    const ENDPOINT: &str = "http://sim/t/oauth2/v2.0/token";

    /// A self-signed certificate and key made by `openssl`: `(certificate PEM, key PEM)`.
    fn keypair() -> (String, Vec<u8>) {
        let dir = tempfile::tempdir().unwrap();
        let (cert, key) = (dir.path().join("c.pem"), dir.path().join("k.pem"));
        let ok = std::process::Command::new("openssl")
            .args([
                "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
            ])
            .args(["-subj", "/CN=sim-test", "-keyout"])
            .arg(&key)
            .arg("-out")
            .arg(&cert)
            .output()
            .unwrap();
        assert!(ok.status.success());
        (
            std::fs::read_to_string(cert).unwrap(),
            std::fs::read(key).unwrap(),
        )
    }

    fn assertion(cert: &str, key: &[u8], claims: Value) -> String {
        let block = pem::parse_many(cert.as_bytes()).unwrap().remove(0);
        let mut header = jsonwebtoken::Header::new(Algorithm::PS256);
        header.x5t_s256 = Some(URL_SAFE_NO_PAD.encode(Sha256::digest(block.contents())));
        jsonwebtoken::encode(
            &header,
            &claims,
            &jsonwebtoken::EncodingKey::from_rsa_pem(key).unwrap(),
        )
        .unwrap()
    }

    fn claims(aud: &str, iss: &str, sub: &str, jti: &str, now: i64) -> Value {
        json!({"aud": aud, "iss": iss, "sub": sub, "jti": jti, "nbf": now, "exp": now + 600})
    }

    fn check(
        a: &str,
        certs: &[RegisteredCertificate],
        replays: &mut Replays,
        now: i64,
    ) -> Result<(), u32> {
        verify(
            a,
            "app",
            ENDPOINT,
            certs,
            &[],
            b"k",
            CertificatePolicy::default(),
            replays,
            now,
        )
        .map_err(|r| r.code)
    }

    /// Microsoft Learn, "certificate credentials", and the Azure SDK's troubleshooting guide:
    /// each claim Entra checks, each with its AADSTS code; a jti is taken once (RFC 7523 §3).
    #[test]
    fn a_certificate_assertion_is_checked_claim_by_claim() {
        let (cert, key) = keypair();
        let certs = [RegisteredCertificate { pem: cert.clone() }];
        let now = 1_800_000_000;
        let mut replays = Replays::default();
        let good = assertion(&cert, &key, claims(ENDPOINT, "app", "app", "j1", now));
        assert_eq!(check(&good, &certs, &mut replays, now), Ok(()));
        assert_eq!(
            check(&good, &certs, &mut replays, now),
            Err(50027),
            "replayed"
        );
        let aud = assertion(
            &cert,
            &key,
            claims("http://elsewhere/token", "app", "app", "j2", now),
        );
        assert_eq!(check(&aud, &certs, &mut replays, now), Err(700023));
        let sub = assertion(&cert, &key, claims(ENDPOINT, "app", "other", "j3", now));
        assert_eq!(check(&sub, &certs, &mut replays, now), Err(700021));
        let late = assertion(&cert, &key, claims(ENDPOINT, "app", "app", "j4", now));
        assert_eq!(check(&late, &certs, &mut replays, now + 3600), Err(700024));
        // A signature that does not verify with the registered certificate.
        let fresh = assertion(&cert, &key, claims(ENDPOINT, "app", "app", "j5", now));
        let (body, sig) = fresh.rsplit_once('.').unwrap();
        let mut raw = URL_SAFE_NO_PAD.decode(sig).unwrap();
        raw[10] ^= 0xff;
        let forged = format!("{body}.{}", URL_SAFE_NO_PAD.encode(raw));
        assert_eq!(check(&forged, &certs, &mut replays, now), Err(700027));
        // A certificate the app does not know.
        assert_eq!(check(&fresh, &[], &mut replays, now), Err(700027));
        assert_eq!(check("not.a.jwt", &certs, &mut replays, now), Err(50027));
    }

    /// Workload identity federation: a platform token is matched by issuer (700211), subject
    /// (700213) and audience (700212) against the app's federated credentials.
    #[test]
    fn a_federated_token_is_matched_by_issuer_subject_and_audience() {
        let key = b"platform";
        let now = 1_800_000_000;
        let credential = FederatedCredential {
            issuer: PLATFORM_ISSUER.into(),
            subject: "system:serviceaccount:ns:sa".into(),
            audience: TOKEN_EXCHANGE_AUDIENCE.into(),
        };
        let check = |token: &str, creds: &[FederatedCredential]| {
            verify(
                token,
                "app",
                ENDPOINT,
                &[],
                creds,
                key,
                CertificatePolicy::default(),
                &mut Replays::default(),
                now,
            )
            .map_err(|r| r.code)
        };
        let good = platform_token(
            key,
            "system:serviceaccount:ns:sa",
            TOKEN_EXCHANGE_AUDIENCE,
            now,
            3600,
        );
        assert_eq!(check(&good, std::slice::from_ref(&credential)), Ok(()));
        let other_subject = platform_token(
            key,
            "system:serviceaccount:ns:other",
            TOKEN_EXCHANGE_AUDIENCE,
            now,
            3600,
        );
        assert_eq!(
            check(&other_subject, std::slice::from_ref(&credential)),
            Err(700213)
        );
        let other_audience =
            platform_token(key, "system:serviceaccount:ns:sa", "api://other", now, 3600);
        assert_eq!(
            check(&other_audience, std::slice::from_ref(&credential)),
            Err(700212)
        );
        let not_the_platforms = platform_token(
            b"someone else",
            "system:serviceaccount:ns:sa",
            TOKEN_EXCHANGE_AUDIENCE,
            now,
            3600,
        );
        assert_eq!(
            check(&not_the_platforms, std::slice::from_ref(&credential)),
            Err(700211)
        );
        assert_eq!(check(&good, &[]), Err(700211), "no federated credential");
        let expired = platform_token(
            key,
            "system:serviceaccount:ns:sa",
            TOKEN_EXCHANGE_AUDIENCE,
            now - 7200,
            3600,
        );
        assert_eq!(
            check(&expired, std::slice::from_ref(&credential)),
            Err(700024)
        );
    }
}
