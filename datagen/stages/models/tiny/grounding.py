"""Random builds of Grounding DINO (``random-tiny``, tests, benches): a tiny model and a
mid-size one built from configs with seeded random weights, whose boxes and phrase
assignments are MEANINGLESS (the mechanics: prompts, batching, thresholds, NMS, run
anywhere), and a processor built in code around a small BERT vocabulary with
bert-base-uncased's special ids. :func:`save_tiny_grounder` writes the tiny one in the
real ``save_pretrained`` format, so tests exercise the production loading path;
:func:`save_random_grounder` writes real architectures with random weights for benches.
"""

from __future__ import annotations

# Sets the offline variables before transformers is imported (it reads them at import).
from datagen.stages.models import offline  # noqa: F401

# isort: split

import math
from pathlib import Path
from typing import Any

import torch

from datagen.stages.models.common import TINY_SEED

RANDOM_TEXT_LOGIT = 1.0  # random builds: every box-token logit is about this (sigmoid ~0.73)
RANDOM_LOGIT_SPREAD = 0.4  # ... with about this spread, so 0.95 is never reached
RANDOM_BOX_WH_LOGIT = 2.0  # random builds: added to the box width/height logits
TINY_GROUNDER_SIZE = (128, 213)  # shortest / longest edge (the released 800 / 1333, scaled)

# bert-base-uncased ids that Grounding DINO hard-codes as its phrase delimiters
# (``modeling_grounding_dino.SPECIAL_TOKENS``): a tokenizer must give them these ids.
CLS_ID, SEP_ID, DOT_ID, QUESTION_ID = 101, 102, 1012, 1029

# a few hundred common nouns and adjectives, for tiny prompts
_WORDS_TEXT = """
a an the of and with on in at near under over behind front left right top bottom
person man woman boy girl child baby people face head hair eye eyes hand hands arm leg
shirt dress hat coat jacket shoe shoes bag glasses helmet suit tie uniform
dog cat bird horse sheep cow elephant bear zebra giraffe mouse rabbit fish duck chicken
animal pet puppy kitten monkey lion tiger deer
car bus truck train bicycle bike motorcycle airplane plane boat ship rocket vehicle wheel
road street sidewalk building house wall window door roof bridge tower fence sign light
pole bench chair table desk sofa couch bed pillow lamp shelf cabinet clock vase plant
flower tree grass bush leaf leaves sky cloud clouds sun moon star mountain hill rock stone
water sea ocean lake river beach sand snow ice field forest garden park ground floor
cup mug glass bottle plate bowl fork knife spoon food pizza cake bread sandwich apple
banana orange fruit vegetable coffee tea saucer drink wine
laptop computer keyboard phone screen television tv camera book paper box bag toy ball
kite umbrella suitcase frame picture painting window mirror towel sink toilet oven
refrigerator microwave
red green blue yellow orange purple pink brown black white gray grey gold silver
big small large little tall short long round square old new young wooden metal striped
dark bright open closed empty full wet dry hot cold soft
space suit flag astronaut spacesuit
"""


def tiny_vocab() -> dict[str, int]:
    """A BERT WordPiece vocabulary laid out like bert-base-uncased where it matters:
    [PAD] 0, [UNK] 100, [CLS] 101, [SEP] 102, [MASK] 103, the ASCII punctuation, digits and
    lowercase letters from 999 ("." = 1012, "?" = 1029), then a few hundred common words
    and "##" letters, so any lowercase word tokenizes (letter by letter at worst)."""
    tokens = ["[PAD]", *(f"[unused{i}]" for i in range(99)), "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tokens += [f"[unused{i}]" for i in range(99, 99 + 999 - len(tokens))]
    tokens += [chr(c) for c in range(33, 127) if not chr(c).isupper()]
    seen = set(tokens)
    for word in [
        *_WORDS_TEXT.split(),
        *(f"##{c}" for c in "abcdefghijklmnopqrstuvwxyz"),
        "##s",
        "##es",
    ]:
        if word not in seen:
            seen.add(word)
            tokens.append(word)
    vocab = {t: i for i, t in enumerate(tokens)}
    assert (vocab["[CLS]"], vocab["[SEP]"], vocab["."], vocab["?"]) == (
        CLS_ID,
        SEP_ID,
        DOT_ID,
        QUESTION_ID,
    )
    return vocab


def grounder_processor(shortest_edge: int = 800, longest_edge: int = 1333) -> Any:
    """A GroundingDinoProcessor built in code: the released image preprocessing (bilinear
    resize keeping the aspect ratio, ImageNet normalisation) at the given size and a BERT
    tokenizer on :func:`tiny_vocab` (bert-base-uncased's special ids)."""
    from transformers import BertTokenizer, GroundingDinoImageProcessor, GroundingDinoProcessor

    image_processor = GroundingDinoImageProcessor(
        size={"shortest_edge": shortest_edge, "longest_edge": longest_edge}
    )
    tokenizer = BertTokenizer(vocab=tiny_vocab(), do_lower_case=True)
    return GroundingDinoProcessor(image_processor=image_processor, tokenizer=tokenizer)


def _config(
    swin_width: int,
    swin_depths: list[int],
    swin_heads: list[int],
    window: int,
    image_size: int,
    text_width: int,
    text_layers: int,
    text_heads: int,
    d_model: int,
    queries: int,
    layers: tuple[int, int],
    heads: int,
    points: int,
) -> Any:
    """A Grounding DINO layout: a Swin backbone read at its last three stages, a BERT
    text encoder over :func:`tiny_vocab`, ``layers`` (encoder, decoder; the decoder needs
    >= 2) of width ``d_model`` with FFNs of ``4 * d_model``."""
    from transformers import BertConfig, GroundingDinoConfig, SwinConfig

    swin = SwinConfig(
        image_size=image_size,
        embed_dim=swin_width,
        depths=swin_depths,
        num_heads=swin_heads,
        window_size=window,
        out_indices=[2, 3, 4],
    )
    bert = BertConfig(
        vocab_size=len(tiny_vocab()),
        hidden_size=text_width,
        num_hidden_layers=text_layers,
        num_attention_heads=text_heads,
        intermediate_size=4 * text_width,
        max_position_embeddings=256,
    )
    return GroundingDinoConfig(
        backbone_config=swin,
        text_config=bert,
        num_queries=queries,
        d_model=d_model,
        encoder_layers=layers[0],
        decoder_layers=layers[1],
        encoder_ffn_dim=4 * d_model,
        decoder_ffn_dim=4 * d_model,
        encoder_attention_heads=heads,
        decoder_attention_heads=heads,
        encoder_n_points=points,
        decoder_n_points=points,
    )


def tiny_grounder_config() -> Any:
    """A ~0.5M-parameter Grounding DINO: Swin backbone of four 1-block stages (16..128
    channels), a 1-layer BERT, d_model 32, 30 queries, 1 encoder and 2 decoder layers.
    Mechanics only."""
    return _config(16, [1, 1, 1, 1], [1, 2, 2, 4], 4, 128, 32, 1, 2, 32, 30, (1, 2), 2, 2)


def mid_grounder_config() -> Any:
    """A ~12M-parameter Grounding DINO for CPU benchmarks with random weights: Swin of
    64..512 channels (1, 1, 3, 1 blocks), a 2-layer BERT of width 256, d_model 128, 300
    queries, 3 + 3 layers (Grounding DINO-T: Swin-T, BERT-base, d_model 256, 900 queries,
    6 + 6; ~172M)."""
    return _config(64, [1, 1, 3, 1], [2, 4, 8, 16], 7, 224, 256, 2, 4, 128, 300, (3, 3), 4, 4)


def _usable_random_outputs(model: Any) -> None:
    """Random weights give box-token logits spread over +-10 (a dot product of two
    LayerNorm outputs), so every box would pass or fail by chance, and boxes that are the
    encoder's smallest proposals (5% of the image). Two fixes, for random builds only:

    - the LayerNorms whose outputs make the logits (the decoder's final norm and the last
      text-enhancer norm) get a shared constant bias and a small gain: the logit is then
      ``RANDOM_TEXT_LOGIT + g^2 * <x, y>`` (a constant bias is orthogonal to every
      normalised vector), about sigmoid(1) = 0.73 with a small spread (measured: max
      sigmoid ~0.9): default thresholds keep boxes, 0.95 keeps none;
    - the decoder box heads' last bias (zero-initialised, as in DETR; one head shared by
      all layers by default) grows the width and height logits by ``RANDOM_BOX_WH_LOGIT``
      over the decoder's refinements, so boxes cover about a quarter to most of the image.
    """
    decoder_norm = model.model.decoder.layer_norm
    text_norm = model.model.encoder.layers[-1].text_enhancer_layer.layer_norm_after
    d = decoder_norm.weight.numel()
    gain = math.sqrt(RANDOM_LOGIT_SPREAD / math.sqrt(d))
    bias = math.sqrt(RANDOM_TEXT_LOGIT / d)  # |bias vector|^2 = RANDOM_TEXT_LOGIT
    with torch.no_grad():
        for norm in (decoder_norm, text_norm):
            norm.weight.fill_(gain)
            norm.bias.fill_(bias)
        # each layer's head adds its bias once; a shared head is one tensor, seen once here
        heads = {id(h.layers[-1].bias): h.layers[-1].bias for h in model.bbox_embed}
        for b in heads.values():
            b[2:] += RANDOM_BOX_WH_LOGIT / len(model.bbox_embed)


def random_grounder(config: Any, seed: int = TINY_SEED) -> Any:
    """``config`` with seeded random weights and usable scores (the global RNG is left as it
    was). MEANINGLESS detections: mechanics only."""
    from transformers import GroundingDinoForObjectDetection

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = GroundingDinoForObjectDetection(config)
    _usable_random_outputs(model)
    return model.eval()


def save_random_grounder(
    folder: str | Path, config: Any = None, processor: Any = None, seed: int = TINY_SEED
) -> Path:
    """A random Grounding DINO + processor in the real ``save_pretrained`` format
    (safetensors, image processor and tokenizer files). Default: the tiny one."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    model = random_grounder(config or tiny_grounder_config(), seed)
    model.save_pretrained(folder, safe_serialization=True)
    (processor or grounder_processor(*TINY_GROUNDER_SIZE)).save_pretrained(folder)
    return folder


def save_tiny_grounder(folder: str | Path) -> Path:
    """The ``random-tiny`` Grounding DINO saved to ``folder`` (same weights as in memory)."""
    return save_random_grounder(folder)
