"""Training: BLIP's pre-training and the two fine-tunings that make a round's captioner and filter.

Pure PyTorch on Hugging Face BLIP modules, so what it writes loads with ``from_pretrained`` and
runs in ``capfilt run`` unchanged. Ray Train, when asked for, lives in ``pipelines/``.
"""
