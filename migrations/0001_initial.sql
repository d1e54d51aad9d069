-- calsync schema v1. Migrations are append-only: never edit this file once released.

-- One row per tracked (user, calendar, window) tuple: its identity and its sync state.
CREATE TABLE sync_tuples (
    id                  bigserial PRIMARY KEY,
    tuple_key           text        NOT NULL UNIQUE,
    user_id             text        NOT NULL,
    calendar_id         text        NOT NULL,
    window_start        timestamptz NOT NULL,
    window_end          timestamptz NOT NULL,
    tracked             boolean     NOT NULL DEFAULT true,
    -- The newest link Graph gave us, and what it was made for (links are bound to a window).
    link                text,
    link_kind           text CHECK (link_kind IN ('next', 'delta')),
    link_user_id        text,
    link_calendar_id    text,
    link_window_start   timestamptz,
    link_window_end     timestamptz,
    -- Bumped with every committed page: a writer holding an older value lost a race.
    link_version        bigint      NOT NULL DEFAULT 0,
    -- Number of the current (or last) full round; rows seen in it carry it in seen_round.
    full_round          bigint      NOT NULL DEFAULT 0,
    round_is_full       boolean     NOT NULL DEFAULT true,
    round_started_at    timestamptz,
    round_pages         integer     NOT NULL DEFAULT 0,
    last_success_at     timestamptz,
    last_full_sync_at   timestamptz,
    last_attempt_at     timestamptz,
    state               text        NOT NULL DEFAULT 'pending'
                        CHECK (state IN ('pending', 'ok', 'retrying', 'degraded', 'failed')),
    last_error          text,
    last_error_code     text,
    consecutive_failures integer    NOT NULL DEFAULT 0,
    created_at          timestamptz NOT NULL DEFAULT now(),
    updated_at          timestamptz NOT NULL DEFAULT now()
);

-- The mirrored instances of each tuple's window.
CREATE TABLE events (
    tuple_id         bigint      NOT NULL REFERENCES sync_tuples (id) ON DELETE CASCADE,
    event_id         text        NOT NULL,
    ical_uid         text,
    subject          text,
    start_at         timestamptz,
    end_at           timestamptz,
    is_all_day       boolean,
    event_type       text,
    series_master_id text,
    last_modified_at timestamptz,
    change_key       text,
    payload          jsonb       NOT NULL,
    seen_round       bigint      NOT NULL,
    synced_at        timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tuple_id, event_id)
);

CREATE INDEX events_by_tuple_and_start ON events (tuple_id, start_at);

-- Read model (public API): the live instances of every tracked window.
CREATE VIEW calendar_events AS
SELECT t.tuple_key,
       t.user_id,
       t.calendar_id,
       t.window_start,
       t.window_end,
       e.event_id,
       e.ical_uid,
       e.subject,
       e.start_at,
       e.end_at,
       e.is_all_day,
       e.event_type,
       e.series_master_id,
       e.last_modified_at,
       e.payload
FROM events e
JOIN sync_tuples t ON t.id = e.tuple_id
WHERE t.tracked;

-- Read model (public API): how each tuple's sync is doing.
CREATE VIEW calendar_sync_status AS
SELECT t.tuple_key,
       t.user_id,
       t.calendar_id,
       t.window_start,
       t.window_end,
       t.tracked,
       CASE WHEN t.round_is_full AND t.link_kind IS DISTINCT FROM 'delta' THEN 'initial' ELSE 'incremental' END AS phase,
       t.state,
       t.last_success_at,
       t.last_full_sync_at,
       t.last_attempt_at,
       t.last_error,
       t.last_error_code,
       t.consecutive_failures,
       (SELECT count(*) FROM events e WHERE e.tuple_id = t.id) AS event_count
FROM sync_tuples t;
