//! Change notifications (notes §5; Microsoft Learn's "Create subscription", "Receive change
//! notifications through webhooks", "Reduce missing subscriptions and change notifications"):
//! subscriptions, the validation handshake, deliveries, retries and lifecycle events, against a
//! receiver of the test's own.

use crate::*;
use http_body_util::{BodyExt, Full};
use hyper::body::{Bytes, Incoming};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use std::sync::{Arc, Mutex};

/// How the test's receiver answers.
#[derive(Clone, Debug)]
enum Answer {
    /// As a correct endpoint does: the decoded token, 202 to notifications.
    Right,
    /// The token still URL-encoded (a common client bug).
    EncodedToken,
    /// Too slow for the handshake.
    Slow(Duration),
    /// 500 to the first n notification POSTs, then right.
    FailFirst(usize),
}

#[derive(Default)]
struct Seen {
    validations: Vec<String>,
    posts: Vec<(String, Value)>,
    failed: usize,
}

/// A notification endpoint on loopback recording what Graph sent it.
struct Receiver {
    url: String,
    seen: Arc<Mutex<Seen>>,
}

impl Receiver {
    async fn start(answer: Answer) -> Receiver {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let seen = Arc::new(Mutex::new(Seen::default()));
        let shared = Arc::clone(&seen);
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                let seen = Arc::clone(&shared);
                let answer = answer.clone();
                tokio::spawn(async move {
                    let svc = service_fn(move |req: Request<Incoming>| {
                        let seen = Arc::clone(&seen);
                        let answer = answer.clone();
                        async move {
                            let path = req.uri().path().to_owned();
                            let token = url::form_urlencoded::parse(
                                req.uri().query().unwrap_or("").as_bytes(),
                            )
                            .find(|(k, _)| k == "validationToken")
                            .map(|(_, v)| v.into_owned());
                            let raw_query = req.uri().query().unwrap_or("").to_owned();
                            let body = req.into_body().collect().await.unwrap().to_bytes();
                            let reply = |status: u16, body: String| {
                                let mut r = Response::new(Full::new(Bytes::from(body)));
                                *r.status_mut() = hyper::StatusCode::from_u16(status).unwrap();
                                r.headers_mut()
                                    .insert("content-type", "text/plain".parse().unwrap());
                                Ok::<_, std::convert::Infallible>(r)
                            };
                            if let Some(token) = token {
                                seen.lock().unwrap().validations.push(token.clone());
                                return match answer {
                                    Answer::EncodedToken => {
                                        let encoded = raw_query
                                            .trim_start_matches("validationToken=")
                                            .to_owned();
                                        reply(200, encoded)
                                    }
                                    Answer::Slow(d) => {
                                        tokio::time::sleep(d).await;
                                        reply(200, token)
                                    }
                                    _ => reply(200, token),
                                };
                            }
                            let json: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
                            let mut s = seen.lock().unwrap();
                            if let Answer::FailFirst(n) = answer {
                                if s.failed < n {
                                    s.failed += 1;
                                    return reply(500, String::new());
                                }
                            }
                            s.posts.push((path, json));
                            reply(202, String::new())
                        }
                    });
                    let _ = http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        Receiver { url, seen }
    }

    /// The notification items received on `path`, in order.
    fn items(&self, path: &str) -> Vec<Value> {
        self.seen
            .lock()
            .unwrap()
            .posts
            .iter()
            .filter(|(p, _)| p == path)
            .flat_map(|(_, v)| v["value"].as_array().cloned().unwrap_or_default())
            .collect()
    }

    async fn wait_items(&self, path: &str, n: usize) -> Vec<Value> {
        for _ in 0..200 {
            let got = self.items(path);
            if got.len() >= n {
                return got;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        panic!("{path}: expected {n} items, got {:?}", self.items(path));
    }
}

/// Deliveries at once, so tests need not wait out Graph's seconds.
fn prompt() -> SimConfig {
    SimConfig {
        push: graph_sim::push::PushSettings {
            delay_ms: 0,
            jitter_ms: 0,
            retry_first_ms: 50,
            ..Default::default()
        },
        ..SimConfig::default()
    }
}

impl Session {
    fn subscriptions_url(&self) -> String {
        format!("{}/subscriptions", self.base())
    }

    fn expiry_in(&self, minutes: i64) -> String {
        (clock() + chrono::Duration::minutes(minutes)).to_rfc3339()
    }

    async fn subscribe(&self, r: &Receiver, resource: &str) -> (StatusCode, Value) {
        self.send(
            reqwest::Method::POST,
            &self.subscriptions_url(),
            Some(json!({
                "changeType": "created,updated,deleted",
                "notificationUrl": format!("{}/notify?tenant=a", r.url),
                "lifecycleNotificationUrl": format!("{}/lifecycle", r.url),
                "resource": resource,
                "expirationDateTime": self.expiry_in(3 * 24 * 60),
                "clientState": "secret-of-the-test",
            })),
        )
        .await
    }

    fn work_calendar(&self) -> String {
        let st = self.sim.lock();
        let u = st.tenant.user_index(&self.user).unwrap();
        st.tenant.users[u].calendars[1].id.clone()
    }
}

#[tokio::test]
async fn creation_validates_both_urls_with_the_decoded_token_learn_validation() {
    let t = start_with(prompt()).await;
    let r = Receiver::start(Answer::Right).await;
    let (s, v) = t.subscribe(&r, &format!("/users/{}/events", t.user)).await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    assert!(v["id"].as_str().is_some());
    assert_eq!(v["changeType"], "created,updated,deleted");
    assert_eq!(v["clientState"], "secret-of-the-test");
    let tokens = r.seen.lock().unwrap().validations.clone();
    assert_eq!(
        tokens.len(),
        2,
        "notification and lifecycle URLs: {tokens:?}"
    );
    assert!(
        tokens[0].contains(' '),
        "a token that needs decoding: {tokens:?}"
    );

    // An endpoint echoing the token still encoded fails the handshake.
    let bad = Receiver::start(Answer::EncodedToken).await;
    let (s, v) = t
        .subscribe(&bad, &format!("/users/{}/events", t.user))
        .await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .starts_with("Subscription validation request failed"),
        "{v}"
    );
}

#[tokio::test]
async fn a_handshake_slower_than_the_limit_times_out() {
    let mut cfg = prompt();
    cfg.push.validation_timeout_ms = 200;
    let t = start_with(cfg).await;
    let r = Receiver::start(Answer::Slow(Duration::from_millis(800))).await;
    let (s, v) = t.subscribe(&r, &format!("/users/{}/events", t.user)).await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    assert_eq!(
        v["error"]["message"],
        "Subscription validation request timed out."
    );
    assert_eq!(
        t.admin("/push", None).await["stats"]["validation_failures"],
        1
    );
}

#[tokio::test]
async fn calendar_view_cannot_be_subscribed_docs_13548_and_http_elsewhere_is_refused() {
    let t = start_with(prompt()).await;
    let r = Receiver::start(Answer::Right).await;
    let (s, v) = t
        .subscribe(&r, &format!("/users/{}/calendarView", t.user))
        .await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("'Resource'"),
        "{v}"
    );
    let (s, _) = t
        .send(
            reqwest::Method::POST,
            &t.subscriptions_url(),
            Some(json!({
                "changeType": "updated",
                "notificationUrl": "http://hooks.example.com/notify",
                "resource": format!("/users/{}/events", t.user),
                "expirationDateTime": t.expiry_in(60),
            })),
        )
        .await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "HTTPS only, except on loopback");
    assert!(
        r.seen.lock().unwrap().validations.is_empty(),
        "nothing validated"
    );
}

#[tokio::test]
async fn a_write_in_a_subscribed_calendar_is_notified_as_learn_shows_it() {
    let t = start_with(prompt()).await;
    let r = Receiver::start(Answer::Right).await;
    let work = t.work_calendar();
    let (s, sub) = t
        .subscribe(&r, &format!("/users/{}/calendars/{work}/events", t.user))
        .await;
    assert_eq!(s, StatusCode::CREATED, "{sub}");
    // A write in the default calendar is not this subscription's.
    t.create(ev(
        "elsewhere",
        "2026-01-15T10:00:00",
        "2026-01-15T11:00:00",
    ))
    .await;
    let (s, created) = t
        .send(
            reqwest::Method::POST,
            &format!("{}/users/{}/calendars/{work}/events", t.base(), t.user),
            Some(ev("at work", "2026-01-16T10:00:00", "2026-01-16T11:00:00")),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED);
    let items = r.wait_items("/notify", 1).await;
    assert_eq!(items.len(), 1, "{items:?}");
    let n = &items[0];
    let id = created["id"].as_str().unwrap();
    assert_eq!(n["subscriptionId"], sub["id"]);
    assert_eq!(n["clientState"], "secret-of-the-test");
    assert_eq!(n["changeType"], "created");
    assert_eq!(
        n["resource"],
        format!("Users/11111111-1111-1111-1111-111111111111/Events/{id}")
    );
    assert_eq!(n["resourceData"]["id"], id);
    assert_eq!(n["resourceData"]["@odata.type"], "#Microsoft.Graph.Event");
    assert!(n["tenantId"].as_str().is_some());
    // Deleting it is a `deleted`.
    let (s, _) = t
        .send(
            reqwest::Method::DELETE,
            &format!("{}/users/{}/events/{id}", t.base(), t.user),
            None,
        )
        .await;
    assert_eq!(s, StatusCode::NO_CONTENT);
    let items = r.wait_items("/notify", 2).await;
    assert_eq!(items[1]["changeType"], "deleted");
}

#[tokio::test]
async fn failed_deliveries_are_retried_until_accepted() {
    let t = start_with(prompt()).await;
    let r = Receiver::start(Answer::FailFirst(2)).await;
    let (s, _) = t.subscribe(&r, &format!("/users/{}/events", t.user)).await;
    assert_eq!(s, StatusCode::CREATED);
    t.create(ev("one", "2026-01-15T10:00:00", "2026-01-15T11:00:00"))
        .await;
    let items = r.wait_items("/notify", 1).await;
    assert_eq!(items.len(), 1);
    let stats = t.admin("/push", None).await["stats"].clone();
    assert_eq!(stats["failed_posts"], 2, "{stats}");
    assert_eq!(stats["delivered"], 1, "{stats}");
}

#[tokio::test]
async fn renew_get_reauthorize_and_delete_answer_as_graph_does() {
    let t = start_with(prompt()).await;
    let r = Receiver::start(Answer::Right).await;
    let (_, sub) = t.subscribe(&r, &format!("/users/{}/events", t.user)).await;
    let url = format!("{}/{}", t.subscriptions_url(), sub["id"].as_str().unwrap());
    let (s, _, got) = t.get(&url, None).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(got["id"], sub["id"]);
    let later = t.expiry_in(5 * 24 * 60);
    let (s, renewed) = t
        .send(
            reqwest::Method::PATCH,
            &url,
            Some(json!({"expirationDateTime": later})),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{renewed}");
    assert_eq!(
        DateTime::parse_from_rfc3339(renewed["expirationDateTime"].as_str().unwrap()).unwrap(),
        DateTime::parse_from_rfc3339(&later).unwrap()
    );
    // Beyond 10,080 minutes is refused.
    let (s, v) = t
        .send(
            reqwest::Method::PATCH,
            &url,
            Some(json!({"expirationDateTime": t.expiry_in(10_081)})),
        )
        .await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{v}");
    let (s, _) = t
        .send(reqwest::Method::POST, &format!("{url}/reauthorize"), None)
        .await;
    assert_eq!(s, StatusCode::NO_CONTENT);
    let (_, _, list) = t.get(&t.subscriptions_url(), None).await;
    assert_eq!(list["value"].as_array().unwrap().len(), 1);
    let (s, _) = t.send(reqwest::Method::DELETE, &url, None).await;
    assert_eq!(s, StatusCode::NO_CONTENT);
    let (s, _, _) = t.get(&url, None).await;
    assert_eq!(
        s,
        StatusCode::NOT_FOUND,
        "renewing a deleted one must create anew"
    );
}

#[tokio::test]
async fn lifecycle_events_reach_the_lifecycle_url_and_a_removed_subscription_is_gone() {
    let t = start_with(prompt()).await;
    let r = Receiver::start(Answer::Right).await;
    let (_, sub) = t.subscribe(&r, &format!("/users/{}/events", t.user)).await;
    let id = sub["id"].as_str().unwrap();
    t.admin(
        &format!("/subscriptions/{id}/lifecycle?event=missed"),
        Some(json!({})),
    )
    .await;
    let items = r.wait_items("/lifecycle", 1).await;
    assert_eq!(items[0]["lifecycleEvent"], "missed");
    assert_eq!(items[0]["subscriptionId"], id);
    assert_eq!(items[0]["clientState"], "secret-of-the-test");
    t.admin(
        &format!("/subscriptions/{id}/lifecycle?event=subscriptionRemoved"),
        Some(json!({})),
    )
    .await;
    let items = r.wait_items("/lifecycle", 2).await;
    assert_eq!(items[1]["lifecycleEvent"], "subscriptionRemoved");
    let (s, _, _) = t
        .get(&format!("{}/{id}", t.subscriptions_url()), None)
        .await;
    assert_eq!(s, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn the_mailbox_limit_refusing_mailboxes_and_lost_notifications() {
    let mut cfg = prompt();
    cfg.push.max_per_mailbox = 2;
    cfg.push.lose_fraction = 1.0;
    let t = start_with(cfg).await;
    let r = Receiver::start(Answer::Right).await;
    let resource = format!("/users/{}/events", t.user);
    for _ in 0..2 {
        assert_eq!(t.subscribe(&r, &resource).await.0, StatusCode::CREATED);
    }
    let (s, v) = t.subscribe(&r, &resource).await;
    assert_eq!(s, StatusCode::FORBIDDEN, "{v}");
    // A mailbox on a backend Graph cannot reach (msgraph-sdk-javascript#1880).
    let alex = "alex@contoso.onmicrosoft.com";
    t.admin(&format!("/push/refuse?user={alex}"), Some(json!({})))
        .await;
    let (s, v) = t.subscribe(&r, &format!("/users/{alex}/events")).await;
    assert_eq!(s, StatusCode::SERVICE_UNAVAILABLE, "{v}");
    assert_eq!(v["error"]["code"], "ExtensionError");
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("backend 'Unknown'")
    );
    // Every notification lost: none arrives, and the simulator counts them.
    t.create(ev("lost", "2026-01-15T10:00:00", "2026-01-15T11:00:00"))
        .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(r.items("/notify").is_empty());
    assert_eq!(t.admin("/push", None).await["stats"]["lost"], 2);
}
