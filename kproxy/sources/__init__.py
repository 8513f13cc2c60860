"""Where objects come from (API watch, manifest directory); every source emits `events.SourceEvent`."""
