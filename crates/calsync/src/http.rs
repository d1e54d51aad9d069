//! The HTTP endpoint (`http.listen`): `/healthz`, `/readyz`, `/metrics`, `POST /reload`.

use crate::shared::Shared;
use crate::worker::WorkerState;
use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use calsync_store::TupleStatus;
use chrono::Utc;
use serde_json::json;
use std::fmt::Write;
use std::sync::Arc;

/// The endpoint's routes over the state the main loop shares.
pub fn router(shared: Arc<Shared>) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/reload", post(reload))
        .with_state(shared)
}

/// Alive: the main loop is turning (not deadlocked, not starved).
async fn healthz(State(s): State<Arc<Shared>>) -> Response {
    if s.alive() {
        (StatusCode::OK, "ok\n").into_response()
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "main loop stalled\n").into_response()
    }
}

/// Ready: the database answers, its migrations are current, the scheduler runs.
async fn readyz(State(s): State<Arc<Shared>>) -> Response {
    let store = s.engine().store();
    // Reasons, never the database's own error text (it can name hosts, users, databases).
    let database = match store.ping().await {
        Ok(()) => "ok",
        Err(e) if e.is_transient() => "unreachable",
        Err(_) => "error",
    };
    let migrations = match store.migrations_current().await {
        Ok(true) => "current",
        Ok(false) => "behind",
        Err(_) => "unknown",
    };
    let scheduler = if s.scheduler_running() {
        "running"
    } else {
        "stopped"
    };
    // A replica whose file the deployment replaced serves the stored set, but is not ready:
    // its operator must know its file is not what runs (issue 23).
    let set = s.followed();
    let config = if set.stale { "stale" } else { "current" };
    let ready = database == "ok" && migrations == "current" && scheduler == "running" && !set.stale;
    let mut body = json!({"ready": ready, "database": database, "migrations": migrations, "scheduler": scheduler,
                          "config": config, "generation": set.generation});
    if set.stale {
        body["reason"] = json!(format!(
            "this replica's config file is not the deployment's (generation {} was written from config {}): fix the file or reload a replica with the current one",
            set.generation, set.digest
        ));
    }
    // Workers are named only when one is not well: restarting after a failure, with how it
    // ended. (A fatal worker's end stops the process.) A busy worker (a long discovery pass)
    // is normal work, not a reason.
    let unwell: serde_json::Map<String, serde_json::Value> = s
        .workers()
        .snapshot()
        .into_iter()
        .filter(|(_, w)| w.state == WorkerState::Restarting)
        .map(|(name, w)| {
            let why = match &w.last_error {
                Some(e) => format!("{}: {e}", w.state.as_str()),
                None => w.state.as_str().to_owned(),
            };
            (name.to_owned(), serde_json::Value::String(why))
        })
        .collect();
    if !unwell.is_empty() {
        body["workers"] = serde_json::Value::Object(unwell);
    }
    let code = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (code, axum::Json(body)).into_response()
}

fn escape(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// The lag histogram's bounds, in seconds: from a busy 1-minute interval to a day.
const LAG_BOUNDS: [f64; 11] = [
    15.0, 30.0, 60.0, 120.0, 300.0, 600.0, 900.0, 1800.0, 3600.0, 21600.0, 86400.0,
];

/// Prometheus text format: the engine's counters and histograms, plus what is read fresh
/// per scrape (tuples by state, per-tuple lag, token renewals, the adaptive request limit).
async fn metrics(State(s): State<Arc<Shared>>) -> Response {
    let Some(handle) = s.metrics() else {
        return (StatusCode::NOT_FOUND, "metrics are off\n").into_response();
    };
    let mut out = handle.render();
    let engine = s.engine();
    let g = engine.gate_stats();
    let _ = writeln!(
        out,
        "# HELP calsync_token_renewals_total Access tokens fetched from the token endpoint.\n# TYPE calsync_token_renewals_total counter\ncalsync_token_renewals_total {}",
        engine.graph().tokens().renewals()
    );
    let _ = writeln!(
        out,
        "# HELP calsync_graph_request_limit The adaptive limit on Graph requests in flight.\n# TYPE calsync_graph_request_limit gauge\ncalsync_graph_request_limit {}",
        g.global_limit
    );
    let _ = writeln!(
        out,
        "# HELP calsync_rounds_in_flight Rounds running now.\n# TYPE calsync_rounds_in_flight gauge\ncalsync_rounds_in_flight {}",
        engine.liveness().rounds_in_flight
    );
    let _ = writeln!(
        out,
        "# HELP calsync_worker_state Each background worker's state (1 for the state it is in).\n# TYPE calsync_worker_state gauge"
    );
    for (name, w) in s.workers().snapshot() {
        for state in WorkerState::ALL {
            let on = u8::from(w.state == state);
            let _ = writeln!(
                out,
                "calsync_worker_state{{worker=\"{name}\",state=\"{}\"}} {on}",
                state.as_str()
            );
        }
    }
    let _ = writeln!(
        out,
        "# HELP calsync_worker_restarts Times each background worker was started again after it ended.\n# TYPE calsync_worker_restarts gauge"
    );
    for (name, w) in s.workers().snapshot() {
        let _ = writeln!(
            out,
            "calsync_worker_restarts{{worker=\"{name}\"}} {}",
            w.restarts
        );
    }
    let store = engine.store();
    // Bounded by default: counts by state and a lag histogram, the same size at 100 or 100,000
    // calendars. Every replica reports its deployment's totals; calsync_leases_held is its own.
    match store.status_summary().await {
        Ok(summary) => {
            let _ = writeln!(
                out,
                "# HELP calsync_tuples Tracked calendars of the deployment by sync state.\n# TYPE calsync_tuples gauge"
            );
            for state in TupleStatus::ALL {
                let n = summary
                    .by_state
                    .iter()
                    .find(|(s, _)| *s == state)
                    .map_or(0, |(_, n)| *n);
                let _ = writeln!(out, "calsync_tuples{{state=\"{state}\"}} {n}");
            }
            // Overdue (issue 23): counted here instead of under the state they claim.
            let _ = writeln!(out, "calsync_tuples{{state=\"stale\"}} {}", summary.stale);
            let _ = writeln!(
                out,
                "# HELP calsync_tuples_unowned Tracked calendars whose mailbox no live replica holds.\n# TYPE calsync_tuples_unowned gauge\ncalsync_tuples_unowned {}",
                summary.unowned
            );
        }
        Err(e) => {
            let _ = writeln!(
                out,
                "# calsync: cannot read tuple states: {}",
                escape(&e.to_string())
            );
        }
    }
    match store.lag_histogram(&LAG_BOUNDS).await {
        Ok(h) => {
            let _ = writeln!(
                out,
                "# HELP calsync_sync_lag_seconds Seconds since each tracked calendar last completed a round.\n# TYPE calsync_sync_lag_seconds histogram"
            );
            for (bound, n) in h.bounds.iter().zip(&h.cumulative) {
                let _ = writeln!(out, "calsync_sync_lag_seconds_bucket{{le=\"{bound}\"}} {n}");
            }
            let _ = writeln!(
                out,
                "calsync_sync_lag_seconds_bucket{{le=\"+Inf\"}} {}\ncalsync_sync_lag_seconds_sum {}\ncalsync_sync_lag_seconds_count {}",
                h.count, h.sum, h.count
            );
            let _ = writeln!(
                out,
                "# HELP calsync_sync_lag_max_seconds The longest any tracked calendar has gone without completing a round.\n# TYPE calsync_sync_lag_max_seconds gauge\ncalsync_sync_lag_max_seconds {}",
                h.max.unwrap_or(0.0)
            );
            let _ = writeln!(
                out,
                "# HELP calsync_tuples_never_synced Tracked calendars that never completed a round.\n# TYPE calsync_tuples_never_synced gauge\ncalsync_tuples_never_synced {}",
                h.never
            );
        }
        Err(e) => {
            let _ = writeln!(
                out,
                "# calsync: cannot read sync lags: {}",
                escape(&e.to_string())
            );
        }
    }
    // Per-calendar series only when asked for (metrics.mailbox_labels = name or hash):
    // labelled by the tuple's name or a hash of it, never by the mailbox itself (a UPN is
    // personal data, and metrics leave the host).
    let labels = s.metric_labels();
    if labels != crate::config::MetricLabels::None {
        if let Ok(rows) = store.tuple_health().await {
            let _ = writeln!(
                out,
                "# HELP calsync_tuple_sync_lag_seconds Seconds since the calendar last completed a round (absent: never).\n# TYPE calsync_tuple_sync_lag_seconds gauge"
            );
            let now = Utc::now();
            for r in &rows {
                if let (Some(t), Some(tuple)) = (
                    r.last_success_at,
                    labels.label(&r.tuple_key, s.label_salt()),
                ) {
                    let lag = (now - t).num_milliseconds().max(0) as f64 / 1000.0;
                    let _ = writeln!(
                        out,
                        "calsync_tuple_sync_lag_seconds{{tuple=\"{}\"}} {lag}",
                        escape(&tuple)
                    );
                }
            }
        }
    }
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        out,
    )
        .into_response()
}

async fn reload(State(s): State<Arc<Shared>>, headers: axum::http::HeaderMap) -> Response {
    if !s.admin_enabled() {
        return (
            StatusCode::FORBIDDEN,
            axum::Json(json!({"reloaded": false,
                "error": "POST /reload is off: set http.admin_token_file (or send SIGHUP)"})),
        )
            .into_response();
    }
    let presented = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    if !s.admin_authorized(presented) {
        return (
            StatusCode::UNAUTHORIZED,
            [(header::WWW_AUTHENTICATE, "Bearer")],
            axum::Json(json!({"reloaded": false, "error": "a valid bearer token is required"})),
        )
            .into_response();
    }
    match s.request_reload().await {
        Ok(a) => (
            StatusCode::OK,
            axum::Json(
                json!({"reloaded": true, "added": a.added, "removed": a.removed,
                "retimed": a.retimed, "restarted": a.restarted}),
            ),
        )
            .into_response(),
        Err(e) => (
            StatusCode::BAD_REQUEST,
            axum::Json(json!({"reloaded": false, "error": e})),
        )
            .into_response(),
    }
}
