//! Schema migrations, applied in order at open. `PRAGMA user_version` holds how many ran.
//! Never edit a shipped migration: append a new one.

pub(crate) const MIGRATIONS: &[&str] = &[
    // 1: the initial schema (DESIGN.md section 3).
    "
    CREATE TABLE images (
        family          TEXT PRIMARY KEY,
        source          TEXT NOT NULL,
        manifest_digest TEXT,
        base_vol_id     INTEGER,
        prepared        INTEGER NOT NULL DEFAULT 0,
        prepared_at     INTEGER,
        created_at      INTEGER NOT NULL,
        updated_at      INTEGER NOT NULL
    ) STRICT;
    CREATE TABLE snapshots (
        id          INTEGER PRIMARY KEY,
        run_id      TEXT NOT NULL UNIQUE,
        family      TEXT NOT NULL,
        base_vol_id INTEGER NOT NULL,
        vol_id      TEXT NOT NULL,
        path        TEXT,
        state       TEXT NOT NULL CHECK (state IN ('intended', 'exposed', 'released')),
        created_at  INTEGER NOT NULL,
        released_at INTEGER
    ) STRICT;
    CREATE INDEX snapshots_family ON snapshots(family);
    CREATE TABLE leases (
        k          TEXT PRIMARY KEY,
        v          TEXT NOT NULL,
        expires_at INTEGER NOT NULL
    ) STRICT;
    CREATE TABLE sequences (
        ns TEXT PRIMARY KEY,
        v  INTEGER NOT NULL
    ) STRICT;
    ",
];
