"""EvoQuality Service tooling outside the core: the `evoq` command and the Python client."""
