"""HTTP/1.1 forwarding rules (SPEC §5, §11) without I/O, the h11 idea: a parsed request head goes in, a
decision comes out (forward this head, or refuse with this status); the same for response heads,
retry eligibility and the bounds every connection lives under. `data_plane/workers/http_proxy.py` is the
event-loop glue that calls these.
"""
