/// The orchestrator's tables, after the common inbox/outbox/tombstones. Each saga names the
/// exact definition it was started on, by content hash (`definition_hash`: it runs and is undone
/// on that one whatever definition is loaded later), and the client's deadline as set at its
/// start, for the audit; a child saga, its parent and the parent's action it runs for; and its
/// `version`, counted up by every transition. The second migration added the hashes and
/// `first_seen`; the index on `updated_at` lets the retention find the oldest finished sagas
/// without a scan.
pub const MIGRATIONS: &[&str] = &[
    "CREATE TABLE definitions (
        id INTEGER PRIMARY KEY,
        workflow TEXT NOT NULL,
        body TEXT NOT NULL,
        UNIQUE (workflow, body)
    );
    CREATE TABLE sagas (
        saga_id TEXT PRIMARY KEY,
        space_id TEXT NOT NULL,
        workflow TEXT NOT NULL,
        status TEXT NOT NULL,
        state TEXT NOT NULL,
        wake_at INTEGER,
        reply_to TEXT,
        traceparent TEXT NOT NULL,
        answer_status INTEGER,
        created_at INTEGER NOT NULL,
        updated_at INTEGER NOT NULL,
        definition INTEGER REFERENCES definitions (id),
        deadline_at INTEGER
    );
    CREATE INDEX sagas_by_wake ON sagas (wake_at) WHERE wake_at IS NOT NULL;
    CREATE INDEX sagas_by_status ON sagas (status);
    CREATE INDEX sagas_by_space ON sagas (space_id);
    CREATE TABLE history (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        saga_id TEXT NOT NULL,
        at INTEGER NOT NULL,
        step TEXT,
        action TEXT,
        attempt INTEGER NOT NULL,
        event TEXT NOT NULL,
        detail TEXT
    );
    CREATE INDEX history_by_saga ON history (saga_id, id);",
    "ALTER TABLE definitions ADD COLUMN hash TEXT;
    ALTER TABLE definitions ADD COLUMN first_seen INTEGER;
    CREATE UNIQUE INDEX definitions_by_hash ON definitions (hash);
    ALTER TABLE sagas ADD COLUMN definition_hash TEXT;
    CREATE INDEX sagas_by_definition ON sagas (definition_hash);
    CREATE INDEX sagas_by_updated ON sagas (updated_at);",
    // The console's and `GET /workflows`'s pages, newest first: a walk of this index that stops
    // at the page's LIMIT, however many sagas the store keeps.
    "CREATE INDEX sagas_by_created ON sagas (created_at, saga_id);",
    // The list's filters and search, each on an index of its own that ends in the page's
    // order, so that a filtered page is a walk too; a space's name and owner are written when
    // its saga starts (sagas from before have none). The ones they replace were their prefixes.
    "ALTER TABLE sagas ADD COLUMN name TEXT;
    ALTER TABLE sagas ADD COLUMN owner TEXT;
    DROP INDEX sagas_by_status;
    DROP INDEX sagas_by_definition;
    CREATE INDEX sagas_by_status ON sagas (status, created_at, saga_id);
    CREATE INDEX sagas_by_definition ON sagas (definition_hash, created_at, saga_id);
    CREATE INDEX sagas_by_workflow ON sagas (workflow, created_at, saga_id);
    CREATE INDEX sagas_by_name ON sagas (name, created_at, saga_id);
    CREATE INDEX sagas_by_owner ON sagas (owner, created_at, saga_id);",
    // A child saga (a step that runs a workflow) names its parent and the parent's action it
    // runs for; its outcome is that action's reply.
    "ALTER TABLE sagas ADD COLUMN parent_id TEXT;
    ALTER TABLE sagas ADD COLUMN parent_index INTEGER;
    CREATE INDEX sagas_by_parent ON sagas (parent_id, parent_index);",
    // Counts a saga's transitions: an instance that moves a saga from the state it stored last,
    // without reading it back, writes only if nobody moved it since.
    "ALTER TABLE sagas ADD COLUMN version INTEGER NOT NULL DEFAULT 0;",
];
