"""The PostgreSQL storage: facade, batching, SQL and migrations."""
