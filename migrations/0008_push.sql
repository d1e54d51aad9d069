-- Push (issue 24): Graph's change notifications wake a calendar's round; polling stays as the
-- backstop. One subscription per tracked (mailbox, calendar), kept by the replica that holds
-- the mailbox's lease; its `clientState` secret is stored only as a SHA-256 hash.
CREATE TABLE push_subscriptions (
    deployment        text        NOT NULL,
    mailbox           text        NOT NULL,
    calendar_id       text        NOT NULL,
    -- Graph's id; NULL until created.
    subscription_id   text,
    client_state_hash bytea,
    expires_at        timestamptz,
    -- 'pending' (to be created), 'active', 'refused' (the mailbox cannot be subscribed: polled,
    -- tried again at retry_at), 'failing' (creation or renewal failed: polled, retried).
    state             text        NOT NULL DEFAULT 'pending',
    detail            text,
    retry_at          timestamptz,
    renewed_at        timestamptz,
    notified_at       timestamptz,
    updated_at        timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (deployment, mailbox, calendar_id)
);
CREATE UNIQUE INDEX push_subscriptions_by_id ON push_subscriptions (subscription_id)
    WHERE subscription_id IS NOT NULL;

-- Notifications coalesce: at most one open (not yet taken) push request per tuple; one that
-- arrives while the round runs leaves one more round, never N.
CREATE UNIQUE INDEX round_requests_push_open ON round_requests (deployment, tuple_key)
    WHERE requested_by = 'push' AND taken_by IS NULL;

-- Read model v7: calendar_sync_status says how each calendar is pushed (`push`: the state of its
-- subscription, NULL when push is off or not yet looked at).
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
       t.served_end AS served_window_end,
       -- Overdue: no round completed within the tuple's bound (max(3 x its cadence, cadence +
       -- 10 min), written by the engine at registration; 15 min without one) while its state
       -- says nothing is wrong. Issue 23: never silently stale.
       (t.tracked AND t.state IN ('pending', 'ok', 'retrying')
        AND COALESCE(t.last_success_at, t.created_at)
            < now() - make_interval(secs => COALESCE((t.settings::jsonb ->> 'stale_after_s')::float8, 900)))
         AS stale,
       (SELECT p.state FROM push_subscriptions p
         WHERE p.deployment = t.deployment AND p.mailbox = t.mailbox AND p.calendar_id = t.calendar_id)
         AS push
FROM sync_tuples t;
