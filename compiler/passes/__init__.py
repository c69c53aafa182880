"""Graph optimization passes, one per module, each behind a CompileConfig switch."""
