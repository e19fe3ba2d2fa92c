"""``python -m spm.ui``: the SPM Trainer tab standalone, on a diffusers pipeline, served on 127.0.0.1.

    python -m spm.ui                          # the toy model (spm/toy/assets), membranes in ./models/spm
    python -m spm.ui --model toy-finetune     # another shipped toy model, by name (spm.toy.MODELS)
    python -m spm.ui --model DIR_OR_FILE [--config DIR] --membranes OUT --port 7861

The pipeline is loaded on the first Train click (startup stays fast; a load error shows in the tab).
"""

from __future__ import annotations

import argparse
import threading
from pathlib import Path

TOY_CONTROLS = ["a blue square", "a green triangle"]  # prompts the toy model knows (spm/toy/captions.py)


def make_provider(model: str | None, config: str | None = None, device: str | None = None):
    """A backend provider that loads the pipeline once, on first use (thread-safe)."""
    lock = threading.Lock()
    cache: dict = {}

    def provider():
        with lock:
            if "backend" not in cache:
                from ..hosts.diffusers import DiffusersBackend, load_pipeline
                from ..train.jobs import NoModelError

                try:
                    from spm import toy

                    name = model or next(iter(toy.MODELS))
                    if toy.toy_model(name) is not None:
                        pipe = toy.load(name)
                        if device:
                            pipe.to(device)
                    else:
                        pipe = load_pipeline(model, config=config, device=device)
                except ImportError as e:
                    raise NoModelError(f"cannot load the model: a package is missing ({e}); run tools/setup.sh") from None
                except (FileNotFoundError, ValueError, OSError) as e:
                    raise NoModelError(f"cannot load the model: {e}") from None
                cache["backend"] = DiffusersBackend(pipe)
            return cache["backend"]

    return provider


def fix_gradio_schema_bug() -> bool:
    """Work around gradio 4.40's API-info crash under pydantic >= 2.11 (standalone only).

    pydantic 2.11+ writes ``"additionalProperties": true`` for ``dict`` fields (gr.Image's ``FileData.meta``)
    and gradio_client 1.2's schema walker expects a dict there ("argument of type 'bool' is not iterable"),
    so every page load fails.  Forge pins pydantic 2.8, where this never happens; the standalone tab may run
    in newer environments.  Patches ``gradio_client.utils`` only when the bug is present; returns whether it did.
    """
    try:
        import gradio
        from gradio_client import utils as cu
    except ImportError:
        return False
    if not str(gradio.__version__).startswith("4."):
        return False  # Gradio 3 (A1111) builds its API info differently
    try:
        cu.json_schema_to_python_type({"type": "object", "additionalProperties": True})
        return False
    except TypeError:
        pass
    except Exception:  # some other schema walker: leave it alone
        return False
    inner = cu._json_schema_to_python_type

    def walk(schema, defs=None):
        if isinstance(schema, bool):
            return "Any"
        return inner(schema, defs)

    cu._json_schema_to_python_type = walk
    return True


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m spm.ui", description="The SPM Trainer tab, standalone")
    from spm import toy

    ap.add_argument("--model", help="a shipped toy model by name (" + ", ".join(toy.MODELS) + "), a diffusers folder or a "
                                    f".safetensors checkpoint (default: {next(iter(toy.MODELS))})")
    ap.add_argument("--config", help="for single-file checkpoints: a diffusers folder with the configs")
    ap.add_argument("--device", help="cpu, cuda, … (default: where the pipeline loads)")
    ap.add_argument("--membranes", default="models/spm", help="folder the membranes are saved to (default: models/spm)")
    ap.add_argument("--host", default="127.0.0.1", help="address to serve on (default 127.0.0.1: this machine only)")
    ap.add_argument("--port", type=int, default=7861)
    ap.add_argument("--controls", help="default control prompts of the before/after check, comma-separated "
                                       "(default: toy-world prompts for the toy model, generic ones otherwise)")
    return ap


def main(argv: list[str] | None = None) -> int:
    ap = build_parser()
    args = ap.parse_args(argv)
    from spm import toy

    if args.model is not None and toy.toy_model(args.model) is None and not Path(args.model).exists():
        ap.exit(2, f"{ap.prog}: error: {toy.missing_model(args.model)}\n")

    from .trainer_tab import build_trainer_tab

    fix_gradio_schema_bug()
    folder = Path(args.membranes)
    folder.mkdir(parents=True, exist_ok=True)
    from ..train.jobs import DEFAULT_CONTROLS, split_concepts

    controls = split_concepts(args.controls, "--controls") if args.controls else (
        TOY_CONTROLS if args.model is None or toy.toy_model(args.model) is not None else list(DEFAULT_CONTROLS))
    tab = build_trainer_tab(make_provider(args.model, args.config, args.device), folder, controls=controls)
    tab.queue()
    print(f"SPM Trainer: membranes are saved in {folder.resolve()}")
    tab.launch(server_name=args.host, server_port=args.port, share=False, inbrowser=False)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
