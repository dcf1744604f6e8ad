"""Guidance-level methods: decide per step and sample whether the unconditional pass runs."""
