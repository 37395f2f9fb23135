"""libSQL storage: ``db.Database`` (writer thread + readers), migrations, and one small
repository module per domain (users, calls, nodes, …). Callers use repository functions,
never SQL strings."""
