-- The deployment's tracked set, versioned (issue 23). Registration (a start with a config the
-- deployment never ran, a reload, a discovery pass, a re-base, sync-once) writes the tuples
-- that changed with the new generation's number and bumps it here in the same transaction;
-- every replica schedules from these rows, following the generation (NOTIFY calsync_tracked,
-- and a poll as backstop), not from its own config file.
CREATE TABLE tracked_sets (
    deployment    text        PRIMARY KEY,
    generation    bigint      NOT NULL,
    -- The digest of the config whose set this is (what a replica compares its file with).
    config_digest text        NOT NULL,
    -- The rolling windows' anchor the set's windows were computed at.
    anchor        timestamptz,
    cause         text        NOT NULL,
    written_by    text        NOT NULL,
    written_at    timestamptz NOT NULL DEFAULT now()
);

-- Every config digest a deployment ran, and the last generation written with it: a start whose
-- file is one the deployment ran and replaced is a stale file, not a new config.
CREATE TABLE tracked_set_digests (
    deployment    text   NOT NULL,
    config_digest text   NOT NULL,
    generation    bigint NOT NULL,
    PRIMARY KEY (deployment, config_digest)
);

-- The generation that last changed the tuple (0: before generations), and what a replica needs
-- to schedule it without a config file: its interval, cron schedule and rolling window (JSON).
ALTER TABLE sync_tuples ADD COLUMN generation bigint NOT NULL DEFAULT 0;
ALTER TABLE sync_tuples ADD COLUMN settings text;
CREATE INDEX sync_tuples_by_generation ON sync_tuples (deployment, generation);

-- Roles one replica of a deployment holds at a time (discovery and re-base: "coordinator"),
-- by the database's clock, so a process suspended past expires_at finds it taken.
CREATE TABLE deployment_roles (
    deployment text        NOT NULL,
    role       text        NOT NULL,
    holder     text        NOT NULL,
    expires_at timestamptz NOT NULL,
    PRIMARY KEY (deployment, role)
);

-- Read model v6: calendar_sync_status says which tuples are overdue (`stale`).
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
         AS stale
FROM sync_tuples t;

-- "Run this tuple's round now", asked anywhere (`calsync sync-once` beside a daemon; a push
-- notification next) and taken by the replica that holds the tuple's mailbox, which runs the
-- round through the tuple's own task and writes how it ended. NOTIFY calsync_rounds wakes the
-- replicas; they also poll.
CREATE TABLE round_requests (
    id           bigserial   PRIMARY KEY,
    deployment   text        NOT NULL,
    tuple_key    text        NOT NULL,
    requested_by text        NOT NULL,
    requested_at timestamptz NOT NULL DEFAULT now(),
    taken_by     text,
    taken_at     timestamptz,
    done_at      timestamptz,
    outcome      text,       -- 'ok', 'failed', 'interrupted', 'not-scheduled'
    detail       text
);
CREATE INDEX round_requests_open ON round_requests (deployment, id) WHERE done_at IS NULL;

-- A random salt per deployment for `metrics.mailbox_labels = "hash"`: an unsalted hash of a
-- tuple's name is reversed by anyone holding a list of the tenant's addresses (issue 23).
CREATE TABLE deployment_salts (
    deployment text  PRIMARY KEY,
    label_salt bytea NOT NULL
);

-- Whether each replica's config file is the deployment's (`calsync status` names the ones
-- whose file is stale; they say so themselves in /readyz and their log).
ALTER TABLE replicas ADD COLUMN config_stale boolean NOT NULL DEFAULT false;
