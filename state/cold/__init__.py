"""Cold tier adapters (Cosmos DB NoSQL, Postgres)."""
