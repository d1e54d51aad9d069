//! A sink endpoint that fails 30% of the time and goes down twice, while writers on five
//! calendars commit changes: it receives every change at least once, each calendar's in feed
//! order, every request signed (issue 25).
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design

use axum::body::Bytes;
use axum::http::{HeaderMap, StatusCode};
use calsync_sinks::{SinkConfig, sign};
use calsync_store::Store;
use rand::Rng;
use sqlx::PgPool;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

const SECRET: &str = "a sink secret";
const CALENDARS: usize = 5;
const WRITES: usize = 60;

/// What the endpoint received, in order: (id, calendar, event), and the requests refused.
#[derive(Default)]
struct Received {
    changes: Vec<(String, String, String)>,
    requests: usize,
    failed: usize,
}

async fn endpoint(received: Arc<Mutex<Received>>, headers: HeaderMap, body: Bytes) -> StatusCode {
    let ts: i64 = headers["calsync-timestamp"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    let sig = headers["calsync-signature"].to_str().unwrap();
    assert!(
        sign::verify(SECRET.as_bytes(), ts, &body, sig),
        "every request is signed"
    );
    let mut r = received.lock().unwrap();
    r.requests += 1;
    if rand::thread_rng().gen_bool(0.3) {
        r.failed += 1;
        return StatusCode::INTERNAL_SERVER_ERROR;
    }
    let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
    for c in v["changes"].as_array().unwrap() {
        r.changes.push((
            c["id"].as_str().unwrap().to_owned(),
            c["tuple_key"].as_str().unwrap().to_owned(),
            c["event_id"].as_str().unwrap().to_owned(),
        ));
    }
    StatusCode::NO_CONTENT
}

/// Serves the endpoint on `listener` until `down` fires.
fn serve(
    listener: tokio::net::TcpListener,
    received: Arc<Mutex<Received>>,
    down: CancellationToken,
) -> tokio::task::JoinHandle<()> {
    let app = axum::Router::new().route(
        "/hook",
        axum::routing::post(move |h: HeaderMap, b: Bytes| endpoint(Arc::clone(&received), h, b)),
    );
    tokio::spawn(async move {
        axum::serve(listener, app)
            .with_graceful_shutdown(async move { down.cancelled().await })
            .await
            .unwrap();
    })
}

#[sqlx::test(migrations = false)]
async fn a_flaky_restarting_endpoint_gets_every_change_in_order_per_calendar(pool: PgPool) {
    let store = Store::from_pool(pool.clone());
    store.migrate().await.unwrap();
    let received = Arc::new(Mutex::new(Received::default()));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let mut down = CancellationToken::new();
    let mut server = serve(listener, Arc::clone(&received), down.clone());

    let stop = CancellationToken::new();
    let sink = SinkConfig {
        name: "crm".into(),
        url: format!("http://{addr}/hook").parse().unwrap(),
        secret: SECRET.into(),
        batch: 25,
        timeout: Duration::from_secs(5),
        from_oldest: false,
    };
    // The sink starts at the feed's present: what is written from now on.
    store.sink_cursor("crm", false).await.unwrap();
    let delivering = tokio::spawn(calsync_sinks::follow(store.clone(), sink, stop.clone()));

    // Writers on five calendars, each change in its calendar's order (the calendar's lock
    // before the first write, as the page transaction's feed lock orders a calendar's).
    let mut writers = Vec::new();
    for w in 0..3usize {
        let pool = pool.clone();
        writers.push(tokio::spawn(async move {
            for i in 0..WRITES {
                let cal = format!("cal{}", (w * 7 + i * 13) % CALENDARS);
                let mut tx = pool.begin().await.unwrap();
                sqlx::query("SELECT pg_advisory_xact_lock(hashtextextended($1, 0))")
                    .bind(&cal)
                    .execute(&mut *tx)
                    .await
                    .unwrap();
                sqlx::query(
                    "INSERT INTO calendar_changes (deployment, tuple_key, user_id, calendar_id, event_id, op, cause, data) \
                     VALUES ('default', $1, 'u', 'default', $2, 'upsert', 'delta', '{}')",
                )
                .bind(&cal)
                .bind(format!("{w}-{i}"))
                .execute(&mut *tx)
                .await
                .unwrap();
                tokio::time::sleep(Duration::from_millis((i % 4) as u64)).await;
                tx.commit().await.unwrap();
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }));
    }
    // The endpoint goes down twice for a second and a half, and comes back on its address.
    for _ in 0..2 {
        tokio::time::sleep(Duration::from_millis(700)).await;
        down.cancel();
        server.await.unwrap();
        tokio::time::sleep(Duration::from_millis(1500)).await;
        down = CancellationToken::new();
        let listener = tokio::net::TcpListener::bind(addr).await.unwrap();
        server = serve(listener, Arc::clone(&received), down.clone());
    }
    for w in writers {
        w.await.unwrap();
    }
    let feed: Vec<(String, String, String)> = sqlx::query_as(
        "SELECT txid || '.' || seq, tuple_key, event_id FROM calendar_changes ORDER BY txid, seq",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    assert_eq!(feed.len(), 3 * WRITES);
    let last = feed.last().unwrap().0.clone();
    let began = Instant::now();
    loop {
        let states = store.sink_states().await.unwrap();
        if states[0].cursor == last {
            break;
        }
        assert!(
            began.elapsed() < Duration::from_secs(120),
            "the sink did not catch up: {states:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    stop.cancel();
    delivering.await.unwrap();
    down.cancel();
    server.await.unwrap();

    let r = std::mem::take(&mut *received.lock().unwrap());
    eprintln!(
        "{} requests, {} refused, {} changes received for {} written",
        r.requests,
        r.failed,
        r.changes.len(),
        feed.len()
    );
    assert!(r.failed > 0, "the endpoint failed some requests");
    // Every change at least once; each calendar's first receipts in its feed order.
    let mut first_seen: Vec<&(String, String, String)> = Vec::new();
    let mut seen = std::collections::HashSet::new();
    for c in &r.changes {
        if seen.insert(c.0.clone()) {
            first_seen.push(c);
        }
    }
    assert_eq!(seen.len(), feed.len(), "every change delivered");
    let by_calendar = |list: Vec<&(String, String, String)>| {
        let mut m: HashMap<String, Vec<String>> = HashMap::new();
        for (id, cal, _) in list {
            m.entry(cal.clone()).or_default().push(id.clone());
        }
        m
    };
    assert_eq!(
        by_calendar(first_seen),
        by_calendar(feed.iter().collect()),
        "each calendar's changes in feed order"
    );
    let states = store.sink_states().await.unwrap();
    assert_eq!(states[0].delivered, feed.len() as i64);
    assert_eq!(states[0].failing_since, None);
}
