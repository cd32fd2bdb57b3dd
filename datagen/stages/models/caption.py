"""Vision-language captioning through transformers: offline loading, tiny random builds,
batched greedy generation, and a per-family cap on image tokens.

Model code lives here, apart from the stage (``caption.py``), and is imported only on a
worker: the driver validates a DAG without importing torch or transformers.

Any image-text-to-text model transformers knows natively runs through one generic path
(``AutoModelForImageTextToText`` + ``AutoProcessor``, the processor's chat template,
greedy decoding). Two ways to get one:

- a local folder in the ``save_pretrained`` format (``config.json``, safetensors
  weights, the processor and tokenizer files), loaded offline (``local_files_only``,
  ``use_safetensors``; no ``trust_remote_code``: no code and no pickle from a weights
  folder);
- ``random-tiny``: a tiny LLaVA-NeXT (the paper's captioner family) built from a config
  with seeded random weights, and its processor built in code around a word-level
  tokenizer of a few hundred common English words. Its captions are MEANINGLESS word
  salad with separators: they exist so the mechanics (prompting, batching, padding,
  decoding, the entity parser downstream, the pipeline) run anywhere without weights.

:func:`save_tiny` writes a tiny build of ``llava_next``, ``qwen2_5_vl``, ``idefics3``
(SmolVLM v1's layout) or ``florence2`` in the real format with the real processor
classes, so tests go through the production loading path; :func:`save_random` with
``size="mid"`` writes a ~23M-parameter LLaVA-NeXT for CPU benchmarks where inference
dominates.

``max_image_tokens`` caps the image tokens each image puts into the prompt, per family
(image tokens are most of a captioning prompt: they set its prefill time and KV-cache
memory, hence the batch that fits); ``None`` keeps the processor's own default:

- ``llava_next``: anyres tiling is restricted to the grid pinpoints whose worst case
  (base tile + grid tiles + one newline per token row) fits the cap, in the processor and
  the model config alike (the model re-derives each image's tile count from them). When
  no released grid fits, a 1x1 grid (base + one tile, about twice a tile's tokens) is
  used; a cap below that is a ValueError: LLaVA-NeXT always adds at least one tile.
- ``qwen2_5_vl`` / ``qwen2_vl``: the image processor's ``max_pixels`` becomes
  ``cap * (patch * merge)**2``, so the dynamic resize keeps at most ``cap`` merged tokens.
- ``idefics3`` / ``smolvlm``: the splitting resolution becomes the largest ``k x k`` tile
  grid with ``(k*k + 1) * image_seq_len <= cap``; below two tiles' worth, splitting is
  off (one ``image_seq_len`` global image); below one, a ValueError.
- ``florence2``: the grid is fixed (577 tokens at the released 768 px): a cap it already
  meets is accepted, a smaller one is a ValueError.
- any other family: a ValueError whenever a cap is set (``None`` works everywhere). A
  cap silently ignored would make the recorded run parameters lie.
"""

from __future__ import annotations

# Sets the offline variables before transformers, ultralytics or segment-anything is
# imported below (they read them at import).

# isort: split

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tokenizers import Tokenizer, decoders, normalizers, pre_tokenizers, processors
from tokenizers.models import WordLevel
from transformers import (
    AutoModelForImageTextToText,
    AutoProcessor,
    PreTrainedTokenizerFast,
)

from datagen.stages.models.common import (
    PROCESSOR_FILES,
    RANDOM_TINY,
    check_pretrained_folder,
    chunks,
    pick_device,
    pick_dtype,
    weights_id,
)

TINY_SEED = 0  # one random-tiny model everywhere, whatever the DAG's seed
TINY_FAMILIES = ("llava_next", "qwen2_5_vl", "idefics3", "florence2")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")

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


# ------------------------------------------------------------------ image-token caps


def _cap_llava_next(model: Any, processor: Any, cap: int) -> None:
    """Keep the anyres grids whose worst case fits ``cap`` (processor and model config
    alike: the model re-derives each image's tile count from its own copy)."""
    ip = processor.image_processor
    crop = int(ip.crop_size["height"] if ip.crop_size else ip.size["shortest_edge"])
    side = crop // int(processor.patch_size)  # tokens along a tile's side
    per_tile = side * side

    def worst(pin: Sequence[int]) -> int:  # base + grid tiles + a newline per token row
        rows, cols = pin[0] // crop, pin[1] // crop
        return per_tile * (1 + rows * cols) + rows * side

    kept = [list(p) for p in ip.image_grid_pinpoints if worst(p) <= cap]
    if not kept:
        if worst((crop, crop)) > cap:
            raise ValueError(
                f"max_image_tokens={cap} is below LLaVA-NeXT's minimum here "
                f"({worst((crop, crop))}: base + one {per_tile}-token tile + newlines)"
            )
        kept = [[crop, crop]]
    ip.image_grid_pinpoints = kept
    model.config.image_grid_pinpoints = kept  # shared with the inner LlavaNextModel


def _cap_qwen_vl(processor: Any, cap: int) -> None:
    ip = processor.image_processor
    unit = int(ip.patch_size) * int(ip.merge_size)  # pixels along one merged token
    max_pixels = cap * unit * unit
    size = dict(ip.size)
    size["longest_edge"] = min(int(size["longest_edge"]), max_pixels)
    size["shortest_edge"] = min(int(size["shortest_edge"]), size["longest_edge"])
    ip.size = size  # smart_resize floors to multiples of ``unit`` within max_pixels


def _cap_idefics3(processor: Any, cap: int) -> None:
    ip = processor.image_processor
    per = int(processor.image_seq_len)
    tile = int(ip.max_image_size["longest_edge"])
    if cap < per:
        raise ValueError(f"max_image_tokens={cap} is below one {per}-token image (Idefics3)")
    default_k = math.ceil(int(ip.size["longest_edge"]) / tile) if ip.do_image_splitting else 1
    k = min(default_k, math.isqrt(max(cap // per - 1, 0)))  # (k*k + 1) * per <= cap
    if k >= 2:
        ip.size = {"longest_edge": k * tile}
    else:  # one tile's worth or less: the global image only
        ip.do_image_splitting = False
        ip.size = {"longest_edge": tile}


def _fixed_image_tokens(processor: Any) -> int | None:
    """Image tokens of a family with a fixed grid (Florence-2), else None (unknown)."""
    n = getattr(processor, "num_image_tokens", None)
    return int(n) if isinstance(n, int) else None


def cap_image_tokens(family: str, model: Any, processor: Any, cap: int | None) -> None:
    """Apply ``max_image_tokens`` (see the module docstring for what each family does)."""
    if cap is None:
        return
    if cap < 1:
        raise ValueError(f"max_image_tokens must be >= 1 or None, not {cap}")
    if family == "llava_next":
        _cap_llava_next(model, processor, cap)
    elif family in ("qwen2_5_vl", "qwen2_vl"):
        _cap_qwen_vl(processor, cap)
    elif family in ("idefics3", "smolvlm"):
        _cap_idefics3(processor, cap)
    else:
        fixed = _fixed_image_tokens(processor)
        if fixed is None or fixed > cap:
            have = "" if fixed is None else f" (it always uses {fixed})"
            raise ValueError(
                f"max_image_tokens={cap} cannot be honoured by a {family!r} model{have}: "
                "set it to None for this family"
            )


# ---------------------------------------------------------------------------- loading


def _user_turn(prompt: str) -> list[dict[str, Any]]:
    return [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]


class CaptionModel:
    """A vision-language model and its processor on one device: RGB images + one
    instruction in, one greedy caption per image out."""

    def __init__(self, model: Any, processor: Any, device: Any, dtype: Any, model_id: str):
        self.model = model.to(device=device, dtype=dtype).eval()
        self.processor = processor
        self.device, self.dtype = device, dtype
        self.model_id = model_id
        self.family: str = str(model.config.model_type)
        tok = processor.tokenizer
        # Decoder-only: left padding, so generation continues at the right edge of every
        # row. Encoder-decoder (Florence-2): the prompt only feeds the encoder, whose
        # learned positions expect text from position 0: right padding.
        tok.padding_side = "right" if model.config.is_encoder_decoder else "left"
        if tok.pad_token_id is None:  # Llama-style tokenizers ship without one
            tok.pad_token = tok.eos_token
        self.pad_token_id: int = int(tok.pad_token_id)
        self.image_token_id: int | None = getattr(processor, "image_token_id", None)

    @classmethod
    def load(
        cls,
        weights: str,
        *,
        device: str = "auto",
        dtype: str = "auto",
        max_image_tokens: int | None = None,
        seed: int = TINY_SEED,
    ) -> CaptionModel:
        """``weights``: a local ``save_pretrained`` folder (offline, safetensors only, no
        remote code) or ``random-tiny`` (a tiny LLaVA-NeXT, meaningless captions; ``seed``
        picks its random weights). ``max_image_tokens`` caps the image tokens an image
        puts into the prompt (module docstring: what each family does; None = default)."""
        dev = pick_device(device)
        dt = pick_dtype(dtype, dev)
        if weights == RANDOM_TINY:
            config, processor = tiny_parts("llava_next")
            model = random_model(config, seed, processor.tokenizer)
        else:
            path = Path(weights)
            check_pretrained_folder(path, "caption", (*PROCESSOR_FILES, *TOKENIZER_FILES))
            # processor first: it fails fast (a missing optional dependency) and cheaply
            processor = AutoProcessor.from_pretrained(path, local_files_only=True)
            model = AutoModelForImageTextToText.from_pretrained(
                path, local_files_only=True, use_safetensors=True, dtype=dt
            )
        cap_image_tokens(str(model.config.model_type), model, processor, max_image_tokens)
        return cls(model, processor, dev, dt, weights_id(weights))

    def _texts(self, prompt: str, n: int) -> list[str]:
        """The chat-formatted prompt (processor's template, else the tokenizer's, as older
        checkpoints keep it there); without any template the prompt goes as is (Florence-2:
        a task token such as ``<MORE_DETAILED_CAPTION>``, or plain text)."""
        template = getattr(self.processor, "chat_template", None) or getattr(
            self.processor.tokenizer, "chat_template", None
        )
        if not template:
            return [prompt] * n
        text = self.processor.apply_chat_template(
            _user_turn(prompt), chat_template=template, add_generation_prompt=True, tokenize=False
        )
        return [text] * n

    def encode(self, images: Sequence[np.ndarray], prompt: str) -> Any:
        """The processor's batch (token ids, attention mask, pixels) for ``images``, padded
        (left for decoder-only models), on the model's device and dtype. Images go as a
        nested list, one per prompt: what Idefics3 / SmolVLM require and the others accept;
        as PIL images, so no processor has to guess the channel axis of a small array."""
        from PIL import Image

        pil = [[Image.fromarray(np.ascontiguousarray(im)).convert("RGB")] for im in images]
        batch = self.processor(
            text=self._texts(prompt, len(images)), images=pil, padding=True, return_tensors="pt"
        )
        return batch.to(self.device, dtype=self.dtype)

    @torch.inference_mode()
    def generate(
        self,
        images: Sequence[np.ndarray],
        prompt: str,
        *,
        max_new_tokens: int,
        micro_batch: int,
        repetition_penalty: float = 1.0,
    ) -> list[str]:
        """One caption per RGB uint8 ``[H, W, 3]`` image: greedy (reruns reproduce), at most
        ``max_new_tokens`` tokens, only the new text (special tokens skipped, stripped).
        Images run ``micro_batch`` per ``generate`` call; left padding + the attention mask
        make a caption independent of its batch neighbours."""
        out: list[str] = []
        for part in chunks(list(images), micro_batch):
            batch = self.encode(part, prompt)
            ids = self.model.generate(
                **batch,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                num_beams=1,
                repetition_penalty=repetition_penalty,
                pad_token_id=self.pad_token_id,
                temperature=None,
                top_p=None,
                top_k=None,
            )
            if not self.model.config.is_encoder_decoder:  # drop the prompt
                ids = ids[:, batch["input_ids"].shape[1] :]
            texts = self.processor.tokenizer.batch_decode(ids, skip_special_tokens=True)
            out.extend(t.strip() for t in texts)
        return out
