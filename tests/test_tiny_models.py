"""Tiny models load through the same from_pretrained calls as Salesforce's checkpoints."""

from transformers import (
    AutoProcessor,
    BlipForConditionalGeneration,
    BlipForImageTextRetrieval,
)

from capfilt.models.tiny import tiny_vocabulary


def test_tiny_models_load_with_from_pretrained_and_ids_agree(tiny_models):
    processor = AutoProcessor.from_pretrained(tiny_models["captioner"])
    tokenizer = processor.tokenizer
    vocab = tiny_vocabulary()
    assert len(vocab) == len(set(vocab)) == len(tokenizer)
    captioner = BlipForConditionalGeneration.from_pretrained(tiny_models["captioner"])
    retrieval = BlipForImageTextRetrieval.from_pretrained(tiny_models["filter"])
    for model in (captioner, retrieval):
        text = model.config.text_config
        assert text.vocab_size == len(tokenizer)
        assert tokenizer.convert_ids_to_tokens(text.bos_token_id) == "[DEC]"
        assert tokenizer.convert_ids_to_tokens(text.sep_token_id) == "[SEP]"
        assert tokenizer.convert_ids_to_tokens(text.pad_token_id) == "[PAD]"
    assert tokenizer.convert_tokens_to_ids("[ENC]") == len(tokenizer) - 1
    # Any lower-case text tokenizes without [UNK].
    ids = tokenizer("a picture of a xylophone, 42!").input_ids
    assert tokenizer.unk_token_id not in ids
