"""Config: YAML files with `defaults:` inheritance, command-line overrides, interpolation, the typed schema
and the mapping of NeMo AutoModel's keys onto chatft's engine."""
