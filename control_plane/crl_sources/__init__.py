"""CRL sources (SPEC §13): the control plane fetches each TrustConfig's CRLs from their URLs, validates
them exactly as written CRLs and rolls new ones out as TrustConfig revisions. `schedule` and `held` are
pure; `fetcher` is the I/O."""
