"""Reading the tamper-evident audit log (writing is core.db.audit.record_event)."""
