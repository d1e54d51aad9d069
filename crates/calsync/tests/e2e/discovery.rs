//! A whole tenant from a few source lines: `calsync run` discovers 1,000 users, a group and the
//! rooms, mirrors them, and follows the directory as it changes; `calsync discover` dry-runs it.

use crate::harness::*;
use graph_sim::MailboxKind;
use serde_json::json;
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

const USERS: usize = 1_000;

fn upn(i: usize) -> String {
    format!("user{i:04}@contoso.onmicrosoft.com")
}

/// 1,000 directory users: every 20th without a mailbox, every 25th (from 1) a room, every
/// 50th (from 7) on-premises (a mail address, but Graph refuses its calendars); each mailbox
/// with two events. A group "team" of users 100-119.
fn tenant(sim: &graph_sim::Sim) -> String {
    let mut st = sim.lock();
    for i in 0..USERS {
        let kind = if i % 20 == 0 {
            MailboxKind::None
        } else if i % 25 == 1 {
            MailboxKind::Room
        } else if i % 50 == 7 {
            MailboxKind::OnPremises
        } else {
            MailboxKind::User
        };
        let u = st
            .tenant
            .add_directory_user(&upn(i), &format!("User {i}"), kind, Some("Sales"));
        if kind.serves_calendars() {
            for d in 0..2 {
                let p = graph_sim::writes::EventPatch::from_json(&single(
                    &format!("u{i} e{d}"),
                    &format!("2026-02-{:02}T09:00:00", 2 + d + i % 20),
                    &format!("2026-02-{:02}T10:00:00", 2 + d + i % 20),
                ))
                .unwrap();
                st.tenant.create_event(u, 0, &p).unwrap();
            }
        }
    }
    let members: Vec<usize> = (100..120).collect();
    // Among them: 100 has no mailbox, 101 is a room, 107 is on-premises (its calendars are
    // listed, and refused).
    let g = st.tenant.add_group("team", members, vec![]);
    st.tenant.groups[g].id.clone()
}

fn sources(group: &str) -> String {
    format!(
        r#"
[discovery]
every = "2s"
refused_recheck = "1h"

[[sources]]
name = "staff"
users = "all"
filter = "accountEnabled ne false"   # an advanced query: sent with ConsistencyLevel: eventual
exclude = ["user0003@contoso.onmicrosoft.com"]
start = "2026-01-01T00:00:00Z"
end = "2026-04-01T00:00:00Z"

[[sources]]
name = "team"
group = "{group}"
calendars = "all"
start = "2026-01-01T00:00:00Z"
end = "2026-04-01T00:00:00Z"

[[sources]]
name = "rooms"
rooms = "all"
start = "-30d"
end = "+400d"
"#
    )
}

type Status = BTreeMap<String, (bool, String, i64)>;

async fn status(db: &sqlx::PgPool) -> Status {
    let rows: Vec<(String, bool, String, i64)> =
        sqlx::query_as("SELECT tuple_key, tracked, state, event_count FROM calendar_sync_status")
            .fetch_all(db)
            .await
            .unwrap_or_default();
    rows.into_iter()
        .map(|(k, t, s, n)| (k, (t, s, n)))
        .collect()
}

async fn wait_until(
    what: &str,
    limit: Duration,
    log: &std::path::Path,
    mut f: impl AsyncFnMut() -> bool,
) {
    let start = Instant::now();
    while !f().await {
        assert!(
            start.elapsed() < limit,
            "timed out waiting for {what}\n{}",
            std::fs::read_to_string(log)
                .unwrap_or_default()
                .lines()
                .rev()
                .take(30)
                .collect::<Vec<_>>()
                .join("\n")
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_tenant_is_discovered_from_three_source_lines_mirrored_and_followed() {
    let url = calsync_store::recreate_database(&database_url(), "calsync_discovery")
        .await
        .unwrap();
    let db = sqlx::PgPool::connect(&url).await.unwrap();
    let sim = graph_sim::Sim::new(&sim_config());
    let group = tenant(&sim);
    let server = sim.serve("127.0.0.1:0").await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(
        dir.path(),
        &url,
        &server,
        &format!(
            "[sync]\ninterval = \"1h\"\nstartup_spread = \"1s\"\n{}",
            sources(&group)
        ),
    );

    // The dry run first: what the sources resolve to, without a database.
    let out = std::process::Command::new(BIN)
        .args(["discover", "--json", "--config"])
        .arg(&config)
        .env_remove("DATABASE_URL")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let dry: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    // 1,000 listed; enabled: all but the 40 rooms; of those, 50 without mail and 1 excluded.
    assert_eq!(
        dry["sources"]["staff"],
        json!({"listed": 960, "skipped": 51, "refused": 0, "calendars": 909})
    );
    assert_eq!(
        dry["sources"]["team"],
        json!({"listed": 20, "skipped": 1, "refused": 1, "calendars": 18})
    );
    assert_eq!(
        dry["sources"]["rooms"],
        json!({"listed": 40, "skipped": 0, "refused": 0, "calendars": 40})
    );
    assert_eq!(
        dry["refused"],
        json!([{"mailbox": upn(107), "code": "MailboxNotEnabledForRESTAPI"}])
    );
    assert_eq!(
        sqlx::query_scalar::<_, i64>(
            "SELECT count(*) FROM pg_tables WHERE tablename = 'sync_tuples'"
        )
        .fetch_one(&db)
        .await
        .unwrap(),
        0,
        "a dry run touches no database"
    );

    // The daemon's requests from here (the dry run was another process, with its own memory).
    let dry_run_requests = sim.lock().requests().last().map_or(0, |r| r.seq);
    let log = dir.path().join("calsync.log");
    let daemon = run_daemon(&config, &log);
    // Every discovered calendar mirrored: two events each, on-premises ones failed (one
    // request each, then left for failed_retry_interval).
    let index = |k: &str| -> usize {
        k.split("user")
            .nth(1)
            .and_then(|r| r.get(..4))
            .and_then(|n| n.parse().ok())
            .unwrap_or(usize::MAX)
    };
    let on_premises = |k: &str| index(k) % 50 == 7;
    let room = |k: &str| index(k) % 25 == 1;
    wait_until(
        "the tenant mirrored",
        Duration::from_secs(90),
        &log,
        async || {
            let s = status(&db).await;
            s.len() == 909 + 18 + 40
                && s.iter().all(|(k, (tracked, state, n))| {
                    *tracked
                        && if on_premises(k) {
                            state == "failed"
                        } else {
                            state == "ok" && (*n == 2 || room(k) && *n == 0)
                        }
                })
        },
    )
    .await;
    let s = status(&db).await;
    let failed: Vec<&String> = s
        .iter()
        .filter(|(_, v)| v.1 == "failed")
        .map(|(k, _)| k)
        .collect();
    assert_eq!(
        failed.len(),
        USERS / 50,
        "on-premises mailboxes: {failed:?}"
    );
    assert!(!s.keys().any(|k| k.contains("user0003@")), "excluded");
    assert!(!s.keys().any(|k| k.contains("user0020@")), "no mailbox");

    // The directory changes: a user joins the group, one leaves; a member's calendar is created.
    let (cal, joined, left) = {
        let mut st = sim.lock();
        let g = st.tenant.group_index(&group).unwrap();
        st.tenant.groups[g].users.push(302);
        st.tenant.groups[g].users.retain(|u| *u != 103);
        let u = st.tenant.user_index(&upn(102)).unwrap();
        (st.tenant.add_calendar(u, "Project X"), upn(302), upn(103))
    };
    let key = |source: &str, who: &str, cal: &str| format!("{source}:{who}/{cal}");
    wait_until(
        "group and calendar changes",
        Duration::from_secs(20),
        &log,
        async || {
            let s = status(&db).await;
            s.get(&key("team", &joined, "default")).is_some_and(|v| v.0)
            && s.get(&key("team", &left, "default")).is_some_and(|v| !v.0)
            && s.get(&key("team", &upn(102), &cal)).is_some_and(|v| v.0 && v.1 == "ok")
            // The one who left the group is still staff.
            && s.get(&key("staff", &left, "default")).is_some_and(|v| v.0)
        },
    )
    .await;
    // Renamed: the same tuple; deleted: untracked.
    {
        let mut st = sim.lock();
        let u = st.tenant.user_index(&upn(102)).unwrap();
        st.tenant.rename_calendar(u, &cal, "Project X (done)");
    }
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert!(
        status(&db).await[&key("team", &upn(102), &cal)].0,
        "a renamed calendar keeps its tuple"
    );
    {
        let mut st = sim.lock();
        let u = st.tenant.user_index(&upn(102)).unwrap();
        st.tenant.delete_calendar(u, &cal);
    }
    wait_until(
        "the deleted calendar untracked",
        Duration::from_secs(20),
        &log,
        async || {
            status(&db)
                .await
                .get(&key("team", &upn(102), &cal))
                .is_some_and(|v| !v.0)
        },
    )
    .await;
    // A user deleted from the directory leaves every source.
    {
        let mut st = sim.lock();
        let u = st.tenant.user_index(&upn(502)).unwrap();
        st.tenant.delete_user(u);
    }
    wait_until(
        "the deleted user untracked",
        Duration::from_secs(20),
        &log,
        async || {
            status(&db)
                .await
                .get(&key("staff", &upn(502), "default"))
                .is_some_and(|v| !v.0)
        },
    )
    .await;

    // A reload that changes a source applies at once (it resolves the sources itself).
    let text = std::fs::read_to_string(&config).unwrap();
    std::fs::write(
        &config,
        text.replace(
            r#"exclude = ["user0003@contoso.onmicrosoft.com"]"#,
            r#"exclude = ["user0003@contoso.onmicrosoft.com", "user0004@contoso.onmicrosoft.com"]"#,
        ),
    )
    .unwrap();
    let hup = std::process::Command::new("kill")
        .args(["-HUP", &daemon.0.id().to_string()])
        .status()
        .unwrap();
    assert!(hup.success());
    wait_until(
        "the reload's exclude applied",
        Duration::from_secs(10),
        &log,
        async || {
            status(&db)
                .await
                .get(&key("staff", &upn(4), "default"))
                .is_some_and(|v| !v.0)
        },
    )
    .await;
    assert!(
        status(&db).await[&key("staff", &upn(5), "default")].0,
        "the others stay"
    );

    // Refused mailboxes were never hammered: over many discovery passes, one calendar listing
    // for the on-premises group member, and one delta request per on-premises staff mailbox.
    let requests: Vec<_> = sim
        .lock()
        .requests()
        .into_iter()
        .filter(|r| r.seq > dry_run_requests)
        .collect();
    let onprem_id = {
        let st = sim.lock();
        st.tenant.users[st.tenant.user_index(&upn(107)).unwrap()]
            .id
            .clone()
    };
    let to = |id: &str, path: &str| {
        requests
            .iter()
            .filter(|r| r.mailbox.as_deref() == Some(id) && r.path.contains(path))
            .count()
    };
    assert_eq!(
        to(&onprem_id, "/calendars"),
        1,
        "the refused listing is asked once per recheck"
    );
    assert_eq!(
        to(&onprem_id, "calendarView/delta"),
        1,
        "one failed round, then failed_retry_interval"
    );
    let passes = requests
        .iter()
        .filter(|r| r.path.ends_with("/users"))
        .count();
    assert!(passes >= 5, "the directory was listed every 2 s: {passes}");
}
