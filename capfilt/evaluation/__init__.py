"""Evaluating a filter and a captioner as BLIP does: retrieval, caption accuracy, BLEU, diversity.
"""
