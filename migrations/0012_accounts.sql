-- calsync schema v12: delegated accounts (issue 26). `calsync login <account>` signs a user in
-- by the device code flow and keeps the account's refresh token here, encrypted with
-- AES-256-GCM under a key that lives only in a credential file (`accounts.key_file`); the
-- associated data binds each ciphertext to its deployment and account name, so a row copied
-- to another name or deployment does not decrypt. Entra rotates the refresh token at every
-- redemption: each rotation is saved (version + 1) before the access token it came with is
-- used. A grant Entra refuses (AADSTS700082 expired, 50173 password changed, 65001 consent
-- revoked) marks the account `revoked` and its tuples fail with a login hint; nothing asks
-- Entra again until a new login. Append-only: never edit this file once released.
CREATE TABLE accounts (
    deployment      text        NOT NULL,
    name            text        NOT NULL,
    -- Who signed in: the directory object id and UPN `/me` answered at login.
    user_id         text        NOT NULL,
    user_principal  text        NOT NULL,
    -- The refresh token, sealed: 12-byte nonce, ciphertext with its 16-byte tag.
    token_nonce     bytea       NOT NULL,
    token_sealed    bytea       NOT NULL,
    -- The first 8 bytes of SHA-256 of the key, hex: which key sealed it (never the key).
    key_id          text        NOT NULL,
    version         bigint      NOT NULL DEFAULT 1,
    state           text        NOT NULL DEFAULT 'ok' CHECK (state IN ('ok', 'revoked')),
    -- Why Entra refused the grant (its error and AADSTS description), for `calsync accounts`.
    problem         text,
    signed_in_at    timestamptz NOT NULL DEFAULT now(),
    rotated_at      timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (deployment, name)
);
