//! Credentials other than a client secret (issue 26), each against graph-sim's Entra: a
//! certificate (PS256 with `x5t#S256`, RS256 with `x5t`), a federated token file rewritten
//! mid-run (workload identity), a managed identity through a VM's IMDS and App Service's
//! endpoint; and refusals that name the key calsync used.

use crate::harness::*;
use calsync_engine::{Engine, Outcome};
use calsync_graph::{
    AuthConfig, Certificate, Credential, GraphClient, ManagedEndpoint, ManagedIdentity, Signature,
};
use graph_sim::assertion::{FederatedCredential, PLATFORM_ISSUER, RegisteredCertificate};
use graph_sim::auth::ClientApp;
use graph_sim::{DEFAULT_CLIENT_ID, SimConfig};
use sqlx::PgPool;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// A self-signed RSA certificate and its key, made by `openssl` (as an admin would make one
/// to upload to the app registration): `(certificate file, key file)`.
fn openssl_certificate(dir: &Path, name: &str) -> (PathBuf, PathBuf) {
    let (cert, key) = (
        dir.join(format!("{name}.crt")),
        dir.join(format!("{name}.key")),
    );
    let out = std::process::Command::new("openssl")
        .args([
            "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
        ])
        .arg("-subj")
        .arg(format!("/CN={name}"))
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .output()
        .expect("openssl runs (.ci/run installs it)");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    (cert, key)
}

fn registered(cert: &Path) -> RegisteredCertificate {
    RegisteredCertificate {
        pem: std::fs::read_to_string(cert).unwrap(),
    }
}

fn certificate(cert: &Path, key: &Path, signature: Signature) -> Credential {
    Credential::Certificate(Arc::new(
        Certificate::from_pem(
            &cert.display().to_string(),
            &std::fs::read(cert).unwrap(),
            &key.display().to_string(),
            &std::fs::read(key).unwrap(),
            signature,
        )
        .unwrap(),
    ))
}

fn engine_with(h: &Harness, credential: Credential) -> Engine {
    let auth = AuthConfig {
        credential,
        ..h.auth()
    };
    Engine::new(
        GraphClient::new(h.graph_config(), auth).unwrap(),
        h.store.clone(),
        settings(),
    )
}

fn app(certificates: Vec<RegisteredCertificate>, federated: Vec<FederatedCredential>) -> SimConfig {
    let mut app = ClientApp::with_secret(DEFAULT_CLIENT_ID, "a secret calsync does not have");
    app.certificates = certificates;
    app.federated = federated;
    SimConfig {
        clients: vec![app],
        ..sim_config()
    }
}

/// The message of a round that failed at the token endpoint.
fn refusal(o: Outcome) -> String {
    match o {
        Outcome::Failed(f) => format!("{}: {}", f.code, f.message),
        other => panic!("expected a refused token request, got {other:?}"),
    }
}

/// Issue 26 (certificate credentials, Microsoft Learn): a client assertion signed PS256 with
/// `x5t#S256` (the default) and one signed RS256 with `x5t` both get tokens and mirror the
/// calendar; a tenant that looks certificates up by SHA-1 only (MicrosoftDocs/entra-docs PR
/// #1301) refuses the first with AADSTS700027 and takes the second.
#[sqlx::test(migrations = false)]
async fn a_certificate_signs_ps256_and_rs256_assertions_that_entra_accepts(pool: PgPool) {
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = openssl_certificate(dir.path(), "calsync");
    let h = harness_with(pool, 10, app(vec![registered(&cert)], vec![])).await;
    seed(&h, 5);
    for signature in [Signature::Ps256, Signature::Rs256] {
        let engine = engine_with(&h, certificate(&cert, &key, signature));
        let t = h.default_tuple(&engine).await;
        report(sync(&engine, &t).await);
        h.assert_mirrors(&[t]).await;
    }
    assert_eq!(h.sim.lock().stats().tokens_issued, 2);

    h.sim.lock().auth.certificate_policy.sha1_thumbprints_only = true;
    h.create(single(
        "after the policy",
        "2026-01-12T09:00:00Z",
        "2026-01-12T10:00:00Z",
    ));
    let ps256 = engine_with(&h, certificate(&cert, &key, Signature::Ps256));
    let t = h.default_tuple(&ps256).await;
    let refused = refusal(sync(&ps256, &t).await);
    assert!(refused.contains("AADSTS700027"), "{refused}");
    let rs256 = engine_with(&h, certificate(&cert, &key, Signature::Rs256));
    report(sync(&rs256, &t).await);
    h.assert_mirrors(&[t]).await;
}

/// Issue 26: a certificate the app does not know, and an assertion Entra reads as expired (its
/// clock an hour ahead of calsync's), are refused with messages that name the certificate
/// file and thumbprint calsync signed with; a key that does not belong to its certificate is
/// refused before any request.
#[sqlx::test(migrations = false)]
async fn a_wrong_certificate_or_an_expired_assertion_is_refused_naming_the_key(pool: PgPool) {
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = openssl_certificate(dir.path(), "registered");
    let (other, other_key) = openssl_certificate(dir.path(), "unknown");
    let h = harness_with(pool.clone(), 10, app(vec![registered(&cert)], vec![])).await;
    seed(&h, 2);
    let wrong = certificate(&other, &other_key, Signature::Ps256);
    let Credential::Certificate(c) = &wrong else {
        unreachable!()
    };
    let thumbprint = c.thumbprint().to_owned();
    let engine = engine_with(&h, wrong);
    let t = h.default_tuple(&engine).await;
    let refused = refusal(sync(&engine, &t).await);
    assert!(refused.contains("AADSTS700027"), "{refused}");
    assert!(refused.contains(&other.display().to_string()), "{refused}");
    assert!(refused.contains(&thumbprint), "{refused}");

    let mismatch = Certificate::from_pem(
        &cert.display().to_string(),
        &std::fs::read(&cert).unwrap(),
        &other_key.display().to_string(),
        &std::fs::read(&other_key).unwrap(),
        Signature::Ps256,
    )
    .unwrap_err()
    .to_string();
    assert!(
        mismatch.contains("does not belong to the certificate") && mismatch.contains("unknown.key"),
        "{mismatch}"
    );

    drop(h);
    let ahead = SimConfig {
        clock_start: Some(chrono::Utc::now() + chrono::Duration::hours(1)),
        ..app(vec![registered(&cert)], vec![])
    };
    let h = harness_with(pool, 10, ahead).await;
    let engine = engine_with(&h, certificate(&cert, &key, Signature::Ps256));
    let t = h.default_tuple(&engine).await;
    let refused = refusal(sync(&engine, &t).await);
    assert!(
        refused.contains("AADSTS700024") && refused.contains(&cert.display().to_string()),
        "{refused}"
    );
}

/// Issue 26 (workload identity): the platform's token is read from its file at every token
/// request, since Kubernetes rotates it. An expired token in the file is refused (AADSTS700024)
/// once the access token must be renewed; the file rewritten with a fresh token is read at the
/// next request, and the calendar syncs again without a restart.
#[sqlx::test(migrations = false)]
async fn a_federated_token_file_rewritten_mid_run_is_read_at_each_token_request(pool: PgPool) {
    let subject = "system:serviceaccount:calsync:calsync";
    let federated = FederatedCredential {
        issuer: PLATFORM_ISSUER.into(),
        subject: subject.into(),
        audience: graph_sim::assertion::TOKEN_EXCHANGE_AUDIENCE.into(),
    };
    let h = harness_with(pool, 10, app(vec![], vec![federated])).await;
    seed(&h, 3);
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("azure-identity-token");
    let platform_token = |lifetime: i64| {
        let st = h.sim.lock();
        st.auth.platform_token(subject, st.tenant.now(), lifetime)
    };
    std::fs::write(&file, platform_token(3600)).unwrap();
    let engine = engine_with(
        &h,
        Credential::Federated {
            token_file: file.clone(),
        },
    );
    let t = h.default_tuple(&engine).await;
    report(sync(&engine, &t).await);

    // The platform's token in the file has expired; the access token is revoked (as a key
    // rollover would), so calsync must ask again, with what the file holds now.
    std::fs::write(&file, platform_token(-3600)).unwrap();
    {
        let mut st = h.sim.lock();
        let now = st.tenant.now();
        st.auth.expire_all(now);
    }
    h.create(single(
        "while the token was stale",
        "2026-01-12T09:00:00Z",
        "2026-01-12T10:00:00Z",
    ));
    let refused = refusal(sync(&engine, &t).await);
    assert!(
        refused.contains("AADSTS700024") && refused.contains("azure-identity-token"),
        "{refused}"
    );
    // Kubernetes writes a fresh token; after the token source's hold (1 s) it is read.
    std::fs::write(&file, platform_token(3600)).unwrap();
    tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
    report(sync(&engine, &t).await);
    h.assert_mirrors(&[t]).await;

    // A token for another service account is no token for this app.
    std::fs::write(
        &file,
        h.sim.lock().auth.platform_token(
            "system:serviceaccount:other:other",
            chrono::Utc::now(),
            3600,
        ),
    )
    .unwrap();
    {
        let mut st = h.sim.lock();
        let now = st.tenant.now();
        st.auth.expire_all(now);
    }
    let fresh = engine_with(
        &h,
        Credential::Federated {
            token_file: file.clone(),
        },
    );
    let refused = refusal(sync(&fresh, &h.default_tuple(&fresh).await).await);
    assert!(refused.contains("AADSTS700213"), "{refused}");
}

/// Issue 26 (managed identity): a VM's IMDS (`Metadata: true`) and App Service's endpoint
/// (`X-IDENTITY-HEADER`) each give the tokens the calendar is mirrored with, for the
/// system-assigned identity and a user-assigned one; an identity the host does not have is
/// refused ("Identity not found"), and so is a wrong App Service header.
#[sqlx::test(migrations = false)]
async fn a_managed_identity_gets_tokens_from_imds_and_from_app_service(pool: PgPool) {
    let h = harness(pool, 10).await;
    seed(&h, 4);
    h.sim.lock().auth.managed.user_assigned = vec!["user-assigned-1".into()];
    let origin = h.server.graph_base_url().replace("/v1.0", "");
    let imds: url::Url = format!("{origin}/metadata/identity/oauth2/token")
        .parse()
        .unwrap();
    let app_service: url::Url = format!("{origin}/msi/token").parse().unwrap();
    let header = h.sim.lock().auth.managed.identity_header.clone();
    let managed = |endpoint: ManagedEndpoint, client_id: Option<&str>| {
        Credential::Managed(ManagedIdentity {
            endpoint,
            client_id: client_id.map(str::to_owned),
        })
    };
    for (endpoint, client_id) in [
        (ManagedEndpoint::Imds(imds.clone()), None),
        (ManagedEndpoint::Imds(imds.clone()), Some("user-assigned-1")),
        (
            ManagedEndpoint::AppService {
                url: app_service.clone(),
                header: header.clone().into(),
            },
            None,
        ),
    ] {
        let engine = engine_with(&h, managed(endpoint, client_id));
        let t = h.default_tuple(&engine).await;
        report(sync(&engine, &t).await);
        h.assert_mirrors(&[t]).await;
    }
    assert_eq!(h.sim.lock().auth.managed_issued, 3);

    let unknown = engine_with(
        &h,
        managed(ManagedEndpoint::Imds(imds), Some("not-attached")),
    );
    let refused = refusal(sync(&unknown, &h.default_tuple(&unknown).await).await);
    assert!(refused.contains("Identity not found"), "{refused}");
    let wrong_header = engine_with(
        &h,
        managed(
            ManagedEndpoint::AppService {
                url: app_service,
                header: "not the header".to_owned().into(),
            },
            None,
        ),
    );
    let refused = refusal(sync(&wrong_header, &h.default_tuple(&wrong_header).await).await);
    assert!(refused.contains("X-IDENTITY-HEADER"), "{refused}");
    assert!(
        !refused.contains("not the header"),
        "the header is a secret: {refused}"
    );
}

/// Issue 26: the real binary at trace level, with each kind's secret in a file (a
/// certificate's key, the platform's federated token, App Service's identity header), through
/// a sync, a forced token renewal and the read-only commands: no key, client assertion,
/// platform token, identity header or access token appears in anything it printed, nor in any
/// text column of the database.
#[tokio::test(flavor = "multi_thread")]
async fn no_key_assertion_or_token_reaches_any_output_or_column() {
    let url = calsync_store::recreate_database(&database_url(), "calsync_credential_secrets")
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = openssl_certificate(dir.path(), "calsync");
    let subject = "system:serviceaccount:calsync:calsync";
    let sim = graph_sim::Sim::new(&app(
        vec![registered(&cert)],
        vec![FederatedCredential {
            issuer: PLATFORM_ISSUER.into(),
            subject: subject.into(),
            audience: graph_sim::assertion::TOKEN_EXCHANGE_AUDIENCE.into(),
        }],
    ));
    let (platform_token, header) = {
        let mut st = sim.lock();
        let u = st.tenant.add_user(USER, None, "Adele Vance");
        for d in 10..20 {
            let p = graph_sim::writes::EventPatch::from_json(&serde_json::json!({
                "subject": format!("e{d}"),
                "start": {"dateTime": format!("2026-01-{d}T10:00:00"), "timeZone": "UTC"},
                "end": {"dateTime": format!("2026-01-{d}T11:00:00"), "timeZone": "UTC"}}))
            .unwrap();
            st.tenant.create_event(u, 0, &p).unwrap();
        }
        let now = st.tenant.now();
        (
            st.auth.platform_token(subject, now, 3600),
            st.auth.managed.identity_header.clone(),
        )
    };
    let server = sim.serve("127.0.0.1:0").await.unwrap();
    let token_file = dir.path().join("azure-identity-token");
    std::fs::write(&token_file, &platform_token).unwrap();
    let header_file = dir.path().join("identity-header");
    std::fs::write(&header_file, &header).unwrap();
    let token_url = server.token_url(graph_sim::DEFAULT_TENANT);
    let origin = server.graph_base_url().replace("/v1.0", "");
    let kinds = [
        format!(
            "kind = \"certificate\"\ntoken_url = \"{token_url}\"\nclient_id = \"{DEFAULT_CLIENT_ID}\"\ncertificate_file = \"{}\"\nkey_file = \"{}\"\n",
            cert.display(),
            key.display()
        ),
        format!(
            "kind = \"workload_identity\"\ntoken_url = \"{token_url}\"\nclient_id = \"{DEFAULT_CLIENT_ID}\"\ntoken_file = \"{}\"\n",
            token_file.display()
        ),
        format!(
            "kind = \"managed_identity\"\nidentity_endpoint = \"{origin}/msi/token\"\nidentity_header_file = \"{}\"\n",
            header_file.display()
        ),
    ];
    let mut printed = String::new();
    for auth in &kinds {
        let config = format!(
            "[database]\nurl = \"{url}\"\n[graph]\nbase_url = \"{}\"\n[auth]\n{auth}\n[sync]\npage_size = 3\n\n[[calendars]]\nuser = \"{USER}\"\ncalendar = \"default\"\nstart = \"2026-01-01T00:00:00Z\"\nend = \"2026-04-01T00:00:00Z\"\n",
            server.graph_base_url()
        );
        let file = dir.path().join("calsync.toml");
        std::fs::write(&file, &config).unwrap();
        let run = |args: &[&str]| run_traced(&file, args);
        let (code, out) = run(&["sync-once"]);
        assert_eq!(code, Some(0), "{auth}\n{out}");
        printed.push_str(&out);
        {
            let mut st = sim.lock();
            let now = st.tenant.now();
            st.auth.expire_all(now);
        }
        let (code, out) = run(&["sync-once"]);
        assert_eq!(code, Some(0), "{auth}\n{out}");
        printed.push_str(&out);
        for args in [&["status"][..], &["status", "--json"], &["config", "check"]] {
            printed.push_str(&run(args).1);
        }
    }
    assert!(printed.contains("TRACE"), "trace level was on");
    assert!(
        printed.contains("credential: certificate"),
        "config check names the kind"
    );
    let mut secrets: Vec<String> = vec![header.clone()];
    // Each line of the private key's base64 body.
    secrets.extend(
        std::fs::read_to_string(&key)
            .unwrap()
            .lines()
            .filter(|l| !l.starts_with("-----") && l.len() > 20)
            .map(str::to_owned),
    );
    let (assertions, tokens) = {
        let st = sim.lock();
        (st.auth.presented_assertions(), st.auth.minted_tokens())
    };
    assert!(
        assertions.len() >= 4,
        "assertions presented: {}",
        assertions.len()
    );
    assert!(tokens.len() >= 6, "tokens minted: {}", tokens.len());
    for t in assertions.iter().chain(&tokens).chain([&platform_token]) {
        secrets.push(t.clone());
        // The signature or random part alone too, in case a line splits the token at a dot.
        secrets.push(t.rsplit('.').next().unwrap().to_owned());
    }
    assert_not_printed(&printed, &secrets);
    // Every text column of every table.
    assert_no_column_holds(&url, &secrets).await;
    server.stop().await;
}
