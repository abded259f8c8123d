"""The teacher: its sentence-hash embedding cache, sharded encoding and fine-tuning."""
