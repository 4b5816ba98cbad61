"""The TTFS benchmark's parts (scripts/ttfs_bench.py): the utterance plan, the clients, the report."""
