"""Writing synthetic captions: BLIP's decoder, BLIP-2's language model, text sampling, seeds and
the guards on what they write.
"""
