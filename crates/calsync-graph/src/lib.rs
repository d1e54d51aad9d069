//! calsync-graph: the Microsoft Graph client — auth, calendarView delta paging, error
//! classification and the event model. The only crate that speaks HTTP to Graph.
//!
//! | module | owns |
//! |---|---|
//! | [`auth`] | app-only tokens: fetched, cached, renewed once per expiry |
//! | [`batch`] | JSON batching of delta-link replays (`POST /$batch`, 20 at most) |
//! | [`delegated`] | delegated accounts: the device code sign-in, refresh tokens redeemed and rotated for `/me` |
//! | `paths` | the URLs of a mailbox's calendar: first delta link, event, instances (`/users/{u}` or `/me`) |
//! | `grant` | what every token request shares: how the app authenticates, what a refusal means |
//! | [`credential`] | what calsync proves its identity with: secret, certificate assertion, federated token, managed identity |
//! | [`budget`] | the memory budget for Graph bodies held between fetch and commit |
//! | [`directory`] | directory reads for discovery: users, group members, rooms, calendars |
//! | [`error`] | `classify`: what a Graph answer means (retry, resync, degrade, fail) |
//! | [`page`] | delta pages as calsync reads them: items, `@removed`, the one link |
//! | [`subscriptions`] | change-notification subscriptions: create, renew, reauthorize, delete |
//! | [`zone`] | time zones as Graph names them: UTC, IANA and Windows names |
//!
//! The client itself (`GraphClient`: links checked against the origin, delta paging, series
//! reads) is here in `lib.rs`.

#![warn(missing_docs)]

pub mod auth;
pub mod batch;
pub mod budget;
pub mod credential;
pub mod delegated;
pub mod directory;
pub mod error;
mod grant;
pub mod page;
mod paths;
pub mod subscriptions;
pub mod zone;

pub use auth::{AuthConfig, TokenSource};
pub use batch::{BatchInbox, MailboxHold};
pub use budget::{PageBudget, PageHold};
pub use credential::{
    AccountGrant, Certificate, Credential, CredentialError, Loaded, ManagedEndpoint,
    ManagedIdentity, RefreshStore, Signature,
};
pub use delegated::{DeviceLogin, SignedIn};
pub use directory::{CalendarInfo, Principal};
pub use error::{ErrorClass, GraphError, classify, parse_retry_after};
pub use page::{DeltaItem, DeltaPage, EventItem, ListPage, PageLink, parse_list, parse_page};
pub use subscriptions::{NewSubscription, Subscribed};

use chrono::{DateTime, Utc};
use futures_util::StreamExt;
use reqwest::header::{AUTHORIZATION, HeaderValue, RETRY_AFTER};
use secrecy::ExposeSecret;
use std::sync::Arc;
use std::time::{Duration, SystemTime};
use url::Url;

/// How calsync talks to Graph.
#[derive(Debug, Clone)]
pub struct GraphConfig {
    /// Graph root, e.g. `https://graph.microsoft.com/v1.0`; links are only followed to its origin.
    pub base_url: Url,
    /// Sent as `Prefer: odata.maxpagesize` on every request.
    pub page_size: Option<u32>,
    /// Time allowed to open a connection.
    pub connect_timeout: Duration,
    /// Time allowed for a whole request, body included.
    pub request_timeout: Duration,
    /// Pages larger than this are refused (guards against the oversized-page service bug).
    pub max_page_bytes: usize,
    /// Extra trusted root certificates (PEM), e.g. a TLS-inspecting proxy's CA
    /// (`tls.ca_file`), for Graph and the token endpoint.
    pub extra_roots_pem: Option<Vec<u8>>,
    /// Trust the operating system's root store as well as the compiled-in (webpki) roots.
    pub native_roots: bool,
    /// Bytes of memory that bodies fetched and not yet committed may take together (see
    /// [`budget`]); 0 turns the budget off.
    pub page_memory_budget: usize,
    /// Delta-link replays sent together in one JSON batch, at most (see [`batch`]); 1 sends
    /// each on its own.
    pub batch_size: usize,
    /// How long the first replay of a batch waits for others to join it.
    pub batch_linger: Duration,
    /// How long replays go one by one after Graph refused a batched one that it served alone,
    /// before batching is tried again.
    pub batch_refusal_hold: Duration,
}

impl GraphConfig {
    /// The defaults for `base_url`: 100 items per page, 10 s to connect, 60 s per request, 64 MiB
    /// pages, replays batched 20 at a time after a 20 ms linger (one by one for an hour after
    /// Graph refused a batched one).
    pub fn new(base_url: Url) -> Self {
        GraphConfig {
            base_url,
            page_size: Some(100),
            connect_timeout: Duration::from_secs(10),
            request_timeout: Duration::from_secs(60),
            max_page_bytes: 64 * 1024 * 1024,
            extra_roots_pem: None,
            native_roots: false,
            page_memory_budget: 192 * 1024 * 1024,
            batch_size: batch::MAX_REQUESTS,
            batch_linger: Duration::from_millis(20),
            batch_refusal_hold: Duration::from_secs(3600),
        }
    }
}

/// Which calendar of a mailbox.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum CalendarRef {
    /// The mailbox's default calendar (`/users/{u}/calendarView`).
    Default,
    /// A calendar by its Graph id (`/users/{u}/calendars/{id}/calendarView`).
    Id(String),
}

/// The window of a calendarView: `[start, end)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ViewWindow {
    /// Inclusive start.
    pub start: DateTime<Utc>,
    /// Exclusive end.
    pub end: DateTime<Utc>,
}

impl std::fmt::Display for ViewWindow {
    /// `start/end` as RFC 3339 UTC instants to the second (an ISO 8601 interval). Written
    /// field by field: it labels every round's log span, and a strftime pattern is parsed
    /// anew at each use.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        use chrono::{Datelike, Timelike};
        let one = |f: &mut std::fmt::Formatter<'_>, t: &DateTime<Utc>| {
            write!(
                f,
                "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}Z",
                t.year(),
                t.month(),
                t.day(),
                t.hour(),
                t.minute(),
                t.second()
            )
        };
        one(f, &self.start)?;
        f.write_str("/")?;
        one(f, &self.end)
    }
}

/// Which connection a request may use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Connection {
    /// A pooled keep-alive connection.
    Reuse,
    /// A new connection, closed after the request (the retry after a 503 or a reset).
    Fresh,
}

/// The Graph client. Cheap to clone.
#[derive(Debug, Clone)]
pub struct GraphClient {
    inner: Arc<Inner>,
    /// A delegated account's tokens: requests go to `/me` with them instead of
    /// `/users/{user}` with the app's (see [`delegated`]).
    account: Option<Arc<TokenSource>>,
}

#[derive(Debug)]
struct Inner {
    http: reqwest::Client,
    /// Keeps no idle connections, so each request on it opens a new one.
    fresh_http: reqwest::Client,
    cfg: GraphConfig,
    tokens: TokenSource,
    prefer: HeaderValue,
    budget: Option<PageBudget>,
    /// Where replays go to be batched (see [`GraphClient::take_batch_inbox`]).
    batcher: batch::Batcher,
    /// Until when (ms after `started`) replays go one by one because Graph refused one in a
    /// batch that it served alone; 0: never refused.
    batch_refused_until_ms: std::sync::atomic::AtomicU64,
    /// When this client was built: the clock of `batch_refused_until_ms`.
    started: std::time::Instant,
    /// `{origin}/`: a link that starts with it is on the configured origin without parsing it.
    origin_slash: String,
    /// `{origin}{root path}/`: a plain link under it is relative to the root without parsing.
    root_slash: String,
}

fn same_origin(a: &Url, b: &Url) -> bool {
    a.scheme() == b.scheme()
        && a.host_str()
            .unwrap_or("")
            .eq_ignore_ascii_case(b.host_str().unwrap_or(""))
        && a.port_or_known_default() == b.port_or_known_default()
}

fn origin_text(u: &Url) -> String {
    u.origin().ascii_serialization()
}

impl GraphClient {
    /// A client with its own connection pool; fails only if the TLS backend cannot start.
    pub fn new(cfg: GraphConfig, auth: AuthConfig) -> Result<Self, GraphError> {
        let extra_roots = match &cfg.extra_roots_pem {
            Some(pem) => reqwest::Certificate::from_pem_bundle(pem).map_err(|e| {
                GraphError::AuthUnavailable {
                    reason: format!("tls.ca_file holds no usable PEM certificate: {e}"),
                }
            })?,
            None => Vec::new(),
        };
        let builder = || {
            let mut b = reqwest::Client::builder()
                // Never follow a redirect: it could carry the bearer token to another host.
                .redirect(reqwest::redirect::Policy::none())
                .connect_timeout(cfg.connect_timeout)
                .timeout(cfg.request_timeout)
                .user_agent(concat!("calsync/", env!("CARGO_PKG_VERSION")))
                .tls_built_in_webpki_certs(true)
                .tls_built_in_native_certs(cfg.native_roots)
                // A path that dies without a reset is noticed by the kernel, not only by the
                // request timeout.
                .tcp_keepalive(Duration::from_secs(30));
            for c in &extra_roots {
                b = b.add_root_certificate(c.clone());
            }
            b
        };
        let built = |b: reqwest::ClientBuilder| {
            b.build().map_err(|e| GraphError::AuthUnavailable {
                reason: if extra_roots.is_empty() {
                    e.without_url().to_string()
                } else {
                    format!(
                        "the TLS client cannot be built; is every certificate in tls.ca_file valid? ({})",
                        e.without_url()
                    )
                },
            })
        };
        let http = built(builder().pool_idle_timeout(Duration::from_secs(60)))?;
        let fresh_http = built(builder().pool_max_idle_per_host(0))?;
        let mut prefer = String::from("outlook.timezone=\"UTC\"");
        if let Some(n) = cfg.page_size {
            prefer = format!("odata.maxpagesize={n}, {prefer}");
        }
        let prefer = HeaderValue::from_str(&prefer).map_err(|_| GraphError::Rejected {
            status: 0,
            code: "BadPreferHeader".into(),
            message: String::new(),
        })?;
        Ok(GraphClient {
            account: None,
            inner: Arc::new(Inner {
                tokens: TokenSource::new(auth, http.clone()),
                http,
                fresh_http,
                budget: PageBudget::new(cfg.page_memory_budget),
                prefer,
                batcher: batch::Batcher::default(),
                batch_refused_until_ms: std::sync::atomic::AtomicU64::new(0),
                started: std::time::Instant::now(),
                origin_slash: format!("{}/", origin_text(&cfg.base_url)),
                root_slash: format!(
                    "{}{}/",
                    origin_text(&cfg.base_url),
                    cfg.base_url.path().trim_end_matches('/')
                ),
                cfg,
            }),
        })
    }

    /// The token source, shared by every request of this client: the account's, for an
    /// account's client.
    pub fn tokens(&self) -> &TokenSource {
        self.account.as_deref().unwrap_or(&self.inner.tokens)
    }

    /// The configured Graph root.
    pub fn base_url(&self) -> &Url {
        &self.inner.cfg.base_url
    }

    /// Refuses links to anywhere but the configured Graph origin (scheme, host and port).
    pub fn check_link(&self, link: &str) -> Result<Url, GraphError> {
        let base = &self.inner.cfg.base_url;
        let url = Url::parse(link).map_err(|_| GraphError::Malformed {
            reason: "a page link is not a URL".into(),
        })?;
        if !same_origin(&url, base) {
            return Err(GraphError::ForeignLink {
                origin: origin_text(&url),
                expected: origin_text(base),
            });
        }
        Ok(url)
    }

    /// [`GraphClient::check_link`] without the parsed URL. A link that starts with the
    /// configured origin and a `/` (what Graph sends) is accepted without being parsed: every
    /// such string parses, and to that origin. Anything else is parsed and checked in full.
    pub fn allows_link(&self, link: &str) -> Result<(), GraphError> {
        if link.starts_with(&self.inner.origin_slash) {
            return Ok(());
        }
        self.check_link(link).map(drop)
    }

    /// GETs one delta page. On 401 the token is renewed once and the request repeated.
    pub async fn fetch_page(
        &self,
        link: &str,
        connection: Connection,
    ) -> Result<DeltaPage, GraphError> {
        let url = self.check_link(link)?;
        let (body, hold) = self.get_ok(&url, connection).await?;
        let mut page = parse_page(&body)?;
        page.hold = hold;
        Ok(page)
    }

    /// The page memory budget, when there is one.
    pub fn page_budget(&self) -> Option<&PageBudget> {
        self.inner.budget.as_ref()
    }

    /// The directory object id of the mailbox `user` names (a UPN or already an id):
    /// `GET …/users/{user}?$select=id`. `None` when Graph says there is no such user.
    pub async fn resolve_user(
        &self,
        user: &str,
        connection: Connection,
    ) -> Result<Option<String>, GraphError> {
        let mut url = self.inner.cfg.base_url.clone();
        if let Ok(mut segs) = url.path_segments_mut() {
            segs.pop_if_empty();
            self.push_mailbox(&mut segs, user);
        }
        url.query_pairs_mut().append_pair("$select", "id");
        match self.get_ok(&url, connection).await {
            Ok((body, _)) => {
                let v: serde_json::Value =
                    serde_json::from_slice(&body).map_err(|e| GraphError::Malformed {
                        reason: format!("a user is not JSON: {e}"),
                    })?;
                match v.get("id").and_then(serde_json::Value::as_str) {
                    Some(id) if !id.is_empty() => Ok(Some(id.to_owned())),
                    _ => Err(GraphError::Malformed {
                        reason: "a user has no id".into(),
                    }),
                }
            }
            Err(GraphError::NotFound { .. }) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// GETs one event (a series master, when hydrating occurrence stubs). `None` when Graph
    /// says it does not exist (404): the series was deleted.
    pub async fn get_event(
        &self,
        user: &str,
        calendar: &CalendarRef,
        id: &str,
        connection: Connection,
    ) -> Result<Option<EventItem>, GraphError> {
        let url = self.event_url(user, calendar, id);
        match self.get_ok(&url, connection).await {
            Ok((body, _)) => {
                let v: serde_json::Map<String, serde_json::Value> =
                    serde_json::from_slice(&body).map_err(|e| GraphError::Malformed {
                        reason: format!("an event is not a JSON object: {e}"),
                    })?;
                EventItem::from_map(v).map(Some)
            }
            Err(GraphError::NotFound { .. }) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// GETs one page of a plain list (`/instances`). `None` when the series is gone (404).
    pub async fn fetch_list(
        &self,
        link: &str,
        connection: Connection,
    ) -> Result<Option<ListPage>, GraphError> {
        let url = self.check_link(link)?;
        match self.get_ok(&url, connection).await {
            Ok((body, _)) => parse_list(&body).map(Some),
            Err(GraphError::NotFound { .. }) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// GETs `url` and returns a 200's body; any other status is classified. On 401 the token
    /// is renewed once and the request repeated.
    async fn get_ok(
        &self,
        url: &Url,
        connection: Connection,
    ) -> Result<(Vec<u8>, PageHold), GraphError> {
        self.get_ok_with(url, connection, false).await
    }

    /// [`GraphClient::get_ok`]; `eventual` sends `ConsistencyLevel: eventual`, which a
    /// directory advanced query (`ne`, `endsWith`, `$count`) needs.
    pub(crate) async fn get_ok_with(
        &self,
        url: &Url,
        connection: Connection,
        eventual: bool,
    ) -> Result<(Vec<u8>, PageHold), GraphError> {
        let token = self.tokens().token().await?;
        match self.get(url, &token, connection, eventual).await {
            Err(GraphError::Unauthorized { .. }) => {
                self.tokens().invalidate(&token).await;
                let fresh = self.tokens().token().await?;
                self.get(url, &fresh, connection, eventual).await
            }
            other => other,
        }
    }

    async fn get(
        &self,
        url: &Url,
        token: &auth::AccessToken,
        connection: Connection,
        eventual: bool,
    ) -> Result<(Vec<u8>, PageHold), GraphError> {
        let http = match connection {
            Connection::Reuse => &self.inner.http,
            Connection::Fresh => &self.inner.fresh_http,
        };
        let mut request = http
            .get(url.clone())
            .header("prefer", self.inner.prefer.clone());
        if eventual {
            request = request.header("consistencylevel", HeaderValue::from_static("eventual"));
        }
        let answer = self
            .exchange(request, token, self.inner.cfg.max_page_bytes)
            .await?;
        if answer.status == 200 {
            Ok((answer.body, answer.hold))
        } else {
            Err(classify(answer.status, answer.retry_after, &answer.body))
        }
    }

    /// Sends `request` with `token` as its bearer and reads the answer's body (at most `limit`
    /// bytes, within the page memory budget), whatever its status.
    async fn exchange(
        &self,
        request: reqwest::RequestBuilder,
        token: &auth::AccessToken,
        limit: usize,
    ) -> Result<Answer, GraphError> {
        let mut bearer = HeaderValue::from_str(&format!("Bearer {}", token.secret.expose_secret()))
            .map_err(|_| GraphError::AuthUnavailable {
                reason: "the access token is not a valid header value".into(),
            })?;
        bearer.set_sensitive(true);
        let resp = request
            .header(AUTHORIZATION, bearer)
            .send()
            .await
            .map_err(transport)?;
        let status = resp.status().as_u16();
        let retry_after = resp
            .headers()
            .get(RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| parse_retry_after(v, SystemTime::now()));
        let (body, hold) = read_capped(resp, limit, self.inner.budget.as_ref()).await?;
        Ok(Answer {
            status,
            retry_after,
            body,
            hold,
        })
    }
}

/// One HTTP answer (or one inner answer of a batch), any status.
#[derive(Debug, Clone)]
pub(crate) struct Answer {
    pub(crate) status: u16,
    pub(crate) retry_after: Option<Duration>,
    pub(crate) body: Vec<u8>,
    pub(crate) hold: PageHold,
}

fn transport(e: reqwest::Error) -> GraphError {
    GraphError::Transient {
        status: None,
        fresh_connection: true,
        message: e.without_url().to_string(),
    }
}

/// Reads a body up to `limit` bytes, reserving memory from `budget` as it arrives.
async fn read_capped(
    resp: reqwest::Response,
    limit: usize,
    budget: Option<&PageBudget>,
) -> Result<(Vec<u8>, PageHold), GraphError> {
    if resp.content_length().is_some_and(|n| n as usize > limit) {
        return Err(GraphError::TooLarge { limit });
    }
    let mut held = None;
    let expected = resp.content_length().map_or(8192, |n| n as usize);
    if let Some(b) = budget {
        b.cover(&mut held, expected).await?;
    }
    let mut out = Vec::with_capacity(expected);
    let mut stream = resp.bytes_stream();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(transport)?;
        if out.len() + chunk.len() > limit {
            return Err(GraphError::TooLarge { limit });
        }
        if let Some(b) = budget {
            b.cover(&mut held, out.len() + chunk.len()).await?;
        }
        out.extend_from_slice(&chunk);
    }
    Ok((out, PageBudget::hold(held)))
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn client(base: &str) -> GraphClient {
        let base = Url::parse(base).unwrap();
        let auth = AuthConfig {
            token_url: base.join("/token").unwrap(),
            client_id: "c".into(),
            credential: Credential::Secret("s".to_owned().into()),
            scope: "x".into(),
        };
        GraphClient::new(GraphConfig::new(base), auth).unwrap()
    }

    #[test]
    fn a_window_prints_as_an_interval_of_utc_instants() {
        let w = ViewWindow {
            start: "2026-07-30T00:00:00Z".parse().unwrap(),
            end: "2027-01-05T13:04:09.5Z".parse().unwrap(),
        };
        assert_eq!(w.to_string(), "2026-07-30T00:00:00Z/2027-01-05T13:04:09Z");
    }

    #[test]
    fn links_are_held_to_the_configured_origin() {
        let g = client("https://graph.microsoft.com/v1.0");
        for ok in [
            "https://graph.microsoft.com/v1.0/users/a/calendarView/delta?$deltatoken=x",
            "HTTPS://GRAPH.microsoft.com/v1.0/x",
            "https://graph.microsoft.com:443/v1.0/x",
        ] {
            assert!(g.check_link(ok).is_ok(), "{ok}");
        }
        for foreign in [
            "https://graph.microsoft.com.evil.example/v1.0/x",
            "https://graph.microsoft.com@evil.example/v1.0/x",
            "https://graph.microsoft.com:8443/v1.0/x",
            "http://graph.microsoft.com/v1.0/x",
            "https://evil.example/https://graph.microsoft.com/",
        ] {
            assert!(
                matches!(g.check_link(foreign), Err(GraphError::ForeignLink { .. })),
                "{foreign}"
            );
        }
        assert!(matches!(
            g.check_link("not a link"),
            Err(GraphError::Malformed { .. })
        ));
    }

    /// `allows_link` skips the parser for links that start with the origin and a `/`; on every
    /// link it answers as `check_link` does.
    #[test]
    fn the_quick_link_check_agrees_with_the_parser() {
        for base in [
            "https://graph.microsoft.com/v1.0",
            "http://127.0.0.1:8080/v1.0/",
        ] {
            let g = client(base);
            for link in [
                "https://graph.microsoft.com/v1.0/users/a/calendarView/delta?$deltatoken=x",
                "https://graph.microsoft.com/",
                "https://graph.microsoft.com/@evil.example/x",
                "https://graph.microsoft.com/v1.0/x y\\z#f",
                "https://graph.microsoft.com.evil.example/v1.0/x",
                "https://graph.microsoft.com@evil.example/v1.0/x",
                "HTTPS://GRAPH.microsoft.com/v1.0/x",
                "https://graph.microsoft.com:443/v1.0/x",
                "http://127.0.0.1:8080/v1.0/users/a?$deltatoken=x",
                "http://127.0.0.1:80800/v1.0/x",
                "http://127.0.0.1:8080@evil.example/v1.0/x",
                "http://127.0.0.1:8080/../../x",
                "not a link",
                "",
            ] {
                let parsed = g.check_link(link).map(drop);
                let quick = g.allows_link(link);
                assert_eq!(
                    format!("{quick:?}"),
                    format!("{parsed:?}"),
                    "{link} against {base}"
                );
            }
        }
    }
}
