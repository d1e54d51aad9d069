-- calsync schema v6: moving a window (a rolling window re-based, a reload that changed it)
-- without a gap or a mix. While the first round of a tuple's new window runs, the read model
-- keeps serving the old one: the rows that round adds are pending (hidden), the rows it leaves
-- are kept. Its last page makes the switch: pending rows show, rows of the old window that the
-- new one does not hold are swept, and the served window becomes the new one, in one
-- transaction. Append-only: never edit this file once released.

-- The window the tuple's rows are a complete mirror of: set by the last page of each full
-- round. NULL until a tuple's first round completes (its rows then show page by page).
ALTER TABLE sync_tuples ADD COLUMN served_start timestamptz;
ALTER TABLE sync_tuples ADD COLUMN served_end timestamptz;
UPDATE sync_tuples SET served_start = link_window_start, served_end = link_window_end
 WHERE link_kind = 'delta' OR NOT round_is_full;

-- A row the first round of a new window added: hidden until that round's last page.
-- (A constant default: no table rewrite.)
ALTER TABLE events ADD COLUMN pending boolean NOT NULL DEFAULT false;

-- Read model v5: calendar_events shows the served window's rows (never pending ones) and says
-- which window they are; calendar_sync_status gains the served window beside the configured.
CREATE OR REPLACE VIEW calendar_events AS
SELECT t.tuple_key,
       t.user_id,
       t.calendar_id,
       COALESCE(t.served_start, t.window_start) AS window_start,
       COALESCE(t.served_end, t.window_end) AS window_end,
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
       e.quarantined,
       t.deployment
FROM events e
JOIN sync_tuples t ON t.id = e.tuple_id
LEFT JOIN series s ON s.tuple_id = e.tuple_id AND s.master_id = e.series_master_id
WHERE t.tracked AND NOT e.pending;

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
         AS incomplete_count,
       t.deployment,
       (SELECT r.replica FROM mailbox_leases l JOIN replicas r
                ON r.deployment = l.deployment AND r.incarnation = l.owner
         WHERE l.deployment = t.deployment AND l.mailbox = t.mailbox AND r.expires_at > now())
         AS owner,
       t.served_start AS served_window_start,
       t.served_end AS served_window_end
FROM sync_tuples t;
