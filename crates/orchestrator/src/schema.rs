/// The orchestrator's tables, after the common inbox/outbox/tombstones.
pub const MIGRATIONS: &[&str] = &[
    "CREATE TABLE sagas (
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
        updated_at INTEGER NOT NULL
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
    // Outcomes moved from baton.replies to baton.outcomes: the answers an earlier version left in
    // the outbox go to the new exchange (the gateway's queue is no longer bound to the old one).
    "UPDATE outbox SET message = json_set(message, '$.exchange', 'baton.outcomes')
     WHERE json_extract(message, '$.exchange') = 'baton.replies'
       AND json_extract(message, '$.kind') = 'orchestrator.start.reply';",
    // Each saga names the exact definition it was started on, so that a start-up with a changed
    // one is refused; and the client's deadline as set at its start, for the audit.
    "CREATE TABLE definitions (
        id INTEGER PRIMARY KEY,
        workflow TEXT NOT NULL,
        body TEXT NOT NULL,
        UNIQUE (workflow, body)
    );
    ALTER TABLE sagas ADD COLUMN definition INTEGER REFERENCES definitions (id);
    ALTER TABLE sagas ADD COLUMN deadline_at INTEGER;",
];

#[cfg(test)]
mod tests {
    use super::MIGRATIONS;
    use baton_store::Db;

    fn row(exchange: &str, kind: &str) -> String {
        serde_json::json!({
            "exchange": exchange, "routing_key": "gateway.main", "kind": kind,
            "message_id": uuid::Uuid::new_v4(), "correlation_id": uuid::Uuid::new_v4(),
            "app_id": "orchestrator", "attempt": 1, "traceparent": "00-0-0-01", "body": "{\"schema\":1}"
        })
        .to_string()
    }

    #[test]
    fn answers_left_in_an_earlier_outbox_move_to_baton_outcomes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("orchestrator.db");
        let earlier: &'static [&'static str] = &MIGRATIONS[..1];
        drop(Db::open_as(&path, earlier, "main").unwrap());
        let c = rusqlite::Connection::open(&path).unwrap();
        c.busy_timeout(std::time::Duration::from_secs(5)).unwrap();
        for m in [row("baton.replies", "orchestrator.start.reply"), row("baton.commands", "records.create")] {
            c.execute("INSERT INTO outbox (message, owner, created_at) VALUES (?1, 'main', 0)", [m]).unwrap();
        }
        drop(c);
        drop(Db::open_as(&path, MIGRATIONS, "main").unwrap());
        let c = rusqlite::Connection::open(&path).unwrap();
        c.busy_timeout(std::time::Duration::from_secs(5)).unwrap();
        let rows: Vec<(String, String, String)> = c
            .prepare("SELECT json_extract(message, '$.exchange'), json_extract(message, '$.kind'), json_extract(message, '$.body') FROM outbox ORDER BY seq")
            .unwrap()
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        assert_eq!(rows[0].0, "baton.outcomes", "the answer moved");
        assert_eq!(rows[0].2, "{\"schema\":1}", "the body is untouched");
        assert_eq!((rows[1].0.as_str(), rows[1].1.as_str()), ("baton.commands", "records.create"));
    }
}
