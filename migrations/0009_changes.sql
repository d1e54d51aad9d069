-- The change feed (issue 25), its first part: the table and the cursor that cannot skip.
-- One row per row that appears in, changes in or leaves calendar_events, written by the
-- transaction that made the change.
--
-- Position: (txid, seq). `txid` is the writing transaction's id (txid_current(): 64-bit,
-- epoch-extended); `seq` orders the rows within it. A reader takes only rows whose txid is
-- below the oldest transaction still running (txid_snapshot_xmin of its snapshot): every
-- transaction that could still add a row below the reader's cursor has finished, so none is
-- skipped. A bigserial alone is assigned at insert, not at commit: a reader following
-- `seq > cursor` passes over a transaction that inserted early and committed late
-- (event-driven.io, "ordering in a Postgres outbox").
--
-- The horizon is the cluster's: a reader waits for every transaction that holds an id, in any
-- database of the server, to end (calsync's own are bounded by its statement timeout; an app's
-- long writing transaction elsewhere on the server delays the feed as long as it stays open).
--
-- Per calendar, commit order: a writer takes the calendar's advisory lock before its first
-- write, so its transaction id is assigned after the previous writer of that calendar
-- committed (an id is assigned at the first write, before any wait for a row lock: a writer
-- that waits on the row would hold an older id than the one it waits for).
CREATE TABLE calendar_changes (
    txid        bigint      NOT NULL DEFAULT txid_current(),
    seq         bigserial,
    deployment  text        NOT NULL,
    tuple_key   text        NOT NULL,
    user_id     text        NOT NULL,
    calendar_id text        NOT NULL,
    event_id    text        NOT NULL,
    op          text        NOT NULL CHECK (op IN ('upsert', 'delete')),
    cause       text        NOT NULL,
    -- The row as calendar_events shows it (upserts); NULL for deletes.
    data        jsonb,
    -- When the writing transaction began (now()); commit follows within its deadline.
    written_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (txid, seq)
);

-- The changes after `after` (a cursor from an earlier row; NULL or '': from the oldest kept),
-- at most `max_rows`, in feed order, each with its own cursor: the last one is where to
-- follow from. Only finished transactions' rows are answered, so following never skips.
CREATE FUNCTION calsync_changes(after text, max_rows integer DEFAULT 1000)
RETURNS TABLE (cursor text, deployment text, tuple_key text, user_id text, calendar_id text,
               event_id text, op text, cause text, data jsonb, written_at timestamptz)
LANGUAGE plpgsql STABLE AS $$
DECLARE
    from_txid bigint := -1;
    from_seq  bigint := -1;
BEGIN
    IF COALESCE(after, '') <> '' THEN
        IF after !~ '^[0-9]{1,18}\.[0-9]{1,18}$' THEN
            RAISE EXCEPTION 'calsync_changes: "%" is not a cursor (a cursor is what an earlier row''s cursor column said)', after
                USING ERRCODE = '22023';
        END IF;
        from_txid := split_part(after, '.', 1)::bigint;
        from_seq := split_part(after, '.', 2)::bigint;
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
