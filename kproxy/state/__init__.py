"""Frozen, validated state: the model, the parser that builds it, per-family views and topology."""
