"""Turn the driver's JSON results (one file per WebUI) into one markdown table with the evidence.

    python3 tools/realwebui/report.py /tmp/realwebui_a1111.json /tmp/realwebui_forge.json > REAL_RESULTS.md
"""
from __future__ import annotations

import json
import sys


def short(v, n: int = 700) -> str:
    s = v if isinstance(v, str) else json.dumps(v, default=str)
    s = s.replace("|", "\\|").replace("\n", " ⏎ ")
    return s if len(s) <= n else s[:n] + " …"


def main(paths: list[str]) -> None:
    runs = []
    for p in paths:
        try:
            with open(p) as f:
                runs.append(json.load(f))
        except (OSError, ValueError) as e:
            print(f"- {p}: not readable ({e})\n")
    for r in runs:
        m = r.get("meta", {})
        items = r.get("items", {})
        n = {s: sum(1 for i in items.values() if i["status"] == s) for s in ("pass", "fail", "n/a")}
        print(f"## {r['webui']} — extension {m.get('extension_commit', '?')[:10]} — {n['pass']} pass, {n['fail']} fail, "
              f"{n['n/a']} n/a\n")
        print(f"started {m.get('started')}, finished {m.get('finished', '(not finished)')}, "
              f"{m.get('seconds', '?')} s, page load {m.get('page_load_s', '?')} s\n")
        print("| item | result | evidence |\n|---|---|---|")
        for name, it in items.items():
            ev = dict(it)
            status = ev.pop("status")
            evidence = ev.pop("evidence")
            extra = {k: v for k, v in ev.items() if k != "traceback"}
            text = short(evidence) + (" " + short(extra, 300) if extra else "")
            print(f"| {name} | **{status.upper()}** | {text} |")
        if m.get("browser_console"):
            print(f"\nbrowser console errors: {short(m['browser_console'], 1200)}")
        print()


if __name__ == "__main__":
    main(sys.argv[1:])
