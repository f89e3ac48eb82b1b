"""The synthetic memorization testbed: a tiny OLMo-2 that learns a rule and memorizes canaries.

(Only the tokenizer lives here so far; the generator, trainer and cache follow.)
"""

from __future__ import annotations


def number_tokenizer(n_numbers: int):
    """A word-level Hugging Face tokenizer over the numbers ``0..n_numbers-1``.

    Token id ``k`` is the number ``k``; then ``<bos>`` = n, ``<eos>`` = n+1, ``<pad>`` = n+2, ``<unk>`` = n+3.
    Text is numbers separated by spaces, e.g. ``"3 10 17"``, so every text-based path of the package (data
    sources, packing, quotes) works on the testbed exactly as on a real model.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {str(i): i for i in range(n_numbers)}
    specials = ["<bos>", "<eos>", "<pad>", "<unk>"]
    for k, tok in enumerate(specials):
        vocab[tok] = n_numbers + k
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    core.post_processor = processors.TemplateProcessing(
        single="<bos> $A", pair="<bos> $A <bos> $B", special_tokens=[("<bos>", n_numbers)]
    )
    from tokenizers import decoders

    core.decoder = decoders.WordPiece(prefix="##", cleanup=False)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", unk_token="<unk>"
    )
    tok.padding_side = "left"
    return tok
