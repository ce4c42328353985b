"""Proxy node workers: TLS termination enforcing ServerTlsPolicy, HTTP forwarding, hot reload (issue 5)."""
