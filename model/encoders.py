"""Frozen VAE and T5 text encoder: tiny random ones for tests, local folders in production.

Nothing here ever reaches a model hub: loaders take a local folder, check it
exists, pass ``local_files_only=True`` and switch the Hugging Face libraries to
offline mode (``offline_mode``). Both wrappers stay in eval mode and never take
gradients, whatever ``.train()`` their owner calls.

Folder layouts accepted by ``from_pretrained``: a flat model folder (what
``save_pretrained`` writes), or a diffusers-style pipeline root with ``vae/``,
``text_encoder/`` and ``tokenizer/`` subfolders, as the OneDiffusion release is laid out.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor, nn

from common.offline import HUB_OFFLINE_ENV, apply_offline_env

_TINY_TEXT = (
    "a an the of in on with and photo image cat dog red blue green yellow mask boundingbox"
    " moon mouse man woman sky tree house depth map edge pose view"
)
TINY_WORDS: tuple[str, ...] = tuple(_TINY_TEXT.split())
TINY_VAE_BLOCKS = (8, 16, 16, 16)  # block_out_channels of FrozenVAE.tiny: 8x downsampling


def vae_downsample(block_out_channels: Sequence[int]) -> int:
    """An AutoencoderKL's spatial downsampling: one halving between consecutive blocks."""
    return 2 ** (len(block_out_channels) - 1)


def offline_mode() -> None:
    """Forbid hub access for this process and its children.

    The env vars cover child processes and libraries imported later; but
    huggingface_hub reads HF_HUB_OFFLINE once, at import, into
    ``huggingface_hub.constants``, so when it is already imported the live flag
    is flipped too (``is_offline_mode()`` reads it at call time).
    """
    apply_offline_env(HUB_OFFLINE_ENV, force=True)
    constants = sys.modules.get("huggingface_hub.constants")
    if constants is not None:
        constants.HF_HUB_OFFLINE = True


def local_folder(path: str | os.PathLike, subfolder: str, marker: str) -> Path:
    """Resolve a flat folder or a pipeline root's ``subfolder``; fail clearly.

    Checked before any library call: given a missing path, transformers and
    diffusers treat it as a hub repo id and report a network or repo-id error.
    """
    root = Path(path).expanduser()
    for folder in (root, root / subfolder):
        if (folder / marker).is_file():
            return folder
    raise FileNotFoundError(
        f"no local {subfolder} found at {root} (looked for {marker} in it and in "
        f"{subfolder}/); weights load from local folders only, never from a hub"
    )


def _freeze(module: nn.Module) -> None:
    module.requires_grad_(False)
    module.eval()


class FrozenVAE(nn.Module):
    """diffusers ``AutoencoderKL`` (16 latent channels, 8x) as a fixed codec.

    ``encode`` returns the latents the denoiser sees:
    (z - shift_factor) * scaling_factor, both read from the VAE config
    (shift_factor None -> 0); ``decode`` inverts that. The released
    OneDiffusion pipeline multiplies by scaling_factor only and never applies
    shift_factor; ``apply_shift=False`` reproduces that for its weights.
    """

    def __init__(self, vae: nn.Module, *, apply_shift: bool = True) -> None:
        super().__init__()
        self.vae = vae
        self.apply_shift = apply_shift
        _freeze(self)

    def train(self, mode: bool = True) -> FrozenVAE:
        """Stay in eval mode: the codec is frozen, whatever the owner does."""
        return super().train(False)

    @property
    def scaling_factor(self) -> float:
        return float(self.vae.config.scaling_factor)

    @property
    def shift_factor(self) -> float:
        shift = self.vae.config.shift_factor
        return float(shift) if (shift is not None and self.apply_shift) else 0.0

    @property
    def latent_channels(self) -> int:
        return int(self.vae.config.latent_channels)

    @property
    def downsample(self) -> int:
        return vae_downsample(self.vae.config.block_out_channels)

    @property
    def dtype(self) -> torch.dtype:
        return next(self.vae.parameters()).dtype

    @torch.no_grad()
    def encode(
        self, images: Tensor, *, sample: bool = False, generator: torch.Generator | None = None
    ) -> Tensor:
        """Images [..., 3, H, W] in [-1, 1] -> float32 latents [..., C, H/8, W/8].

        Leading dims are flattened through the VAE, so [B, V, 3, H, W] works.
        Uses the posterior mode (deterministic, cacheable) unless ``sample``.
        """
        lead = images.shape[:-3]
        x = images.reshape(-1, *images.shape[-3:]).to(self.dtype)
        dist = self.vae.encode(x).latent_dist
        z = dist.sample(generator) if sample else dist.mode()
        z = (z.float() - self.shift_factor) * self.scaling_factor
        return z.reshape(*lead, *z.shape[1:])

    @torch.no_grad()
    def decode(self, latents: Tensor) -> Tensor:
        """Latents [..., C, h, w] -> float32 images [..., 3, 8h, 8w], roughly in [-1, 1]."""
        lead = latents.shape[:-3]
        z = latents.reshape(-1, *latents.shape[-3:]).float()
        z = z / self.scaling_factor + self.shift_factor
        images = self.vae.decode(z.to(self.dtype)).sample.float()
        return images.reshape(*lead, *images.shape[1:])

    @classmethod
    def from_pretrained(
        cls, path: str | os.PathLike, *, dtype: torch.dtype | None = None, apply_shift: bool = True
    ) -> FrozenVAE:
        """Load from a local folder (or a pipeline root's ``vae/``), offline."""
        from diffusers import AutoencoderKL

        folder = local_folder(path, "vae", "config.json")
        offline_mode()
        vae = AutoencoderKL.from_pretrained(
            folder, local_files_only=True, torch_dtype=dtype, low_cpu_mem_usage=False
        )
        return cls(vae, apply_shift=apply_shift)

    def save_pretrained(self, path: str | os.PathLike) -> None:
        self.vae.save_pretrained(path)

    @classmethod
    def tiny(cls, *, seed: int = 0, apply_shift: bool = True) -> FrozenVAE:
        """Random AutoencoderKL with the real one's interface: 16 latent
        channels, 4 blocks (8x), non-trivial scaling and shift factors."""
        from diffusers import AutoencoderKL

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            vae = AutoencoderKL(
                in_channels=3,
                out_channels=3,
                down_block_types=("DownEncoderBlock2D",) * 4,
                up_block_types=("UpDecoderBlock2D",) * 4,
                block_out_channels=TINY_VAE_BLOCKS,
                layers_per_block=1,
                latent_channels=16,
                norm_num_groups=4,
                sample_size=32,
                scaling_factor=1.5305,
                shift_factor=0.0609,
                use_quant_conv=False,
                use_post_quant_conv=False,
            )
        return cls(vae, apply_shift=apply_shift)


def build_word_tokenizer(vocab_file: str | os.PathLike, extra_tokens: Sequence[str] = ()):
    """A whitespace WordLevel tokenizer from a JSON vocabulary, T5-like.

    Ids 0/1/2 must be <pad>, </s>, <unk> (T5's pad and eos ids); every
    sequence gets a trailing </s>, and ``extra_tokens`` become whole added tokens.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = json.loads(Path(vocab_file).read_text())
    if [vocab.get(t) for t in ("<pad>", "</s>", "<unk>")] != [0, 1, 2]:
        raise ValueError("vocabulary must map <pad>, </s>, <unk> to 0, 1, 2")
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.post_processor = processors.TemplateProcessing(
        single="$A </s>", special_tokens=[("</s>", 1)]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", eos_token="</s>", unk_token="<unk>"
    )
    tokenizer.add_tokens(list(extra_tokens))
    return tokenizer


class FrozenTextEncoder(nn.Module):
    """T5 encoder + tokenizer: prompts -> (features [B, L, D] float32, mask [B, L] bool).

    Prompts are padded and truncated to ``max_length`` (300 in the release;
    truncation keeps the closing </s>). Features at padded positions are left
    as the encoder produced them: consumers must use the mask.
    """

    def __init__(self, model: nn.Module, tokenizer, *, max_length: int = 300) -> None:
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer
        self.tokenizer.padding_side = "right"
        self.max_length = max_length
        _freeze(self)

    def train(self, mode: bool = True) -> FrozenTextEncoder:
        """Stay in eval mode: T5 has dropout, which must stay off when frozen."""
        return super().train(False)

    @property
    def dim(self) -> int:
        return int(self.model.config.d_model)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def tokenize(self, prompts: Sequence[str]) -> tuple[Tensor, Tensor]:
        """-> input ids [B, max_length] long, mask [B, max_length] bool."""
        enc = self.tokenizer(
            list(prompts),
            padding="max_length",
            max_length=self.max_length,
            truncation=True,
            add_special_tokens=True,
            return_tensors="pt",
        )
        return enc["input_ids"], enc["attention_mask"].bool()

    @torch.no_grad()
    def forward(self, prompts: Sequence[str]) -> tuple[Tensor, Tensor]:
        if isinstance(prompts, str):
            raise TypeError("prompts must be a list of strings, not one string")
        ids, mask = self.tokenize(prompts)
        ids, mask = ids.to(self.device), mask.to(self.device)
        out = self.model(input_ids=ids, attention_mask=mask.long())
        return out.last_hidden_state.float(), mask

    @classmethod
    def from_pretrained(
        cls,
        path: str | os.PathLike,
        *,
        max_length: int = 300,
        dtype: torch.dtype | None = None,
    ) -> FrozenTextEncoder:
        """Load a T5 encoder and its tokenizer from a local folder, offline.

        Accepts a flat folder holding both, or a pipeline root with
        ``text_encoder/`` and ``tokenizer/``. Keep T5 in bf16 or fp32: its
        activations overflow fp16.
        """
        from transformers import AutoTokenizer, T5EncoderModel

        model_dir = local_folder(path, "text_encoder", "config.json")
        tok_dir = local_folder(path, "tokenizer", "tokenizer_config.json")
        offline_mode()
        model = T5EncoderModel.from_pretrained(model_dir, local_files_only=True, dtype=dtype)
        tokenizer = AutoTokenizer.from_pretrained(tok_dir, local_files_only=True)
        return cls(model, tokenizer, max_length=max_length)

    def save_pretrained(self, path: str | os.PathLike) -> None:
        """Model and tokenizer into one flat folder."""
        self.model.save_pretrained(path)
        self.tokenizer.save_pretrained(path)

    @classmethod
    def tiny(
        cls,
        vocab_dir: str | os.PathLike,
        *,
        words: Sequence[str] = TINY_WORDS,
        extra_tokens: Sequence[str] = (),
        max_length: int = 300,
        d_model: int = 32,
        seed: int = 0,
    ) -> FrozenTextEncoder:
        """A 2-layer random T5 encoder and a word tokenizer whose vocabulary is
        written to ``vocab_dir/vocab.json``.

        ``extra_tokens`` (task labels, image markers) become whole tokens; the
        caller passes them so the sample contract stays their one source. The
        real T5 tokenizer is not given them: the released weights saw task
        labels as ordinary sentencepiece pieces."""
        from transformers import T5Config, T5EncoderModel

        vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2}
        for word in words:
            vocab.setdefault(word, len(vocab))
        vocab_file = Path(vocab_dir) / "vocab.json"
        vocab_file.parent.mkdir(parents=True, exist_ok=True)
        vocab_file.write_text(json.dumps(vocab, indent=0))
        tokenizer = build_word_tokenizer(vocab_file, extra_tokens)
        config = T5Config(
            vocab_size=len(tokenizer),
            d_model=d_model,
            d_kv=8,
            d_ff=2 * d_model,
            num_layers=2,
            num_heads=4,
            relative_attention_num_buckets=8,
            feed_forward_proj="gated-gelu",
            pad_token_id=0,
            eos_token_id=1,
            decoder_start_token_id=0,
        )
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = T5EncoderModel(config)
        return cls(model, tokenizer, max_length=max_length)
