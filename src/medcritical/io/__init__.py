"""Shared file concerns, one module each: JSONL logs (`jsonl`), checksums and resume fingerprints
(`fingerprint`), and the one-writer lock on an output folder (`lock`)."""
