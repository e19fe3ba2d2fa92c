"""``python -m spm.ui``: the SPM Trainer tab standalone, on a diffusers pipeline, served on 127.0.0.1.

    python -m spm.ui                          # the toy model (bench/toyworld assets), membranes in ./models/spm
    python -m spm.ui --model DIR_OR_FILE [--config DIR] --membranes OUT --port 7861

The pipeline is loaded on the first Train click (startup stays fast; a load error shows in the tab).
"""

from __future__ import annotations

import argparse
import threading
from pathlib import Path

from .jobs import NoModelError


def make_provider(model: str | None, config: str | None = None, device: str | None = None):
    """A backend provider that loads the pipeline once, on first use (thread-safe)."""
    lock = threading.Lock()
    cache: dict = {}

    def provider():
        with lock:
            if "backend" not in cache:
                from ..hosts.diffusers import DiffusersBackend, load_pipeline

                try:
                    if model is None:
                        from bench.toyworld.model import load_toy_pipeline

                        pipe = load_toy_pipeline("base")
                        if device:
                            pipe.to(device)
                    else:
                        pipe = load_pipeline(model, config=config, device=device)
                except ImportError as e:
                    raise NoModelError(f"the toy model needs the repository's bench/ folder ({e}); "
                                       "pass --model DIR_OR_FILE instead") from None
                except (FileNotFoundError, ValueError, OSError) as e:
                    raise NoModelError(f"cannot load the model: {e}") from None
                cache["backend"] = DiffusersBackend(pipe)
            return cache["backend"]

    return provider


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m spm.ui", description="The SPM Trainer tab, standalone")
    ap.add_argument("--model", help="a diffusers folder or a .safetensors checkpoint (default: the toy model)")
    ap.add_argument("--config", help="for single-file checkpoints: a diffusers folder with the configs")
    ap.add_argument("--device", help="cpu, cuda, … (default: where the pipeline loads)")
    ap.add_argument("--membranes", default="models/spm", help="folder the membranes are saved to (default: models/spm)")
    ap.add_argument("--host", default="127.0.0.1", help="address to serve on (default 127.0.0.1: this machine only)")
    ap.add_argument("--port", type=int, default=7861)
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from .trainer_tab import build_trainer_tab

    folder = Path(args.membranes)
    folder.mkdir(parents=True, exist_ok=True)
    tab = build_trainer_tab(make_provider(args.model, args.config, args.device), folder)
    tab.queue()
    print(f"SPM Trainer: membranes are saved in {folder.resolve()}")
    tab.launch(server_name=args.host, server_port=args.port, share=False, inbrowser=False)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
