//! One deployment, one truth (issue 23): replicas schedule the deployment's tracked set as
//! stored in PostgreSQL, in generations, not their own config files. A reload sent to one
//! replica reaches all; a replica with a stale file never reverts the set (not at start, not
//! in a discovery pass, not in a re-base); a tuple re-keyed from its UPN to its object id
//! keeps syncing. The real binary as child processes, graph-sim on loopback, real PostgreSQL.

use crate::replicas::{Node, add_event, mirrors, sim_with, store_for, tuple, upn, write_config};
use sqlx::PgPool;
use std::collections::BTreeSet;
use std::time::{Duration, Instant};

/// The tracked tuples' mailboxes (`personNNN`), sorted.
async fn tracked_people(db: &PgPool) -> BTreeSet<String> {
    let keys: Vec<String> = sqlx::query_scalar(
        "SELECT user_id FROM sync_tuples WHERE deployment = 'default' AND tracked",
    )
    .fetch_all(db)
    .await
    .unwrap_or_default();
    keys.into_iter()
        .map(|u| u.split('@').next().unwrap_or_default().to_owned())
        .collect()
}

fn people(ids: &[usize]) -> BTreeSet<String> {
    ids.iter()
        .map(|i| upn(*i).split('@').next().unwrap().to_owned())
        .collect()
}

/// Every tracked tuple has synced since `since` and none is failing.
async fn all_fresh(db: &PgPool, n: i64, since: chrono::DateTime<chrono::Utc>) -> bool {
    let (fresh, bad): (i64, i64) = sqlx::query_as(
        "SELECT count(*) FILTER (WHERE last_success_at > $1), count(*) FILTER (WHERE state IN ('failed', 'degraded')) \
         FROM sync_tuples WHERE deployment = 'default' AND tracked",
    )
    .bind(since)
    .fetch_one(db)
    .await
    .unwrap_or((0, 1));
    fresh == n && bad == 0
}

/// The sources section: every user but `excluded`, rolling windows re-based every 3 s, a
/// discovery pass every 2 s, removed calendars purged.
fn config(
    dir: &std::path::Path,
    replica: &str,
    url: &str,
    server: &graph_sim::SimServer,
    excluded: &[usize],
) -> std::path::PathBuf {
    let exclude: Vec<String> = excluded
        .iter()
        .map(|i| format!("\"{}\"", upn(*i)))
        .collect();
    let sources = format!(
        "\n[discovery]\nevery = \"2s\"\n\n[[sources]]\nname = \"staff\"\nusers = \"all\"\nexclude = [{}]\nstart = \"-400d\"\nend = \"+400d\"\n",
        exclude.join(", ")
    );
    write_config(
        dir,
        &format!("{replica}.toml"),
        url,
        server,
        &format!("replica = \"{replica}\"\nlease_ttl = \"3s\"\non_remove = \"purge\""),
        "interval = \"1s\"\nstartup_spread = \"200ms\"\nwindow_rebase = \"3s\"",
        &sources,
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn a_reload_sent_to_one_of_three_replicas_reaches_all_and_a_stale_file_never_reverts_it() {
    let url = calsync_store::recreate_database(&crate::harness::database_url(), "calsync_converge")
        .await
        .unwrap();
    let db = PgPool::connect(&url).await.unwrap();
    let (sim, server) = sim_with(6, 2).await;
    let dir = tempfile::tempdir().unwrap();
    let v1 = [4, 5];
    let v2 = [0, 1];
    let mut nodes: Vec<Node> = ["r1", "r2", "r3"]
        .iter()
        .map(|r| {
            let c = config(dir.path(), r, &url, &server, &v1);
            Node::start(&c, dir.path().join(format!("{r}.log")))
        })
        .collect();
    let start = chrono::Utc::now();
    crate::harness::wait_for(
        "the first set synced",
        Duration::from_secs(40),
        async || {
            tracked_people(&db).await == people(&[0, 1, 2, 3]) && all_fresh(&db, 4, start).await
        },
    )
    .await;
    let purged_user: i64 =
        sqlx::query_scalar("SELECT count(*) FROM calendar_events WHERE user_id = $1")
            .bind(upn(0))
            .fetch_one(&db)
            .await
            .unwrap();
    assert!(
        purged_user > 0,
        "person000's events are mirrored before the reload"
    );

    // r1's file changes and only r1 is told: it registers the new set; r2 and r3 follow it.
    config(dir.path(), "r1", &url, &server, &v2);
    nodes[0].signal("HUP");
    let reloaded = Instant::now();
    let after = chrono::Utc::now();
    crate::harness::wait_for(
        "every replica serves the new set",
        Duration::from_secs(20),
        async || {
            tracked_people(&db).await == people(&[2, 3, 4, 5]) && all_fresh(&db, 4, after).await
        },
    )
    .await;
    let converged = reloaded.elapsed();
    // `status` names the replicas whose file is not the deployment's.
    let status = |cfg: std::path::PathBuf| {
        let out = std::process::Command::new(crate::harness::BIN)
            .args(["status", "--config"])
            .arg(cfg)
            .env_remove("DATABASE_URL")
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let r1_file = dir.path().join("r1.toml");
    let started = Instant::now();
    loop {
        let out = status(r1_file.clone());
        if out.contains("replica r2: its config file is not the deployment's")
            && out.contains("replica r3: its config file is not the deployment's")
            && !out.contains("replica r1:")
            // The reload's generation, or a re-base after it (every 3 s here): r1's either way,
            // the stale replicas never write one.
            && (out.contains("(reload by r1 at") || out.contains("(rebase by r1 at"))
        {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "status does not name the stale replicas:\n{out}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // Purged with the reload (the transaction after the untracking one): rows and tuples of
    // the removed calendars are gone.
    crate::harness::wait_for(
        "the removed calendars purged",
        Duration::from_secs(10),
        async || {
            let left: i64 =
                sqlx::query_scalar("SELECT count(*) FROM sync_tuples WHERE user_id = ANY($1)")
                    .bind(vec![upn(0), upn(1)])
                    .fetch_one(&db)
                    .await
                    .unwrap();
            left == 0
        },
    )
    .await;

    // Watch across discovery passes (every 2 s) and re-bases (every 3 s), with r3 restarted
    // on its stale file: the set never reverts, and nothing is purged again.
    let users_listed = |sim: &graph_sim::Sim| {
        sim.lock()
            .requests()
            .iter()
            .filter(|r| r.path.contains("/users") && !r.path.contains("calendar"))
            .count()
    };
    let listed_before = users_listed(&sim);
    nodes[2].stop();
    nodes[2] = Node::start(&dir.path().join("r3.toml"), dir.path().join("r3-again.log"));
    let mut causes = BTreeSet::new();
    let watch = Instant::now();
    while watch.elapsed() < Duration::from_secs(10) {
        assert_eq!(
            tracked_people(&db).await,
            people(&[2, 3, 4, 5]),
            "the set reverted"
        );
        let cause: Option<String> =
            sqlx::query_scalar("SELECT cause FROM tracked_sets WHERE deployment = 'default'")
                .fetch_optional(&db)
                .await
                .unwrap();
        causes.extend(cause);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        users_listed(&sim) >= listed_before + 3,
        "discovery passes ran while watching"
    );
    assert!(
        causes.contains("rebase"),
        "re-bases ran while watching: {causes:?}"
    );
    let again = chrono::Utc::now();
    crate::harness::wait_for(
        "all fresh after the watch",
        Duration::from_secs(15),
        async || all_fresh(&db, 4, again).await,
    )
    .await;
    // The stale replicas said so; the restarted one registered nothing.
    for (i, log) in [(1, nodes[1].log()), (2, nodes[2].log())] {
        assert!(
            log.contains("config file is not the deployment's")
                || log.contains("config file is one the deployment replaced"),
            "replica {i} did not report its stale file:\n{log}"
        );
    }
    assert!(
        nodes[2]
            .log()
            .contains("config file is one the deployment replaced")
    );
    let writers: Vec<String> =
        sqlx::query_scalar("SELECT DISTINCT split_part(written_by, '#', 1) FROM tracked_sets")
            .fetch_all(&db)
            .await
            .unwrap();
    assert!(
        !writers.contains(&"r3".to_owned()) || causes.contains("rebase"),
        "{writers:?}"
    );
    let v = sim.lock().violations();
    assert_eq!((v.retry_after, v.concurrency), (0, 0), "{v:?}");
    eprintln!("converged on the reloaded set in {converged:?}");
    assert!(converged < Duration::from_secs(15), "{converged:?}");
    for n in &mut nodes {
        n.stop();
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_tuple_re_keyed_from_its_upn_to_its_object_id_keeps_syncing() {
    let url = calsync_store::recreate_database(&crate::harness::database_url(), "calsync_rekey")
        .await
        .unwrap();
    let db = PgPool::connect(&url).await.unwrap();
    let (sim, server) = sim_with(3, 2).await;
    let dir = tempfile::tempdir().unwrap();
    let sync = "interval = \"1s\"\nstartup_spread = \"200ms\"";
    let service = "replica = \"r1\"\nlease_ttl = \"3s\"";
    let upn_only: String = (0..2)
        .map(|i| crate::replicas::calendar(&format!("c{i}"), &upn(i)))
        .collect();
    let cfg = write_config(
        dir.path(),
        "r1.toml",
        &url,
        &server,
        service,
        sync,
        &upn_only,
    );
    let mut node = Node::start(&cfg, dir.path().join("r1.log"));
    let start = chrono::Utc::now();
    crate::harness::wait_for("synced", Duration::from_secs(30), async || {
        all_fresh(&db, 2, start).await
    })
    .await;
    // A calendar named by object id joins: every UPN tuple is re-keyed to its object id.
    let id2 = {
        let st = sim.lock();
        let u = st.tenant.user_index(&upn(2)).unwrap();
        st.tenant.users[u].id.clone()
    };
    let with_id = format!("{upn_only}{}", crate::replicas::calendar("c2", &id2));
    write_config(
        dir.path(),
        "r1.toml",
        &url,
        &server,
        service,
        sync,
        &with_id,
    );
    node.signal("HUP");
    crate::harness::wait_for("re-keyed", Duration::from_secs(20), async || {
        let mailboxes: Vec<String> =
            sqlx::query_scalar("SELECT mailbox FROM sync_tuples WHERE tracked ORDER BY tuple_key")
                .fetch_all(&db)
                .await
                .unwrap();
        mailboxes.len() == 3 && mailboxes.iter().all(|m| !m.contains('@'))
    })
    .await;
    // Edits after the re-key reach the mirror, and every tuple keeps succeeding.
    {
        let mut st = sim.lock();
        for i in 0..3 {
            let u = st.tenant.user_index(&upn(i)).unwrap();
            add_event(
                &mut st.tenant,
                u,
                0,
                &format!("after {i}"),
                "2026-03-03T09:00:00",
            );
        }
    }
    let after = chrono::Utc::now();
    let store = store_for(&url, "default").await;
    let tuples = vec![
        tuple("c0", &upn(0)),
        tuple("c1", &upn(1)),
        tuple("c2", &id2),
    ];
    mirrors(&store, &sim, &tuples, Duration::from_secs(20)).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(all_fresh(&db, 3, after).await, "{}", node.log());
    assert!(!node.log().contains("stands down"), "{}", node.log());
    node.stop();
}

/// Issue 23: a calendar whose mailbox is held by a replica that never completes its rounds
/// (a stand-down loop, a wedged process) keeps the state `ok` it last had: `status` and
/// `/metrics` must call it stale, with the reason the owner gives.
#[tokio::test(flavor = "multi_thread")]
async fn a_calendar_whose_owner_never_completes_a_round_shows_stale_in_status_and_metrics() {
    let url = calsync_store::recreate_database(&crate::harness::database_url(), "calsync_stale")
        .await
        .unwrap();
    let db = PgPool::connect(&url).await.unwrap();
    let (_sim, server) = sim_with(2, 1).await;
    let dir = tempfile::tempdir().unwrap();
    let cals: String = (0..2)
        .map(|i| crate::replicas::calendar(&format!("c{i}"), &upn(i)))
        .collect();
    let cfg = write_config(
        dir.path(),
        "r1.toml",
        &url,
        &server,
        "replica = \"r1\"\nlease_ttl = \"3s\"",
        "interval = \"1s\"\nstartup_spread = \"200ms\"",
        &format!("{cals}\n[http]\nlisten = \"127.0.0.1:0\"\n"),
    );
    let mut node = Node::start(&cfg, dir.path().join("r1.log"));
    let start = chrono::Utc::now();
    crate::harness::wait_for("synced", Duration::from_secs(30), async || {
        all_fresh(&db, 2, start).await
    })
    .await;
    // A process that holds c1's mailbox and never completes a round of it; and the hour
    // since its last success, passed.
    for sql in [
        "INSERT INTO replicas (deployment, incarnation, replica, kind, expires_at) \
         VALUES ('default', 'wedged#1', 'wedged', 'one-off', now() + interval '1 hour')",
        "UPDATE mailbox_leases SET owner = 'wedged#1', fence = nextval('lease_fence') WHERE mailbox = $1",
        "UPDATE sync_tuples SET last_success_at = now() - interval '1 hour' WHERE user_id = $1",
    ] {
        sqlx::query(sql).bind(upn(1)).execute(&db).await.unwrap();
    }
    let status = std::process::Command::new(crate::harness::BIN)
        .args(["status", "--state", "stale", "--config"])
        .arg(&cfg)
        .env_remove("DATABASE_URL")
        .output()
        .unwrap();
    let out = String::from_utf8_lossy(&status.stdout);
    assert!(status.status.success(), "{out}");
    assert!(out.contains("1 stale"), "{out}");
    let line = out
        .lines()
        .find(|l| l.starts_with("c1 "))
        .unwrap_or_else(|| panic!("{out}"));
    assert!(
        line.contains("stale") && line.contains("overdue: wedged"),
        "{line}"
    );
    assert!(
        !out.lines().any(|l| l.starts_with("c0 ")),
        "only the stale one: {out}"
    );
    let addr = crate::harness::bound_addr(&node.log()).unwrap();
    let (code, metrics) = calsync::commands::local_request(addr, "GET", "/metrics")
        .await
        .unwrap();
    assert_eq!(code, 200);
    assert!(
        metrics.contains("calsync_tuples{state=\"stale\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("calsync_tuples{state=\"ok\"} 1"),
        "{metrics}"
    );
    node.stop();
}

/// Issue 23, point 3: a discovery pass that believed every answer untracked (and, with
/// `purge`, deleted) a mirrored mailbox's calendars when Graph refused it once, and every room
/// when `/places` answered an empty list once. Now a refused mirrored mailbox keeps its rows
/// until refused for `refused_recheck`, and a pass that would empty a source is held until the
/// next one agrees: one empty answer untracks nothing.
#[tokio::test(flavor = "multi_thread")]
async fn a_mirrored_mailbox_refused_once_and_an_empty_room_listing_untrack_nothing() {
    use graph_sim::MailboxKind;
    let url = calsync_store::recreate_database(&crate::harness::database_url(), "calsync_doubt")
        .await
        .unwrap();
    let db = PgPool::connect(&url).await.unwrap();
    let sim = graph_sim::Sim::new(&crate::harness::sim_config());
    let rooms = [
        "room1@contoso.onmicrosoft.com",
        "room2@contoso.onmicrosoft.com",
    ];
    let group = {
        let mut st = sim.lock();
        let mut members = Vec::new();
        for (i, who) in [upn(0), upn(1)].iter().enumerate() {
            let u = st
                .tenant
                .add_directory_user(who, who, MailboxKind::User, None);
            add_event(
                &mut st.tenant,
                u,
                0,
                &format!("person {i}"),
                "2026-02-03T10:00:00",
            );
            members.push(u);
        }
        for (i, room) in rooms.iter().enumerate() {
            let u = st
                .tenant
                .add_directory_user(room, room, MailboxKind::Room, None);
            add_event(
                &mut st.tenant,
                u,
                0,
                &format!("room {i}"),
                "2026-02-04T10:00:00",
            );
        }
        let g = st.tenant.add_group("team", members, vec![]);
        st.tenant.groups[g].id.clone()
    };
    let server = sim.serve("127.0.0.1:0").await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let sources = format!(
        "\n[discovery]\nevery = \"2s\"\nrefused_recheck = \"1h\"\n\n\
         [[sources]]\nname = \"team\"\ngroup = \"{group}\"\ncalendars = \"all\"\nstart = \"2026-01-01T00:00:00Z\"\nend = \"2026-04-01T00:00:00Z\"\n\n\
         [[sources]]\nname = \"rooms\"\nrooms = \"all\"\nstart = \"2026-01-01T00:00:00Z\"\nend = \"2026-04-01T00:00:00Z\"\n"
    );
    let cfg = write_config(
        dir.path(),
        "r1.toml",
        &url,
        &server,
        "replica = \"r1\"\nlease_ttl = \"3s\"\non_remove = \"purge\"",
        "interval = \"1s\"\nstartup_spread = \"200ms\"",
        &sources,
    );
    let mut node = Node::start(&cfg, dir.path().join("r1.log"));
    let rows = |db: PgPool| async move {
        let r: Vec<(String, i64)> = sqlx::query_as(
            "SELECT tuple_key, event_count FROM calendar_sync_status WHERE tracked ORDER BY tuple_key",
        )
        .fetch_all(&db)
        .await
        .unwrap_or_default();
        r
    };
    crate::harness::wait_for(
        "four calendars mirrored",
        Duration::from_secs(30),
        async || {
            let r = rows(db.clone()).await;
            r.len() == 4 && r.iter().all(|(_, n)| *n > 0)
        },
    )
    .await;
    let mirrored = rows(db.clone()).await;

    // Graph refuses person001's calendars from now on (a mailbox move, a policy change), and
    // the Places directory answers an empty room list (its rooms not rooms for a moment).
    {
        let mut st = sim.lock();
        st.faults = vec![crate::harness::rule(serde_json::json!({
            "mailbox": upn(1), "path_contains": "/calendar",
            "action": {"kind": "status", "status": 403, "code": "ErrorAccessDenied"}
        }))];
        for room in rooms {
            let u = st.tenant.user_index(room).unwrap();
            st.tenant.users[u].directory.mailbox = MailboxKind::User;
        }
    }
    // The first pass that sees the empty list holds it; the directory recovers before the next.
    let log = dir.path().join("r1.log");
    crate::harness::wait_for(
        "the empty room list held",
        Duration::from_secs(10),
        async || {
            std::fs::read_to_string(&log)
                .unwrap_or_default()
                .contains("held until the next pass agrees")
        },
    )
    .await;
    {
        let mut st = sim.lock();
        for room in rooms {
            let u = st.tenant.user_index(room).unwrap();
            st.tenant.users[u].directory.mailbox = MailboxKind::Room;
        }
    }
    // Three more passes: nothing untracked, nothing purged.
    let watch = Instant::now();
    while watch.elapsed() < Duration::from_secs(7) {
        assert_eq!(rows(db.clone()).await, mirrored, "{}", node.log());
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let text = node.log();
    assert!(text.contains("they stay tracked"), "{text}");
    let refused_state: String =
        sqlx::query_scalar("SELECT state FROM sync_tuples WHERE user_id = $1")
            .bind(upn(1))
            .fetch_one(&db)
            .await
            .unwrap();
    assert_ne!(
        refused_state, "ok",
        "its rounds fail with Graph's code meanwhile"
    );
    node.stop();
}
