"""Orchestration: plan a round, skip finished shards, dispatch to Ray, commit the manifest."""
