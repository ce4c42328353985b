"""Who is calling and what they may do (SPEC §8), as pure functions: `identity.who` names a caller from
what its transport proved, `bindings` parses the `--authz` file, `policy.allowed` decides a call. The
gRPC glue (interceptor, ADS admission) lives in `control_plane/api/authorization.py` and the ADS servicer."""
