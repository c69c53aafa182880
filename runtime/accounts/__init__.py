"""API keys, tiers, request cost and the credit ledger behind the quota interceptors.

`tiers` reads the tiers file, `cost` prices a request, `keys` makes and checks API keys, and `ledger` holds
keys, daily credits, reservations and idempotency records in one authority: SQLite for one server, Redis for
several replicas.
"""
