"""Where membranes go, and how their file keys map to a loaded UNet's module names.

Two namings of the same SD UNet exist:

* **diffusers** (``UNet2DConditionModel``, and the reference's file keys):
  ``down_blocks.{i}.attentions.{j}``, ``mid_block.attentions.0``, ``up_blocks.{i}.attentions.{j}``;
* **LDM / sgm** (CompVis ``UNetModel``, which A1111 and Forge load):
  ``input_blocks.{n}.1``, ``middle_block.1``, ``output_blocks.{n}.1``.

Inside a transformer (``Transformer2DModel`` / ``SpatialTransformer``) the names are identical in both
(``proj_in``, ``transformer_blocks.K.attn2.to_k`` …), so the mapping is a mapping of *block prefixes*.
With ``L`` resnets per down level (``layers_per_block`` / ``num_res_blocks``) the UNet interleaves, per
level, ``L`` res(+attn) blocks and one downsampler, after the stem at ``input_blocks.0``; the up path has
``L + 1`` blocks per level.  Hence::

    down_blocks.i.attentions.j  <->  input_blocks.(1 + (L+1)*i + j).1
    mid_block.attentions.0      <->  middle_block.1
    up_blocks.i.attentions.j    <->  output_blocks.((L+1)*i + j).1

This is the same rule that diffusers' single-file conversion
(``diffusers.loaders.single_file_utils.convert_ldm_unet_checkpoint``) applies; ``tests/test_naming.py``
checks it against that conversion for SD1.x, SD2.x and SDXL.  Nothing here imports diffusers, so the
WebUI path (A1111 ships no diffusers) can use it.

File keys are ``lora_unet_`` + the module path with dots replaced by underscores.  Reference (diffusers)
keys and kohya-style LDM keys (``lora_unet_input_blocks_4_1_…``, as kohya writes for SDXL) are both read.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import nn

FILE_PREFIX = "lora_unet_"

# The reference targets every Linear / Conv2d child of a transformer: per transformer block
# attn1/attn2 q,k,v,out, the GEGLU input projection and the FF output, plus proj_in/proj_out.
_INNER = r"(?:proj_in|proj_out|transformer_blocks\.\d+\.(?:attn[12]\.(?:to_q|to_k|to_v|to_out\.0)|ff\.net\.(?:0\.proj|2)))"
_DIFFUSERS_BLOCK = r"(?:down_blocks\.\d+\.attentions\.\d+|mid_block\.attentions\.\d+|up_blocks\.\d+\.attentions\.\d+)"
_LDM_BLOCK = r"(?:input_blocks\.\d+\.1|middle_block\.1|output_blocks\.\d+\.1)"
TARGET_RE = re.compile(rf"^(?P<block>{_DIFFUSERS_BLOCK}|{_LDM_BLOCK})\.(?P<inner>{_INNER})$")

_DOWN = re.compile(r"^down_blocks\.(\d+)\.attentions\.(\d+)$")
_MID = re.compile(r"^mid_block\.attentions\.(\d+)$")
_UP = re.compile(r"^up_blocks\.(\d+)\.attentions\.(\d+)$")
_IN = re.compile(r"^input_blocks\.(\d+)\.1$")
_OUT = re.compile(r"^output_blocks\.(\d+)\.1$")


class NamingError(ValueError):
    """A module path that is not an SPM target, or a key that fits no module of the model."""


@dataclass(frozen=True)
class Target:
    """One module that a membrane adapts.

    ``name`` is the module's path in the loaded model; ``canonical`` is its diffusers path, which is what
    reference files use.  ``kind`` is ``"linear"`` or ``"conv"`` (1×1 convolution); ``in_features`` /
    ``out_features`` are channels.
    """

    name: str
    canonical: str
    kind: str
    in_features: int
    out_features: int

    @property
    def file_key(self) -> str:
        return file_key(self.canonical)


def file_key(module_path: str) -> str:
    """``down_blocks.0.attentions.0.proj_in`` → ``lora_unet_down_blocks_0_attentions_0_proj_in``."""
    return FILE_PREFIX + module_path.replace(".", "_")


def _split(path: str) -> tuple[str, str]:
    m = TARGET_RE.match(path)
    if not m:
        raise NamingError(f"{path!r} is not an SPM target (a Linear/Conv of a UNet transformer block)")
    return m.group("block"), m.group("inner")


def is_target_path(path: str) -> bool:
    return TARGET_RE.match(path) is not None


def naming_of(path: str) -> str:
    """``"diffusers"`` or ``"ldm"`` for a target path."""
    block, _ = _split(path)
    return "ldm" if block.startswith(("input_blocks", "middle_block", "output_blocks")) else "diffusers"


def block_to_ldm(block: str, layers_per_block: int) -> str:
    step = layers_per_block + 1
    if m := _DOWN.match(block):
        i, j = int(m.group(1)), int(m.group(2))
        return f"input_blocks.{1 + step * i + j}.1"
    if m := _MID.match(block):
        if int(m.group(1)) != 0:
            raise NamingError(f"{block!r}: SD UNets have a single mid-block attention")
        return "middle_block.1"
    if m := _UP.match(block):
        i, j = int(m.group(1)), int(m.group(2))
        return f"output_blocks.{step * i + j}.1"
    if _IN.match(block) or _OUT.match(block) or block == "middle_block.1":
        return block
    raise NamingError(f"unknown UNet block {block!r}")


def block_to_diffusers(block: str, layers_per_block: int) -> str:
    step = layers_per_block + 1
    if m := _IN.match(block):
        n = int(m.group(1)) - 1
        i, j = divmod(n, step)
        if n < 0 or j >= layers_per_block:
            raise NamingError(f"{block!r} holds no attention for layers_per_block={layers_per_block}")
        return f"down_blocks.{i}.attentions.{j}"
    if block == "middle_block.1":
        return "mid_block.attentions.0"
    if m := _OUT.match(block):
        i, j = divmod(int(m.group(1)), step)
        return f"up_blocks.{i}.attentions.{j}"
    if _DOWN.match(block) or _MID.match(block) or _UP.match(block):
        return block
    raise NamingError(f"unknown UNet block {block!r}")


def to_ldm(path: str, layers_per_block: int = 2) -> str:
    """Diffusers target path → LDM path (LDM paths pass through)."""
    block, inner = _split(path)
    return f"{block_to_ldm(block, layers_per_block)}.{inner}"


def to_diffusers(path: str, layers_per_block: int = 2) -> str:
    """LDM target path → diffusers path (diffusers paths pass through)."""
    block, inner = _split(path)
    return f"{block_to_diffusers(block, layers_per_block)}.{inner}"


def _strip(name: str) -> str:
    """Drop wrappers' prefixes so that ``model.diffusion_model.input_blocks…`` matches too."""
    for marker in ("down_blocks.", "mid_block.", "up_blocks.", "input_blocks.", "middle_block.", "output_blocks."):
        idx = name.find(marker)
        if idx == 0 or (idx > 0 and name[idx - 1] == "."):
            return name[idx:]
    return name


def layers_per_block_of(unet: nn.Module) -> int:
    """Resnets per down level: diffusers ``config.layers_per_block``, LDM ``num_res_blocks``, else inferred."""
    cfg = getattr(unet, "config", None)
    lpb = getattr(cfg, "layers_per_block", None) if cfg is not None else None
    if lpb is None:
        lpb = getattr(unet, "num_res_blocks", None)
    if isinstance(lpb, (list, tuple)):
        if len(set(lpb)) != 1:
            raise NamingError(f"per-level layers_per_block {lpb} is not supported")
        lpb = lpb[0]
    if lpb is not None:
        return int(lpb)
    # LDM without the attribute: output_blocks has (L + 1) blocks per level, input_blocks 1 + L*levels + (levels-1).
    out_blocks = getattr(unet, "output_blocks", None)
    in_blocks = getattr(unet, "input_blocks", None)
    if out_blocks is not None and in_blocks is not None:
        n_out, n_in = len(out_blocks), len(in_blocks)
        for lpb in range(1, 9):
            levels, rem = divmod(n_out, lpb + 1)
            if rem == 0 and n_in == 1 + lpb * levels + levels - 1:
                return lpb
    return 2


def _module_kind(module: nn.Module) -> tuple[str, int, int] | None:
    """(kind, in, out) for a Linear-like or 1×1-Conv-like module, found by weight shape, not class.

    Forge's Linear is not an ``nn.Linear`` subclass, and its weights may be quantised; we only need
    the logical shape, which every such class keeps in ``in_features``/``out_features`` or its weight.
    """
    w = getattr(module, "weight", None)
    if isinstance(module, nn.Conv2d) or (w is not None and getattr(w, "ndim", 0) == 4):
        ks = getattr(module, "kernel_size", (1, 1))
        if tuple(ks) != (1, 1):
            return None
        inc = getattr(module, "in_channels", None) or w.shape[1]
        outc = getattr(module, "out_channels", None) or w.shape[0]
        return "conv", int(inc), int(outc)
    inf, outf = getattr(module, "in_features", None), getattr(module, "out_features", None)
    if inf is None and w is not None and getattr(w, "ndim", 0) == 2:
        outf, inf = w.shape
    if inf is None:
        return None
    return "linear", int(inf), int(outf)


def find_targets(unet: nn.Module) -> list[Target]:
    """Every SPM target of a UNet (diffusers or LDM/sgm naming), in module order.

    SD1.x gives 192 (16 transformers × 12), SD2.x 192, SDXL 722.
    """
    lpb = layers_per_block_of(unet)
    out: list[Target] = []
    for name, module in unet.named_modules():
        path = _strip(name)
        if not TARGET_RE.match(path):
            continue
        kind = _module_kind(module)
        if kind is None:
            continue
        out.append(Target(name=name, canonical=to_diffusers(path, lpb), kind=kind[0], in_features=kind[1], out_features=kind[2]))
    return out


class KeyMap:
    """Resolves file-key stems (reference diffusers keys or kohya LDM keys) to a model's targets."""

    def __init__(self, targets: list[Target], layers_per_block: int):
        self.targets = targets
        self.layers_per_block = layers_per_block
        self._by_key: dict[str, Target] = {}
        for t in targets:
            self._by_key[file_key(t.canonical)] = t
            self._by_key[file_key(to_ldm(t.canonical, layers_per_block))] = t

    @classmethod
    def for_model(cls, unet: nn.Module) -> "KeyMap":
        return cls(find_targets(unet), layers_per_block_of(unet))

    def resolve(self, stem: str) -> Target | None:
        return self._by_key.get(stem)

    def __len__(self) -> int:
        return len(self.targets)


def context_dim(unet: nn.Module) -> int | None:
    """The cross-attention width (768 SD1.x, 1024 SD2.x, 2048 SDXL) read from any ``attn2.to_k``."""
    for t in find_targets(unet):
        if t.canonical.endswith("attn2.to_k"):
            return t.in_features
    return None


def describe_architecture(ctx_dim: int | None, n_modules: int | None = None) -> str:
    """Architecture family from the context width: ``sd1``/``sd2``/``sdxl``, else ``custom-ctx{N}``."""
    return {768: "sd1", 1024: "sd2", 2048: "sdxl"}.get(ctx_dim or -1, f"custom-ctx{ctx_dim}")


ARCH_LABEL = {"sd1": "SD1.x", "sd2": "SD2.x", "sdxl": "SDXL"}


def arch_label(arch: str, ctx_dim: int | None = None) -> str:
    label = ARCH_LABEL.get(arch, arch)
    return f"{label} (context {ctx_dim})" if ctx_dim else label


def param_device_dtype(module: nn.Module) -> tuple[torch.device, torch.dtype]:
    for p in module.parameters():
        return p.device, p.dtype
    return torch.device("cpu"), torch.float32
