-- calsync schema v2: series masters kept beside their instances, and the read-model columns a
-- business calendar needs. Append-only: never edit this file once released.
--
-- Outlook sends occurrences of a series as bare stubs (id, type, seriesMasterId, start, end) and
-- lists the series master instead (graph-delta-notes.md 1.7a). A master is series data, never an
-- instance: it lives here, and the read model lays it under each of its occurrences, so a rename
-- of the series reaches every occurrence by changing one row.
CREATE TABLE series (
    tuple_id                 bigint      NOT NULL REFERENCES sync_tuples (id) ON DELETE CASCADE,
    master_id                text        NOT NULL,
    ical_uid                 text,
    subject                  text,
    is_all_day               boolean,
    is_cancelled             boolean,
    organizer_email          text,
    location                 text,
    show_as                  text,
    online_meeting_url       text,
    original_start_time_zone text,
    last_modified_at         timestamptz,
    change_key               text,
    payload                  jsonb       NOT NULL,
    seen_round               bigint      NOT NULL,
    synced_at                timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tuple_id, master_id)
);

ALTER TABLE events
    ADD COLUMN is_cancelled             boolean,
    -- The date part of start and end as Graph wrote them: an all-day event's floating dates.
    ADD COLUMN start_date               date,
    ADD COLUMN end_date                 date,
    ADD COLUMN organizer_email          text,
    ADD COLUMN location                 text,
    ADD COLUMN show_as                  text,
    ADD COLUMN online_meeting_url       text,
    ADD COLUMN original_start_time_zone text,
    -- Why start/end could not be read (an unknown time zone): the row is kept and counted as
    -- incomplete rather than guessed at.
    ADD COLUMN time_error               text;

CREATE INDEX events_by_series ON events (tuple_id, series_master_id)
    WHERE series_master_id IS NOT NULL;

-- Read model (public API), v2: the v1 columns unchanged in name, type and order; an occurrence
-- shows its series' fields wherever it has none of its own; new columns appended.
CREATE OR REPLACE VIEW calendar_events AS
SELECT t.tuple_key,
       t.user_id,
       t.calendar_id,
       t.window_start,
       t.window_end,
       e.event_id,
       e.ical_uid,
       COALESCE(e.subject, s.subject) AS subject,
       e.start_at,
       e.end_at,
       COALESCE(e.is_all_day, s.is_all_day) AS is_all_day,
       e.event_type,
       e.series_master_id,
       COALESCE(e.last_modified_at, s.last_modified_at) AS last_modified_at,
       CASE WHEN s.payload IS NULL THEN e.payload
            ELSE (s.payload - 'recurrence' - '@odata.context' - '@odata.etag' - 'changeKey') || e.payload
       END AS payload,
       COALESCE(e.is_cancelled, s.is_cancelled, false) AS is_cancelled,
       CASE WHEN COALESCE(e.is_all_day, s.is_all_day) THEN e.start_date END AS start_date,
       CASE WHEN COALESCE(e.is_all_day, s.is_all_day) THEN e.end_date END AS end_date,
       COALESCE(e.organizer_email, s.organizer_email) AS organizer_email,
       COALESCE(e.location, s.location) AS location,
       COALESCE(e.show_as, s.show_as) AS show_as,
       COALESCE(e.online_meeting_url, s.online_meeting_url) AS online_meeting_url,
       COALESCE(e.original_start_time_zone, s.original_start_time_zone) AS original_start_time_zone,
       e.time_error
FROM events e
JOIN sync_tuples t ON t.id = e.tuple_id
LEFT JOIN series s ON s.tuple_id = e.tuple_id AND s.master_id = e.series_master_id
WHERE t.tracked;

-- Read model (public API), v2: gains the count of rows that are not whole yet (a time that could
-- not be read, or an occurrence stub whose series is not stored).
CREATE OR REPLACE VIEW calendar_sync_status AS
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
       (SELECT count(*) FROM events e WHERE e.tuple_id = t.id) AS event_count,
       (SELECT count(*) FROM events e
         WHERE e.tuple_id = t.id
           AND (e.time_error IS NOT NULL
                OR (e.event_type = 'occurrence' AND e.subject IS NULL
                    AND NOT EXISTS (SELECT 1 FROM series s
                                     WHERE s.tuple_id = e.tuple_id AND s.master_id = e.series_master_id))))
         AS incomplete_count
FROM sync_tuples t;
