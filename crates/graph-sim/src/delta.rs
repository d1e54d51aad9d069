//! calendarView delta: the sync-state cache, rounds frozen at their start, pages cut by
//! `odata.maxpagesize`, and the documented and observed quirks behind switches.
//!
//! A round lists either every instance in the window (initial) or what changed since the
//! delta token (incremental: new or changed instances in full, `@removed` for instances that
//! left the window, and `@removed` for events changed outside the window, as the docs say).
//! The round's content is fixed when it starts; changes made while it is paged show up in the
//! next round. Rounds and delta states share one cache that evicts oldest first, as Outlook's
//! delta-token cache does; an evicted entry answers 410 `SyncStateNotFound`.

use crate::behaviour::Behaviour;
use crate::error::GraphError;
use crate::model::{Instance, InstanceKind, Render, Tenant, Window, parse_occurrence_id};
use crate::token::{TokenBody, TokenCodec, TokenError, TokenKind};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;

/// Switches for service behaviour users have reported (graph-delta-notes.md §7).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Quirks {
    /// Empty pages (`"value": []` with a nextLink) served at the start of every round.
    pub empty_pages: u16,
    /// The last item of each page is served again at the top of the next page.
    pub duplicate_across_pages: bool,
    /// A series is never split across pages, so its page may exceed `maxpagesize`.
    pub oversize_series_pages: bool,
    /// After an oversized page the nextLinks return that same page forever (each with a new
    /// skiptoken) and the round never reaches its deltaLink.
    pub endless_next_link: bool,
    /// Serve nextLinks and deltaLinks on this origin (`http://host:port`) instead of the
    /// simulator's own, as a misconfigured proxy or a hostile server might; a client must
    /// refuse to follow them.
    pub link_origin: Option<String>,
    /// Delta requests inside a `$batch` are answered 400 while the same requests sent alone are
    /// served. Graph documents neither (notes §6); this is the service a client must survive if
    /// it turns out not to route them.
    pub no_delta_in_batch: bool,
}

/// What the client asked for on one delta request.
#[derive(Clone, Debug, Default)]
pub struct DeltaRequest {
    /// `startDateTime`/`endDateTime`, when given.
    pub window: Option<Window>,
    /// `$skiptoken`: the round continues.
    pub skip_token: Option<String>,
    /// `$deltatoken`: a new round from a delta state.
    pub delta_token: Option<String>,
    /// `Prefer: odata.maxpagesize`.
    pub max_page_size: Option<usize>,
    /// The zone times are rendered in (`Prefer: outlook.timezone`).
    pub render: Render,
}

impl Default for Render {
    fn default() -> Self {
        Render::utc()
    }
}

#[derive(Debug, Default)]
struct Snapshot(HashMap<String, u64>);

#[derive(Debug)]
struct DeltaState {
    user: usize,
    calendar: usize,
    window: Window,
    seq: u64,
    snapshot: Arc<Snapshot>,
}

/// One entry of a round, serialized once when the round starts: pages splice these bytes
/// instead of cloning and re-serializing JSON trees (bodies can be 100 KB).
#[derive(Debug)]
struct RoundItem {
    group: Option<String>,
    json: Arc<str>,
}

fn item(group: Option<String>, value: &Value) -> RoundItem {
    RoundItem {
        group,
        json: Arc::from(serde_json::to_string(value).unwrap_or_else(|_| "{}".into())),
    }
}

#[derive(Debug)]
struct Round {
    user: usize,
    calendar: usize,
    window: Window,
    items: Vec<RoundItem>,
    highest_page: u32,
    delta_state: u64,
}

#[derive(Debug)]
enum Entry {
    State(Arc<DeltaState>),
    Round(Round),
}

/// One page of a round, ready to render: each entry is one serialized item.
#[derive(Debug)]
pub struct Page {
    /// The page's items, each already serialized.
    pub value: Vec<Arc<str>>,
    /// The link the page ends with.
    pub link: PageLink,
}

/// The link a page ends with, as a token the cache can resolve.
#[derive(Debug, PartialEq, Eq)]
pub enum PageLink {
    /// More pages: a `$skiptoken`.
    Next(String),
    /// The round is complete: a `$deltatoken`.
    Delta(String),
}

/// Outlook's delta sync-state cache: rounds in progress and delta states, oldest evicted first.
#[derive(Debug)]
pub struct SyncCache {
    entries: BTreeMap<u64, Entry>,
    next_id: u64,
    /// Entries kept before the oldest is evicted.
    pub capacity: usize,
    codec: TokenCodec,
    /// Page size when the client asks for none.
    pub default_page_size: usize,
    /// Reported service misbehaviour to reproduce.
    pub quirks: Quirks,
    /// Entries evicted so far.
    pub evictions: u64,
}

impl SyncCache {
    /// An empty cache whose tokens are sealed with a key derived from `seed`.
    pub fn new(seed: u64, capacity: usize, default_page_size: usize) -> Self {
        SyncCache {
            entries: BTreeMap::new(),
            next_id: 1,
            capacity: capacity.max(2),
            codec: TokenCodec::new(seed),
            default_page_size: default_page_size.max(1),
            quirks: Quirks::default(),
            evictions: 0,
        }
    }

    fn insert(&mut self, e: Entry) -> u64 {
        let id = self.next_id;
        self.next_id += 1;
        self.entries.insert(id, e);
        while self.entries.len() > self.capacity {
            self.entries.pop_first();
            self.evictions += 1;
        }
        id
    }

    /// Drops every sync state (all users, or one), so the next request with any of their
    /// tokens answers 410 `SyncStateNotFound`. Returns how many entries went.
    pub fn evict(&mut self, user: Option<usize>) -> usize {
        let before = self.entries.len();
        self.entries.retain(|_, e| match (user, e) {
            (None, _) => false,
            (Some(u), Entry::State(s)) => s.user != u,
            (Some(u), Entry::Round(r)) => r.user != u,
        });
        let n = before - self.entries.len();
        self.evictions += n as u64;
        n
    }

    /// Entries held now.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// No entries held.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Serves one delta request on `(user, calendar)`. `link_base` is the absolute URL of the
    /// path the client used, without a query: links are that plus a token.
    pub fn serve(
        &mut self,
        tenant: &Tenant,
        behaviour: &Behaviour,
        user: usize,
        calendar: usize,
        req: &DeltaRequest,
        link_base: &str,
    ) -> Result<Page, GraphError> {
        let page_size = req.max_page_size.unwrap_or(self.default_page_size).max(1);
        if let Some(tok) = &req.skip_token {
            let body = self.decode(tok, TokenKind::Skip, behaviour)?;
            self.check_binding(&body, user, calendar, req.window)?;
            return self.page(body, page_size, link_base);
        }
        let (window, previous) = match &req.delta_token {
            Some(tok) => {
                let body = self.decode(tok, TokenKind::Delta, behaviour)?;
                self.check_binding(&body, user, calendar, req.window)?;
                match self.entries.get(&body.entry) {
                    Some(Entry::State(s)) => (s.window, Some(Arc::clone(s))),
                    _ => return Err(not_found(&body, None)),
                }
            }
            None => {
                let window = req.window.ok_or_else(|| {
                    GraphError::invalid_parameter(
                        "This request requires a time window specified by the query string \
                         parameters StartDateTime and EndDateTime.",
                    )
                })?;
                (window, None)
            }
        };
        let round = self.start_round(
            tenant,
            behaviour,
            &req.render,
            user,
            calendar,
            window,
            previous.as_deref(),
        );
        let body = TokenBody {
            kind: TokenKind::Skip,
            entry: round,
            offset: 0,
            empties: 0,
            loops: 0,
            page_no: 0,
            window_start: window.start.timestamp(),
            window_end: window.end.timestamp(),
        };
        self.page(body, page_size, link_base)
    }

    fn decode(
        &self,
        tok: &str,
        want: TokenKind,
        behaviour: &Behaviour,
    ) -> Result<TokenBody, GraphError> {
        match self.codec.decode(tok) {
            Ok(b) if b.kind == want => Ok(b),
            // An unreadable token: 400 as reported from production (docs#6599 comments), 410
            // as the documented error table suggests.
            _ if behaviour.bad_token_is_400 => Err(GraphError::new(
                400,
                "InvalidDeltaToken",
                format!(
                    "The value '{}' of parameter '{}' is invalid.",
                    tok,
                    match want {
                        TokenKind::Skip => "$skipToken",
                        TokenKind::Delta => "$deltaToken",
                    }
                ),
            )),
            Ok(_) | Err(TokenError::Malformed) | Err(TokenError::Tampered) => Err(GraphError::new(
                410,
                "SyncStateInvalid",
                "The sync state is invalid: the token could not be read.",
            )),
        }
    }

    /// A token belongs to one (user, calendar, window); using it elsewhere is a client error.
    fn check_binding(
        &self,
        body: &TokenBody,
        user: usize,
        calendar: usize,
        window: Option<Window>,
    ) -> Result<(), GraphError> {
        if let Some(w) = window {
            if w.start.timestamp() != body.window_start || w.end.timestamp() != body.window_end {
                return Err(GraphError::invalid_parameter(
                    "The StartDateTime and EndDateTime of a delta request must match the token's.",
                ));
            }
        }
        let owner = match self.entries.get(&body.entry) {
            Some(Entry::State(s)) => Some((s.user, s.calendar)),
            Some(Entry::Round(r)) => Some((r.user, r.calendar)),
            None => None,
        };
        match owner {
            Some(o) if o != (user, calendar) => Err(GraphError::invalid_parameter(
                "The delta token does not belong to this calendar.",
            )),
            _ => Ok(()),
        }
    }

    #[allow(clippy::too_many_arguments)] // one round's every input
    fn start_round(
        &mut self,
        tenant: &Tenant,
        behaviour: &Behaviour,
        render: &Render,
        user: usize,
        calendar: usize,
        window: Window,
        previous: Option<&DeltaState>,
    ) -> u64 {
        let u = &tenant.users[user];
        let cal = &u.calendars[calendar];
        let mut items = Vec::new();
        let state = match previous {
            // Nothing changed in the calendar: the same snapshot serves the new token.
            Some(prev) if prev.seq == cal.seq => DeltaState {
                user,
                calendar,
                window,
                seq: cal.seq,
                snapshot: Arc::clone(&prev.snapshot),
            },
            _ => {
                let mut instances = cal.instances(&window);
                instances.sort_by(|a, b| {
                    (a.series_master_id().unwrap_or(&a.id), a.start, &a.id).cmp(&(
                        b.series_master_id().unwrap_or(&b.id),
                        b.start,
                        &b.id,
                    ))
                });
                let mut snapshot = HashMap::with_capacity(instances.len());
                let mut present: HashSet<&str> = HashSet::new();
                for inst in &instances {
                    let v = inst.version();
                    snapshot.insert(inst.id.clone(), v);
                    present.insert(inst.series_master_id().unwrap_or(&inst.id));
                    // Outlook lists a series' master (once, ahead of its instances) whenever
                    // one of its instances is in the window, and again whenever the series
                    // changed (keeper.sh #409, #410).
                    if let (true, Some(master)) =
                        (behaviour.list_series_masters, inst.series_master_id())
                    {
                        if !snapshot.contains_key(master) {
                            let mv = inst.event.series_version();
                            snapshot.insert(master.to_owned(), mv);
                            if previous.is_none_or(|p| p.snapshot.0.get(master) != Some(&mv)) {
                                items.push(item(
                                    Some(master.to_owned()),
                                    &inst.event.master_json(render),
                                ));
                            }
                        }
                    }
                    let changed = previous.is_none_or(|p| p.snapshot.0.get(&inst.id) != Some(&v));
                    if changed {
                        items.push(item(
                            inst.series_master_id().map(str::to_owned),
                            &delta_json(inst, behaviour, render),
                        ));
                    }
                }
                if let Some(prev) = previous {
                    let mut gone: Vec<&String> = prev
                        .snapshot
                        .0
                        .keys()
                        .filter(|id| !snapshot.contains_key(*id))
                        .collect();
                    gone.sort();
                    for id in gone {
                        if let Some((master, _)) = parse_occurrence_id(id) {
                            let series_lives = cal.events.contains_key(&master);
                            // A cancelled (or retimed-away) occurrence: only the master changes
                            // (docs PR #4501; closeio/sync-engine #389).
                            if series_lives && behaviour.silent_occurrence_removal {
                                continue;
                            }
                            if !series_lives && !behaviour.removed_series_lists_occurrences {
                                continue;
                            }
                        }
                        items.push(removed(id));
                    }
                    // Documented: changes to events outside the window also arrive as
                    // `@removed` "deleted" (added, updated or deleted since the last round).
                    if let Some(changed) = cal.changed_since(prev.seq) {
                        for id in changed {
                            if !present.contains(id) && !prev.snapshot.0.contains_key(id) {
                                items.push(removed(id));
                            }
                        }
                    }
                }
                DeltaState {
                    user,
                    calendar,
                    window,
                    seq: cal.seq,
                    snapshot: Arc::new(Snapshot(snapshot)),
                }
            }
        };
        let delta_state = self.insert(Entry::State(Arc::new(state)));
        self.insert(Entry::Round(Round {
            user,
            calendar,
            window,
            items,
            highest_page: 0,
            delta_state,
        }))
    }

    fn page(
        &mut self,
        pos: TokenBody,
        page_size: usize,
        link_base: &str,
    ) -> Result<Page, GraphError> {
        let quirks = self.quirks.clone();
        let link_base = match &quirks.link_origin {
            Some(origin) => match link_base
                .find("://")
                .and_then(|i| link_base[i + 3..].find('/').map(|j| i + 3 + j))
            {
                Some(path_at) => format!("{origin}{}", &link_base[path_at..]),
                None => link_base.to_owned(),
            },
            None => link_base.to_owned(),
        };
        let round = match self.entries.get_mut(&pos.entry) {
            Some(Entry::Round(r)) => r,
            _ => return Err(not_found(&pos, None)),
        };
        if pos.page_no < round.highest_page {
            return Err(not_found(&pos, Some(round.highest_page)));
        }
        round.highest_page = pos.page_no;
        let window = round.window;
        let mut next = pos;
        next.page_no += 1;
        if pos.empties < quirks.empty_pages {
            next.empties += 1;
            let link = format!("{link_base}?$skiptoken={}", self.codec.encode(&next));
            return Ok(Page {
                value: Vec::new(),
                link: PageLink::Next(link),
            });
        }
        let items = &round.items;
        let start = (pos.offset as usize).min(items.len());
        let mut end = (start + page_size).min(items.len());
        if quirks.oversize_series_pages {
            while end > start
                && end < items.len()
                && items[end].group.is_some()
                && items[end].group == items[end - 1].group
            {
                end += 1;
            }
        }
        let mut value = Vec::with_capacity(end - start + 1);
        if quirks.duplicate_across_pages && start > 0 && start < items.len() {
            value.push(Arc::clone(&items[start - 1].json));
        }
        value.extend(items[start..end].iter().map(|i| Arc::clone(&i.json)));
        let oversized = end - start > page_size;
        let link = if quirks.endless_next_link && oversized {
            next.loops += 1;
            PageLink::Next(format!(
                "{link_base}?$skiptoken={}",
                self.codec.encode(&next)
            ))
        } else if end == items.len() {
            let delta = TokenBody {
                kind: TokenKind::Delta,
                entry: round.delta_state,
                offset: 0,
                empties: 0,
                loops: 0,
                page_no: 0,
                window_start: window.start.timestamp(),
                window_end: window.end.timestamp(),
            };
            PageLink::Delta(format!(
                "{link_base}?$deltatoken={}",
                self.codec.encode(&delta)
            ))
        } else {
            next.offset = end as u32;
            PageLink::Next(format!(
                "{link_base}?$skiptoken={}",
                self.codec.encode(&next)
            ))
        };
        Ok(Page { value, link })
    }
}

/// An instance as a delta page carries it: occurrences as bare stubs when Outlook's behaviour is
/// on (microsoft-graph-docs #1716, #7632, #22197; keeper.sh #409; OpenWhispr #1665, #1835),
/// everything else in full.
fn delta_json(inst: &Instance<'_>, behaviour: &Behaviour, render: &Render) -> Value {
    if behaviour.stub_occurrences && inst.kind == InstanceKind::Occurrence {
        inst.to_stub_json(render)
    } else {
        inst.to_graph_json(render)
    }
}

fn removed(id: &str) -> RoundItem {
    item(
        None,
        &json!({"@odata.type": "#microsoft.graph.event", "id": id, "@removed": {"reason": "deleted"}}),
    )
}

/// The observed 410 text: "The sync state generation is not found; generation=149;[highest=157]".
fn not_found(body: &TokenBody, highest: Option<u32>) -> GraphError {
    let msg = match highest {
        Some(h) => format!(
            "The sync state generation is not found; generation={};[highest={h}].",
            body.page_no
        ),
        None => format!(
            "The sync state generation is not found; generation={}.",
            body.entry
        ),
    };
    GraphError::sync_state_not_found(msg)
}

/// Renders a page as Graph does: context, then the link, then the values.
pub fn page_json(page: Page, context: &str) -> Vec<u8> {
    let (key, link) = match &page.link {
        PageLink::Next(l) => ("@odata.nextLink", l),
        PageLink::Delta(l) => ("@odata.deltaLink", l),
    };
    let size: usize = page.value.iter().map(|v| v.len() + 1).sum();
    let mut out = Vec::with_capacity(size + context.len() + link.len() + 64);
    out.extend_from_slice(b"{\"@odata.context\":");
    out.extend_from_slice(json!(context).to_string().as_bytes());
    out.extend_from_slice(format!(",\"{key}\":").as_bytes());
    out.extend_from_slice(json!(link).to_string().as_bytes());
    out.extend_from_slice(b",\"value\":[");
    for (i, v) in page.value.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        out.extend_from_slice(v.as_bytes());
    }
    out.extend_from_slice(b"]}");
    out
}
