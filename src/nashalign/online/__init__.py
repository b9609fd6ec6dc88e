"""The online loop: config, stages, artifacts, resume, process sharding, the dry-run plan."""
