"""Throughput benchmark of chatft against TRL's SFTTrainer; `python bench/run.py --help` is the entry point."""
