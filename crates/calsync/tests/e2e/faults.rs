//! Throttling, auth, permanent, transport and payload faults, each produced for real by
//! graph-sim, against real PostgreSQL: the outcome (the view equals the truth) and the manners
//! (no request before `Retry-After`, at most 4 in flight per mailbox, no token storm).

use crate::harness::*;
use calsync_engine::{Budget, Health, Outcome, SyncSettings, Tuple};
use calsync_store::TupleStatus;
use graph_sim::RequestRecord;
use serde_json::json;
use sqlx::PgPool;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

fn mailbox_id(h: &Harness, upn: &str) -> String {
    let st = h.sim.lock();
    let u = st.tenant.user_index(upn).unwrap();
    st.tenant.users[u].id.clone()
}

fn delta_requests(h: &Harness) -> Vec<RequestRecord> {
    h.sim
        .lock()
        .requests()
        .into_iter()
        .filter(|r| r.path.contains("calendarView"))
        .collect()
}

async fn all_synced(engine: &calsync_engine::Engine, tuples: &[Tuple]) {
    let outcomes = engine
        .sync_all_once(tuples, &CancellationToken::new())
        .await;
    for (t, o) in &outcomes {
        assert!(matches!(o, Outcome::Synced(_)), "{}: {o:?}", t.key);
    }
}

/// Two tuples on one mailbox (default and Work calendars), sharing its limits.
async fn two_calendars(h: &Harness, engine: &calsync_engine::Engine) -> Vec<Tuple> {
    let work = {
        let st = h.sim.lock();
        let u = st.tenant.user_index(USER).unwrap();
        st.tenant.users[u].calendars[1].id.clone()
    };
    h.tuples(
        engine,
        &[("adele", USER, "default"), ("adele-work", USER, &work)],
    )
    .await
}

#[sqlx::test(migrations = false)]
async fn retry_after_in_every_form_holds_the_whole_mailbox(pool: PgPool) {
    let h = harness(pool, 3).await;
    seed(&h, 20);
    // Seconds with a fraction, an HTTP date, and each throttling status Graph uses.
    let forms = [
        json!({"status": 429, "code": "TooManyRequests", "retry_after": 0.35}),
        json!({"status": 503, "code": "ServiceUnavailable", "retry_after": 0.2}),
        json!({"status": 509, "code": "BandwidthLimitExceeded", "retry_after": 0.25}),
        json!({"status": 504, "code": "GatewayTimeout", "retry_after": 0.1}),
        json!({"status": 429, "code": "ApplicationThrottled", "retry_after": 1.0, "retry_after_as_date": true}),
    ];
    for (i, form) in forms.into_iter().enumerate() {
        let mut action = form;
        action["kind"] = json!("status");
        h.sim.lock().faults = vec![rule(json!({
            "path_contains": "calendarView", "every": 4, "times": 3, "action": action
        }))];
        let engine = h.engine(settings());
        let tuples = two_calendars(&h, &engine).await;
        if i > 0 {
            for t in &tuples {
                h.store
                    .forget_link(t.id, h.store.load(t.id).await.unwrap().link_version, None)
                    .await
                    .unwrap();
            }
        }
        all_synced(&engine, &tuples).await;
        let fired = h.sim.lock().faults[0].fired;
        assert_eq!(fired, 3, "form {i}: every fault fired");
        assert!(
            engine.gate_stats().throttle_waits >= 1,
            "form {i}: the gate held requests"
        );
        assert_good_manners(&h);
        h.assert_mirrors(&tuples).await;
    }
}

#[sqlx::test(migrations = false)]
async fn throttling_without_retry_after_backs_off_and_gets_through(pool: PgPool) {
    let h = harness(pool, 5).await;
    seed(&h, 20);
    h.sim.lock().faults = vec![rule(json!({
        "path_contains": "calendarView", "every": 2, "times": 4,
        "action": {"kind": "status", "status": 429, "code": "TooManyRequests"}
    }))];
    let engine = h.engine(settings());
    let t = h.default_tuple(&engine).await;
    report(sync(&engine, &t).await);
    assert_eq!(h.sim.lock().faults[0].fired, 4);
    assert_good_manners(&h);
    h.assert_mirrors(&[t]).await;
}

#[sqlx::test(migrations = false)]
async fn a_503_is_retried_on_a_fresh_connection(pool: PgPool) {
    let h = harness(pool, 5).await;
    seed(&h, 20);
    h.sim.lock().faults = vec![rule(json!({
        "path_contains": "calendarView", "nth": 3,
        "action": {"kind": "status", "status": 503, "code": "ServiceUnavailable"}
    }))];
    let engine = h.engine(settings());
    let t = h.default_tuple(&engine).await;
    report(sync(&engine, &t).await);
    let log = delta_requests(&h);
    let at = log.iter().position(|r| r.status == 503).unwrap();
    let (failed, retry) = (&log[at], &log[at + 1]);
    assert_eq!(failed.path, retry.path, "the same page was asked again");
    assert!(
        log[..=at].iter().all(|r| r.connection != retry.connection),
        "the retry went out on a new connection: {log:#?}"
    );
    // Before the 503 the pool reused one connection.
    assert!(log[..at].iter().all(|r| r.connection == log[0].connection));
    h.assert_mirrors(&[t]).await;
}

#[sqlx::test(migrations = false)]
async fn many_mailboxes_throttled_at_once_slow_the_whole_tenant(pool: PgPool) {
    let h = harness(pool, 2).await;
    let users: Vec<String> = (0..8)
        .map(|i| format!("user{i}@contoso.onmicrosoft.com"))
        .collect();
    {
        let mut st = h.sim.lock();
        for (i, upn) in users.iter().enumerate() {
            let u = st.tenant.add_user(upn, None, &format!("User {i}"));
            for k in 0..6 {
                let day = 3 + k;
                let patch = graph_sim::writes::EventPatch::from_json(&single(
                    &format!("u{i} e{k}"),
                    &format!("2026-02-{day:02}T10:00:00"),
                    &format!("2026-02-{day:02}T11:00:00"),
                ))
                .unwrap();
                st.tenant.create_event(u, 0, &patch).unwrap();
            }
        }
        // An app-wide budget the eight mailboxes together exceed: 429s across mailboxes.
        st.limits.app_requests = Some(6);
        st.limits.app_window_secs = 0.5;
    }
    let engine = h.engine(SyncSettings {
        max_in_flight: 32,
        min_in_flight: 2,
        max_attempts: 20,
        ..settings()
    });
    let specs: Vec<(&str, &str, &str)> = users
        .iter()
        .map(|u| (u.as_str(), u.as_str(), "default"))
        .collect();
    let tuples = h.tuples(&engine, &specs).await;
    all_synced(&engine, &tuples).await;
    let g = engine.gate_stats();
    assert!(g.decreases >= 1, "the global limit came down: {g:?}");
    assert!(g.lowest_global_limit <= 16, "{g:?}");
    let throttled = h
        .sim
        .lock()
        .stats()
        .by_status
        .get(&429)
        .copied()
        .unwrap_or(0);
    assert!(throttled > 0);
    assert_good_manners(&h);
    h.assert_mirrors(&tuples).await;
}

#[sqlx::test(migrations = false)]
async fn the_mailbox_request_budget_is_never_exceeded(pool: PgPool) {
    let h = harness(pool, 1).await;
    seed(&h, 24);
    let budget = Budget {
        requests: 10,
        per: Duration::from_secs(1),
    };
    let engine = h.engine(SyncSettings {
        mailbox_budget: Some(budget),
        ..settings()
    });
    let tuples = two_calendars(&h, &engine).await;
    all_synced(&engine, &tuples).await;
    let log = delta_requests(&h);
    assert!(
        log.len() > 30,
        "enough requests to meet the budget: {}",
        log.len()
    );
    for (i, r) in log.iter().enumerate() {
        let in_window = log[i..]
            .iter()
            .take_while(|x| x.at_secs < r.at_secs + 1.0)
            .count();
        assert!(
            in_window <= 10,
            "{in_window} requests in 1 s from {}",
            r.at_secs
        );
    }
    h.assert_mirrors(&tuples).await;
}

#[sqlx::test(migrations = false)]
async fn a_refused_client_secret_is_a_clear_status_not_a_token_storm(pool: PgPool) {
    let h = harness(pool, 10).await;
    seed(&h, 5);
    // Azure AD answers invalid_client (a rotated secret) for the first token requests.
    h.sim.lock().faults = vec![rule(json!({
        "path_contains": "oauth2", "times": 2,
        "action": {"kind": "status", "status": 401, "code": "invalid_client",
                   "message": "AADSTS7000215: Invalid client secret provided."}
    }))];
    let engine = h.engine(settings());
    let specs: Vec<String> = (0..10).map(|i| format!("t{i}")).collect();
    let specs: Vec<(&str, &str, &str)> = specs
        .iter()
        .map(|k| (k.as_str(), USER, "default"))
        .collect();
    let tuples = h.tuples(&engine, &specs).await;
    let outcomes = engine
        .sync_all_once(&tuples, &CancellationToken::new())
        .await;
    for (_, o) in &outcomes {
        assert!(
            matches!(o, Outcome::Failed(f) if f.health == Health::Retrying && f.code == "invalid_client"),
            "{o:?}"
        );
    }
    let token_requests = |h: &Harness| {
        h.sim
            .lock()
            .requests()
            .iter()
            .filter(|r| r.path.contains("oauth2"))
            .count()
    };
    // Ten tuples, six attempts each, one token request: the failure is held, not retried.
    assert_eq!(token_requests(&h), 1);
    let status = h.store.status().await.unwrap();
    for s in &status {
        assert_eq!(s.state, TupleStatus::Retrying);
        assert_eq!(s.last_error_code.as_deref(), Some("invalid_client"));
        assert!(
            s.last_error
                .as_deref()
                .unwrap()
                .contains("Invalid client secret"),
            "{s:?}"
        );
    }
    // After the hold (1 s, then 2 s) the endpoint is asked again and the tuples recover.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert!(matches!(
        sync(&engine, &tuples[0]).await,
        Outcome::Failed(_)
    ));
    assert_eq!(token_requests(&h), 2);
    tokio::time::sleep(Duration::from_millis(2100)).await;
    all_synced(&engine, &tuples).await;
    assert_eq!(token_requests(&h), 3);
    let status = h.store.status().await.unwrap();
    assert!(
        status
            .iter()
            .all(|s| s.state == TupleStatus::Ok && s.last_error.is_none()),
        "{status:?}"
    );
    h.assert_mirrors(&tuples).await;
}

#[sqlx::test(migrations = false)]
async fn a_token_endpoint_that_is_down_is_waited_out(pool: PgPool) {
    let h = harness(pool, 10).await;
    seed(&h, 5);
    h.sim.lock().faults = vec![rule(json!({
        "path_contains": "oauth2", "times": 1, "action": {"kind": "reset"}
    }))];
    let engine = h.engine(settings());
    let t = h.default_tuple(&engine).await;
    let o = sync(&engine, &t).await;
    assert!(
        matches!(&o, Outcome::Failed(f) if f.code == "TokenEndpointUnavailable"),
        "{o:?}"
    );
    let s = h.store.status().await.unwrap().remove(0);
    assert!(
        s.last_error
            .unwrap()
            .contains("token endpoint is unavailable")
    );
    tokio::time::sleep(Duration::from_millis(1100)).await;
    report(sync(&engine, &t).await);
    h.assert_mirrors(&[t]).await;
}

#[sqlx::test(migrations = false)]
async fn permanent_graph_refusals_fail_one_tuple_and_the_others_carry_on(pool: PgPool) {
    let h = harness(pool.clone(), 10).await;
    seed(&h, 5);
    let cases = [
        (
            "denied@contoso.onmicrosoft.com",
            403,
            "ErrorAccessDenied",
            "Access is denied. Check credentials and try again.",
        ),
        (
            "unlicensed@contoso.onmicrosoft.com",
            404,
            "MailboxNotEnabledForRESTAPI",
            "The mailbox is either inactive, soft-deleted, or is hosted on-premise.",
        ),
        (
            "gone@contoso.onmicrosoft.com",
            404,
            "ErrorItemNotFound",
            "The specified object was not found in the store.",
        ),
        (
            "badparam@contoso.onmicrosoft.com",
            400,
            "ErrorInvalidParameter",
            "The value of the parameter 'startDateTime' is invalid.",
        ),
    ];
    {
        let mut st = h.sim.lock();
        let mut faults = Vec::new();
        for (upn, status, code, message) in cases {
            st.tenant.add_user(upn, None, upn);
            faults.push(rule(json!({"mailbox": upn, "action": {
                "kind": "status", "status": status, "code": code, "message": message}})));
        }
        st.faults = faults;
    }
    let engine = h.engine(settings());
    let mut specs: Vec<(&str, &str, &str)> = cases.iter().map(|c| (c.0, c.0, "default")).collect();
    specs.push(("good", USER, "default"));
    let tuples = h.tuples(&engine, &specs).await;
    let outcomes = engine
        .sync_all_once(&tuples, &CancellationToken::new())
        .await;
    for (t, o) in &outcomes {
        if t.key == "good" {
            assert!(matches!(o, Outcome::Synced(_)));
            continue;
        }
        let (_, _, code, _) = cases.iter().find(|c| c.0 == t.key).unwrap();
        assert!(
            matches!(o, Outcome::Failed(f) if f.health == Health::Failed && f.code == *code),
            "{}: {o:?}",
            t.key
        );
    }
    // One delta request each: a permanent refusal is not retried within the round (the
    // mailbox's id lookup at registration is refused too, and leaves the name as its key).
    for (upn, ..) in cases {
        let id = mailbox_id(&h, upn);
        let n = h
            .sim
            .lock()
            .requests()
            .iter()
            .filter(|r| r.mailbox.as_deref() == Some(&id) && r.path.contains("calendarView"))
            .count();
        assert_eq!(n, 1, "{upn}");
    }
    // The read model's status view carries Graph's code and message.
    let rows: Vec<(String, String, Option<String>, Option<String>)> = sqlx::query_as(
        "SELECT tuple_key, state, last_error_code, last_error FROM calendar_sync_status ORDER BY tuple_key",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    for (upn, _, code, message) in cases {
        let row = rows.iter().find(|r| r.0 == upn).unwrap();
        assert_eq!(row.1, "failed");
        assert_eq!(row.2.as_deref(), Some(code));
        assert!(row.3.as_deref().unwrap().contains(message), "{row:?}");
    }
    h.assert_mirrors(&tuples[tuples.len() - 1..]).await;

    // Under the scheduler the failed tuples wait for the slow cadence; the good one runs on.
    h.sim.lock().clear_log();
    let cancel = CancellationToken::new();
    let run = {
        let engine = h.engine(SyncSettings {
            startup_spread: Duration::from_millis(10),
            failed_retry_interval: Duration::from_secs(3600),
            ..settings()
        });
        let tuples = tuples.clone();
        let cancel = cancel.clone();
        tokio::spawn(async move { engine.run(tuples, cancel).await })
    };
    tokio::time::sleep(Duration::from_millis(3500)).await;
    cancel.cancel();
    run.await.unwrap();
    let log = h.sim.lock().requests();
    let good = mailbox_id(&h, USER);
    assert!(
        log.iter()
            .filter(|r| r.mailbox.as_deref() == Some(&good))
            .count()
            >= 3
    );
    for (upn, ..) in cases {
        let id = mailbox_id(&h, upn);
        let n = log
            .iter()
            .filter(|r| r.mailbox.as_deref() == Some(&id))
            .count();
        assert!(n <= 1, "{upn}: {n} attempts in 3.5 s");
    }
}

#[sqlx::test(migrations = false)]
async fn broken_transfers_never_advance_the_link_and_are_retried(pool: PgPool) {
    let h = harness(pool, 4).await;
    let ids = seed(&h, 20);
    let actions = [
        json!({"kind": "truncate"}),
        json!({"kind": "malformed_json"}),
        json!({"kind": "reset"}),
        json!({"kind": "status", "status": 500, "code": "InternalServerError"}),
        json!({"kind": "status", "status": 502, "code": "BadGateway"}),
        // Longer than the request timeout below.
        json!({"kind": "delay", "ms": 1500}),
    ];
    let one_shot = |h: &Harness, attempts: usize| {
        let mut g = h.graph_config();
        g.request_timeout = Duration::from_millis(500);
        calsync_engine::Engine::new(
            calsync_graph::GraphClient::new(g, h.auth()).unwrap(),
            h.store.clone(),
            SyncSettings {
                max_attempts: attempts,
                ..settings()
            },
        )
    };
    let engine = one_shot(&h, 6);
    let t = h.default_tuple(&engine).await;
    report(sync(&engine, &t).await);
    for (i, action) in actions.into_iter().enumerate() {
        h.update(&ids[i], json!({"subject": format!("edit {i}")}));
        h.delete(&ids[10 + i]);
        // One attempt only: the broken page fails the round and must leave no trace.
        h.sim.lock().faults = vec![rule(json!({
            "path_contains": "calendarView", "times": 1, "action": action.clone()
        }))];
        let before = h.store.load(t.id).await.unwrap();
        let rows_before = h.store.event_summaries(&t.key).await.unwrap();
        let o = sync(&one_shot(&h, 1), &t).await;
        assert!(
            matches!(&o, Outcome::Failed(f) if f.health == Health::Retrying),
            "{action}: {o:?}"
        );
        let after = h.store.load(t.id).await.unwrap();
        assert_eq!(
            (after.link_version, &after.link),
            (before.link_version, &before.link),
            "{action}"
        );
        assert_eq!(
            h.store.event_summaries(&t.key).await.unwrap(),
            rows_before,
            "{action}"
        );
        // With retries the same fault is absorbed inside the round.
        h.sim.lock().faults = vec![rule(json!({
            "path_contains": "calendarView", "times": 2, "action": action.clone()
        }))];
        report(sync(&engine, &t).await);
        h.assert_mirrors(std::slice::from_ref(&t)).await;
    }
}

#[sqlx::test(migrations = false)]
async fn one_mailbox_named_by_upn_and_by_id_shares_one_gate(pool: PgPool) {
    let h = harness(pool, 5).await;
    seed(&h, 12);
    let (id, work) = {
        let st = h.sim.lock();
        let u = st.tenant.user_index(USER).unwrap();
        (
            st.tenant.users[u].id.clone(),
            st.tenant.users[u].calendars[1].id.clone(),
        )
    };
    // Every delta request is slow, so rounds overlap; six tuples, three by each name.
    h.sim.lock().faults = vec![rule(
        json!({"path_contains": "calendarView", "action": {"kind": "delay", "ms": 150}}),
    )];
    let engine = h.engine(settings());
    let tuples = h
        .tuples(
            &engine,
            &[
                ("upn-default", USER, "default"),
                ("upn-work", USER, &work),
                ("upn-default-2", USER, "default"),
                ("id-default", &id, "default"),
                ("id-work", &id, &work),
                ("id-default-2", &id, "default"),
            ],
        )
        .await;
    assert!(
        tuples.iter().all(|t| t.mailbox == id),
        "both names resolve to the object id: {:?}",
        tuples.iter().map(|t| &t.mailbox).collect::<Vec<_>>()
    );
    all_synced(&engine, &tuples).await;
    assert_good_manners(&h);
    let v = h.sim.lock().violations();
    assert_eq!(
        v.max_in_flight, 4,
        "the gate filled its 4 slots, and no more: {v:?}"
    );
    // The resolution is remembered: a second engine asks Graph for no user.
    h.sim.lock().faults.clear();
    h.sim.lock().clear_log();
    let again = h.engine(settings());
    h.tuples(&again, &[("upn-default", USER, "default")]).await;
    let asked = h.sim.lock().requests();
    assert!(
        asked
            .iter()
            .all(|r| !r.path.ends_with(&format!("/users/{USER}"))),
        "{asked:?}"
    );
}

#[sqlx::test(migrations = false)]
async fn a_page_malformed_every_time_degrades_its_tuple_instead_of_fast_retries_forever(
    pool: PgPool,
) {
    let h = harness(pool, 50).await;
    seed(&h, 5);
    let engine = h.engine(SyncSettings {
        max_attempts: 2,
        ..settings()
    });
    let t = h.default_tuple(&engine).await;
    h.sim.lock().faults = vec![rule(
        json!({"path_contains": "calendarView", "action": {"kind": "malformed_json"}}),
    )];
    let mut healths = Vec::new();
    for _ in 0..5 {
        match sync(&engine, &t).await {
            Outcome::Failed(f) => healths.push(f.health),
            other => panic!("a malformed page cannot sync: {other:?}"),
        }
    }
    assert_eq!(
        healths,
        [
            Health::Retrying,
            Health::Retrying,
            Health::Retrying,
            Health::Retrying,
            Health::Degraded
        ]
    );
    assert_eq!(
        h.store.status().await.unwrap()[0].state,
        TupleStatus::Degraded
    );
    // When Graph answers properly again, the next run starts afresh and converges.
    h.sim.lock().faults.clear();
    report(sync(&engine, &t).await);
    h.assert_mirrors(std::slice::from_ref(&t)).await;
}

#[sqlx::test(migrations = false)]
async fn a_round_waiting_on_an_answer_shows_as_stalled_until_it_gets_one(pool: PgPool) {
    let h = harness(pool, 50).await;
    seed(&h, 3);
    let engine = h.engine(settings());
    let t = h.default_tuple(&engine).await;
    h.sim.lock().faults = vec![rule(
        json!({"path_contains": "calendarView", "nth": 1, "action": {"kind": "delay", "ms": 1500}}),
    )];
    let round = tokio::spawn({
        let (engine, t) = (engine.clone(), t.clone());
        async move { sync(&engine, &t).await }
    });
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let l = engine.liveness();
    assert_eq!(l.rounds_in_flight, 1);
    assert!(
        l.longest_round_stall >= Duration::from_millis(900),
        "the watchdog sees one round waiting: {l:?}"
    );
    report(round.await.unwrap());
    let l = engine.liveness();
    assert_eq!(
        (l.rounds_in_flight, l.longest_round_stall),
        (0, Duration::ZERO)
    );
}

#[sqlx::test(migrations = false)]
async fn a_round_without_progress_is_cancelled_alone_and_retried(pool: PgPool) {
    let h = harness(pool, 50).await;
    seed(&h, 3);
    let engine = h.engine(settings());
    let tuples = h
        .tuples(
            &engine,
            &[
                ("stuck", USER, "default"),
                ("alex", "alex@contoso.onmicrosoft.com", "default"),
            ],
        )
        .await;
    // Adele's first delta request hangs for 30 s; the service's check runs every 100 ms here.
    h.sim.lock().faults = vec![rule(json!({"path_contains": "calendarView", "nth": 1,
        "mailbox": USER, "action": {"kind": "delay", "ms": 30000}}))];
    let reaper = tokio::spawn({
        let engine = engine.clone();
        async move {
            loop {
                engine.cancel_stuck_rounds(Duration::from_millis(400));
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    });
    let started = std::time::Instant::now();
    let outcomes = engine
        .sync_all_once(&tuples, &CancellationToken::new())
        .await;
    assert!(started.elapsed() < Duration::from_secs(10), "not 30 s");
    for (t, o) in &outcomes {
        if t.key == "stuck" {
            assert!(
                matches!(o, Outcome::Failed(f) if f.code == "StuckRound" && f.health == Health::Retrying),
                "{o:?}"
            );
        } else {
            assert!(
                matches!(o, Outcome::Synced(_)),
                "the other round carries on: {o:?}"
            );
        }
    }
    let status = h.store.status().await.unwrap();
    let stuck = status.iter().find(|r| r.tuple_key == "stuck").unwrap();
    assert_eq!(stuck.state, TupleStatus::Retrying);
    assert_eq!(stuck.last_error_code.as_deref(), Some("StuckRound"));
    reaper.abort();
    // The next run, without the hang, converges.
    all_synced(&engine, &tuples).await;
    h.assert_mirrors(&tuples).await;
}

/// Mailboxes waiting out a long `Retry-After` give their round slot back while they wait: 300
/// mailboxes throttled with `Retry-After: 120` beside 50 healthy ones, 256 round slots (issue
/// 23: a few hundred throttled mailboxes held all 256 slots and healthy ones stopped being
/// synced). Before: every slot held by a throttled round waiting at the gate, the healthy ones
/// not asked again within the 6 s.
#[sqlx::test(migrations = false)]
async fn mailboxes_waiting_out_a_long_retry_after_leave_the_round_slots_to_healthy_ones(
    pool: PgPool,
) {
    let h = harness(pool, 350).await;
    let users: Vec<String> = (0..350)
        .map(|i| format!("user{i}@contoso.onmicrosoft.com"))
        .collect();
    {
        let mut st = h.sim.lock();
        for (i, upn) in users.iter().enumerate() {
            let u = st.tenant.add_user(upn, None, &format!("User {i}"));
            let patch = graph_sim::writes::EventPatch::from_json(&single(
                &format!("u{i}"),
                "2026-02-03T10:00:00",
                "2026-02-03T11:00:00",
            ))
            .unwrap();
            st.tenant.create_event(u, 0, &patch).unwrap();
        }
    }
    // max_in_flight 64: ROUNDS_PER_REQUEST (4) x 64 = 256 round slots, the default's.
    let engine = h.engine(SyncSettings {
        max_in_flight: 64,
        min_in_flight: 64,
        startup_spread: Duration::from_millis(200),
        ..settings()
    });
    let specs: Vec<(&str, &str, &str)> = users
        .iter()
        .map(|u| (u.as_str(), u.as_str(), "default"))
        .collect();
    let tuples = h.tuples(&engine, &specs).await;
    all_synced(&engine, &tuples).await;

    // Users 0..300 are throttled from now on, each answer saying 120 s.
    h.sim.lock().faults = users[..300]
        .iter()
        .map(|u| {
            rule(json!({
                "mailbox": u, "path_contains": "calendarView",
                "action": {"kind": "status", "status": 429, "code": "ApplicationThrottled",
                           "retry_after": 120}
            }))
        })
        .collect();
    h.sim.lock().clear_log();
    let cancel = CancellationToken::new();
    let run = tokio::spawn({
        let (engine, cancel, tuples) = (engine.clone(), cancel.clone(), tuples.clone());
        async move { engine.run(tuples, cancel).await }
    });
    tokio::time::sleep(Duration::from_secs(6)).await;
    let log = delta_requests(&h);
    for healthy in &users[300..] {
        let id = mailbox_id(&h, healthy);
        let asked = log
            .iter()
            .filter(|r| r.mailbox.as_deref() == Some(id.as_str()) && r.status == 200)
            .count();
        // Every second (the harness's interval) for 6 s, give or take the start's spread.
        assert!(asked >= 4, "{healthy} was synced {asked} times in 6 s");
    }
    let throttled = log.iter().filter(|r| r.status == 429).count();
    assert!(
        throttled >= 300,
        "each throttled mailbox was asked: {throttled}"
    );
    cancel.cancel();
    tokio::time::timeout(Duration::from_secs(10), run)
        .await
        .expect("the throttled rounds stop at the cancel")
        .unwrap();
    assert_good_manners(&h);
}
