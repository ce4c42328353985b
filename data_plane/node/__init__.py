"""The proxy node's supervisor side: xDS agent, node configuration, port reservations, admin endpoint."""
