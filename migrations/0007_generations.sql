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
