"""torpord: the REST API over one instance manager (FastAPI app, server, client)."""

# Names a long request's operation, to poll its progress (server and client both).
OPERATION_HEADER = "X-Torpor-Operation"
