"""WebUI installer: install only what is missing; never touch a package the WebUI pins.

The in-WebUI path needs torch, safetensors and (for the WebUI's own tokenizer) nothing else: A1111 1.10
and Forge both ship torch and safetensors, so this normally installs nothing.  diffusers, open_clip and
transformers are never installed here (A1111 pins transformers, Forge pins diffusers; the WebUI path
uses neither directly).
"""

import launch

REQUIRED = {
    # import name: pip requirement used only when the import name is missing
    "safetensors": "safetensors>=0.4",
}

for module, requirement in REQUIRED.items():
    if not launch.is_installed(module):
        launch.run_pip(f"install {requirement}", f"{requirement} for SPM")
