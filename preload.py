"""WebUI preload: the ``--spm-dir`` option (default ``models/spm`` under the WebUI's models folder)."""

import os


def preload(parser):
    from modules import paths

    default = os.path.join(paths.models_path, "spm")
    parser.add_argument("--spm-dir", type=str, default=default,
                        help=f"folder with SPM membranes (.safetensors); default {default}")
    try:
        os.makedirs(default, exist_ok=True)
    except OSError:
        pass  # reported by the SPM panel when it lists the folder
