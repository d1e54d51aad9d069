-- The change feed (issue 25), its second part: what writes it and what reads it beyond the
-- cursor of 0009_changes.sql. The page transaction writes calendar_changes as its last
-- statement (calsync-store's changes.rs), registration when it hides or shows a calendar's rows.
--
-- A change's `data` is the row as calendar_events shows it; with changes.payload, ~5 kB of
-- JSON for an occurrence (the master's payload laid under it). lz4 compresses it several times
-- faster than pglz, the default (BENCHMARKS.md, issue 25); PostgreSQL 14+ built with lz4 only,
-- else the default stays.
DO $$
BEGIN
    IF current_setting('server_version_num')::int >= 140000 THEN
        BEGIN
            EXECUTE 'ALTER TABLE calendar_changes ALTER COLUMN data SET COMPRESSION lz4';
        EXCEPTION WHEN feature_not_supported OR invalid_parameter_value THEN
            RAISE NOTICE 'calendar_changes.data: lz4 is not available, pglz stays';
        END;
    END IF;
END
$$;

-- The change feed's lock of a deployment: a page transaction takes it shared, registration
-- (which untracks, re-tracks and re-points calendars) exclusive, as the first thing each does,
-- so no transaction writing a deployment's changes gets its id while another that could
-- change the same calendars' rows runs (see above). NULL: no feed, no lock. Returns true.
CREATE FUNCTION calsync_feed_lock(deployment text, exclusive boolean)
RETURNS boolean LANGUAGE plpgsql VOLATILE AS $$
BEGIN
    IF deployment IS NULL THEN
        RETURN true;
    END IF;
    IF exclusive THEN
        PERFORM pg_advisory_xact_lock(hashtextextended('calsync_changes:' || deployment, 0));
    ELSE
        PERFORM pg_advisory_xact_lock_shared(hashtextextended('calsync_changes:' || deployment, 0));
    END IF;
    RETURN true;
END
$$;

-- Retention's mark (changes.retention): every change at or before (txid, seq) was deleted. A
-- cursor before it cannot be followed without a gap: calsync_changes refuses it.
CREATE TABLE calendar_changes_trimmed (
    only_row   boolean     PRIMARY KEY DEFAULT true CHECK (only_row),
    txid       bigint      NOT NULL,
    seq        bigint      NOT NULL,
    trimmed_at timestamptz NOT NULL DEFAULT now()
);

-- The changes after `after` (a cursor from an earlier row or from calsync_snapshot; NULL or
-- '': from the oldest kept), at most `max_rows`, in feed order, each with its own cursor: the
-- last one is where to follow from. Only finished transactions' rows are answered, so
-- following never skips. A cursor older than what retention kept fails with SQLSTATE CS410
-- ("expired: read the snapshot"), one that is no cursor with 22023.
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
           c.event_id, c.op, c.cause, c.data, c.written_at
    FROM calendar_changes c
    WHERE (c.txid, c.seq) > (from_txid, from_seq)
      AND c.txid < txid_snapshot_xmin(txid_current_snapshot())
    ORDER BY c.txid, c.seq
    LIMIT GREATEST(max_rows, 0);
END
$$;

-- What calendar_events shows now, as the feed carries a row (`data`: the event's columns,
-- without its calendar's, which are beside it, and without the window; the payload only
-- `with_payload`, as calsync writes changes with `changes.payload`), read in one snapshot,
-- with the cursor to follow from: every change not in the snapshot comes after it. (Changes of
-- transactions that committed while older ones still ran may be in the snapshot and come
-- again after the cursor: each change sets a row whole, so applying one again in its order
-- converges to the same rows.) The first row has no event: it carries the cursor when the view
-- is empty too. `of_deployment`: one deployment's rows, or NULL for all.
CREATE FUNCTION calsync_snapshot(of_deployment text DEFAULT NULL, with_payload boolean DEFAULT false)
RETURNS TABLE (cursor text, deployment text, tuple_key text, user_id text, calendar_id text,
               event_id text, data jsonb)
LANGUAGE sql STABLE AS $$
    WITH c AS (SELECT txid_snapshot_xmin(txid_current_snapshot()) || '.0' AS cursor)
    SELECT c.cursor, x.deployment, x.tuple_key, x.user_id, x.calendar_id, x.event_id, x.data
    FROM c, (SELECT NULL::text AS deployment, NULL::text AS tuple_key, NULL::text AS user_id,
                    NULL::text AS calendar_id, NULL::text AS event_id, NULL::jsonb AS data
             UNION ALL
             SELECT v.deployment, v.tuple_key, v.user_id, v.calendar_id, v.event_id,
                    to_jsonb(v) - CASE WHEN with_payload
                        THEN '{deployment,tuple_key,user_id,calendar_id,window_start,window_end}'::text[]
                        ELSE '{deployment,tuple_key,user_id,calendar_id,window_start,window_end,payload}'::text[] END
             FROM calendar_events v
             WHERE of_deployment IS NULL OR v.deployment = of_deployment) x
    ORDER BY x.event_id IS NOT NULL, x.deployment, x.tuple_key, x.event_id
$$;

-- Where each [[sinks]] endpoint is in the feed: the cursor of the last change it acknowledged
-- (2xx), owned by one replica at a time (the role `sink:<name>`); how it is failing, if it is.
CREATE TABLE sink_cursors (
    deployment    text        NOT NULL,
    sink          text        NOT NULL,
    cursor        text        NOT NULL,
    delivered     bigint      NOT NULL DEFAULT 0,
    updated_at    timestamptz NOT NULL DEFAULT now(),
    failing_since timestamptz,
    last_error    text,
    PRIMARY KEY (deployment, sink)
);
