-- calsync schema v5: many processes, one database. Tuples belong to a named deployment; each
-- mailbox of a deployment is leased to one replica at a time, with a fencing token that every
-- page commit checks. Append-only: never edit this file once released.

-- A tuple's key is unique within its deployment: two deployments may name a tuple alike.
ALTER TABLE sync_tuples ADD COLUMN deployment text NOT NULL DEFAULT 'default';
ALTER TABLE sync_tuples DROP CONSTRAINT sync_tuples_tuple_key_key;
ALTER TABLE sync_tuples ADD CONSTRAINT sync_tuples_deployment_tuple_key UNIQUE (deployment, tuple_key);

-- The lease key of the tuple's mailbox: its directory object id when resolved, else the
-- mailbox as configured. All tuples of one mailbox share one lease (and one request gate).
ALTER TABLE sync_tuples ADD COLUMN mailbox text;
UPDATE sync_tuples t SET mailbox = COALESCE((SELECT m.object_id FROM mailboxes m WHERE m.user_key = t.user_id), t.user_id);
ALTER TABLE sync_tuples ALTER COLUMN mailbox SET NOT NULL;
CREATE INDEX sync_tuples_by_mailbox ON sync_tuples (deployment, mailbox);
-- Which replica incarnation committed the tuple's last page (for status and tests).
ALTER TABLE sync_tuples ADD COLUMN committed_by text;

-- Fencing tokens: one sequence, so a token is never reused by any lease.
CREATE SEQUENCE lease_fence;

-- One row per mailbox of a deployment. `owner` (a replica incarnation) holds it while that
-- replica's row in `replicas` is unexpired: one heartbeat renews all of a replica's leases.
-- Every acquisition takes a new `fence`, and a page commits only with the current one.
CREATE TABLE mailbox_leases (
    deployment text   NOT NULL,
    mailbox    text   NOT NULL,
    owner      text,
    fence      bigint NOT NULL DEFAULT 0,
    PRIMARY KEY (deployment, mailbox)
);
CREATE INDEX mailbox_leases_by_owner ON mailbox_leases (deployment, owner);
INSERT INTO mailbox_leases (deployment, mailbox)
SELECT DISTINCT deployment, mailbox FROM sync_tuples WHERE tracked;

-- The replicas of each deployment that are alive: each renews its row with its leases.
CREATE TABLE replicas (
    deployment   text        NOT NULL,
    incarnation  text        NOT NULL,   -- unique per process start: "<replica>#<random>"
    replica      text        NOT NULL,   -- as configured or derived from the host name
    -- 'run' replicas share the deployment's mailboxes; a 'one-off' command (sync-once) holds
    -- only the leases it takes and does not count towards the fair share.
    kind         text        NOT NULL DEFAULT 'run' CHECK (kind IN ('run', 'one-off')),
    started_at   timestamptz NOT NULL DEFAULT now(),
    heartbeat_at timestamptz NOT NULL DEFAULT now(),
    -- Database time: the replica's leases are its own until then.
    expires_at   timestamptz NOT NULL,
    PRIMARY KEY (deployment, incarnation)
);

-- Read model v4: both views gain the deployment; calendar_sync_status gains the replica that
-- holds the tuple's mailbox now (NULL when no live lease) and the time since its last success.
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
       e.quarantined,
       t.deployment
FROM events e
JOIN sync_tuples t ON t.id = e.tuple_id
LEFT JOIN series s ON s.tuple_id = e.tuple_id AND s.master_id = e.series_master_id
WHERE t.tracked;

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
         AS owner
FROM sync_tuples t;
