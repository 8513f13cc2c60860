"""Change tracking: sources' events in, per-family views of what changed out."""
