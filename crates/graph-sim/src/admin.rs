//! graph-sim's `/_sim` admin API: observe the truth and the request log, script faults,
//! evict tokens, move time, edit the directory, act as the user at the device login page.

use crate::behaviour::Behaviour;
use crate::delta::Quirks;
use crate::faults::FaultRule;
use crate::model::Window;
use crate::sim::Sim;
use serde_json::{Value, json};

fn query_map(query: &str) -> std::collections::HashMap<String, String> {
    url::form_urlencoded::parse(query.as_bytes())
        .into_owned()
        .collect()
}

/// `/_sim/…`: observe the truth and the request log, script faults, evict tokens, move time.
pub(crate) fn admin(sim: &Sim, method: &str, rest: &str, query: &str, body: &[u8]) -> (u16, Value) {
    let q = query_map(query);
    let bad = |m: String| (400, json!({"error": m}));
    match (method, rest.trim_end_matches('/')) {
        ("GET", "truth") => {
            let (Some(user), Some(start), Some(end)) =
                (q.get("user"), q.get("start"), q.get("end"))
            else {
                return bad(
                    "truth needs user, start and end (RFC 3339), and optionally calendar".into(),
                );
            };
            let parse = |s: &String| {
                chrono::DateTime::parse_from_rfc3339(s).map(|t| t.with_timezone(&chrono::Utc))
            };
            let (Ok(start), Ok(end)) = (parse(start), parse(end)) else {
                return bad("start and end must be RFC 3339 instants".into());
            };
            let cal = q.get("calendar").map_or("default", String::as_str);
            match sim.lock().truth(user, cal, Window { start, end }) {
                Some(items) => (200, json!(items)),
                None => (404, json!({"error": "no such user or calendar"})),
            }
        }
        ("GET", "users") => {
            let st = sim.lock();
            let users: Vec<Value> = st.tenant.users.iter().map(|u| json!({
                "id": u.id, "userPrincipalName": u.upn, "displayName": u.display_name,
                "calendars": u.calendars.iter().map(|c| json!({"id": c.id, "name": c.name, "isDefaultCalendar": c.is_default, "events": c.events.len()})).collect::<Vec<_>>(),
            })).collect();
            (200, json!(users))
        }
        ("GET", "requests") => (200, json!(sim.lock().requests())),
        ("GET", "violations") => (200, json!(sim.lock().violations())),
        ("GET", "stats") => (200, json!(sim.lock().stats())),
        ("POST", "faults") => match serde_json::from_slice::<FaultRule>(body) {
            Ok(rule) => {
                sim.lock().faults.push(rule);
                (201, json!({"ok": true}))
            }
            Err(e) => bad(format!("invalid fault rule: {e}")),
        },
        ("GET", "faults") => (200, json!(sim.lock().faults)),
        ("DELETE", "faults") => {
            sim.lock().faults.clear();
            (200, json!({"ok": true}))
        }
        (m, path)
            if path == "push"
                || path.starts_with("push/")
                || path.starts_with("subscriptions/") =>
        {
            match sim.admin_push(m, path, &q, body) {
                Some((status, v)) => (status, v),
                None => (404, json!({"error": "no such admin route"})),
            }
        }
        ("GET", "behaviour") => (200, json!(sim.lock().behaviour)),
        ("PUT", "behaviour") => match serde_json::from_slice::<Behaviour>(body) {
            Ok(b) => {
                sim.lock().behaviour = b;
                (200, json!({"ok": true}))
            }
            Err(e) => bad(format!("invalid behaviour: {e}")),
        },
        ("PUT", "quirks") => match serde_json::from_slice::<Quirks>(body) {
            Ok(quirks) => {
                sim.lock().cache.quirks = quirks;
                (200, json!({"ok": true}))
            }
            Err(e) => bad(format!("invalid quirks: {e}")),
        },
        ("POST", "evict") => {
            let mut st = sim.lock();
            let user = match q.get("user") {
                Some(k) => match st.tenant.user_index(k) {
                    Some(u) => Some(u),
                    None => return (404, json!({"error": "no such user"})),
                },
                None => None,
            };
            let n = st.cache.evict(user);
            (200, json!({"evicted": n}))
        }
        ("POST", "churn") => {
            // Random realistic edits (churn::random_edit) over every mailbox's default
            // calendar, aimed at a window: what a benchmark's churn round replays. The i-th
            // edit goes to mailbox (offset + i) mod users.
            let n = q.get("edits").and_then(|v| v.parse::<usize>().ok());
            let offset = q
                .get("offset")
                .and_then(|v| v.parse::<usize>().ok())
                .unwrap_or(0);
            let seed = q
                .get("seed")
                .and_then(|v| v.parse::<u64>().ok())
                .unwrap_or(1);
            let parse = |k: &str| {
                q.get(k)
                    .and_then(|s| chrono::DateTime::parse_from_rfc3339(s).ok())
                    .map(|t| t.with_timezone(&chrono::Utc))
            };
            let (Some(n), Some(start), Some(end)) = (n, parse("start"), parse("end")) else {
                return bad(
                    "churn needs edits=<n>, start and end (RFC 3339), optionally seed".into(),
                );
            };
            let window = Window { start, end };
            let mut rng = <rand::rngs::StdRng as rand::SeedableRng>::seed_from_u64(seed);
            let mut st = sim.lock();
            let users = st.tenant.users.len();
            let mut done: std::collections::BTreeMap<&'static str, u64> = Default::default();
            for i in 0..n {
                if users == 0 {
                    break;
                }
                if let Some(e) = crate::churn::random_edit(
                    &mut st.tenant,
                    &mut rng,
                    (offset + i) % users,
                    0,
                    &window,
                ) {
                    *done.entry(e.label()).or_default() += 1;
                }
            }
            (200, json!(done))
        }
        ("POST", "organizer-cancel") => {
            let mut st = sim.lock();
            let (Some(u), Some(id)) = (
                q.get("user").and_then(|u| st.tenant.user_index(u)),
                q.get("id"),
            ) else {
                return bad("organizer-cancel needs user and id".into());
            };
            match st.tenant.cancel_by_organizer(u, None, id) {
                Ok(()) => (200, json!({"ok": true})),
                Err(e) => (e.status, json!({"error": e.message})),
            }
        }
        // The directory, as an administrator changes it (discovery tests, the demo).
        ("POST", "users") => {
            let Some(upn) = q.get("upn") else {
                return bad("users needs upn, optionally name, department and mailbox=user|room|none|on_premises".into());
            };
            let kind = match q.get("mailbox").map_or("user", String::as_str) {
                "user" => crate::model::MailboxKind::User,
                "room" => crate::model::MailboxKind::Room,
                "none" => crate::model::MailboxKind::None,
                "on_premises" => crate::model::MailboxKind::OnPremises,
                other => {
                    return bad(format!(
                        "mailbox '{other}' is not one of user, room, none, on_premises"
                    ));
                }
            };
            let mut st = sim.lock();
            if st.tenant.user_index(upn).is_some() {
                return (409, json!({"error": "the user exists"}));
            }
            let name = q
                .get("name")
                .map_or(upn.as_str(), String::as_str)
                .to_owned();
            let u = st.tenant.add_directory_user(
                upn,
                &name,
                kind,
                q.get("department").map(String::as_str),
            );
            (201, json!({"id": st.tenant.users[u].id}))
        }
        ("DELETE", "users") => {
            let mut st = sim.lock();
            match q.get("user").and_then(|k| st.tenant.user_index(k)) {
                Some(u) => {
                    st.tenant.delete_user(u);
                    (200, json!({"ok": true}))
                }
                None => (404, json!({"error": "no such user"})),
            }
        }
        ("POST", "groups") => {
            let mut st = sim.lock();
            let mut members = Vec::new();
            for m in q
                .get("members")
                .map(|m| m.split(',').filter(|x| !x.is_empty()).collect::<Vec<_>>())
                .unwrap_or_default()
            {
                match st.tenant.user_index(m) {
                    Some(u) => members.push(u),
                    None => return (404, json!({"error": format!("no such user {m}")})),
                }
            }
            let g = st.tenant.add_group(
                q.get("name").map_or("group", String::as_str),
                members,
                Vec::new(),
            );
            (201, json!({"id": st.tenant.groups[g].id}))
        }
        (m @ ("POST" | "DELETE"), "groups/members") => {
            let mut st = sim.lock();
            let g = q.get("group").and_then(|g| st.tenant.group_index(g));
            let u = q.get("user").and_then(|u| st.tenant.user_index(u));
            let (Some(g), Some(u)) = (g, u) else {
                return (
                    404,
                    json!({"error": "groups/members needs an existing group and user"}),
                );
            };
            let users = &mut st.tenant.groups[g].users;
            if m == "POST" {
                if !users.contains(&u) {
                    users.push(u);
                }
            } else {
                users.retain(|x| *x != u);
            }
            (200, json!({"ok": true}))
        }
        (m @ ("POST" | "PATCH" | "DELETE"), "calendars") => {
            let mut st = sim.lock();
            let Some(u) = q.get("user").and_then(|u| st.tenant.user_index(u)) else {
                return (404, json!({"error": "no such user"}));
            };
            match (m, q.get("id"), q.get("name")) {
                ("POST", _, Some(name)) => {
                    let id = st.tenant.add_calendar(u, name);
                    (201, json!({"id": id}))
                }
                ("PATCH", Some(id), Some(name)) if st.tenant.rename_calendar(u, id, name) => {
                    (200, json!({"ok": true}))
                }
                ("DELETE", Some(id), _) if st.tenant.delete_calendar(u, id) => {
                    (200, json!({"ok": true}))
                }
                ("POST", _, None) => bad("POST calendars needs user and name".into()),
                _ => (
                    404,
                    json!({"error": "no such calendar (or it is the default one)"}),
                ),
            }
        }
        ("POST", "expire-tokens") => {
            let mut st = sim.lock();
            let now = st.tenant.now();
            st.auth.expire_all(now);
            (200, json!({"ok": true}))
        }
        ("POST", "clock/advance") => match q.get("seconds").and_then(|s| s.parse::<i64>().ok()) {
            Some(s) => {
                sim.clock().advance(chrono::Duration::seconds(s));
                (200, json!({"now": sim.clock().now()}))
            }
            None => bad("clock/advance needs seconds=<integer>".into()),
        },
        ("POST", "delegated-token") => {
            match q.get("user").and_then(|u| sim.lock().delegated_token(u)) {
                Some(t) => (200, json!({"access_token": t})),
                None => (404, json!({"error": "no such user"})),
            }
        }
        // What the user does in a browser at https://microsoft.com/devicelogin.
        ("POST", "device-code/approve") => {
            let (Some(code), Some(user)) = (q.get("user_code"), q.get("user")) else {
                return bad("device-code/approve needs user_code and user".into());
            };
            if sim.lock().approve_device_code(code, user) {
                (200, json!({"approved": code}))
            } else {
                (404, json!({"error": "no such pending code or user"}))
            }
        }
        // A password change or revoked consent: the user's refresh tokens answer
        // invalid_grant with AADSTS50173 or 65001 from now on.
        ("POST", "refresh-tokens/revoke") => {
            let why = match q.get("why").map(String::as_str) {
                Some("password") | None => crate::delegated::Revocation::PasswordChanged,
                Some("consent") => crate::delegated::Revocation::ConsentRevoked,
                Some(other) => {
                    return bad(format!("why={other}: password or consent"));
                }
            };
            let Some(user) = q.get("user") else {
                return bad("refresh-tokens/revoke needs user".into());
            };
            let mut st = sim.lock();
            match st.tenant.user_index(user) {
                Some(u) => {
                    st.auth.delegated.revoke(u, why);
                    (200, json!({"revoked": user, "why": format!("{why:?}")}))
                }
                None => (404, json!({"error": "no such user"})),
            }
        }
        _ => (
            404,
            json!({"error": format!("no admin endpoint {method} /_sim/{rest}")}),
        ),
    }
}
