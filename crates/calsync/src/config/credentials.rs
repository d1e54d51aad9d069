//! `[auth]`'s credential kinds (issue 26): a client secret, a certificate, workload identity
//! (the variables the AKS webhook sets) and a managed identity (App Service's variables, or a
//! VM's IMDS). Secrets and keys come from files only (`$CREDENTIALS_DIRECTORY` first), and a
//! missing piece is named with the kind that needs it.

use super::connect::{check_clouds, default_scope, refuse_clear_text};
use super::values::{http_url, read_secret_file, resolve_credential};
use super::{ConfigError, RawAuth, bad};
use calsync_graph::{
    AuthConfig, Certificate, Credential, ManagedEndpoint, ManagedIdentity, Signature,
};
use secrecy::ExposeSecret;
use std::path::PathBuf;
use std::sync::Arc;
use url::Url;

/// The environment as the platform sets it; a function so tests can give their own.
pub(super) type Env<'a> = &'a dyn Fn(&str) -> Option<String>;

/// The process environment, empty values as unset.
pub(super) fn process_env(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.trim().is_empty())
}

/// `[auth]` with the process environment.
pub(super) fn auth_from_process_env(
    a: &RawAuth,
    graph_base: &Url,
    allow_insecure_http: bool,
) -> Result<AuthConfig, ConfigError> {
    auth(a, graph_base, allow_insecure_http, &process_env)
}

/// The files of `[auth]` that hold a secret or a key, by key: warned about when others can
/// read them.
pub(super) fn secret_files(a: &RawAuth) -> [(&'static str, &Option<PathBuf>); 4] {
    [
        ("auth.client_secret_file", &a.client_secret_file),
        ("auth.certificate_file", &a.certificate_file),
        ("auth.key_file", &a.key_file),
        ("auth.identity_header_file", &a.identity_header_file),
    ]
}

/// `[auth]` of any kind. The token endpoint and Graph must be of one cloud.
pub(super) fn auth(
    a: &RawAuth,
    graph_base: &Url,
    allow_insecure_http: bool,
    env: Env<'_>,
) -> Result<AuthConfig, ConfigError> {
    // The `.default` scope of the Graph calsync talks to: https://graph.microsoft.com/.default
    // asks a US Government or China tenant for a token Graph there does not accept.
    let scope = match a.scope.trim() {
        "" => default_scope(graph_base),
        s => s.to_owned(),
    };
    let kind = a.kind.trim();
    const KINDS: [&str; 5] = [
        "client_secret",
        "certificate",
        "workload_identity",
        "managed_identity",
        "public_client",
    ];
    if !kind.is_empty() && !KINDS.contains(&kind) {
        return Err(unknown_kind(kind));
    }
    if kind == "managed_identity" {
        let managed = managed(a, allow_insecure_http, env)?;
        return Ok(AuthConfig {
            // Unused: the identity endpoint answers tokens itself.
            token_url: graph_base.clone(),
            client_id: a.client_id.trim().to_owned(),
            credential: Credential::Managed(managed),
            scope,
        });
    }
    let (token_url, client_id) = if kind == "workload_identity" {
        workload_endpoint(a, env)?
    } else {
        (a.token_url.clone(), a.client_id.clone())
    };
    if token_url.trim().is_empty() {
        return Err(bad(
            "auth.token_url",
            "missing: e.g. https://login.microsoftonline.com/<tenant>/oauth2/v2.0/token",
        ));
    }
    let token_url = http_url("auth.token_url", &token_url)?;
    refuse_clear_text("auth.token_url", &token_url, allow_insecure_http)?;
    check_clouds(&token_url, graph_base)?;
    if client_id.trim().is_empty() {
        return Err(bad("auth.client_id", "missing"));
    }
    let credential = match kind {
        "" | "client_secret" => Credential::Secret(secret(a)?),
        "certificate" => Credential::Certificate(Arc::new(certificate(a)?)),
        // An app registration with "Allow public client flows": delegated accounts only.
        "public_client" => Credential::Public,
        "workload_identity" => {
            let token_file = a
                .token_file
                .clone()
                .or_else(|| env("AZURE_FEDERATED_TOKEN_FILE").map(PathBuf::from))
                .ok_or_else(|| {
                    bad(
                        "auth.token_file",
                        "missing for kind = \"workload_identity\": set it, or run where the AKS workload identity webhook sets AZURE_FEDERATED_TOKEN_FILE (the pod's service account annotated with azure.workload.identity/client-id, the pod labelled azure.workload.identity/use: \"true\")",
                    )
                })?;
            // Read now so a wrong path is named at start; read again at every token request.
            read_secret_file("auth.token_file", &token_file)?;
            Credential::Federated { token_file }
        }
        other => return Err(unknown_kind(other)),
    };
    Ok(AuthConfig {
        token_url,
        client_id: client_id.trim().to_owned(),
        credential,
        scope,
    })
}

fn unknown_kind(kind: &str) -> ConfigError {
    bad(
        "auth.kind",
        format!(
            "'{kind}' is not a credential kind: client_secret, certificate, workload_identity, managed_identity or public_client"
        ),
    )
}

fn secret(a: &RawAuth) -> Result<secrecy::SecretString, ConfigError> {
    match (&a.client_secret.0, &a.client_secret_file) {
        (Some(_), Some(_)) => Err(bad(
            "auth.client_secret_file",
            "set auth.client_secret or auth.client_secret_file, not both",
        )),
        (Some(s), None) if !s.expose_secret().is_empty() => Ok(s.clone()),
        (Some(_), None) => Err(bad("auth.client_secret", "is empty")),
        (None, Some(p)) => read_secret_file("auth.client_secret_file", &resolve_credential(p)),
        (None, None) => Err(bad(
            "auth.client_secret",
            "missing for kind = \"client_secret\": set auth.client_secret_file (or auth.client_secret), or choose another auth.kind",
        )),
    }
}

/// `certificate`: the PEM files read and the key checked against the certificate now.
fn certificate(a: &RawAuth) -> Result<Certificate, ConfigError> {
    let Some(cert_file) = &a.certificate_file else {
        return Err(bad(
            "auth.certificate_file",
            "missing for kind = \"certificate\": a PEM file with the certificate registered on the app (and its private key, unless auth.key_file)",
        ));
    };
    let signature = match a.signature.trim().to_ascii_uppercase().as_str() {
        "" | "PS256" => Signature::Ps256,
        "RS256" => Signature::Rs256,
        other => {
            return Err(bad(
                "auth.signature",
                format!("'{other}' is not PS256 (the default, with x5t#S256) or RS256 (with x5t)"),
            ));
        }
    };
    let cert_path = resolve_credential(cert_file);
    let key_path = resolve_credential(a.key_file.as_ref().unwrap_or(cert_file));
    let read = |key: &str, p: &PathBuf| {
        std::fs::read(p).map_err(|e| bad(key, format!("cannot read {}: {e}", p.display())))
    };
    let cert_pem = read("auth.certificate_file", &cert_path)?;
    let key_name = if a.key_file.is_some() {
        "auth.key_file"
    } else {
        "auth.certificate_file"
    };
    let key_pem = read(key_name, &key_path)?;
    Certificate::from_pem(
        &cert_path.display().to_string(),
        &cert_pem,
        &key_path.display().to_string(),
        &key_pem,
        signature,
    )
    .map_err(|e| {
        let key = match e {
            calsync_graph::CredentialError::NoCertificate { .. } => "auth.certificate_file",
            calsync_graph::CredentialError::Unreadable { ref file, .. }
                if *file == cert_path.display().to_string() && key_name == "auth.key_file" =>
            {
                "auth.certificate_file"
            }
            _ => key_name,
        };
        bad(key, e.to_string())
    })
}

/// `workload_identity`: the token endpoint and client id as the AKS webhook gives them
/// (`AZURE_AUTHORITY_HOST`, `AZURE_TENANT_ID`, `AZURE_CLIENT_ID`), unless configured.
fn workload_endpoint(a: &RawAuth, env: Env<'_>) -> Result<(String, String), ConfigError> {
    let client_id = match a.client_id.trim() {
        "" => env("AZURE_CLIENT_ID").unwrap_or_default(),
        id => id.to_owned(),
    };
    if client_id.is_empty() {
        return Err(bad(
            "auth.client_id",
            "missing for kind = \"workload_identity\": set it, or AZURE_CLIENT_ID (the AKS webhook sets it from the service account's azure.workload.identity/client-id annotation)",
        ));
    }
    if !a.token_url.trim().is_empty() {
        return Ok((a.token_url.clone(), client_id));
    }
    let Some(tenant) = env("AZURE_TENANT_ID") else {
        return Err(bad(
            "auth.token_url",
            "missing for kind = \"workload_identity\": set it, or AZURE_TENANT_ID (with AZURE_AUTHORITY_HOST, as the AKS webhook sets them)",
        ));
    };
    let host = env("AZURE_AUTHORITY_HOST")
        .unwrap_or_else(|| "https://login.microsoftonline.com/".to_owned());
    Ok((
        format!(
            "{}/{}/oauth2/v2.0/token",
            host.trim_end_matches('/'),
            tenant.trim()
        ),
        client_id,
    ))
}

/// `managed_identity`: App Service's endpoint and header (`IDENTITY_ENDPOINT`,
/// `IDENTITY_HEADER`, or `auth.identity_endpoint` with `auth.identity_header_file`), else the
/// VM's IMDS (or `auth.identity_endpoint` asked as IMDS).
fn managed(
    a: &RawAuth,
    allow_insecure_http: bool,
    env: Env<'_>,
) -> Result<ManagedIdentity, ConfigError> {
    let header = match &a.identity_header_file {
        Some(p) => Some(read_secret_file(
            "auth.identity_header_file",
            &resolve_credential(p),
        )?),
        None => env("IDENTITY_HEADER").map(secrecy::SecretString::from),
    };
    let configured = a.identity_endpoint.trim();
    let endpoint = match (configured, env("IDENTITY_ENDPOINT")) {
        ("", Some(e)) => e,
        ("", None) => calsync_graph::credential::IMDS_ENDPOINT.to_owned(),
        (c, _) => c.to_owned(),
    };
    let url = http_url("auth.identity_endpoint", &endpoint)?;
    // The identity endpoints are http:// by design, on the host itself (App Service:
    // localhost) or link-local (IMDS); anywhere else a token would cross a network in clear.
    let link_local = matches!(url.host(), Some(url::Host::Ipv4(ip)) if ip.is_link_local());
    if !link_local {
        refuse_clear_text("auth.identity_endpoint", &url, allow_insecure_http)?;
    }
    let endpoint = match header {
        Some(header) => ManagedEndpoint::AppService { url, header },
        None if env("IDENTITY_ENDPOINT").is_some() && configured.is_empty() => {
            return Err(bad(
                "auth.identity_header_file",
                "missing for kind = \"managed_identity\": IDENTITY_ENDPOINT is set but IDENTITY_HEADER is not (App Service sets both)",
            ));
        }
        None => ManagedEndpoint::Imds(url),
    };
    let client_id = Some(a.client_id.trim().to_owned()).filter(|c| !c.is_empty());
    Ok(ManagedIdentity {
        endpoint,
        client_id,
    })
}

/// A secret file readable by its group or by others (the client secret, a key, the database
/// URL with its password, the admin token, the accounts key): allowed, but warned about.
pub(super) fn secret_file_warnings(raw: &super::RawConfig) -> Vec<String> {
    use std::os::unix::fs::PermissionsExt;
    secret_files(&raw.auth)
        .into_iter()
        .chain([
            ("database.url_file", &raw.database.url_file),
            ("http.admin_token_file", &raw.http.admin_token_file),
            ("accounts.key_file", &raw.accounts.key_file),
        ])
        .map(|(key, p)| (key, p.as_ref()))
        .chain(
            raw.accounts
                .previous_key_files
                .iter()
                .map(|p| ("accounts.previous_key_files[]", Some(p))),
        )
        .chain(
            raw.sinks
                .iter()
                .map(|s| ("sinks[].secret_file", s.secret_file.as_ref())),
        )
        .filter_map(|(key, p)| {
            let p = resolve_credential(p?);
            let mode = std::fs::metadata(&p).ok()?.permissions().mode();
            (mode & 0o077 != 0).then(|| {
                format!(
                    "{key}: {} is readable by {} (mode {:o}); chmod 600 it",
                    p.display(),
                    if mode & 0o007 != 0 {
                        "others"
                    } else {
                        "its group"
                    },
                    mode & 0o777
                )
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn graph() -> Url {
        "https://graph.microsoft.com/v1.0".parse().unwrap()
    }

    fn raw(kind: &str) -> RawAuth {
        RawAuth {
            kind: kind.into(),
            ..RawAuth::default()
        }
    }

    fn env_of(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let map: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |k| map.get(k).cloned()
    }

    fn refused(a: &RawAuth, env: &[(&str, &str)]) -> ConfigError {
        auth(a, &graph(), false, &env_of(env)).unwrap_err()
    }

    #[test]
    fn each_kind_names_what_it_misses() {
        let e = refused(&raw("kerberos"), &[]);
        assert_eq!(e.key, "auth.kind");
        assert!(e.message.contains(
            "client_secret, certificate, workload_identity, managed_identity or public_client"
        ));
        let mut cert = raw("certificate");
        cert.token_url = "https://login.microsoftonline.com/t/oauth2/v2.0/token".into();
        cert.client_id = "c".into();
        let e = refused(&cert, &[]);
        assert_eq!(e.key, "auth.certificate_file");
        assert!(
            e.message.contains("kind = \"certificate\""),
            "{}",
            e.message
        );
        cert.certificate_file = Some("/nonexistent/calsync.pem".into());
        let e = refused(&cert, &[]);
        assert!(
            e.message.contains("cannot read /nonexistent/calsync.pem"),
            "{}",
            e.message
        );
        cert.signature = "HS256".into();
        assert_eq!(refused(&cert, &[]).key, "auth.signature");
        let mut secret = raw("client_secret");
        secret.token_url = cert.token_url.clone();
        secret.client_id = "c".into();
        let e = refused(&secret, &[]);
        assert_eq!(e.key, "auth.client_secret");
        assert!(e.message.contains("kind = \"client_secret\""));
        let e = refused(&raw("workload_identity"), &[]);
        assert_eq!(e.key, "auth.client_id");
        assert!(e.message.contains("AZURE_CLIENT_ID"));
    }

    /// The variables the AKS workload identity webhook sets (Microsoft Learn, "Use Microsoft
    /// Entra Workload ID with AKS"): the token endpoint, client id and token file from them.
    #[test]
    fn workload_identity_reads_what_the_aks_webhook_sets() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("azure-identity-token");
        std::fs::write(&file, "eyJ.platform.token").unwrap();
        let env = [
            ("AZURE_CLIENT_ID", "11111111-2222-3333-4444-555555555555"),
            ("AZURE_TENANT_ID", "contoso.onmicrosoft.com"),
            ("AZURE_AUTHORITY_HOST", "https://login.microsoftonline.com/"),
            ("AZURE_FEDERATED_TOKEN_FILE", file.to_str().unwrap()),
        ];
        let a = auth(&raw("workload_identity"), &graph(), false, &env_of(&env)).unwrap();
        assert_eq!(
            a.token_url.as_str(),
            "https://login.microsoftonline.com/contoso.onmicrosoft.com/oauth2/v2.0/token"
        );
        assert_eq!(a.client_id, "11111111-2222-3333-4444-555555555555");
        assert!(
            matches!(&a.credential, Credential::Federated { token_file } if *token_file == file)
        );
        assert!(!format!("{a:?}").contains("platform.token"));
        let e = refused(&raw("workload_identity"), &env[..3]);
        assert_eq!(e.key, "auth.token_file");
        assert!(e.message.contains("AZURE_FEDERATED_TOKEN_FILE"));
    }

    #[test]
    fn a_managed_identity_asks_app_service_when_it_sets_its_variables_else_imds() {
        let a = auth(&raw("managed_identity"), &graph(), false, &env_of(&[])).unwrap();
        assert!(matches!(
            &a.credential,
            Credential::Managed(ManagedIdentity { endpoint: ManagedEndpoint::Imds(u), client_id: None })
                if u.as_str() == calsync_graph::credential::IMDS_ENDPOINT
        ));
        let env = [
            ("IDENTITY_ENDPOINT", "http://localhost:42356/msi/token"),
            ("IDENTITY_HEADER", "a-host-secret"),
        ];
        let mut user_assigned = raw("managed_identity");
        user_assigned.client_id = "ua-1".into();
        let a = auth(&user_assigned, &graph(), false, &env_of(&env)).unwrap();
        assert!(matches!(
            &a.credential,
            Credential::Managed(ManagedIdentity { endpoint: ManagedEndpoint::AppService { .. }, client_id: Some(c) })
                if c == "ua-1"
        ));
        assert!(!format!("{a:?}").contains("a-host-secret"));
        let e = refused(&raw("managed_identity"), &env[..1]);
        assert_eq!(e.key, "auth.identity_header_file");
        let mut far = raw("managed_identity");
        far.identity_endpoint = "http://10.0.0.5/metadata/identity/oauth2/token".into();
        assert_eq!(refused(&far, &[]).key, "auth.identity_endpoint");
    }
}
