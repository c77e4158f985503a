"""Shared loading, saving and text handling of the diffusers-pipeline families (SDXL, SD3).

A family adapter declares its folder layout as `Part`s (sub-folder, library, class); this module
checks the files with weights.require_files before importing diffusers or transformers, loads each
part with the real class's from_pretrained, and writes the same layout back with save_pretrained,
so a toy teacher trained here ships as an ordinary diffusers folder.
"""
from __future__ import annotations

import contextlib
import importlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

from fewstep.backbones.base import Backbone
from fewstep.backbones.codec import PixelCodec, VAECodec
from fewstep.backbones.weights import ALTERNATIVES_SEP, require_files, resolve, under
from fewstep.io import atomic_path

VAE = "vae"


@dataclass(frozen=True)
class Part:
    """One sub-folder of a diffusers pipeline folder, as model_index.json names it."""

    name: str  # sub-folder, e.g. "text_encoder_2"
    library: str  # "diffusers" or "transformers"
    cls: str  # class name inside the library; tokenizers load through AutoTokenizer
    kind: str  # "model", "tokenizer" or "scheduler"

    def expected_files(self) -> list[str]:
        if self.kind == "tokenizer":
            return [f"{self.name}/tokenizer_config.json"]
        if self.kind == "scheduler":
            return [f"{self.name}/scheduler_config.json"]
        stem = "diffusion_pytorch_model" if self.library == "diffusers" else "model"
        legacy = f"{stem}.bin" if self.library == "diffusers" else "pytorch_model.bin"
        options = [f"{stem}.safetensors", f"{stem}.safetensors.index.json", legacy]
        return [f"{self.name}/config.json",
                ALTERNATIVES_SEP.join(f"{self.name}/{o}" for o in options)]

    def load(self, folder: Path, dtype: torch.dtype | None = None):
        """from_pretrained of the real class; dtype applies to models only."""
        if self.kind == "tokenizer":
            from transformers import AutoTokenizer  # the toy word tokenizer loads this way too
            return AutoTokenizer.from_pretrained(folder / self.name, local_files_only=True)
        cls = getattr(importlib.import_module(self.library), self.cls)
        kwargs = {"dtype": dtype} if dtype is not None and self.kind == "model" else {}
        return cls.from_pretrained(folder / self.name, local_files_only=True, **kwargs)


VAE_PART = Part(VAE, "diffusers", "AutoencoderKL", "model")


def read_json(path: Path) -> dict:
    try:
        return json.loads(Path(path).read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON ({err}); re-save the model folder") from err


def write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def at_least_fp32(x: torch.Tensor) -> torch.Tensor:
    """x0 conversions return float32 at least, even for a bf16 x_t (fewstep/notes/conventions.md sec. 3)."""
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def freeze(module: torch.nn.Module) -> torch.nn.Module:
    """Frozen and in eval mode: text encoders and VAEs are never trained by the harness."""
    module.requires_grad_(False)
    return module.eval()


@contextlib.contextmanager
def seeded(seed: int):
    """Random initialisation from `seed` without disturbing the caller's global RNG."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def as_hw(resolution) -> tuple[int, int]:
    """An image size given as an int (square) or (height, width) -> (height, width)."""
    pair = isinstance(resolution, (tuple, list))
    h, w = tuple(resolution) if pair else (resolution, resolution)
    if int(h) <= 0 or int(w) <= 0:
        raise ValueError(f"resolution {resolution!r}: height and width must be positive")
    return int(h), int(w)


def codec_for(vae) -> tuple[torch.nn.Module, int]:
    """VAECodec(vae) in fp32 (the SDXL VAE is not fp16-safe) and its downsampling factor, or
    PixelCodec with factor 1 for a pixel-space toy teacher (no vae/ folder)."""
    if vae is None:
        return PixelCodec(), 1
    codec = VAECodec(freeze(vae.float()))
    return codec, codec.downsampling


class TextStack:
    """Frozen tokenizers and text encoders, kept outside the backbone's module tree.

    They are not parameters of the denoiser (an optimiser over backbone.parameters() never sees
    them), and a deep copy of the backbone (critic, EMA) shares them instead of copying gigabytes.
    """

    def __init__(self, tokenizers: dict, encoders: dict):
        self.tokenizers = dict(tokenizers)
        self.encoders = {name: freeze(enc) for name, enc in encoders.items()}

    def __deepcopy__(self, memo):
        return self

    def to(self, device) -> "TextStack":
        for enc in self.encoders.values():
            enc.to(device)
        return self

    @property
    def device(self) -> torch.device:
        return next(iter(self.encoders.values())).device

    def token_ids(self, tokenizer: str, prompts: Sequence[str], max_length: int) -> torch.Tensor:
        """Pad and truncate to max_length, as the diffusers SDXL/SD3 pipelines do."""
        out = self.tokenizers[tokenizer](list(prompts), padding="max_length", max_length=max_length,
                                          truncation=True, return_tensors="pt")
        return out.input_ids.to(self.device)


class DiffusersBackbone(Backbone):
    """What SDXL and SD3 share: the folder layout, the text stack, the codec, latent shapes.

    Subclasses set `family`, `PIPELINE_CLASS`, `DENOISER` (a Part), `TEXT_PARTS`
    ((encoder Part, tokenizer Part) pairs), `SCHEDULER_CLASS`, and `WEIGHTS_NAME` /
    `WEIGHTS_SOURCE` (the real checkpoint's folder name in the weights cache and where to get
    it), and implement the maths.
    """

    PIPELINE_CLASS: str
    DENOISER: Part
    TEXT_PARTS: tuple[tuple[Part, Part], ...]
    SCHEDULER_CLASS: str
    WEIGHTS_NAME: str
    WEIGHTS_SOURCE: str

    def __init__(self, denoiser, text: TextStack | None, scheduler_config: dict, vae=None,
                 resolution=None):
        super().__init__()
        setattr(self, self.DENOISER.name, denoiser)  # registered as a submodule (unet/transformer)
        self.text = text
        self.scheduler_config = dict(scheduler_config)
        self.codec, self.vae_scale_factor = codec_for(vae)
        h, w = as_hw(resolution or denoiser.config.sample_size * self.vae_scale_factor)
        f = self.vae_scale_factor
        if h % f or w % f:
            raise ValueError(f"{self.family}: resolution {h}x{w} is not divisible by the VAE's "
                             f"downsampling factor {f}; use a multiple of {f}")
        self.resolution = (h, w)
        self.latent_shape = (int(denoiser.config.in_channels), h // f, w // f)
        codec_channels = 3 if vae is None else int(vae.config.latent_channels)
        if codec_channels != self.latent_shape[0]:
            raise ValueError(
                f"{self.family}: the {self.DENOISER.name} takes {self.latent_shape[0]} input "
                f"channels but the {'VAE has' if vae else 'pixel-space codec (no vae/ folder) has'} "
                f"{codec_channels}; the folder's parts do not belong together")

    # -- the denoiser and the text stack -----------------------------------------------------------
    @property
    def denoiser(self) -> torch.nn.Module:
        """The trainable network (UNet or transformer)."""
        return getattr(self, self.DENOISER.name)

    def release_text_encoders(self) -> None:
        """Free the text encoders (e.g. T5-XXL) once every prompt set is encoded and cached."""
        self.text = None

    def _text_stack(self) -> TextStack:
        if self.text is None:
            raise RuntimeError(
                f"{self.family}: this prompt set is not in the encoding cache and the text "
                "encoders were not loaded (or were released); encode every prompt set before "
                "release_text_encoders(), or load with text_encoders=True")
        if self.text.device != self.device:
            self.text.to(self.device)
        return self.text

    def _run_network_dtype(self, x: torch.Tensor) -> torch.Tensor:
        return x.to(self.network_dtype())

    def network_dtype(self) -> torch.dtype:
        """diffusers' `ModelMixin.dtype`, cached: it walks every submodule on each call (1 ms on
        the toy UNet, 4 % of a toy training step) but changes only with the weights' storage."""
        net = self.denoiser
        key = (id(net), next(net.parameters()).dtype)
        cached = self.__dict__.get("_network_dtype")
        if cached is None or cached[0] != key:
            cached = (key, net.dtype)
            self.__dict__["_network_dtype"] = cached
        return cached[1]

    @property
    def pixel_space(self) -> bool:
        return isinstance(self.codec, PixelCodec)

    # -- the pipeline's use of its scheduler (fewstep.sampling's teacher sampler) ------------------
    def pipeline_latents(self, scheduler, noise: torch.Tensor) -> torch.Tensor:
        """The initial latents from given noise: noise * init_noise_sigma, as the Stable
        Diffusion (XL) pipelines' prepare_latents scale latents passed in."""
        return noise * scheduler.init_noise_sigma

    def pipeline_model_input(self, scheduler, x: torch.Tensor, timestep) -> torch.Tensor:
        """The network input of the latents at `timestep`: scheduler.scale_model_input, as the
        Stable Diffusion (XL) pipelines call it before every network evaluation."""
        return scheduler.scale_model_input(x, timestep)

    def scheduler_kwargs(self, scheduler) -> dict:
        """Extra arguments the family's pipeline gives set_timesteps (none by default)."""
        return {}

    # -- codec -------------------------------------------------------------------------------------
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return self.codec.decode(latents)

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        return self.codec.encode(images)

    # -- folders -----------------------------------------------------------------------------------
    @classmethod
    def _parts(cls, with_text: bool) -> list[Part]:
        text = [p for pair in cls.TEXT_PARTS for p in pair] if with_text else []
        scheduler = Part("scheduler", "diffusers", cls.SCHEDULER_CLASS, "scheduler")
        return [cls.DENOISER, *text, scheduler]

    @classmethod
    def expected_files(cls, text_encoders: bool = True) -> list[str]:
        """Files the loader requires in the pipeline folder ("a|b": either; vae/ is checked apart,
        as a toy teacher may have none)."""
        parts = cls._parts(text_encoders)
        return ["model_index.json"] + [f for p in parts for f in p.expected_files()]

    @classmethod
    def required_weights(cls) -> list[tuple[str, str]]:
        """(entry under the weights cache, source) of every file the real checkpoint needs, VAE
        included: what `fewstep weights check` lists. The folder name is WEIGHTS_NAME."""
        files = cls.expected_files() + VAE_PART.expected_files()
        return [(under(cls.WEIGHTS_NAME, f), cls.WEIGHTS_SOURCE) for f in files]

    @classmethod
    def _load_parts(cls, path, dtype=None, text_encoders: bool = True) -> dict:
        """Check files, then load every part of the folder; returns constructor arguments."""
        expected = cls.expected_files(text_encoders)
        folder = require_files(resolve(path), expected, f"{cls.family} pipeline folder")
        index = read_json(folder / "model_index.json")
        if cls.DENOISER.name not in index:
            raise ValueError(
                f"{folder}/model_index.json has no {cls.DENOISER.name!r} entry (_class_name="
                f"{index.get('_class_name')!r}); this is not a {cls.family} pipeline folder")
        has_vae = (folder / VAE).is_dir()
        if has_vae:
            require_files(folder, VAE_PART.expected_files(), f"{cls.family} VAE")
        text = None
        if text_encoders:
            text = TextStack({t.name: t.load(folder) for _, t in cls.TEXT_PARTS},
                             {e.name: e.load(folder, dtype) for e, _ in cls.TEXT_PARTS})
        return dict(denoiser=cls.DENOISER.load(folder, dtype), text=text,
                    scheduler_config=read_json(folder / "scheduler/scheduler_config.json"),
                    vae=VAE_PART.load(folder) if has_vae else None)

    def save_pretrained(self, path) -> Path:
        """Write the diffusers folder layout (model_index.json and one sub-folder per part)."""
        if self.text is None:
            raise RuntimeError(f"{self.family}: cannot save a pipeline folder without its text "
                               "encoders (they were not loaded or were released)")
        folder = Path(path).expanduser()
        objects = {self.DENOISER.name: self.denoiser, **self.text.encoders, **self.text.tokenizers}
        if isinstance(self.codec, VAECodec):
            objects[VAE] = self.codec.vae
        with atomic_path(folder) as tmp:  # a half-written folder never looks like a model
            for name, obj in objects.items():
                obj.save_pretrained(tmp / name)
            write_json(tmp / "scheduler/scheduler_config.json", self.scheduler_config)
            write_json(tmp / "model_index.json", self._model_index(objects))
        return folder

    def _model_index(self, objects: dict) -> dict:
        import diffusers

        index = {"_class_name": self.PIPELINE_CLASS, "_diffusers_version": diffusers.__version__,
                 "scheduler": ["diffusers", self.scheduler_config.get("_class_name",
                                                                      self.SCHEDULER_CLASS)],
                 VAE: [None, None]}
        for name, obj in objects.items():
            library = type(obj).__module__.split(".")[0]  # "diffusers" or "transformers"
            index[name] = [library, type(obj).__name__]
        return index



# -- tiny random models (tests and the toy world) --------------------------------------------------
def scheduler_config_of(scheduler) -> dict:
    """The scheduler_config.json content of a diffusers scheduler object (class name included)."""
    import diffusers

    cfg = {k: v for k, v in dict(scheduler.config).items() if not k.startswith("_")}
    return {"_class_name": type(scheduler).__name__, "_diffusers_version": diffusers.__version__,
            **cfg}


def tiny_channels(family: str, pixel_space: bool, in_channels: int | None,
                  latent_default: int) -> int:
    """Pixel space means latents are RGB pixels (3 channels); a VAE gets `latent_default`."""
    if pixel_space:
        if in_channels not in (None, 3):
            raise ValueError(f"{family}.tiny: pixel_space=True needs in_channels=3 (RGB pixels), "
                             f"got {in_channels}; pass pixel_space=False for a latent model")
        return 3
    return int(in_channels or latent_default)


def check_width(family: str, width: int, multiple: int = 8) -> int:
    if width <= 0 or width % multiple:
        raise ValueError(f"{family}.tiny: width={width} must be a positive multiple of {multiple} "
                         "(group norm and attention heads split it)")
    return width


def tiny_vae(latent_channels: int, resolution: int, scaling_factor: float,
             shift_factor: float | None = None, quant_conv: bool = True):
    """A random two-level AutoencoderKL (downsampling factor 2) with the family's factors."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=latent_channels,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=8,
        sample_size=resolution, scaling_factor=scaling_factor, shift_factor=shift_factor,
        use_quant_conv=quant_conv, use_post_quant_conv=quant_conv)
