"""xDS distribution: snapshot building, per-group cache, the ADS stream protocol, fleet status, metrics."""
