"""Configuration: the schemas of conf/ (schema.py, with the OmegaConf shim of compat.py),
every check of a composed config before any work (checks.py), and the dry-run cuts (dry_run.py)."""
