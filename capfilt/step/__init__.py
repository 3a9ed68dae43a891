"""The CapFilt step a worker runs: its settings, input rows to scored and reject rows, one shard to
committed files.
"""
