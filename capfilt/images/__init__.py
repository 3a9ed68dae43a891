"""Images: decoding web bytes, the models' preprocessing, and fingerprints that find repeated
images.
"""
