"""``python -m bench.toyworld [--json] [--world NAME] | build [--world NAME] [--quick] | build-scorer | grid | export-ldm OUT``"""

import os

# on a shared, oversubscribed CPU, spinning OpenMP workers waste the cores we compete for
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from .cli import main  # noqa: E402

raise SystemExit(main())
