//! Schema migrations, applied in order at open. `PRAGMA user_version` holds how many ran.
//! Never edit a shipped migration: append a new one.

pub(crate) const MIGRATIONS: &[&str] = &[
    // 1: the initial schema (see ARCHITECTURE.md, `store/`).
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
    // 2: snapshot rows move intended → created → exposed → releasing → released, and a
    // release that arrives before any activation leaves a tombstone (no base). Rows that an
    // earlier release marked (released_at set) but that stayed live are `releasing`: the
    // worker finishes them at start.
    "
    CREATE TABLE snapshots_v2 (
        id                   INTEGER PRIMARY KEY,
        run_id               TEXT NOT NULL UNIQUE,
        family               TEXT NOT NULL,
        base_vol_id          INTEGER,
        vol_id               TEXT NOT NULL,
        path                 TEXT,
        state                TEXT NOT NULL
                             CHECK (state IN ('intended', 'created', 'exposed', 'releasing', 'released')),
        created_at           INTEGER NOT NULL,
        release_requested_at INTEGER,
        released_at          INTEGER
    ) STRICT;
    INSERT INTO snapshots_v2 (id, run_id, family, base_vol_id, vol_id, path, state, created_at,
                              release_requested_at, released_at)
        SELECT id, run_id, family, base_vol_id, vol_id, path,
               CASE WHEN released_at IS NOT NULL AND state != 'released' THEN 'releasing' ELSE state END,
               created_at, released_at,
               CASE WHEN state = 'released' THEN released_at END
        FROM snapshots;
    DROP TABLE snapshots;
    ALTER TABLE snapshots_v2 RENAME TO snapshots;
    CREATE INDEX snapshots_family ON snapshots(family);
    CREATE INDEX snapshots_releasing ON snapshots(state) WHERE state = 'releasing';
    ",
    // 3: a family has versions. Each version prepared on this host is a `bases` row (its
    // manifest digest, its base volume, its blob digests, `preparing → sealed → retiring`);
    // `images.current_base` points at the family's current version (once the `prepared` flag).
    // Snapshots remember their version's digest and may expire.
    "
    CREATE TABLE bases (
        id                INTEGER PRIMARY KEY,
        family            TEXT NOT NULL,
        digest            TEXT NOT NULL,
        blobs             TEXT,
        state             TEXT NOT NULL CHECK (state IN ('preparing', 'sealed', 'retiring')),
        created_at        INTEGER NOT NULL,
        sealed_at         INTEGER,
        last_activated_at INTEGER,
        superseded_at     INTEGER,
        retiring_at       INTEGER,
        UNIQUE (family, digest)
    ) STRICT;
    INSERT INTO bases (id, family, digest, state, created_at, sealed_at)
        SELECT base_vol_id, family, COALESCE(manifest_digest, 'unknown:base-' || base_vol_id),
               CASE WHEN prepared THEN 'sealed' ELSE 'preparing' END, created_at, prepared_at
        FROM images WHERE base_vol_id IS NOT NULL;
    CREATE TABLE images_v3 (
        family       TEXT PRIMARY KEY,
        source       TEXT NOT NULL,
        current_base INTEGER REFERENCES bases (id),
        created_at   INTEGER NOT NULL,
        updated_at   INTEGER NOT NULL
    ) STRICT;
    INSERT INTO images_v3 (family, source, current_base, created_at, updated_at)
        SELECT family, source, CASE WHEN prepared THEN base_vol_id END, created_at, updated_at FROM images;
    DROP TABLE images;
    ALTER TABLE images_v3 RENAME TO images;
    ALTER TABLE snapshots ADD COLUMN digest TEXT;
    ALTER TABLE snapshots ADD COLUMN expires_at INTEGER;
    ALTER TABLE snapshots ADD COLUMN host_id TEXT;
    UPDATE snapshots SET digest = (SELECT digest FROM bases WHERE bases.id = snapshots.base_vol_id);
    CREATE INDEX snapshots_live_base ON snapshots (base_vol_id) WHERE state != 'released';
    CREATE INDEX snapshots_expiring ON snapshots (expires_at) WHERE expires_at IS NOT NULL AND state NOT IN ('releasing', 'released');
    ",
    // 4: where this host's volumes live (backend, location, filesystem), recorded at first
    // use; one row. Commands whose settings disagree are refused (`placement.rs`). A base
    // records the bytes its layers wrote (what capacity eviction weighs); a family, why its
    // last prepare failed (shown by `worker images` until it prepares, or ages out).
    "
    CREATE TABLE volume_place (
        one         INTEGER PRIMARY KEY CHECK (one = 1),
        backend     TEXT NOT NULL,
        location    TEXT NOT NULL,
        filesystem  TEXT NOT NULL,
        recorded_at INTEGER NOT NULL
    ) STRICT;
    ALTER TABLE bases ADD COLUMN bytes INTEGER;
    ALTER TABLE images ADD COLUMN last_error TEXT;
    ALTER TABLE images ADD COLUMN last_error_at INTEGER;
    ",
    // 5: snapshot ids are reserved durably in batches and bound to an activation by a write
    // that waits for no fsync (`snapshots.rs`); these are the reserved, unbound ones.
    "
    CREATE TABLE snapshot_ids (id INTEGER PRIMARY KEY) STRICT;
    ",
    // 6: the digests of a directory source's flat layer files, by path, with what identifies
    // the file's content on the disk (`file_digests.rs`), so a listing hashes only what changed.
    "
    CREATE TABLE file_digests (
        path     TEXT PRIMARY KEY,
        dev      INTEGER NOT NULL,
        ino      INTEGER NOT NULL,
        size     INTEGER NOT NULL,
        mtime_ns TEXT NOT NULL,
        ctime_ns TEXT NOT NULL,
        digest   TEXT NOT NULL
    ) STRICT;
    ",
    // 7: registry versions whose cosign signatures were verified, by the key set that
    // verified them (`verified.rs`): a verified version is not verified again.
    "
    CREATE TABLE verified_signatures (
        digest      TEXT NOT NULL,
        keys        TEXT NOT NULL,
        verified_at INTEGER NOT NULL,
        PRIMARY KEY (digest, keys)
    ) STRICT;
    ",
];
