"""The step registry: one folder per step (`<category>/<name>/`) with `step.toml` and `config/*.yaml`,
and the artifact types that steps consume and produce (`artifact_types.toml`)."""
