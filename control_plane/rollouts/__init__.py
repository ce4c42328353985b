"""Staged roll-outs (SPEC §12): pure planning and gates (`plan`, `gate`), the policy rules, which revision
each node serves, and — as glue — the driver task that moves runs from wave to wave."""
