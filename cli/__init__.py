"""The `kiln` command line: one entry point, each subcommand importing only what it needs."""
