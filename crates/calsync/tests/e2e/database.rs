//! Database trouble that is not an outage: a server turned read-only (a failover), a lock held
//! by someone else, a statement cancelled by its timeout, a value PostgreSQL refuses. Each is
//! caused for real on the test's own database; none may leave a tuple `failed` or a page stuck.

use crate::harness::*;
use calsync_engine::{Health, Outcome, SyncSettings};
use calsync_store::TupleStatus;
use serde_json::json;
use sqlx::{Connection, Executor, PgPool};

/// Ends every other session on this database, so the pool reconnects and new sessions pick up
/// database-level settings.
async fn reconnect_everyone(admin: &mut sqlx::PgConnection) {
    admin
        .execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
             WHERE datname = current_database() AND pid <> pg_backend_pid()",
        )
        .await
        .unwrap();
}

/// A session of its own on the test's database, outside the pool under test.
async fn admin_session(pool: &PgPool) -> sqlx::PgConnection {
    let opts = pool.connect_options().as_ref().clone();
    sqlx::PgConnection::connect_with(&opts).await.unwrap()
}

/// `ALTER DATABASE <this database> <change>`, then every other session reconnects to see it.
async fn alter_this_database(admin: &mut sqlx::PgConnection, change: &str) {
    let sql = format!(
        "DO $$ BEGIN EXECUTE format('ALTER DATABASE %I {}', current_database()); END $$",
        change.replace('\'', "''")
    );
    admin.execute(sql.as_str()).await.unwrap();
    reconnect_everyone(admin).await;
}

fn quick() -> SyncSettings {
    SyncSettings {
        max_attempts: 2,
        ..settings()
    }
}

fn retrying(o: &Outcome) -> bool {
    matches!(o, Outcome::Failed(f) if f.health == Health::Retrying && f.code == "DatabaseUnavailable")
}

#[sqlx::test(migrations = false)]
async fn a_database_turned_read_only_is_waited_out_not_failed(pool: PgPool) {
    let h = harness(pool.clone(), 20).await;
    seed(&h, 10);
    let engine = h.engine(quick());
    let t = h.default_tuple(&engine).await;
    let mut admin = admin_session(&pool).await;
    // A failover: the server this URL reaches is now a standby (SQLSTATE 25006 on writes).
    alter_this_database(&mut admin, "SET default_transaction_read_only = on").await;
    let o = sync(&engine, &t).await;
    assert!(retrying(&o), "retried as unavailable, not failed: {o:?}");
    alter_this_database(&mut admin, "RESET default_transaction_read_only").await;
    // The pool's old connections are gone; the next round reconnects and completes.
    let r = sync(&engine, &t).await;
    let r = if retrying(&r) {
        sync(&engine, &t).await
    } else {
        r
    };
    report(r);
    h.assert_mirrors(std::slice::from_ref(&t)).await;
    assert_eq!(h.store.status().await.unwrap()[0].state, TupleStatus::Ok);
}

#[sqlx::test(migrations = false)]
async fn a_lock_held_past_the_statement_timeout_is_retried_not_failed(pool: PgPool) {
    let h = harness(pool.clone(), 20).await;
    seed(&h, 10);
    let engine = h.engine(quick());
    let t = h.default_tuple(&engine).await;
    let mut admin = admin_session(&pool).await;
    // calsync's sessions carry a statement_timeout; here a short one, set for the database.
    alter_this_database(&mut admin, "SET statement_timeout = '300ms'").await;
    // Someone holds the tuples table: every write of calsync's waits, then is cancelled (57014).
    let mut locker = admin_session(&pool).await;
    locker.execute("BEGIN").await.unwrap();
    locker
        .execute("LOCK TABLE sync_tuples IN ACCESS EXCLUSIVE MODE")
        .await
        .unwrap();
    let o = sync(&engine, &t).await;
    assert!(retrying(&o), "retried as unavailable, not failed: {o:?}");
    locker.execute("ROLLBACK").await.unwrap();
    report(sync(&engine, &t).await);
    h.assert_mirrors(std::slice::from_ref(&t)).await;
    assert_eq!(h.store.status().await.unwrap()[0].state, TupleStatus::Ok);
}

#[sqlx::test(migrations = false)]
async fn an_event_with_nul_characters_is_stored_without_them_and_its_page_commits(pool: PgPool) {
    let h = harness(pool, 50).await;
    seed(&h, 5);
    // PostgreSQL refuses U+0000 in text and jsonb; bodies pasted from other systems carry it.
    let nul = h.create(json!({
        "subject": "Budget\u{0} review",
        "body": {"contentType": "html", "content": "<p>from a fax\u{0}gateway</p>"},
        "start": at("2026-01-20T10:00:00"), "end": at("2026-01-20T11:00:00")
    }));
    let engine = h.engine(settings());
    let t = h.default_tuple(&engine).await;
    report(sync(&engine, &t).await);
    let rows = h.store.event_summaries(&t.key).await.unwrap();
    let truth: Vec<String> = h.instances(&t).into_iter().map(|i| i.id).collect();
    let mut stored: Vec<String> = rows.iter().map(|r| r.event_id.clone()).collect();
    let mut want = truth.clone();
    stored.sort();
    want.sort();
    assert_eq!(stored, want, "every item of the page committed");
    let row = rows.iter().find(|r| r.event_id == nul).unwrap();
    assert_eq!(row.subject.as_deref(), Some("Budget review"));
    assert_eq!(h.store.status().await.unwrap()[0].state, TupleStatus::Ok);
}

/// A TCP proxy on loopback in front of PostgreSQL that can turn into a black hole: while
/// `blackhole` is set, bytes are read and dropped in both directions and connections stay open,
/// as when a network path dies without a reset.
struct Proxy {
    addr: std::net::SocketAddr,
    blackhole: std::sync::Arc<std::sync::atomic::AtomicBool>,
    task: tokio::task::JoinHandle<()>,
}

impl Proxy {
    async fn start(upstream: std::net::SocketAddr) -> Proxy {
        use std::sync::atomic::Ordering;
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let blackhole = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let hole = blackhole.clone();
        let task = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let Ok(server) = tokio::net::TcpStream::connect(upstream).await else {
                    continue;
                };
                let (cr, cw) = client.into_split();
                let (sr, sw) = server.into_split();
                for (mut from, mut to, hole) in [
                    (
                        Box::new(cr) as Box<dyn tokio::io::AsyncRead + Send + Unpin>,
                        Box::new(sw) as Box<dyn tokio::io::AsyncWrite + Send + Unpin>,
                        hole.clone(),
                    ),
                    (Box::new(sr), Box::new(cw), hole.clone()),
                ] {
                    tokio::spawn(async move {
                        let mut buf = vec![0u8; 16 * 1024];
                        loop {
                            let n = match from.read(&mut buf).await {
                                Ok(0) | Err(_) => break,
                                Ok(n) => n,
                            };
                            if hole.load(Ordering::Relaxed) {
                                continue; // dropped on the floor
                            }
                            if to.write_all(&buf[..n]).await.is_err() {
                                break;
                            }
                        }
                    });
                }
            }
        });
        Proxy {
            addr,
            blackhole,
            task,
        }
    }

    fn set_blackhole(&self, on: bool) {
        self.blackhole
            .store(on, std::sync::atomic::Ordering::Relaxed);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

#[sqlx::test(migrations = false)]
async fn a_blackholed_database_connection_fails_the_round_within_its_deadline_and_recovers(
    pool: PgPool,
) {
    let (db, user): (String, String) =
        sqlx::query_as("SELECT current_database(), current_user::text")
            .fetch_one(&pool)
            .await
            .unwrap();
    let upstream: std::net::SocketAddr = {
        let o = pool.connect_options();
        format!("{}:{}", o.get_host(), o.get_port())
            .parse()
            .unwrap_or_else(|_| ([127, 0, 0, 1], o.get_port()).into())
    };
    let proxy = Proxy::start(upstream).await;
    let url = format!("postgres://{user}@{}/{db}", proxy.addr);
    // A 1 s statement timeout: calsync abandons a store call 6 s in.
    let store = calsync_store::Store::connect(
        &url,
        &calsync_store::ConnectOptions {
            acquire_timeout: std::time::Duration::from_secs(2),
            statement_timeout: std::time::Duration::from_secs(1),
            ..calsync_store::ConnectOptions::new(4)
        },
    )
    .await
    .unwrap();
    let h = harness_on(store, 20).await;
    seed(&h, 10);
    let engine = h.engine(SyncSettings {
        max_attempts: 1,
        ..settings()
    });
    let t = h.default_tuple(&engine).await;
    proxy.set_blackhole(true);
    let started = std::time::Instant::now();
    let o = sync(&engine, &t).await;
    let took = started.elapsed();
    assert!(
        retrying(&o),
        "a database that stopped answering is unavailable: {o:?}"
    );
    assert!(
        took < std::time::Duration::from_secs(15),
        "the round gave up within its deadline, not never: {took:?}"
    );
    proxy.set_blackhole(false);
    // The connections the black hole ate are broken; fresh ones work.
    let engine = h.engine(SyncSettings {
        max_attempts: 4,
        ..settings()
    });
    report(sync(&engine, &t).await);
    h.assert_mirrors(std::slice::from_ref(&t)).await;
}

#[sqlx::test(migrations = false)]
async fn no_connection_slot_left_is_waited_out_not_failed(pool: PgPool) {
    // calsync as an ordinary role, whose connection limit another client (here: the limit
    // itself) has used up: SQLSTATE 53300 for every new connection. (Superusers ignore
    // connection limits, and exhausting the server's would starve the other tests.)
    let (db, port): (String, i32) =
        sqlx::query_as("SELECT current_database(), current_setting('port')::int")
            .fetch_one(&pool)
            .await
            .unwrap();
    let role = format!("calsync_limited_{}_{}", std::process::id(), rand_suffix());
    let mut admin = admin_session(&pool).await;
    for sql in [
        format!("CREATE ROLE {role} LOGIN"),
        format!("GRANT USAGE, CREATE ON SCHEMA public TO {role}"),
    ] {
        admin.execute(sql.as_str()).await.unwrap();
    }
    let h = harness(pool.clone(), 20).await;
    for sql in [
        format!("GRANT ALL ON ALL TABLES IN SCHEMA public TO {role}"),
        format!("GRANT ALL ON ALL SEQUENCES IN SCHEMA public TO {role}"),
    ] {
        admin.execute(sql.as_str()).await.unwrap();
    }
    let host = pool.connect_options().get_host().to_owned();
    let host = if host.starts_with('/') {
        "127.0.0.1".to_owned()
    } else {
        host
    };
    let url = format!("postgres://{role}@{host}:{port}/{db}");
    let store = calsync_store::Store::connect(
        &url,
        &calsync_store::ConnectOptions {
            acquire_timeout: std::time::Duration::from_secs(1),
            ..calsync_store::ConnectOptions::new(2)
        },
    )
    .await
    .unwrap();
    let limited = harness_on(store, 20).await;
    seed(&limited, 10);
    let engine = limited.engine(quick());
    let t = limited.default_tuple(&engine).await;
    admin
        .execute(format!("ALTER ROLE {role} CONNECTION LIMIT 0").as_str())
        .await
        .unwrap();
    admin
        .execute(
            format!(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = '{role}'"
            )
            .as_str(),
        )
        .await
        .unwrap();
    let o = sync(&engine, &t).await;
    assert!(retrying(&o), "retried as unavailable, not failed: {o:?}");
    admin
        .execute(format!("ALTER ROLE {role} CONNECTION LIMIT -1").as_str())
        .await
        .unwrap();
    let r = sync(&engine, &t).await;
    let r = if retrying(&r) {
        sync(&engine, &t).await
    } else {
        r
    };
    report(r);
    limited.assert_mirrors(std::slice::from_ref(&t)).await;
    drop((engine, limited, h));
    admin
        .execute(
            format!(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = '{role}'"
            )
            .as_str(),
        )
        .await
        .unwrap();
    for sql in [format!("DROP OWNED BY {role}"), format!("DROP ROLE {role}")] {
        let _ = admin.execute(sql.as_str()).await;
    }
}

fn rand_suffix() -> u32 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(
        std::time::SystemTime::now()
            .elapsed()
            .map_or(0, |d| d.as_nanos() as u64),
    );
    (h.finish() % 1_000_000) as u32
}

#[sqlx::test(migrations = false)]
async fn under_the_scheduler_every_tuple_catches_up_within_two_intervals_of_the_database_returning(
    pool: PgPool,
) {
    let h = harness(pool.clone(), 20).await;
    seed(&h, 5);
    let engine = h.engine(SyncSettings {
        startup_spread: std::time::Duration::from_millis(100),
        ..settings()
    });
    let work = {
        let st = h.sim.lock();
        let u = st.tenant.user_index(USER).unwrap();
        st.tenant.users[u].calendars[1].id.clone()
    };
    // Interval 1 s each (the harness's).
    let tuples = h
        .tuples(
            &engine,
            &[("adele", USER, "default"), ("adele-work", USER, &work)],
        )
        .await;
    let stop = tokio_util::sync::CancellationToken::new();
    let run = tokio::spawn({
        let (engine, tuples, stop) = (engine.clone(), tuples.clone(), stop.clone());
        async move { engine.run(tuples, stop).await }
    });
    let all_ok = |h: &Harness| {
        let store = h.store.clone();
        async move {
            store
                .status()
                .await
                .map(|rows| {
                    rows.iter()
                        .all(|r| r.state == TupleStatus::Ok && r.last_success_at.is_some())
                })
                .unwrap_or(false)
        }
    };
    let t0 = std::time::Instant::now();
    while !all_ok(&h).await {
        assert!(
            t0.elapsed() < std::time::Duration::from_secs(10),
            "first rounds"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let mut admin = admin_session(&pool).await;
    alter_this_database(&mut admin, "SET default_transaction_read_only = on").await;
    // The calendar changes while the database refuses writes.
    let during = h.create(single(
        "written during the outage",
        "2026-02-10T10:00:00",
        "2026-02-10T11:00:00",
    ));
    tokio::time::sleep(std::time::Duration::from_secs(3)).await;
    alter_this_database(&mut admin, "RESET default_transaction_read_only").await;
    let back = chrono::Utc::now();
    let t1 = std::time::Instant::now();
    loop {
        let rows = h.store.status().await.unwrap_or_default();
        let caught_up = rows.len() == 2
            && rows
                .iter()
                .all(|r| r.state == TupleStatus::Ok && r.last_success_at.is_some_and(|t| t > back));
        if caught_up && h.store.event_ids("adele").await.unwrap().contains(&during) {
            break;
        }
        assert!(
            t1.elapsed() <= std::time::Duration::from_millis(2500),
            "not caught up within 2 × the 1 s interval (+ polling): {rows:?}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    stop.cancel();
    let _ = run.await;
    h.assert_mirrors(&tuples).await;
}
