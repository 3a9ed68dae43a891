"""Checkpoints: what a model folder holds and whether it fits, loading it, converting Salesforce's,
tiny ones for tests, and the host-device copies its inputs take.
"""
