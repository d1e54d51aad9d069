//! The database goes away under a running scheduler (a private PostgreSQL cluster, really
//! stopped and started): calsync keeps running, retries, and resumes where it was.

use crate::harness::*;
use calsync_engine::{Engine, SyncSettings, TupleConfig};
use calsync_graph::CalendarRef;
use calsync_store::Store;
use calsync_testkit::LocalPostgres;
use serde_json::json;
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

async fn diverged(h: &Harness, tuples: &[calsync_engine::Tuple]) -> Option<String> {
    match calsync_testkit::compare(&h.store, &h.sim, tuples).await {
        Ok(d) => d.iter().find(|x| !x.is_empty()).map(|x| {
            format!(
                "{} diverges: missing {:?}, extra {:?}, different {:?}",
                x.tuple, x.missing, x.extra, x.different
            )
        }),
        Err(e) => Some(format!("cannot compare: {e}")),
    }
}

async fn wait_until_mirrored(h: &Harness, tuples: &[calsync_engine::Tuple], limit: Duration) {
    let start = Instant::now();
    loop {
        let d = diverged(h, tuples).await;
        match d {
            None => return,
            Some(why) if start.elapsed() > limit => panic!("not mirrored after {limit:?}: {why}"),
            Some(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}

#[tokio::test]
async fn a_database_restart_under_the_scheduler_loses_nothing() {
    let pg = LocalPostgres::start().unwrap();
    let store = Store::connect(
        &pg.url(),
        &calsync_store::ConnectOptions {
            acquire_timeout: Duration::from_secs(2),
            statement_timeout: Duration::from_secs(30),
            ..calsync_store::ConnectOptions::new(4)
        },
    )
    .await
    .unwrap();
    let h = harness_on(store, 5).await;
    let ids = seed(&h, 30);
    let engine = Engine::new(
        h.graph(),
        h.store.clone(),
        SyncSettings {
            interval: Duration::from_millis(300),
            startup_spread: Duration::from_millis(10),
            max_backoff: Duration::from_millis(200),
            ..settings()
        },
    );
    let configs: Vec<TupleConfig> = ["a", "b", "c"]
        .iter()
        .map(|k| TupleConfig {
            key: k.to_string(),
            user: USER.into(),
            account: None,
            calendar: CalendarRef::Default,
            window: window(),
            rolling: None,
            schedule: None,
            interval: Some(Duration::from_millis(300)),
        })
        .collect();
    let tuples = engine.register(&configs).await.unwrap();
    let cancel = CancellationToken::new();
    let run = tokio::spawn({
        let (engine, tuples, cancel) = (engine.clone(), tuples.clone(), cancel.clone());
        async move { engine.run(tuples, cancel).await }
    });
    wait_until_mirrored(&h, &tuples, Duration::from_secs(20)).await;

    for outage in 0..2 {
        pg.stop_server().unwrap();
        // Changes while the database is down: rounds fetch them and cannot store them.
        for i in 0..5 {
            let n = outage * 5 + i;
            h.update(
                &ids[n],
                json!({"subject": format!("while down {outage}.{i}")}),
            );
            h.delete(&ids[15 + n]);
        }
        h.create(single(
            "created while down",
            "2026-02-10T09:00:00",
            "2026-02-10T10:00:00",
        ));
        assert!(
            h.store.status().await.is_err(),
            "the database is really down"
        );
        tokio::time::sleep(Duration::from_millis(1500)).await;
        assert!(!run.is_finished(), "the scheduler survived the outage");
        pg.start_server().unwrap();
        wait_until_mirrored(&h, &tuples, Duration::from_secs(30)).await;
    }
    cancel.cancel();
    run.await.unwrap();
    // Nothing applied twice: every row is one live instance, no more.
    for t in &tuples {
        assert_eq!(
            h.store.event_ids(&t.key).await.unwrap().len(),
            h.instances(t).len()
        );
    }
}
