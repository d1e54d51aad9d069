-- The change feed (issue 25), its third part: a change's row without the payload is stored as
-- a row of its own type (`fields`) instead of jsonb (`data`). Building the jsonb was most of
-- the CPU a change cost its page transaction, and its keys, repeated in every change, half of
-- the WAL (scripts/feed-row-cost.sql on a benchmark's events: 878 bytes of WAL and 7-9 µs a
-- change with jsonb, 418 bytes and 5 µs with the row; BENCHMARKS.md). The jsonb is built when the change is read, by
-- calsync_change_data, off the page transaction's path. With changes.payload, changes still
-- carry their row as jsonb in `data` (with the payload, which has no fixed shape).
--
-- The type's attributes are calendar_events' columns but the calendar's (beside the change),
-- the event id (a column of the change) and the payload, in the view's order; calsync-store's
-- changes.rs builds each from the event and its series as the view does, and a test keeps the
-- two equal. A column added to the view is added here too (ALTER TYPE ... ADD ATTRIBUTE).
CREATE TYPE calendar_change_row AS (
    ical_uid                 text,
    subject                  text,
    start_at                 timestamptz,
    end_at                   timestamptz,
    is_all_day               boolean,
    event_type               text,
    series_master_id         text,
    last_modified_at         timestamptz,
    is_cancelled             boolean,
    start_date               date,
    end_date                 date,
    organizer_email          text,
    location                 text,
    show_as                  text,
    online_meeting_url       text,
    original_start_time_zone text,
    time_error               text,
    quarantined              text
);

ALTER TABLE calendar_changes ADD COLUMN fields calendar_change_row;

-- A change's row as calendar_events shows it, as jsonb: `data` where the change carries it
-- (the payload on, or written by an earlier release), else built from `fields`; NULL for a
-- delete.
CREATE FUNCTION calsync_change_data(data jsonb, fields calendar_change_row, event_id text)
RETURNS jsonb LANGUAGE sql STABLE AS $$
    SELECT COALESCE(data, to_jsonb(fields) || jsonb_build_object('event_id', event_id))
$$;

-- As in 0010_change_feed.sql, with `data` read through calsync_change_data.
CREATE OR REPLACE FUNCTION calsync_changes(after text, max_rows integer DEFAULT 1000)
RETURNS TABLE (cursor text, deployment text, tuple_key text, user_id text, calendar_id text,
               event_id text, op text, cause text, data jsonb, written_at timestamptz)
LANGUAGE plpgsql STABLE AS $$
DECLARE
    from_txid bigint := -1;
    from_seq  bigint := -1;
    kept      calendar_changes_trimmed;
BEGIN
    IF COALESCE(after, '') <> '' THEN
        IF after !~ '^[0-9]{1,18}\.[0-9]{1,18}$' THEN
            RAISE EXCEPTION 'calsync_changes: "%" is not a cursor (a cursor is what an earlier row''s cursor column said)', after
                USING ERRCODE = '22023';
        END IF;
        from_txid := split_part(after, '.', 1)::bigint;
        from_seq := split_part(after, '.', 2)::bigint;
        SELECT * INTO kept FROM calendar_changes_trimmed;
        IF FOUND AND (from_txid, from_seq) < (kept.txid, kept.seq) THEN
            RAISE EXCEPTION 'calsync_changes: cursor % is expired: the changes after it were deleted by retention on %; read the snapshot (calsync_snapshot()) and follow from its cursor', after, kept.trimmed_at
                USING ERRCODE = 'CS410';
        END IF;
    END IF;
    RETURN QUERY
    SELECT c.txid || '.' || c.seq, c.deployment, c.tuple_key, c.user_id, c.calendar_id,
           c.event_id, c.op, c.cause, calsync_change_data(c.data, c.fields, c.event_id), c.written_at
    FROM calendar_changes c
    WHERE (c.txid, c.seq) > (from_txid, from_seq)
      AND c.txid < txid_snapshot_xmin(txid_current_snapshot())
    ORDER BY c.txid, c.seq
    LIMIT GREATEST(max_rows, 0);
END
$$;
