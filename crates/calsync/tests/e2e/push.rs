//! Push (issue 24): graph-sim delivers change notifications to the daemon's receiver, and a
//! change reaches `calendar_events` within seconds although the poll interval is minutes. A
//! notification only wakes the normal delta round; the receiver checks the subscription and
//! its `clientState`; lifecycle events recreate, renew or catch up; a notification reaching a
//! replica that does not hold the mailbox wakes the one that does; lost notifications are
//! covered by the backstop poll. The real binary as child processes, graph-sim on loopback,
//! real PostgreSQL.

use crate::replicas::{Node, add_event, sim_with, upn, write_config};
use sqlx::PgPool;
use std::time::{Duration, Instant};

/// A loopback port free now (the daemon binds it a moment later).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn calendars(n: usize) -> String {
    (0..n)
        .map(|i| crate::replicas::calendar(&format!("c{i}"), &upn(i)))
        .collect()
}

/// `[push]` with Graph posting to `public` and the receiver on `listen`.
fn push_section(public: u16, listen: u16, backstop: &str) -> String {
    format!(
        "\n[push]\nnotification_url = \"http://127.0.0.1:{public}/graph\"\nlisten = \"127.0.0.1:{listen}\"\nlifetime = \"45m\"\nrenew_before = \"10m\"\nbackstop_interval = \"{backstop}\"\n"
    )
}

async fn active_subscriptions(db: &PgPool) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM push_subscriptions WHERE state = 'active'")
        .fetch_one(db)
        .await
        .unwrap_or(0)
}

/// Whether an event with this subject is in the read model.
async fn mirrored(db: &PgPool, subject: &str) -> bool {
    sqlx::query_scalar::<_, i64>("SELECT count(*) FROM calendar_events WHERE subject = $1")
        .bind(subject)
        .fetch_one(db)
        .await
        .unwrap_or(0)
        > 0
}

/// Adds an event to `user`'s default calendar in graph-sim and answers how long it took to
/// reach the read model.
async fn edit_and_time(
    db: &PgPool,
    sim: &graph_sim::Sim,
    user: usize,
    subject: &str,
    limit: Duration,
) -> Duration {
    {
        let mut st = sim.lock();
        add_event(&mut st.tenant, user, 0, subject, "2026-02-20T09:00:00");
    }
    let started = Instant::now();
    crate::harness::wait_for(subject, limit, async || mirrored(db, subject).await).await;
    started.elapsed()
}

/// A poll interval push must beat by far.
const TEN_MINUTES: &str = "interval = \"10m\"\nstartup_spread = \"200ms\"";

/// A fresh database `name`, and graph-sim with `users` mailboxes of `events` events each,
/// delivering notifications `delay_ms` plus up to `jitter_ms` after each write.
async fn rig(
    name: &str,
    users: usize,
    events: usize,
    delay_ms: u64,
    jitter_ms: u64,
) -> (String, PgPool, graph_sim::Sim, graph_sim::SimServer) {
    let url = calsync_store::recreate_database(&crate::harness::database_url(), name)
        .await
        .unwrap();
    let db = PgPool::connect(&url).await.unwrap();
    let (sim, server) = sim_with(users, events).await;
    {
        let mut st = sim.lock();
        st.push.settings.delay_ms = delay_ms;
        st.push.settings.jitter_ms = jitter_ms;
    }
    (url, db, sim, server)
}

/// Replica `replica`'s config: `n` calendars, lease TTL 3 s, `sync` settings, then `push`.
fn daemon_config(
    dir: &std::path::Path,
    replica: &str,
    url: &str,
    server: &graph_sim::SimServer,
    sync: &str,
    n: usize,
    push: &str,
) -> std::path::PathBuf {
    write_config(
        dir,
        &format!("{replica}.toml"),
        url,
        server,
        &format!("replica = \"{replica}\"\nlease_ttl = \"3s\""),
        sync,
        &format!("{}{push}", calendars(n)),
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn a_change_reaches_the_mirror_in_seconds_while_the_poll_interval_is_ten_minutes() {
    let (url, db, sim, server) = rig("calsync_push", 3, 2, 100, 400).await;
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let push = push_section(port, port, "30m");
    let cfg = daemon_config(dir.path(), "r1", &url, &server, TEN_MINUTES, 3, &push);
    let mut node = Node::start(&cfg, dir.path().join("r1.log"));
    crate::harness::wait_for(
        "three subscriptions active",
        Duration::from_secs(30),
        async || active_subscriptions(&db).await == 3,
    )
    .await;
    crate::harness::wait_for("the first rounds", Duration::from_secs(20), async || {
        crate::replicas::all_ok(&db, "default", 3).await
    })
    .await;
    // Graph's handshake reached the receiver (creation succeeded): both URLs validated.
    let stats = sim.lock().push.stats.clone();
    assert_eq!(stats.created, 3, "{stats:?}");
    assert_eq!(stats.validation_failures, 0);

    let mut took = Vec::new();
    for i in 0..3 {
        took.push(
            edit_and_time(
                &db,
                &sim,
                i,
                &format!("pushed {i}"),
                Duration::from_secs(15),
            )
            .await,
        );
    }
    eprintln!("change -> row: {took:?}");
    assert!(
        took.iter().all(|t| *t < Duration::from_secs(10)),
        "{took:?}"
    );

    // `status` shows each calendar's subscription.
    let out = std::process::Command::new(crate::harness::BIN)
        .args(["status", "--config"])
        .arg(&cfg)
        .env_remove("DATABASE_URL")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("PUSH"), "{text}");
    assert_eq!(text.matches(" active ").count(), 3, "{text}");

    // A forged notification (unknown id, wrong clientState) wakes nothing.
    let open = || async {
        sqlx::query_scalar::<_, i64>(
            "SELECT count(*) FROM round_requests WHERE requested_by = 'push'",
        )
        .fetch_one(&db)
        .await
        .unwrap()
    };
    let before = open().await;
    let known: String =
        sqlx::query_scalar("SELECT subscription_id FROM push_subscriptions LIMIT 1")
            .fetch_one(&db)
            .await
            .unwrap();
    let http = reqwest::Client::new();
    for (id, state) in [
        ("not-a-subscription", "x"),
        (known.as_str(), "wrong secret"),
    ] {
        let r = http
            .post(format!("http://127.0.0.1:{port}/graph/notifications"))
            .json(
                &serde_json::json!({"value": [{"subscriptionId": id, "clientState": state,
                "changeType": "updated", "resource": "Users/x/Events/y"}]}),
            )
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 202);
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(open().await, before, "a forged notification woke a round");
    // The handshake answers the decoded token as plain text.
    let r = http
        .post(format!(
            "http://127.0.0.1:{port}/graph/notifications?validationToken=Validation%3A%20a%20b"
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.text().await.unwrap(), "Validation: a b");
    // Nothing else is served there.
    let r = http
        .get(format!("http://127.0.0.1:{port}/metrics"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    let v = sim.lock().violations();
    assert_eq!((v.retry_after, v.concurrency), (0, 0), "{v:?}");
    node.stop();
}

#[tokio::test(flavor = "multi_thread")]
async fn lifecycle_events_recreate_renew_and_catch_up_and_a_refusing_mailbox_polls() {
    let (url, db, sim, server) = rig("calsync_push_life", 3, 1, 50, 100).await;
    {
        let mut st = sim.lock();
        // person002's mailbox is on a backend Graph cannot subscribe (Close's ExtensionError).
        let u = st.tenant.user_index(&upn(2)).unwrap();
        st.push.refusing.insert(u);
    }
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let push = push_section(port, port, "30m");
    let cfg = daemon_config(dir.path(), "r1", &url, &server, TEN_MINUTES, 3, &push);
    let mut node = Node::start(&cfg, dir.path().join("r1.log"));
    crate::harness::wait_for("two active, one refused", Duration::from_secs(30), async || {
        let refused: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM push_subscriptions WHERE state = 'refused' AND detail LIKE '%backend%'",
        )
        .fetch_one(&db)
        .await
        .unwrap_or(0);
        active_subscriptions(&db).await == 2 && refused == 1
    })
    .await;
    let id_of = |user: usize| {
        let db = db.clone();
        async move {
            sqlx::query_scalar::<_, Option<String>>(
                "SELECT p.subscription_id FROM push_subscriptions p JOIN sync_tuples t \
                 ON t.mailbox = p.mailbox AND t.calendar_id = p.calendar_id WHERE t.user_id = $1",
            )
            .bind(upn(user))
            .fetch_one(&db)
            .await
            .unwrap()
        }
    };
    let first = id_of(0).await.unwrap();
    // subscriptionRemoved: created again, under a new id.
    assert!(sim.lifecycle_event(&first, graph_sim::push::LifecycleEvent::SubscriptionRemoved));
    crate::harness::wait_for("a new subscription", Duration::from_secs(20), async || {
        id_of(0).await.is_some_and(|id| id != first)
    })
    .await;
    // reauthorizationRequired: answered by a renewal.
    let second = id_of(1).await.unwrap();
    let renewed = sim.lock().push.stats.renewed;
    assert!(sim.lifecycle_event(
        &second,
        graph_sim::push::LifecycleEvent::ReauthorizationRequired
    ));
    crate::harness::wait_for("the renewal", Duration::from_secs(20), async || {
        sim.lock().push.stats.renewed > renewed
    })
    .await;
    // missed: a round runs although nothing was notified.
    let last = || async {
        sqlx::query_scalar::<_, Option<chrono::DateTime<chrono::Utc>>>(
            "SELECT last_success_at FROM sync_tuples WHERE user_id = $1",
        )
        .bind(upn(1))
        .fetch_one(&db)
        .await
        .unwrap()
    };
    let before = last().await;
    let current = id_of(1).await.unwrap();
    assert!(sim.lifecycle_event(&current, graph_sim::push::LifecycleEvent::Missed));
    crate::harness::wait_for("a catch-up round", Duration::from_secs(15), async || {
        last().await > before
    })
    .await;
    // The refused mailbox is still mirrored (its first round), polled at its interval. Its
    // first round runs within the startup spread, which nothing above waited for.
    crate::harness::wait_for("every calendar ok", Duration::from_secs(15), async || {
        crate::replicas::all_ok(&db, "default", 3).await
    })
    .await;
    node.stop();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_notification_reaching_the_other_replica_wakes_the_holder_and_a_hand_over_keeps_push() {
    let (url, db, sim, server) = rig("calsync_push_two", 4, 1, 50, 200).await;
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (free_port(), free_port());
    // Each replica's subscriptions send Graph to the other replica's receiver: every
    // notification reaches a replica that does not hold the mailbox.
    let node = |name: &str, public: u16, listen: u16| {
        let push = push_section(public, listen, "30m");
        let cfg = daemon_config(dir.path(), name, &url, &server, TEN_MINUTES, 4, &push);
        Node::start(&cfg, dir.path().join(format!("{name}.log")))
    };
    let mut r1 = node("r1", b, a);
    let mut r2 = node("r2", a, b);
    crate::harness::wait_for(
        "four subscriptions active",
        Duration::from_secs(40),
        async || {
            active_subscriptions(&db).await == 4 && crate::replicas::all_ok(&db, "default", 4).await
        },
    )
    .await;
    for i in 0..4 {
        let took = edit_and_time(
            &db,
            &sim,
            i,
            &format!("crossed {i}"),
            Duration::from_secs(15),
        )
        .await;
        assert!(took < Duration::from_secs(10), "{took:?}");
    }
    // The mailboxes r1 holds: their subscriptions send Graph to r2's receiver.
    let of_r1: Vec<(String, String)> = sqlx::query_as(
        "SELECT s.user_id, p.subscription_id FROM calendar_sync_status s JOIN sync_tuples t \
         ON t.tuple_key = s.tuple_key AND t.deployment = s.deployment JOIN push_subscriptions p \
         ON p.mailbox = t.mailbox AND p.calendar_id = t.calendar_id WHERE s.owner = 'r1' ORDER BY 1",
    )
    .fetch_all(&db)
    .await
    .unwrap();
    assert!(!of_r1.is_empty(), "r1 holds some mailboxes");
    // r1 dies: r2 takes its mailboxes with their subscriptions (kept, not created again),
    // and their notifications still wake rounds within seconds.
    r1.signal("KILL");
    let _ = r1.wait(Duration::from_secs(5));
    crate::harness::wait_for(
        "r2 holds every mailbox",
        Duration::from_secs(20),
        async || {
            let owners: Vec<Option<String>> =
                sqlx::query_scalar("SELECT owner FROM calendar_sync_status WHERE tracked")
                    .fetch_all(&db)
                    .await
                    .unwrap_or_default();
            owners.len() == 4 && owners.iter().all(|o| o.as_deref() == Some("r2"))
        },
    )
    .await;
    for (user, id) in &of_r1 {
        let still: Option<String> = sqlx::query_scalar(
            "SELECT p.subscription_id FROM push_subscriptions p JOIN sync_tuples t \
             ON t.mailbox = p.mailbox AND t.calendar_id = p.calendar_id WHERE t.user_id = $1",
        )
        .bind(user)
        .fetch_one(&db)
        .await
        .unwrap();
        assert_eq!(
            still.as_deref(),
            Some(id.as_str()),
            "{user}: handed over, not recreated"
        );
        let i: usize = user[6..9].parse().unwrap();
        let took = edit_and_time(
            &db,
            &sim,
            i,
            &format!("after hand-over {i}"),
            Duration::from_secs(15),
        )
        .await;
        assert!(took < Duration::from_secs(10), "{user}: {took:?}");
    }
    r2.stop();
}

#[tokio::test(flavor = "multi_thread")]
async fn with_a_fifth_of_notifications_lost_the_backstop_poll_still_converges_and_subscriptions_renew()
 {
    let (url, db, sim, server) = rig("calsync_push_lost", 4, 2, 50, 200).await;
    // Graph does not promise delivery: a fifth never arrives, silently.
    sim.lock().push.settings.lose_fraction = 0.2;
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    // Renewed as soon as less than 44.5 of its 45 minutes are left: within a minute.
    let section = push_section(port, port, "4s")
        .replace("renew_before = \"10m\"", "renew_before = \"44m30s\"");
    let sync = "interval = \"2s\"\nstartup_spread = \"200ms\"";
    let cfg = daemon_config(dir.path(), "r1", &url, &server, sync, 4, &section);
    let mut node = Node::start(&cfg, dir.path().join("r1.log"));
    crate::harness::wait_for(
        "four subscriptions active",
        Duration::from_secs(30),
        async || {
            active_subscriptions(&db).await == 4 && crate::replicas::all_ok(&db, "default", 4).await
        },
    )
    .await;
    // Forty edits over a few seconds; about eight of their notifications are lost.
    for n in 0..40 {
        {
            let mut st = sim.lock();
            add_event(
                &mut st.tenant,
                n % 4,
                0,
                &format!("edit {n}"),
                "2026-02-21T09:00:00",
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let store = crate::replicas::store_for(&url, "default").await;
    let tuples: Vec<_> = (0..4)
        .map(|i| crate::replicas::tuple(&format!("c{i}"), &upn(i)))
        .collect();
    crate::replicas::mirrors(&store, &sim, &tuples, Duration::from_secs(20)).await;
    assert!(
        sim.lock().push.stats.lost > 0,
        "some notifications were lost"
    );
    crate::harness::wait_for("renewals", Duration::from_secs(60), async || {
        sim.lock().push.stats.renewed >= 4
    })
    .await;
    assert_eq!(active_subscriptions(&db).await, 4);
    node.stop();
}
