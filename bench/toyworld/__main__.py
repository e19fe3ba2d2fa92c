"""``python -m bench.toyworld [--json] | build [--quick] | grid | export-ldm OUT.safetensors``"""

from .cli import main

raise SystemExit(main())
