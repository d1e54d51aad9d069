-- calsync schema v3: each configured mailbox name resolved to its directory object id, so that
-- tuples naming one mailbox by UPN and by id share its limits (4 requests in flight, one
-- Retry-After). Append-only: never edit this file once released.
CREATE TABLE mailboxes (
    user_key    text        PRIMARY KEY,   -- as configured: a UPN or an object id
    object_id   text        NOT NULL,      -- Graph's user id (a GUID)
    resolved_at timestamptz NOT NULL DEFAULT now()
);
