"""Small infrastructure with no Kubernetes meaning: logging, the HTTP server, GC pauses, the
bounded-frequency runner, the node's addresses."""
