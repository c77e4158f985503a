"""Load the installed `image-reward` 1.5 package on today's transformers and timm, without
vendoring it (sec. 2.3-2.4).

The package is installed without its dependencies (it pins timm 0.6.13). Importing it normally
runs its `__init__`, which pulls OpenAI `clip` and the ReFL trainer, and its BLIP-BERT copy was
written for transformers 4.15. `import_image_reward()` therefore:

1. registers placeholder modules for `ImageReward` and `ImageReward.models` whose search paths
   point at the installed folders, so their `__init__` files never run, and imports only the
   scorer module and the BLIP submodules (sec. 2.4 step 2);
2. makes three helpers importable from `transformers.modeling_utils` again: the two that moved to
   `transformers.pytorch_utils` are aliased, the removed pruning helper becomes a stand-in that
   raises (scoring never prunes) (step 3);
3. wraps BLIP-BERT's `init_weights` so `post_init()` runs first (transformers 5 reads attributes
   that `post_init` sets) (step 5);
4. re-attaches `invert_attention_mask` and `get_head_mask`, written here with transformers 4.55
   semantics (step 6).
The tokenizer patch (step 4) and local files (step 7) are in `build_image_reward`, which replaces
the package's `init_tokenizer` (it downloads `bert-base-uncased`) by one that reads a local folder.
Sections (sec. N) are those of metrics/notes/metrics.md.
"""
from __future__ import annotations

import contextlib
import importlib
import importlib.util
import sys
import types
import warnings
from pathlib import Path

import torch

PACKAGE = "ImageReward"
MAX_TEXT_TOKENS = 35  # the package's tokenizer call: padding to and truncation at 35 (sec. 2.1)


class ImageRewardPackageMissing(ImportError):
    pass


def _package_folder() -> Path:
    if PACKAGE in sys.modules:  # our placeholder (or the package itself) is already there
        return Path(list(sys.modules[PACKAGE].__path__)[0])
    spec = importlib.util.find_spec(PACKAGE)  # finds, does not import, a top-level package
    if spec is None or not spec.submodule_search_locations:
        raise ImageRewardPackageMissing(
            "the image-reward package is not installed; install it without its dependencies, "
            "as requirements-nodeps.lock says: pip install --no-deps image-reward==1.5 "
            "fairscale==0.4.13")
    return Path(list(spec.submodule_search_locations)[0])


def _placeholder(name: str, folder: Path) -> None:
    """A package module whose __init__ never runs; its submodules import from `folder`."""
    if name in sys.modules:
        return
    module = types.ModuleType(name)
    module.__path__ = [str(folder)]
    module.__package__ = name
    sys.modules[name] = module


def _raise_pruning(*args, **kwargs):
    raise RuntimeError("head pruning is not supported by fewstep's ImageReward adapter "
                       "(transformers 5 removed find_pruneable_heads_and_indices; scoring never "
                       "prunes)")


def _restore_transformers_helpers() -> None:
    import transformers.modeling_utils as modeling_utils
    import transformers.pytorch_utils as pytorch_utils

    for name in ("apply_chunking_to_forward", "prune_linear_layer"):
        if not hasattr(modeling_utils, name):
            setattr(modeling_utils, name, getattr(pytorch_utils, name))
    if not hasattr(modeling_utils, "find_pruneable_heads_and_indices"):
        modeling_utils.find_pruneable_heads_and_indices = _raise_pruning


def invert_attention_mask(self, encoder_attention_mask: torch.Tensor) -> torch.Tensor:
    """transformers 4.55 semantics: singleton head (and query) axes for 2-D (3-D) input, model
    dtype, (1 - mask) x the most negative finite value of that dtype."""
    mask = encoder_attention_mask
    if mask.dim() == 3:
        mask = mask[:, None, :, :]
    elif mask.dim() == 2:
        mask = mask[:, None, None, :]
    else:
        raise ValueError(f"attention mask of {mask.dim()} dimensions; expected 2 or 3")
    mask = mask.to(dtype=self.dtype)
    return (1.0 - mask) * torch.finfo(self.dtype).min


def get_head_mask(self, head_mask, num_hidden_layers: int, is_attention_chunked: bool = False):
    """transformers 4.55 semantics: None -> [None] * layers; a given mask is broadcast to 5-D
    (layers, batch, heads, query, key) in the model dtype."""
    if head_mask is None:
        return [None] * num_hidden_layers
    if head_mask.dim() == 1:
        head_mask = head_mask[None, None, :, None, None].expand(num_hidden_layers, -1, -1, -1, -1)
    elif head_mask.dim() == 2:
        head_mask = head_mask[:, None, :, None, None]
    if head_mask.dim() != 5:
        raise ValueError(f"head mask of {head_mask.dim()} dimensions; expected 1 or 2")
    head_mask = head_mask.to(dtype=self.dtype)
    if is_attention_chunked:
        head_mask = head_mask.unsqueeze(-1)
    return head_mask


def _post_init_first(original):
    def init_weights(self):
        if getattr(self, "_fewstep_post_init_running", False):
            return original(self)  # post_init calls init_weights again: now run the original
        self._fewstep_post_init_running = True
        try:
            return self.post_init()
        finally:
            del self._fewstep_post_init_running
    init_weights.__wrapped__ = original
    return init_weights


def _adapt_blip_bert(med) -> None:
    model_class = med.BertPreTrainedModel
    if not hasattr(med.BertModel.init_weights, "__wrapped__"):
        med.BertModel.init_weights = _post_init_first(med.BertModel.init_weights)
    for name, function in (("invert_attention_mask", invert_attention_mask),
                           ("get_head_mask", get_head_mask)):
        if not hasattr(model_class, name):
            setattr(model_class, name, function)


def import_image_reward():
    """The package's scorer module (`ImageReward.ImageReward`), imported without its `__init__`
    and adapted to the installed transformers. Idempotent."""
    folder = _package_folder()
    _placeholder(PACKAGE, folder)
    _placeholder(f"{PACKAGE}.models", folder / "models")
    _restore_transformers_helpers()
    with warnings.catch_warnings():  # timm 1.0 deprecation warnings for the old import paths
        warnings.simplefilter("ignore", FutureWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        med = importlib.import_module(f"{PACKAGE}.models.BLIP.med")
        _adapt_blip_bert(med)
        return importlib.import_module(f"{PACKAGE}.ImageReward")


def local_tokenizer(folder: Path):
    """BLIP's tokenizer (bert-base-uncased + [DEC] bos + [ENC]) from a local folder; the [ENC] id is
    looked up by name (transformers 5 dropped `additional_special_tokens_ids`, sec. 2.4 step
    4)."""
    from transformers import BertTokenizer

    tokenizer = BertTokenizer.from_pretrained(str(folder), local_files_only=True)
    tokenizer.add_special_tokens({"bos_token": "[DEC]"})
    tokenizer.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
    tokenizer.enc_token_id = tokenizer.convert_tokens_to_ids("[ENC]")
    return tokenizer


@contextlib.contextmanager
def _construction_patches(tokenizer_folder: Path, vision: dict | None):
    """During construction only: the local tokenizer, and (tests) a smaller ViT of the same class."""
    blip_pretrain = importlib.import_module(f"{PACKAGE}.models.BLIP.blip_pretrain")
    vit = importlib.import_module(f"{PACKAGE}.models.BLIP.vit")
    saved = blip_pretrain.init_tokenizer, blip_pretrain.create_vit

    def create_small_vit(_name, image_size, *args, **kwargs):
        cfg = dict(vision)
        return vit.VisionTransformer(img_size=image_size, patch_size=cfg.pop("patch_size", 16),
                                     **cfg), cfg["embed_dim"]

    blip_pretrain.init_tokenizer = lambda: local_tokenizer(tokenizer_folder)
    if vision is not None:
        blip_pretrain.create_vit = create_small_vit
    try:
        yield
    finally:
        blip_pretrain.init_tokenizer, blip_pretrain.create_vit = saved


def build_image_reward(med_config: Path, tokenizer_folder: Path, device="cpu",
                       vision: dict | None = None):
    """The package's `ImageReward` model (random weights), built from local files. `vision`
    replaces the ViT-L/16 by a smaller VisionTransformer of the same class (tests)."""
    scorer = import_image_reward()
    with _construction_patches(Path(tokenizer_folder), vision):
        with torch.device(device):
            model = scorer.ImageReward(med_config=str(med_config), device=str(device))
    return model


def check_key_report(missing, unexpected, checkpoint) -> None:
    """sec. 2.2: no unexpected keys, and only `position_ids` buffers missing."""
    bad_missing = [k for k in missing if not k.endswith("position_ids")]
    if unexpected or bad_missing:
        raise ValueError(f"{checkpoint} does not match the ImageReward model (BLIP ViT-L/16 + "
                         f"BERT-base): unexpected keys {sorted(unexpected)[:5]}, missing keys "
                         f"{sorted(bad_missing)[:5]}; is it THUDM/ImageReward's ImageReward.pt?")
