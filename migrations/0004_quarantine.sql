-- calsync schema v4: an item PostgreSQL refuses even after repair is kept as a quarantined row
-- (its id, type and series, the reason) so that the rest of its page commits. Append-only.
ALTER TABLE events ADD COLUMN quarantined text;

-- Read model v3: the status view counts quarantined rows as incomplete.
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
                OR e.quarantined IS NOT NULL
                OR (e.event_type = 'occurrence' AND e.subject IS NULL
                    AND NOT EXISTS (SELECT 1 FROM series s
                                     WHERE s.tuple_id = e.tuple_id AND s.master_id = e.series_master_id))))
         AS incomplete_count
FROM sync_tuples t;

-- Read model v3: calendar_events gains the reason a row is quarantined (NULL for whole rows).
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
       e.time_error,
       e.quarantined
FROM events e
JOIN sync_tuples t ON t.id = e.tuple_id
LEFT JOIN series s ON s.tuple_id = e.tuple_id AND s.master_id = e.series_master_id
WHERE t.tracked;
