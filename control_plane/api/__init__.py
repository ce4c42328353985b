"""The management gRPC API: one service per resource kind, the audit service, API authentication."""
