"""``python -m spm bake``: merge membranes at fixed weights into a copy of a checkpoint.

For deployments without the extension.  Every membrane module's weight becomes

    W' = W + Σ_m weight_m · (alpha_m / rank_m) · up_m · down_m

(1×1 convolutions too), computed in fp32 and stored in the checkpoint's own dtype.  This is exactly what the hook
path computes at strength 1 with Facilitated Transport off, so the baked model **loses Facilitated Transport**:
every prompt gets each membrane's full weight, unrelated prompts change too.  Keep the membrane files where the
extension runs.

Inputs and outputs keep their layout:

* a diffusers folder (``model_index.json``, or a folder of components with ``unet/``) → a diffusers folder, every
  file copied, the UNet's ``*.safetensors`` rewritten;
* a shipped toy model by name (``toy`` …) → a diffusers folder of it (``save_pretrained``), UNet merged;
* a single-file SD checkpoint in the WebUI's (LDM) layout (``model.diffusion_model.*`` keys) → a single file in the
  same layout, every other tensor and the metadata kept.

Module names go through :mod:`spm.naming` (diffusers ⇄ LDM), and :func:`spm.checkpoint.resolve_targets` refuses
membranes of another architecture before anything is written.  The input is never modified: the output is staged
beside its destination and renamed into place.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import types
from pathlib import Path
from typing import Callable, Sequence

import torch

from .naming import KeyMap, Target, describe_architecture, is_target_path, layers_per_block_of, to_diffusers

LDM_UNET_PREFIX = "model.diffusion_model."
BAKED_KEY = "spm_baked"  # safetensors metadata: JSON list of the membranes merged in


class BakeError(ValueError):
    """The checkpoint or the output cannot be baked (one line, with the fix)."""


def _kind(shape: Sequence[int]) -> str | None:
    if len(shape) == 2:
        return "linear"
    if len(shape) == 4 and tuple(shape[2:]) == (1, 1):
        return "conv"
    return None


def targets_from_shapes(shapes: dict[str, Sequence[int]], prefix: str, layers_per_block: int) -> list[Target]:
    """The SPM targets among a state dict's ``<prefix><module>.weight`` keys; ``name`` is the key without ``.weight``."""
    out: list[Target] = []
    for key, shape in shapes.items():
        if not (key.startswith(prefix) and key.endswith(".weight")):
            continue
        path = key[len(prefix):-len(".weight")]
        kind = _kind(shape)
        if kind is None or not is_target_path(path):
            continue
        out.append(Target(name=key[:-len(".weight")], canonical=to_diffusers(path, layers_per_block), kind=kind,
                          in_features=int(shape[1]), out_features=int(shape[0])))
    return out


def _ldm_layers_per_block(keys) -> int:
    """``num_res_blocks`` of an LDM UNet from its block indices, by :func:`spm.naming.layers_per_block_of`'s rule."""
    def count(block: str) -> int:
        idx = [int(k[len(LDM_UNET_PREFIX) + len(block) + 1:].split(".", 1)[0]) for k in keys
               if k.startswith(f"{LDM_UNET_PREFIX}{block}.")]
        return max(idx) + 1 if idx else 0

    shape = types.SimpleNamespace(config=None, num_res_blocks=None, input_blocks=range(count("input_blocks")),
                                  output_blocks=range(count("output_blocks")))
    return layers_per_block_of(shape)


def _context_dim(targets: list[Target]) -> int | None:
    return next((t.in_features for t in targets if t.canonical.endswith("attn2.to_k")), None)


def plan(items: Sequence[tuple], shapes: dict[str, Sequence[int]], prefix: str, layers_per_block: int,
         where: str) -> dict[str, list[tuple[object, float]]]:
    """``{weight key: [(MembraneLayer, weight)]}``; raises before anything is written when a membrane does not fit."""
    from .checkpoint import resolve_targets

    targets = targets_from_shapes(shapes, prefix, layers_per_block)
    if not targets:
        raise BakeError(f"{where} holds no Stable Diffusion UNet transformer modules to bake into")
    ctx = _context_dim(targets)
    keymap = KeyMap(targets, layers_per_block)
    out: dict[str, list[tuple[object, float]]] = {}
    for membrane, weight in items:
        mapping = resolve_targets(membrane, keymap, describe_architecture(ctx), ctx)  # IncompatibleMembrane
        for stem, t in mapping.items():
            out.setdefault(t.name + ".weight", []).append((membrane.layers[stem], float(weight)))
    return out


def merged(weight: torch.Tensor, parts: list[tuple[object, float]]) -> torch.Tensor:
    """``W + Σ weight·scale·up·down`` in fp32, in ``W``'s dtype and shape."""
    w = weight.float()
    delta = torch.zeros(w.shape[0], w[0].numel(), dtype=torch.float32)
    for layer, k in parts:
        up = layer.up_matrix().detach().float()
        down = layer.down_matrix().detach().float()
        delta += (k * layer.scale) * (up @ down)
    return (w + delta.reshape(w.shape)).to(weight.dtype).contiguous()


def _note(items) -> str:
    return json.dumps([{"name": m.name, "concepts": list(m.concepts), "weight": float(w)} for m, w in items],
                      ensure_ascii=False)


def _rewrite(path: Path, todo: dict, note: str, out_path: Path | None = None) -> int:
    """Rewrite ``path`` (or write ``out_path``) with the merged weights of the keys it holds; returns how many."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    with safe_open(str(path), framework="pt") as f:
        meta = dict(f.metadata() or {})
    tensors = load_file(str(path))
    n = 0
    for key, parts in todo.items():
        if key in tensors:
            tensors[key] = merged(tensors[key], parts)
            n += 1
    if n:
        meta[BAKED_KEY] = note
        meta.setdefault("format", "pt")
        save_file(tensors, str(out_path or path), metadata=meta)
    elif out_path is not None:
        shutil.copyfile(path, out_path)
    return n


def _shapes(files: list[Path]) -> dict[str, tuple[int, ...]]:
    from safetensors import safe_open

    shapes: dict[str, tuple[int, ...]] = {}
    for p in files:
        with safe_open(str(p), framework="pt") as f:
            for k in f.keys():
                shapes[k] = tuple(f.get_slice(k).get_shape())
    return shapes


def _staging(output: Path) -> Path:
    return output.parent / f".{output.name}.baking-{os.getpid()}"


def _place(staged: Path, output: Path) -> None:
    if output.exists():
        if output.is_dir() and not output.is_symlink():
            shutil.rmtree(output)
        else:
            output.unlink()
    os.replace(staged, output)


def _folder_plan(folder: Path, items) -> tuple[dict, list[Path]]:
    """(merge plan, the UNet weight files) of a diffusers folder, checked before anything is copied."""
    unet = folder / "unet"
    files = sorted(unet.glob("*.safetensors"))
    if not files:
        pickled = sorted(p.name for p in unet.glob("*.bin"))
        raise BakeError(f"{unet}: no .safetensors UNet weights" +
                        (f" (only {', '.join(pickled)}: convert them to .safetensors first)" if pickled else ""))
    try:
        cfg = json.loads((unet / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise BakeError(f"{unet / 'config.json'}: cannot be read ({e})") from None
    lpb = layers_per_block_of(types.SimpleNamespace(config=types.SimpleNamespace(layers_per_block=cfg.get("layers_per_block"))))
    return plan(items, _shapes(files), "", lpb, str(folder)), [f.relative_to(folder) for f in files]


def bake(model: str, items: Sequence[tuple], output: str | os.PathLike, *, overwrite: bool = False,
         progress: Callable[[str], None] | None = None) -> Path:
    """Merge ``items`` (``[(Membrane, weight)]``) into a copy of ``model`` written to ``output``; returns ``output``."""
    from . import toy

    say = progress or (lambda _m: None)
    out = Path(output)
    for _, w in items:
        if not math.isfinite(float(w)):
            raise BakeError(f"membrane weight {w} is not a finite number")
    if out.exists() and not overwrite:
        raise BakeError(f"-o {out} exists; pass --overwrite to replace it")
    src = None if toy.toy_model(model) else Path(model)
    if src is not None:
        if not src.exists():
            raise FileNotFoundError(toy.missing_model(model, "single-file .safetensors checkpoint"))
        if out.resolve() == src.resolve() or src.resolve() in out.resolve().parents:
            raise BakeError(f"-o {out}: write the baked model somewhere else than the input {src} (it is never modified)")
    out.parent.mkdir(parents=True, exist_ok=True)
    staged = _staging(out)
    if staged.exists():
        shutil.rmtree(staged) if staged.is_dir() else staged.unlink()
    try:
        if src is None or src.is_dir():
            if out.suffix.lower() == ".safetensors":
                raise BakeError(f"-o {out}: a diffusers model is baked into a folder, not a .safetensors file")
            if src is None:
                say(f"loading the toy model {model!r} and writing it as a diffusers folder")
                toy.load(model).save_pretrained(str(staged), safe_serialization=True)
                todo, files = _folder_plan(staged, items)
            else:
                if not (src / "unet").is_dir():
                    raise BakeError(f"{src} is a folder but not a diffusers model (no unet/ folder)")
                todo, files = _folder_plan(src, items)
                say(f"copying {src} to {out}")
                shutil.copytree(src, staged, symlinks=False)
            n, note = 0, _note(items)
            for f in files:
                say(f"merging {len(todo)} modules into {f}")
                n += _rewrite(staged / f, todo, note)
        else:
            n = _bake_single_file(src, staged, out, items, say)
        if n == 0:
            raise BakeError(f"{model}: no membrane module found in the checkpoint's weights")
        _place(staged, out)
    finally:
        if staged.exists():
            shutil.rmtree(staged) if staged.is_dir() else staged.unlink()
    say(f"wrote {out} ({n} weights merged; Facilitated Transport is not part of a baked model)")
    return out


def _bake_single_file(src: Path, staged: Path, out: Path, items, say) -> int:
    if src.suffix.lower() != ".safetensors":
        raise BakeError(f"{src.name}: only .safetensors checkpoints are baked (pickled .ckpt files can run code)")
    if out.suffix.lower() != ".safetensors":
        raise BakeError(f"-o {out}: a single-file checkpoint is baked into a .safetensors file")
    try:
        shapes = _shapes([src])
    except Exception as e:  # safetensors raises its own types for a file that is not one
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise BakeError(f"{src.name} is not a readable .safetensors checkpoint ({first})") from None
    if not any(k.startswith(LDM_UNET_PREFIX) for k in shapes):
        raise BakeError(f"{src.name} is not a single-file SD checkpoint in the WebUI's layout (no {LDM_UNET_PREFIX}* keys)")
    lpb = _ldm_layers_per_block(shapes)
    todo = plan(items, shapes, LDM_UNET_PREFIX, lpb, src.name)
    say(f"merging {len(todo)} modules into a copy of {src.name}")
    return _rewrite(src, todo, _note(items), out_path=staged)


__all__ = ["BAKED_KEY", "BakeError", "bake", "merged", "plan", "targets_from_shapes"]
