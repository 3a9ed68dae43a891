"""The CapFilt step a worker runs: its settings, input rows to scored and reject rows, one shard to
committed files, and shards taking turns at one worker's models.
"""
