"""Backend services on the node (SPEC §15), the pure part: load balancing over weighted endpoints, the
active health-check state machine and passive outlier ejection. No sockets, no clocks (time is passed in);
the worker and the supervisor drive them (data_plane/workers/)."""
