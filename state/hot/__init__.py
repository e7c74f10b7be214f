"""Hot tier adapters (Redis)."""
