"""Input shards as img2dataset writes them (parquet, webdataset tars), read with bounded reads,
into one row schema.
"""
