"""torpord: the REST API over one instance manager (FastAPI app, server, client)."""
