"""Fault-injection tests: kills, damaged checkpoints, full disks, bad inputs, pickles, locks (docs/reliability.md)."""
