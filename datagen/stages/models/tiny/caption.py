"""Tiny random builds of the captioning VLMs (``random-tiny``, tests, benches): a tiny
LLaVA-NeXT (the paper's captioner family) built from a config with seeded random weights,
and its processor built in code around a word-level tokenizer of a few hundred common
English words. Its captions are MEANINGLESS word salad with separators: they exist so the
mechanics (prompting, batching, padding, decoding, the entity parser downstream, the
pipeline) run anywhere without weights.

:func:`save_tiny` writes a tiny build of ``llava_next``, ``qwen2_5_vl``, ``idefics3``
(SmolVLM v1's layout) or ``florence2`` in the real format with the real processor
classes, so tests go through the production loading path; :func:`save_random` with
``size="mid"`` writes a ~23M-parameter LLaVA-NeXT for CPU benchmarks where inference
dominates.
"""

from __future__ import annotations

# Sets the offline variables before transformers is imported below (it reads them at import).
from datagen.stages.models import offline  # noqa: F401

# isort: split

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer, decoders, normalizers, pre_tokenizers, processors
from tokenizers.models import WordLevel
from transformers import AutoModelForImageTextToText, PreTrainedTokenizerFast

from datagen.stages.models.common import TINY_SEED

TINY_FAMILIES = ("llava_next", "qwen2_5_vl", "idefics3", "florence2")

# The tiny tokenizers' words: common nouns, adjectives, verbs and glue words, so a random
# model's greedy output reads as word salad with separators (the entity parser downstream
# then has phrases and lists to parse in the demo).
_WORD_LIST = """
a an the of in on at with and or to from by near under over behind beside above below
is are has have there this that its their some two three several many few one
dog cat horse bird cow sheep fish bear elephant zebra giraffe duck chicken rabbit mouse
person man woman child boy girl baby people crowd player rider chef doctor farmer
face hair eye eyes hand hands arm leg head shirt jacket hat dress shoe shoes glasses
tree trees grass flower flowers plant leaf leaves forest field garden park bush rock
sky cloud clouds sun moon star snow rain water sea ocean lake river beach sand wave
mountain hill road street path bridge building house city town wall window door roof
car bus truck bicycle motorcycle train boat airplane plane wheel sign light lamp pole
table chair sofa bed desk shelf book books cup mug bottle glass plate bowl spoon fork
knife food bread cake pizza apple banana orange fruit coffee tea sandwich vegetable
phone computer laptop screen keyboard clock bag ball kite umbrella box basket toy
room kitchen floor ceiling carpet curtain mirror picture painting frame fence gate
stone wood metal paper cloth brick tile ice fire smoke shadow reflection background
red blue green yellow white black brown gray grey pink purple golden silver
big small large tiny tall short long round square old young new bright dark wooden
soft hard wet dry warm cold sunny cloudy open closed empty full busy quiet modern
sitting standing walking running lying holding wearing looking eating playing riding
flying swimming smiling parked hanging growing covered filled surrounded lit
left right front back top bottom middle center side corner edge distance foreground
view scene image photo close detail pattern texture color colors shape line lines
astronaut suit flag helmet saucer fur whiskers tabby kitten puppy
"""
WORDS = tuple(dict.fromkeys(_WORD_LIST.split()))
SEPARATORS = (",", ".", "-", ":", "1.", "2.", "3.", "4.")
PAD, UNK, BOS, EOS, IMAGE = "<pad>", "<unk>", "<s>", "</s>", "<image>"
NEWLINE = "\n"
SEPARATOR_BOOST = 1.5
# Random text weights of std 0.3, not transformers' 0.02: at 0.02 a tiny model's greedy
# output is one word repeated, at 0.3 it wanders over the vocabulary.
TINY_TEXT_INIT = 0.3


# --------------------------------------------------------------------------- tokenizer


def tiny_tokenizer(
    words: Sequence[str] = (),
    specials: Sequence[str] = (),
    chat_template: str | None = None,
    extra_attrs: dict[str, str] | None = None,
) -> PreTrainedTokenizerFast:
    """A word-level tokenizer over :data:`WORDS` + separators (lower-cased, split on
    whitespace and punctuation; decoding joins words with spaces and glues punctuation
    back, like WordPiece's clean-up), plus ordinary ``words`` (the chat templates' role
    names, common prompt words). ``specials`` are the family's markup tokens (image
    placeholder, chat turns); ``"\\n"`` is an ordinary added token so the chat templates'
    line breaks survive and a model can emit one."""
    base = [PAD, UNK, BOS, EOS, IMAGE]
    vocab: dict[str, int] = {}
    for token in (*base, *WORDS, *words, *SEPARATORS, *specials):
        vocab.setdefault(token, len(vocab))
    model = Tokenizer(WordLevel(vocab, unk_token=UNK))
    model.normalizer = normalizers.Lowercase()
    model.pre_tokenizer = pre_tokenizers.Whitespace()
    model.decoder = decoders.WordPiece(prefix="##", cleanup=True)
    model.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, vocab[BOS])]
    )
    tok = PreTrainedTokenizerFast(
        tokenizer_object=model,
        bos_token=BOS,
        eos_token=EOS,
        unk_token=UNK,
        pad_token=PAD,
        extra_special_tokens=extra_attrs or {},
        chat_template=chat_template,
        padding_side="left",
    )
    tok.add_special_tokens({"additional_special_tokens": [IMAGE, *specials]})
    tok.add_tokens([NEWLINE])
    return tok


# ------------------------------------------------------------------- tiny family builds

_LLAVA_TEMPLATE = (
    "{% for message in messages %}{{ message['role'] }}:"
    "{% if message['content'] is string %} {{ message['content'] }}{% else %}"
    "{% for item in message['content'] %}{% if item['type'] == 'image' %} <image>{{ '\\n' }}"
    "{% elif item['type'] == 'text' %} {{ item['text'] }}{% endif %}{% endfor %}{% endif %}{{ '\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}assistant:{% endif %}"
)
_QWEN_TEMPLATE = (  # Qwen2.5-VL's own layout, without the system turn
    "{% for message in messages %}<|im_start|>{{ message['role'] }}{{ '\\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for item in message['content'] %}{% if item['type'] == 'image' %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}{% endfor %}{% endif %}"
    "<|im_end|>{{ '\\n' }}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant{{ '\\n' }}{% endif %}"
)
_IDEFICS3_TEMPLATE = (  # SmolVLM's own template
    "<|im_start|>{% for message in messages %}{{ message['role'] | capitalize }}"
    "{% if message['content'][0]['type'] == 'image' %}{{ ':' }}{% else %}{{ ': ' }}{% endif %}"
    "{% for line in message['content'] %}{% if line['type'] == 'text' %}{{ line['text'] }}"
    "{% elif line['type'] == 'image' %}{{ '<image>' }}{% endif %}{% endfor %}"
    "<end_of_utterance>{{ '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)
_PROMPT_WORDS = ("user", "assistant", "describe", "detail", "about", "words", "caption")


def _llama_text(
    tok: PreTrainedTokenizerFast, width: int, layers: int, heads: int, init: float = TINY_TEXT_INIT
) -> Any:
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=len(tok),
        hidden_size=width,
        intermediate_size=width * 2 if width < 256 else width * 11 // 4,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=max(1, heads // 2),
        max_position_embeddings=4096,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        tie_word_embeddings=False,
        initializer_range=init,
    )


def _llava_next(size: str) -> tuple[Any, Any]:
    """LLaVA-NeXT (CLIP tower + Llama + anyres tiling), scaled down: crop 32 px / patch 8
    (16 tokens a tile) for ``tiny``, crop 112 / patch 14 (64 a tile) for ``mid``; the
    released grids (2x1, 1x2, 2x2, 3x1, 1x3 tiles) at that crop."""
    from transformers import (
        CLIPVisionConfig,
        LlavaNextConfig,
        LlavaNextImageProcessor,
        LlavaNextProcessor,
    )

    tok = tiny_tokenizer(_PROMPT_WORDS, chat_template=_LLAVA_TEMPLATE)
    if size == "tiny":
        crop, patch, vw, vl, vh, tw, tl, th = 32, 8, 32, 2, 2, 64, 2, 4
    else:
        crop, patch, vw, vl, vh, tw, tl, th = 112, 14, 256, 6, 4, 512, 6, 8
    grids = [[1, 2], [2, 1], [2, 2], [3, 1], [1, 3]]
    pinpoints = [[crop * r, crop * c] for r, c in grids]
    vision = CLIPVisionConfig(
        hidden_size=vw,
        intermediate_size=vw * 4 if size != "tiny" else vw * 2,
        num_hidden_layers=vl,
        num_attention_heads=vh,
        image_size=crop,
        patch_size=patch,
        projection_dim=vw,
    )
    config = LlavaNextConfig(
        vision_config=vision,
        text_config=_llama_text(tok, tw, tl, th, TINY_TEXT_INIT if size == "tiny" else 0.1),
        image_token_index=tok.convert_tokens_to_ids(IMAGE),
        image_grid_pinpoints=pinpoints,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        image_seq_length=(crop // patch) ** 2,
        tie_word_embeddings=False,
    )
    image_processor = LlavaNextImageProcessor(
        size={"shortest_edge": crop},
        crop_size={"height": crop, "width": crop},
        image_grid_pinpoints=pinpoints,
    )
    processor = LlavaNextProcessor(
        image_processor=image_processor,
        tokenizer=tok,
        patch_size=patch,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,  # CLIP's CLS token (NOTES.md: else features != tokens)
        chat_template=_LLAVA_TEMPLATE,
    )
    return config, processor


def _qwen2_5_vl() -> tuple[Any, Any]:
    """Qwen2.5-VL (windowed ViT, 2x2 token merge, M-RoPE), scaled down: patch 14 and merge 2
    as released (28 px a token), at most 16 tokens an image by default."""
    from transformers import (
        Qwen2_5_VLConfig,
        Qwen2_5_VLProcessor,
        Qwen2VLImageProcessor,
        Qwen2VLVideoProcessor,
    )

    specials = ("<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>")
    specials += ("<|image_pad|>", "<|video_pad|>")
    tok = tiny_tokenizer(_PROMPT_WORDS, specials, chat_template=_QWEN_TEMPLATE)
    tok.eos_token = "<|im_end|>"
    ids = {t: tok.convert_tokens_to_ids(t) for t in specials}
    width, heads = 64, 4
    config = Qwen2_5_VLConfig(
        vision_config={
            "depth": 2,
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_heads": 2,
            "patch_size": 14,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
            "window_size": 56,
            "out_hidden_size": width,
            "fullatt_block_indexes": [1],
        },
        text_config={
            "vocab_size": len(tok),
            "hidden_size": width,
            "intermediate_size": width * 2,
            "num_hidden_layers": 2,
            "num_attention_heads": heads,
            "num_key_value_heads": heads // 2,
            "max_position_embeddings": 4096,
            "rope_parameters": {
                "rope_type": "default",
                "rope_theta": 1e6,
                "mrope_section": [2, 3, 3],  # sums to head_dim / 2
            },
            "bos_token_id": tok.bos_token_id,
            "eos_token_id": tok.eos_token_id,
            "pad_token_id": tok.pad_token_id,
            "initializer_range": TINY_TEXT_INIT,
        },
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=False,
    )
    pixels = {"shortest_edge": 28 * 28 * 4, "longest_edge": 28 * 28 * 16}
    processor = Qwen2_5_VLProcessor(
        image_processor=Qwen2VLImageProcessor(size=pixels),
        tokenizer=tok,
        video_processor=Qwen2VLVideoProcessor(size=pixels),
        chat_template=_QWEN_TEMPLATE,
    )
    return config, processor


def _idefics3() -> tuple[Any, Any]:
    """Idefics3 / SmolVLM v1 (SigLIP tower, pixel shuffle, image splitting), scaled down:
    32 px tiles of 8 px patches, scale factor 2 (4 tokens a tile), images split up to
    3x3 tiles (longest edge 96) plus the global one."""
    from transformers import Idefics3Config, Idefics3ImageProcessor, Idefics3Processor

    rowcol = tuple(f"<row_{i}_col_{j}>" for i in range(1, 7) for j in range(1, 7))
    specials = ("<|im_start|>", "<fake_token_around_image>", "<global-img>", "<end_of_utterance>")
    tok = tiny_tokenizer(_PROMPT_WORDS, (*specials, *rowcol), chat_template=_IDEFICS3_TEMPLATE)
    tok.eos_token = "<end_of_utterance>"
    tile, patch, scale = 32, 8, 2
    text = _llama_text(tok, 64, 2, 4)
    config = Idefics3Config(
        vision_config={
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "image_size": tile,
            "patch_size": patch,
        },
        text_config=text.to_dict(),
        image_token_id=tok.convert_tokens_to_ids(IMAGE),
        scale_factor=scale,
        pad_token_id=tok.pad_token_id,
        tie_word_embeddings=False,
    )
    processor = Idefics3Processor(
        image_processor=Idefics3ImageProcessor(
            size={"longest_edge": 3 * tile}, max_image_size={"longest_edge": tile}
        ),
        tokenizer=tok,
        image_seq_len=(tile // patch) ** 2 // scale**2,
        chat_template=_IDEFICS3_TEMPLATE,
    )
    return config, processor


def _florence2() -> tuple[Any, Any]:
    """Florence-2 (DaViT tower + BART encoder-decoder), scaled down: 64 px square input,
    stride 32 (2x2 grid + 1 pooled = 5 image tokens). No chat template: the prompt is a
    task token (``<MORE_DETAILED_CAPTION>``) or plain text, passed as is."""
    from transformers import CLIPImageProcessor, Florence2Config, Florence2Processor

    tok = tiny_tokenizer(_PROMPT_WORDS, extra_attrs={"image_token": IMAGE})
    width, side = 64, 64
    config = Florence2Config(
        vision_config={
            "depths": [1, 1, 1, 1],
            "embed_dim": [16, 32, 32, 64],
            "num_heads": [1, 2, 2, 4],
            "num_groups": [1, 2, 2, 4],
            "window_size": 2,
            "projection_dim": width,
            "drop_path_rate": 0.0,
        },
        text_config={
            "vocab_size": len(tok),
            "d_model": width,
            "encoder_layers": 1,
            "decoder_layers": 1,
            "encoder_attention_heads": 4,
            "decoder_attention_heads": 4,
            "encoder_ffn_dim": width * 2,
            "decoder_ffn_dim": width * 2,
            "max_position_embeddings": 1024,
            "bos_token_id": tok.bos_token_id,
            "eos_token_id": tok.eos_token_id,
            "pad_token_id": tok.pad_token_id,
            "decoder_start_token_id": tok.eos_token_id,
            "forced_bos_token_id": tok.bos_token_id,
            "init_std": TINY_TEXT_INIT,
        },
        image_token_id=tok.convert_tokens_to_ids(IMAGE),
    )
    grid = side // 32
    image_processor = CLIPImageProcessor(
        size={"height": side, "width": side},
        do_center_crop=False,
        crop_size={"height": side, "width": side},
        image_mean=[0.485, 0.456, 0.406],
        image_std=[0.229, 0.224, 0.225],
        image_seq_length=grid * grid + 1,
    )
    processor = Florence2Processor(image_processor=image_processor, tokenizer=tok)
    return config, processor


def tiny_parts(family: str = "llava_next", size: str = "tiny") -> tuple[Any, Any]:
    """(config, processor) of a tiny build of ``family`` (``size="mid"``: LLaVA-NeXT only)."""
    if size not in ("tiny", "mid") or (size == "mid" and family != "llava_next"):
        raise ValueError(
            f"no {size!r} build of {family!r}: sizes tiny (any of "
            f"{TINY_FAMILIES}) and mid (llava_next)"
        )
    if family == "llava_next":
        return _llava_next(size)
    builders = {"qwen2_5_vl": _qwen2_5_vl, "idefics3": _idefics3, "florence2": _florence2}
    if family not in builders:
        raise ValueError(f"no tiny build of {family!r}: one of {TINY_FAMILIES}")
    return builders[family]()


def random_model(config: Any, seed: int = TINY_SEED, tokenizer: Any = None) -> Any:
    """``config`` with seeded random weights (the global RNG is left as it was).

    With ``tokenizer``, the output-head rows of the separators (``,`` ``.`` ``-`` ``1.``
    ... and the line break) are scaled by :data:`SEPARATOR_BOOST`, so a random model's
    greedy output is word salad broken into phrases and lists (without it a separator is
    picked about once in 300 words), which gives the entity parser downstream something
    to parse in the demo. The text is meaningless either way."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForImageTextToText.from_config(config)
    if tokenizer is not None:
        ids = tokenizer.convert_tokens_to_ids([*SEPARATORS, NEWLINE])
        with torch.no_grad():
            model.get_output_embeddings().weight[ids] *= SEPARATOR_BOOST
    return model.eval()


def save_random(
    folder: str | Path, family: str = "llava_next", size: str = "tiny", seed: int = TINY_SEED
) -> Path:
    """Write a random build + its processor in the real ``save_pretrained`` format
    (safetensors, processor and tokenizer files, chat template), so tests and benches go
    through the production loading path. ``size="mid"``: a ~23M-parameter LLaVA-NeXT."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config, processor = tiny_parts(family, size)
    random_model(config, seed, processor.tokenizer).save_pretrained(folder, safe_serialization=True)
    processor.save_pretrained(folder)
    return folder


def save_tiny(folder: str | Path, family: str = "llava_next") -> Path:
    """A tiny build of ``family`` saved to ``folder``; for ``llava_next`` it is exactly the
    in-memory ``random-tiny`` model."""
    return save_random(folder, family, "tiny")
