"""Client-certificate validation core (SPEC §4-§5): pure functions, no sockets, no gRPC.

`bundle` compiles a TrustConfig, `policy` compiles a ServerTlsPolicy, `engine.validate` decides, and
`headers` renders what the backend receives. The proxy, control-plane write validation and
`mtlsgate check` all run this same code.
"""
