"""Drive a running real WebUI (A1111 1.10.1 or Forge) with Playwright and check the items of issue #15.

Never run by CI, never collected by pytest (no ``test_`` names, outside ``tests/``). See README.md here.

    python3 tools/realwebui/drive.py --webui forge --url http://127.0.0.1:7861 --root /work/webuis/forge \
        --reference /work/webuis/ref_forge.png --out /tmp/realwebui_forge.json
    python3 tools/realwebui/drive.py --webui a1111 --url http://127.0.0.1:7860 --make-reference /work/webuis/ref_a1111.png

Every check records pass / fail / n/a with its evidence (texts seen, timings) in the JSON file named by --out,
rewritten after each check, and screenshots under --shots. The checks only read what a user or an API client
sees: the page, the HTTP API, the WebUI's console log and the membrane folder.
"""
from __future__ import annotations

import argparse
import base64
import hashlib
import io
import json
import os
import re
import stat
import threading
import time
import traceback
import urllib.error
import urllib.request
from pathlib import Path

CHROMIUM = "/usr/bin/chromium"
GEN = dict(prompt="a photo of a cat", negative_prompt="", seed=1234, steps=4, width=64, height=64, cfg_scale=7,
           sampler_name="Euler", batch_size=1, n_iter=1)
TRAIN = dict(target="cat", iterations=4, resolution=64)
# the before/after check: one control prompt and 2 sampling steps (the defaults, 2 controls x 20 steps, cost
# 120 sampling steps on a shared 2-core machine); the tab gets the same values
CHECK = dict(control_prompts="a photo of a dog", preview_steps=2)
PHASES = {  # phase → words a user would read for it in the progress text
    "loading": re.compile(r"load", re.I),
    "latent pool": re.compile(r"(latent|pool|anchor)[^0-9]*\d+\s*/\s*\d+", re.I),
    "training step": re.compile(r"step\s*\d+\s*/\s*\d+", re.I),
    "before/after check": re.compile(r"(check|before|after|preview)[^0-9]*\d+\s*/\s*\d+", re.I),
    "saving": re.compile(r"sav", re.I),
}
# phases a job names only when it runs them (calibration and the neighbour words once per checkpoint and target, the
# model-synonym scan not for short jobs, the erasure signal after the last step): they name a phase in the bar, but
# "every phase named" does not require them
OPTIONAL_PHASES = {
    "transport calibration": re.compile(r"calibrat", re.I),
    "finding words": re.compile(r"finding the words", re.I),
    "erasure signal": re.compile(r"measuring the erasure", re.I),
    "erasure probes": re.compile(r"held-out probes", re.I),
    "membrane gate": re.compile(r"membrane gate", re.I),
}
ALL_PHASES = {**PHASES, **OPTIONAL_PHASES}


# --- results -----------------------------------------------------------------------------------------
class Results:
    def __init__(self, path: Path, webui: str, meta: dict):
        self.path, self.data = path, {"webui": webui, "meta": meta, "items": {}}

    def add(self, item: str, ok: bool | None, evidence, **extra) -> None:
        status = "n/a" if ok is None else ("pass" if ok else "fail")
        self.data["items"][item] = {"status": status, "evidence": evidence, **extra}
        print(f"[{status.upper():4}] {item}: {evidence if isinstance(evidence, str) else json.dumps(evidence)[:400]}",
              flush=True)
        self.save()

    def save(self) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=1, default=str))
        os.replace(tmp, self.path)


# --- HTTP --------------------------------------------------------------------------------------------
class Api:
    def __init__(self, url: str):
        self.url = url.rstrip("/")

    def call(self, method: str, path: str, body=None, timeout: float = 600):
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data=data, method=method,
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                return r.status, json.loads(r.read() or b"null")
        except urllib.error.HTTPError as e:
            raw = e.read()
            try:
                return e.code, json.loads(raw)
            except ValueError:
                return e.code, raw.decode(errors="replace")

    def txt2img(self, **kw):
        body = dict(GEN, **kw)
        code, res = self.call("POST", "/sdapi/v1/txt2img", body)
        if code != 200:
            raise RuntimeError(f"txt2img → {code}: {str(res)[:500]}")
        png = base64.b64decode(res["images"][0].split(",", 1)[-1])
        return png, json.loads(res.get("info") or "{}")


def pixels(png: bytes) -> bytes:
    from PIL import Image

    with Image.open(io.BytesIO(png)) as im:
        return im.convert("RGB").tobytes()


def digest(png: bytes) -> str:
    return hashlib.sha256(pixels(png)).hexdigest()[:16]


class ProgressPoller(threading.Thread):
    """Polls ``/sdapi/v1/progress`` (the WebUI's own state: textinfo, ETA, job counters) once a second."""

    def __init__(self, api: Api):
        super().__init__(daemon=True)
        self.api, self.samples, self.stop_event, self.t0 = api, [], threading.Event(), time.monotonic()

    def run(self):
        while not self.stop_event.is_set():
            try:
                code, res = self.api.call("GET", "/sdapi/v1/progress?skip_current_image=true", timeout=10)
                if code == 200:
                    st = res.get("state", {})
                    self.samples.append({"t": round(time.monotonic() - self.t0, 1), "eta": res.get("eta_relative"),
                                         "progress": res.get("progress"), "textinfo": res.get("textinfo"),
                                         "job": st.get("job"), "job_no": st.get("job_no"),
                                         "job_count": st.get("job_count")})
            except Exception as e:  # the server being busy is evidence too
                self.samples.append({"t": round(time.monotonic() - self.t0, 1), "error": repr(e)[:120]})
            self.stop_event.wait(1.0)


class LogTail:
    """The part of the WebUI's console log written after ``mark``."""

    def __init__(self, path: Path):
        self.path = path
        self.offset = self.size()

    def size(self) -> int:
        return self.path.stat().st_size if self.path.exists() else 0

    def mark(self) -> None:
        self.offset = self.size()

    def since(self) -> str:
        if not self.path.exists():
            return ""
        with open(self.path, "rb") as f:
            f.seek(self.offset)
            return f.read().decode(errors="replace")


def spm_lines(text: str) -> list[str]:
    # A1111/Forge consoles redraw tqdm bars with \r; keep the last state of each line
    lines = [ln.split("\r")[-1].strip() for ln in text.splitlines()]
    return [ln for ln in lines if re.search(r"\bspm\b", ln, re.I)]


def console_has(lines: list[str]) -> dict[str, bool]:
    return {k: any(re.search(rx, ln, re.I) for ln in lines) for k, rx in
            {"start": r"start|begin|queued|train(ing)?\b.*(for|on|:)|load", "progress": r"\d+\s*/\s*\d+",
             "end": r"done|saved|finished|interrupted|failed|error"}.items()}


def phases_in(texts: list[str]) -> dict[str, str]:
    found = {}
    for txt in texts:
        for phase, rx in ALL_PHASES.items():
            if phase not in found and txt and rx.search(txt):
                found[phase] = txt
    return found


SAMPLE_LIMIT_S = 2.0  # a phase shorter than this may fall between two samples of the tab (1 s) or the API (0.3 s + a call)


def logged_phases(status: str | None = None, api_phases: list | None = None) -> list[tuple[str, float]]:
    """``(label, seconds)`` of every phase a finished job logged: the API's ``phases`` list, or the tab's final status
    line "Time per phase: loading the model 0.4 s · … · saving 0.1 s"."""
    if api_phases:
        # a phase still running (seconds None) has no duration to credit
        return [(str(e.get("label") or e.get("phase")), float(e["seconds"])) for e in api_phases
                if e.get("seconds") is not None]
    m = re.search(r"Time per phase:\s*(.*)", status or "")
    out = []
    for item in (m.group(1).split(" · ") if m else []):
        d = re.search(r"(\d+(?:\.\d+)?) s$|(\d+):(\d\d)$", item.strip())
        if d:
            sec = float(d.group(1)) if d.group(1) else 60 * int(d.group(2)) + int(d.group(3))
            out.append((item.strip()[:d.start()].strip(), sec))
    return out


def too_short_to_sample(missing: list[str], logged: list[tuple[str, float]]) -> dict[str, float]:
    """The missing phases that the job's own log shows it ran for less than :data:`SAMPLE_LIMIT_S` (named in the
    bar while they ran, but between two samples of this checker): phase → seconds."""
    out = {}
    for phase in missing:
        hits = [sec for label, sec in logged if ALL_PHASES[phase].search(label)]
        if hits and max(hits) < SAMPLE_LIMIT_S:
            out[phase] = max(hits)
    return out


def eta_count(text: str) -> int:
    return len(re.findall(r"\bETA\b", text or ""))


# --- the page ----------------------------------------------------------------------------------------
class Page:
    def __init__(self, pw, url: str, shots: Path, webui: str):
        self.browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True,
                                          args=["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"])
        self.ctx = self.browser.new_context(viewport={"width": 1600, "height": 1400}, reduced_motion="reduce")
        self.page = self.ctx.new_page()
        self.page.set_default_timeout(60_000)
        self.url, self.shots, self.webui = url, shots, webui
        self.console: list[str] = []
        self.page.on("console", lambda m: self.console.append(f"{m.type}: {m.text}"[:300]))
        # where the error was thrown (the first frames of its stack), so that a report names the script at fault
        self.page.on("pageerror", lambda e: self.console.append(
            (f"pageerror: {e}" + " @ " + " | ".join((e.stack or "").splitlines()[1:4]).strip())[:600]))

    def load(self, timeout_s: float = 300) -> float:
        t0 = time.monotonic()
        self.page.goto(self.url, wait_until="domcontentloaded", timeout=timeout_s * 1000)
        self.page.wait_for_selector("#txt2img_prompt textarea", timeout=timeout_s * 1000)
        # the WebUI's own scripts run onUiLoaded once Gradio mounted everything: wait for the settings JSON
        self.page.wait_for_function("() => typeof opts !== 'undefined' && Object.keys(opts).length > 10",
                                    timeout=timeout_s * 1000)
        return time.monotonic() - t0

    def shot(self, name: str) -> str:
        path = self.shots / f"{name}.png"
        try:
            self.page.screenshot(path=str(path), full_page=False)
        except Exception as e:
            return f"(screenshot failed: {e!r})"
        return str(path)

    def js(self, expr: str, arg=None):
        return self.page.evaluate(expr, arg)

    def tab(self, label: str) -> None:
        """Click a top-level tab of the WebUI by its label."""
        self.page.locator("#tabs > .tab-nav button, #tabs > div > .tab-nav button, #tabs button[role=tab]",
                          has_text=re.compile(rf"^\s*{re.escape(label)}\s*$", re.I)).first.click()
        time.sleep(0.5)

    def text(self, selector: str) -> str:
        return self.js("(s) => { const e = gradioApp().querySelector(s); return e ? (e.value ?? e.innerText ?? '') : null; }",
                       selector)

    def set_field(self, elem_id: str, value) -> None:
        """Fill a Gradio textbox/number by its elem_id (input or textarea inside it), firing the input events."""
        loc = self.page.locator(f"#{elem_id} textarea, #{elem_id} input[type=number], #{elem_id} input[type=text], "
                                f"#{elem_id} input:not([type])").first
        loc.fill(str(value))
        loc.dispatch_event("input")
        loc.dispatch_event("change")
        loc.press("Tab")


# --- the checks --------------------------------------------------------------------------------------
class Driver:
    def __init__(self, a):
        self.a = a
        self.api = Api(a.url)
        self.root = Path(a.root) if a.root else None
        self.shots = Path(a.shots)
        self.shots.mkdir(parents=True, exist_ok=True)
        self.log = LogTail(self.root / "webui.log") if self.root else None
        commit = ""
        if self.root and (self.root / "extensions/sd-webui-spm/.installed_commit").exists():
            commit = (self.root / "extensions/sd-webui-spm/.installed_commit").read_text().strip()
        self.r = Results(Path(a.out), a.webui, {"url": a.url, "extension_commit": commit,
                                                 "started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())})
        self.tag = time.strftime("%H%M%S", time.gmtime())
        self.names: dict[str, str] = {}
        self.t_start = time.monotonic()

    # -- helpers
    def left(self) -> float:
        return self.a.budget - (time.monotonic() - self.t_start)

    def membrane_dir(self) -> Path | None:
        code, res = self.api.call("GET", "/spm/v1/membranes", timeout=60)
        if code == 200 and isinstance(res, dict) and res.get("folder"):
            return Path(res["folder"])
        return self.root / "models" / "spm" if self.root else None

    def membranes(self) -> list[dict]:
        code, res = self.api.call("GET", "/spm/v1/membranes", timeout=60)
        return res.get("membranes", []) if code == 200 and isinstance(res, dict) else []

    def run(self, name: str, fn) -> None:
        if name in self.a.skip:
            self.r.add(name, None, "skipped: --skip")
            return
        if self.left() < 30:
            self.r.add(name, None, f"skipped: the driver's time budget ({self.a.budget:.0f} s) is spent")
            return
        try:
            fn()
        except Exception as e:
            shot = self.p.shot(f"{self.a.webui}_error_{name}") if getattr(self, "p", None) else ""
            self.r.add(name, False, f"the check itself broke: {e!r}", traceback=traceback.format_exc()[-1500:],
                       screenshot=shot)

    # -- generation / bit identity
    def check_reference(self, key: str, phase: str) -> None:
        png, info = self.api.txt2img()
        d = digest(png)
        (self.shots / f"{self.a.webui}_gen_{phase}.png").write_bytes(png)
        ev = {"pixels_sha256": d, "infotext": info.get("infotexts", [""])[0][:300]}
        ref = Path(self.a.reference) if self.a.reference else None
        if ref is not None and ref.exists():
            rd = digest(ref.read_bytes())
            ev["reference"] = {"file": str(ref), "pixels_sha256": rd}
            self.r.add(key, d == rd and "SPM" not in ev["infotext"], ev)
        else:
            self.r.add(key, None, dict(ev, note="no reference image made without the extension"))
        return d

    # -- settings
    def check_settings(self) -> None:
        self.p.tab("Settings")
        self.p.page.wait_for_selector("#settings", timeout=60_000)
        res = self.p.js("""() => {
            const nav = gradioApp().querySelector('#settings > .tab-nav') || gradioApp().querySelector('#settings .tab-nav');
            if (!nav) return {error: 'no settings nav'};
            let cat = null, hit = null; const sections = [];
            for (const el of nav.children) {
                if (el.classList.contains('settings-category')) { cat = el.textContent.trim(); continue; }
                const t = el.textContent.trim(); sections.push([cat, t]);
                if (/^spm$/i.test(t) || /\\bspm\\b/i.test(t)) hit = hit || {category: cat, section: t};
            }
            const opts_sec = Object.keys(opts).filter(k => k.startsWith('spm_'));
            return {hit, spm_options: opts_sec, n_sections: sections.length,
                    uncategorized: sections.filter(s => s[0] === 'Uncategorized').map(s => s[1])};
        }""")
        shot = None
        if res.get("hit"):
            btn = self.p.page.locator("#settings .tab-nav button", has_text=res["hit"]["section"]).first
            btn.click()
            time.sleep(0.5)
            shot = self.p.shot(f"{self.a.webui}_settings_spm")
            res["fields"] = self.p.js("""() => Array.from(gradioApp().querySelectorAll('[id^=setting_spm_]'))
                                          .map(e => e.id + ': ' + (e.innerText || '').split('\\n')[0])""")
        ok = bool(res.get("hit")) and res["hit"].get("category") not in ("Uncategorized", None)
        self.r.add("settings: own SPM section (not under Uncategorized)", ok, res, screenshot=shot)
        self.p.tab("txt2img")

    # -- the trainer tab
    def open_trainer(self) -> None:
        self.p.tab("SPM Trainer")
        self.p.page.wait_for_selector("#spm_train_name", timeout=60_000)

    def fill_trainer(self, name: str, iterations: int, resolution: int, target: str = TRAIN["target"]) -> None:
        p = self.p
        p.set_field("spm_train_name", name)
        p.set_field("spm_train_target", target)
        p.set_field("spm_train_iterations", iterations)
        # "More settings" accordion holds the resolution
        if not p.page.locator("#spm_train_resolution").first.is_visible():
            p.page.get_by_text("More settings", exact=False).first.click()
            time.sleep(0.5)
        p.set_field("spm_train_resolution", resolution)
        values = {"control_prompts": CHECK["control_prompts"],
                  "preview_steps": CHECK["preview_steps"] if self.a.tab_preview_steps is None else self.a.tab_preview_steps}
        for elem_id, key in (("spm_train_controls", "control_prompts"), ("spm_train_preview_steps", "preview_steps")):
            if p.page.locator(f"#{elem_id}").count() and values[key] != "default":
                p.set_field(elem_id, values[key])
        time.sleep(0.3)

    def tab_snapshot(self) -> dict:
        return self.p.js("""() => {
            const q = s => gradioApp().querySelector(s);
            const bar = Array.from(gradioApp().querySelectorAll('.progressDiv .progress')).map(e => e.textContent);
            const fp = src => src ? src.length + ':' + src.slice(-48) : null;  // tells images apart, stays short
            const img = s => { const i = q(s + ' img'); return i && i.src ? fp(i.src) : null; };
            // where the WebUI's live preview (the progress bar's image) is drawn: the container and its labels
            const lives = Array.from(gradioApp().querySelectorAll('.livePreview')).filter(l => l.querySelector('img'))
                .map(l => { const box = l.parentElement; const near = l.closest('[id^=spm_train]');
                            return {parent: box ? box.id : null, inside: near ? near.id : null,
                                    labels: box ? Array.from(box.querySelectorAll('label, [data-testid=block-label], .block-label'))
                                                     .map(x => x.innerText.trim()).filter(Boolean).slice(0, 3) : []}; });
            const prog = q('#spm_train_progress textarea, #spm_train_progress input');
            // the HTML's own content, without Gradio's loading overlay ("queue: 1/1 | 1.7s", "processing | 3s")
            // (live innerText, so that what the page hides with display:none is not read as shown)
            const clean = e => { if (!e) return null; let t = e.innerText || '';
                e.querySelectorAll('.wrap, .eta-bar, .progress-text, .progressDiv, .meta-text, .meta-text-center, .progress-level')
                 .forEach(x => { const o = (x.innerText || '').trim(); if (o) t = t.split(o).join(''); });
                return {innerText: t}; };
            const status = clean(q('#spm_train_status'));
            return {bar, progress: prog ? prog.value : null, status: status ? status.innerText.trim() : null,
                    loss_img: img('#spm_train_loss'), preview_img: img('#spm_train_preview'),
                    live_img: (() => { const l = q('#spm_train_live .livePreview img'); return l ? fp(l.src) : null; })(),
                    live_where: lives,
                    loss_spinner: !!q('#spm_train_loss .wrap:not(.hide), #spm_train_loss .eta-bar, #spm_train_loss .progress-text'),
                    file: (q('#spm_train_file textarea, #spm_train_file input') || {}).value || null};
        }""")

    def watch_tab_job(self, label: str, limit_s: float) -> dict:
        """Click Train, then sample the tab every 0.5 s until the job's end shows (status or saved file)."""
        self.log.mark()
        poller = ProgressPoller(self.api)
        poller.start()
        initial = self.tab_snapshot()  # what the tab showed before this start (an old error, an old Progress)
        t0 = time.monotonic()
        self.p.page.locator("#spm_train_train").first.click()
        timeline, shots, ended = [], [], None
        first_named = None
        while time.monotonic() - t0 < limit_s:
            snap = self.p.tab_snapshot() if hasattr(self.p, "tab_snapshot") else self.tab_snapshot()
            snap["t"] = round(time.monotonic() - t0, 1)
            if not timeline or {k: v for k, v in snap.items() if k != "t"} != {k: v for k, v in timeline[-1].items()
                                                                              if k != "t"}:
                timeline.append(snap)
            # the bar, and Progress only once it changed: an old "step 0/4" left by a failed job names nothing
            texts = snap["bar"] + ([snap["progress"]] if snap["progress"] != initial.get("progress") else [])
            if first_named is None and phases_in(texts):
                first_named = snap["t"]
            if len(shots) < 4 and snap["t"] >= [2, 10, 30, 90][len(shots)]:
                shots.append(self.p.shot(f"{self.a.webui}_{label}_t{int(snap['t'])}"))
            st = (snap.get("status") or "").lower()
            if snap["t"] > 2 and not snap["bar"] and (snap.get("file") or "failed" in st or "interrupted" in st
                                                     or "saved" in st or "done" in st):
                ended = snap["t"]
                break
            time.sleep(1.0)
        over = None
        if ended is None:  # past the limit: press Interrupt, as a user would, and wait for the end
            over = {"limit_s": limit_s, "interrupt_pressed_at_s": round(time.monotonic() - t0, 1)}
            self.p.page.locator("#spm_train_interrupt").first.click()
            t1 = time.monotonic()
            while time.monotonic() - t1 < self.a.interrupt_wait:
                snap = self.tab_snapshot()
                if not snap["bar"]:
                    break
                time.sleep(2.0)
            over["ended_after_interrupt_s"] = None if snap["bar"] else round(time.monotonic() - t1, 1)
        time.sleep(1.5)
        final = self.tab_snapshot()
        final["t"] = round(time.monotonic() - t0, 1)
        timeline.append(final)
        shots.append(self.p.shot(f"{self.a.webui}_{label}_end"))
        poller.stop_event.set()
        return {"timeline": timeline, "ended_s": ended, "first_named_s": first_named, "shots": shots, "over_limit": over,
                "initial": initial,
                "webui_progress": poller.samples, "console": self.log.since()}

    def phase_times(self, timeline: list[dict], old_progress=None) -> dict:
        out = {}
        for s in timeline:
            for txt in s["bar"] + ([s.get("progress") or ""] if s.get("progress") != old_progress else []):
                for phase, rx in ALL_PHASES.items():
                    if txt and rx.search(txt):
                        out.setdefault(phase, [s["t"], s["t"]])
                        out[phase][1] = s["t"]
        return out

    def judge_job(self, label: str, w: dict, via: str) -> None:
        tl = w["timeline"]
        old = w["initial"].get("progress")
        texts = [t for s in tl for t in s["bar"] + ([s.get("progress") or ""] if s.get("progress") != old else [])]
        found = phases_in(texts)
        missing = [p for p in PHASES if p not in found]
        logged = logged_phases(tl[-1].get("status"))
        short = too_short_to_sample(missing, logged)
        running = [s for s in tl if s["bar"] and s["t"] > 0 and not re.match(r"^\s*Waiting", " ".join(s["bar"]))]
        self.r.add(f"{via}: every phase named in the progress text", not [p for p in missing if p not in short],
                   {"named": found, "missing": missing, "shorter_than_a_sample_s": short, "logged": logged,
                    "phase_seconds": self.phase_times(tl, old)})
        silent, start = 0.0, None
        for s in running:
            named = bool(phases_in(s["bar"]))
            if not named and start is None:
                start = s["t"]
            if named and start is not None:
                silent, start = max(silent, s["t"] - start), None
        if start is not None and running:
            silent = max(silent, running[-1]["t"] - start)
        self.r.add(f"{via}: no stretch longer than 10 s in which the bar names no phase", bool(running) and silent <= 10,
                   {"longest_silent_s": round(silent, 1), "job_s": w["ended_s"]})
        first = w["first_named_s"]
        self.r.add(f"{via}: a phase is named from the first second", first is not None and first <= 2.0,
                   {"first_named_after_s": first, "first_samples": tl[:4]})
        bars = [b for s in tl for b in s["bar"]]
        worst = max(bars, key=eta_count, default="")
        self.r.add(f"{via}: only one ETA in the bar", bool(bars) and eta_count(worst) <= 1,
                   {"bar_with_most_ETAs": worst, "bars_seen": len(set(bars)), "some_bars": sorted(set(bars))[:12]})
        # while the job runs (the bar shows), the loss plot must be in the Loss box, not only at the end
        def live_in_loss(s):
            return any("loss" in ((lv.get("inside") or "") + (lv.get("parent") or "")).lower() or
                       (any("Loss" in x for x in lv.get("labels", [])) and not any("Before" in x for x in lv.get("labels", [])))
                       for lv in s.get("live_where") or [])

        # ...and before the job's final outputs arrive (the saved file, a final status), which also draw the plot;
        # a status that merely changed is no end: the start itself clears an old error (A1111: "Time taken: 0.0 sec.")
        t_out = next((s["t"] for s in tl if s.get("file") or (s.get("status") and s.get("status") != w["initial"].get("status")
                                                              and re.search(r"saved|failed|interrupted|\bdone\b",
                                                                            s["status"], re.I))),
                     float("inf"))
        loss_live = [s["t"] for s in running if s["t"] < t_out and (
            (s.get("loss_img") and s.get("loss_img") != w["initial"].get("loss_img")) or live_in_loss(s))]
        loss_end = bool(tl[-1].get("loss_img"))
        loss_spinner = [s["t"] for s in running if s.get("loss_spinner")]
        preview_live = [s["t"] for s in running if s.get("live_img")]
        self.r.add(f"{via}: the loss plot appears in the 'Loss' box (while the job runs)", bool(loss_live),
                   {"loss_box_image_while_running_at_s": loss_live[:5], "loss_box_image_at_end": loss_end,
                    "loss_box_spinner_while_running_at_s": loss_spinner[:5],
                    "live_preview_in_before_after_slot_at_s": preview_live[:5],
                    "live_preview_places": sorted({json.dumps(lv) for s in running for lv in s.get("live_where") or []})[:4],
                    "screenshots": w["shots"]})
        eta_vals = [s.get("eta") for s in w["webui_progress"] if s.get("eta") is not None]
        dur = w["ended_s"] or tl[-1]["t"]
        self.r.add(f"{via}: the WebUI's own ETA is right or hidden", bool(eta_vals) is False or max(eta_vals) <= 3 * dur,
                   {"job_seconds": dur, "webui_eta_max_s": max(eta_vals, default=None),
                    "webui_eta_samples": [(s["t"], s.get("eta"), s.get("job_no"), s.get("job_count"))
                                          for s in w["webui_progress"][:: max(1, len(w['webui_progress']) // 12)]]})
        lines = spm_lines(w["console"])
        has = console_has(lines)
        self.r.add(f"{via}: the console logs start / progress / end", all(has.values()),
                   {"found": has, "spm_console_lines": lines[:25]})
        self.r.add(f"{via}: duration (seconds, per phase)", None,
                   {"total_s": dur, "phase_first_last_seen_s": self.phase_times(tl, old)})

    def check_tab_training(self) -> None:
        name = f"rw_tab_{self.tag}"
        self.names["tab"] = name
        self.open_trainer()
        self.fill_trainer(name, TRAIN["iterations"], TRAIN["resolution"])
        w = self.watch_tab_job("tab_train", self.a.job_limit)
        final = w["timeline"][-1]
        ok = final.get("file") and "fail" not in (final.get("status") or "").lower()
        compact = [{k: (v[:160] if isinstance(v, str) else v) for k, v in x.items() if k in ("t", "bar", "progress", "status")}
                   for x in w["timeline"]]
        self.r.add("tab: a 4-iteration 64 px job finishes and saves", bool(ok) and not w["over_limit"],
                   {"final": final, "ended_after_s": w["ended_s"], "over_limit": w["over_limit"]},
                   screenshot=w["shots"][-1], timeline=compact[:80])
        self.judge_job("tab", w, "tab")
        self.tab_job = w

    def check_failure_then_restart(self) -> None:
        """A failed start, then a good one: the old error must go and Progress must be reset at the new start."""
        self.open_trainer()
        self.p.set_field("spm_train_name", f"rw_bad_{self.tag}")
        self.p.set_field("spm_train_target", "   ")
        self.p.page.locator("#spm_train_train").first.click()
        t0 = time.monotonic()
        while time.monotonic() - t0 < 60:
            s = self.tab_snapshot()
            if s.get("status"):
                break
            time.sleep(0.5)
        self.failed_state = self.tab_snapshot()
        self.failed_shot = self.p.shot(f"{self.a.webui}_bad_input")

    def judge_restart(self, w: dict, before: dict, via: str) -> None:
        tl = w["timeline"]
        err = (before.get("status") or "").strip()
        # at the first sample where the new job shows progress, is the old error still there?
        first_running = next((s for s in tl if s["bar"] or (s.get("progress") not in (None, "", before.get("progress")))),
                             None)
        stale_err = bool(err) and first_running is not None and err in (first_running.get("status") or "")
        progress_reset = first_running is not None and first_running.get("progress") != before.get("progress") or \
            not before.get("progress")
        self.r.add(f"{via}: after a failure, the next start clears the old error and resets Progress",
                   bool(err) and first_running is not None and not stale_err and progress_reset,
                   {"error_before": err[:300], "progress_before": before.get("progress"),
                    "first_sample_of_new_job": first_running})

    def check_api_training(self) -> None:
        name = f"rw_api_{self.tag}"
        self.names["api"] = name
        self.log.mark()
        poller = ProgressPoller(self.api)
        poller.start()
        t0 = time.monotonic()
        code, res = self.api.call("POST", "/spm/v1/train", {"name": name, **TRAIN, **CHECK})
        if code != 200:
            poller.stop_event.set()
            self.r.add("api: POST /spm/v1/train queues a job", False, {"code": code, "body": res})
            return
        jid = res["id"]
        tl = []
        while time.monotonic() - t0 < self.a.job_limit:
            c, j = self.api.call("GET", f"/spm/v1/train/{jid}", timeout=30)
            s = {"t": round(time.monotonic() - t0, 1), "status": j.get("status"), "message": j.get("message"),
                 "step": j.get("step"), "total": j.get("total"), "error": j.get("error")}
            for k in ("phase", "phase_done", "phase_total", "phase_eta_s", "progress", "eta_s"):
                if k in j:
                    s[k] = j[k]
            if not tl or {k: v for k, v in s.items() if k != "t"} != {k: v for k, v in tl[-1].items() if k != "t"}:
                tl.append(s)
            if j.get("status") in ("done", "failed", "interrupted"):
                break
            time.sleep(0.3)
        over = None
        if j.get("status") not in ("done", "failed", "interrupted"):
            over = {"limit_s": self.a.job_limit, "interrupt": self.api.call("POST", f"/spm/v1/train/{jid}/interrupt")}
            t1 = time.monotonic()
            while time.monotonic() - t1 < self.a.interrupt_wait:
                _, j = self.api.call("GET", f"/spm/v1/train/{jid}", timeout=30)
                if j.get("status") in ("done", "failed", "interrupted"):
                    break
                time.sleep(2.0)
            over["status_after"] = j.get("status")
            over["seconds_after_interrupt"] = round(time.monotonic() - t1, 1)
            tl.append({"t": round(time.monotonic() - t0, 1), "status": j.get("status"), "message": j.get("message")})
        poller.stop_event.set()
        self.api_job = j
        ok = j.get("status") == "done" and j.get("output")
        self.r.add("api: a 4-iteration 64 px job finishes and saves", bool(ok) and over is None,
                   {"final": {k: j.get(k) for k in ("status", "step", "total", "output", "error", "message")},
                    "seconds": tl[-1]["t"], "over_limit": over})
        texts = [f"{s.get('phase') or ''} {s.get('message') or ''} {s.get('progress') or ''}" for s in tl]
        found = phases_in(texts)
        # the second job on the same checkpoint may reuse the latent pool (#15 allows it): not required here
        required = [p for p in PHASES if p != "latent pool"]
        logged = logged_phases(api_phases=j.get("phases"))
        short = too_short_to_sample([p for p in required if p not in found], logged)
        self.r.add("api: every phase named in the job's message", all(p in found or p in short for p in required),
                   {"named": found, "missing": [p for p in PHASES if p not in found], "shorter_than_a_sample_s": short,
                    "logged": logged,
                    "note": "latent pool not required for this second job (may be reused)", "timeline": tl[:40]})
        silent, start = 0.0, None
        for s in tl:
            named = bool(phases_in([f"{s.get('phase') or ''} {s.get('message') or ''} {s.get('progress') or ''}"])) \
                or s.get("status") != "running"
            if not named and start is None:
                start = s["t"]
            if named and start is not None:
                silent, start = max(silent, s["t"] - start), None
        self.r.add("api: no stretch longer than 10 s in which the job's message names no phase", silent <= 10,
                   {"longest_silent_s": round(silent, 1)})
        first = next((s["t"] for s in tl if phases_in([f"{s.get('phase') or ''} {s.get('message') or ''} {s.get('progress') or ''}"])),
                     None)
        self.r.add("api: a phase is named from the first second", first is not None and first <= 2.0,
                   {"first_named_after_s": first, "first_polls": tl[:4]})
        eta_vals = [s.get("eta") for s in poller.samples if s.get("eta") is not None]
        self.r.add("api: the WebUI's own ETA (/sdapi/v1/progress) is right or hidden",
                   not eta_vals or max(eta_vals) <= 3 * tl[-1]["t"],
                   {"job_seconds": tl[-1]["t"], "webui_eta_max_s": max(eta_vals, default=None),
                    "samples": [(s["t"], s.get("eta"), s.get("textinfo"), s.get("job_no"), s.get("job_count"))
                                for s in poller.samples[:: max(1, len(poller.samples) // 12)]]})
        lines = spm_lines(self.log.since())
        has = console_has(lines)
        self.r.add("api: the console logs start / progress / end", all(has.values()),
                   {"found": has, "spm_console_lines": lines[:25]})

    def check_folder_after_success(self) -> None:
        folder = self.membrane_dir()
        names = [n for k, n in self.names.items() if k in ("tab", "api")]
        ev, ok_state, ok_mode = {"folder": str(folder)}, True, True
        listing = sorted(os.listdir(folder)) if folder and folder.exists() else []
        ev["listing"] = listing
        for n in names:
            f = folder / f"{n}.safetensors"
            if not f.exists():
                ev[n] = "missing"
                ok_mode = False
                continue
            mode = stat.S_IMODE(f.stat().st_mode)
            ev[n] = {"mode": oct(mode), "size": f.stat().st_size}
            ok_mode &= mode == 0o644
            leftovers = [x for x in listing if x.startswith(n + ".") and x != f"{n}.safetensors"
                         and not x.endswith((".png", ".json", ".preview.png"))]
            ev[n]["beside"] = leftovers
            ok_state &= not any("trainstate" in x for x in leftovers)
        self.r.add("folder: no NAME.safetensors.trainstate after a successful run with 'Save every' 0",
                   ok_state and bool(names), ev)
        self.r.add("folder: membrane file mode 0644 under umask 022", ok_mode and bool(names),
                   {k: v for k, v in ev.items() if k in names})

    def check_robust_api(self) -> None:
        """Robust training long enough to reach an erasure check after its first adversary search (the 4-iteration
        jobs above end before one): the job ends "done", the file records robust training and names the response
        gate's ramp, and the console has no traceback (real A1111 once failed here on a channels-last UNet output)."""
        name = f"rw_rob_{self.tag}"
        self.log.mark()
        t0 = time.monotonic()
        body = {"name": name, **TRAIN, **CHECK, "iterations": 24, "robust": True, "contexts": 0, "synonyms": "off"}
        code, res = self.api.call("POST", "/spm/v1/train", body)
        if code != 200:
            self.r.add("robust: a robust job reaches a check after its first search and saves", False,
                       {"code": code, "body": res})
            return
        j = {}
        while time.monotonic() - t0 < self.a.job_limit:
            _, j = self.api.call("GET", f"/spm/v1/train/{res['id']}", timeout=30)
            if j.get("status") in ("done", "failed", "interrupted"):
                break
            time.sleep(1.0)
        meta: dict = {}
        folder = self.membrane_dir()
        f = folder / f"{name}.safetensors" if folder else None
        if f is not None and f.exists():
            with open(f, "rb") as fh:
                n = int.from_bytes(fh.read(8), "little")
                meta = json.loads(fh.read(n)).get("__metadata__", {})
        training = json.loads(meta.get("spm_training", "{}") or "{}")
        transport = json.loads(meta.get("spm_transport", "{}") or "{}")
        checks = [c.get("step") for c in training.get("signal_history", [])]
        stats = training.get("robust_stats") or {}
        since = self.log.since()
        ok = (j.get("status") == "done" and training.get("robust") == "embedding"
              and (transport.get("response") or {}).get("ramp") == "empty" and stats.get("searches", 0) >= 1
              and len(checks) >= 2 and "Traceback" not in since)
        self.r.add("robust: a robust job reaches a check after its first search and saves", ok,
                   {"final": {k: j.get(k) for k in ("status", "step", "total", "error", "message")},
                    "robust": training.get("robust"), "ramp": (transport.get("response") or {}).get("ramp"),
                    "searches": stats.get("searches"), "checks_at": checks, "tracebacks": since.count("Traceback"),
                    "seconds": round(time.monotonic() - t0, 1)})

    def check_interrupted(self) -> None:
        name = f"rw_int_{self.tag}"
        self.names["int"] = name
        t0 = time.monotonic()
        code, res = self.api.call("POST", "/spm/v1/train", {"name": name, "target": "dog", "iterations": 40,
                                                             "resolution": 64, **CHECK})
        if code != 200:
            self.r.add("interrupt: the card shows the steps actually done", False, {"post": [code, res]})
            return
        jid, j, sent = res["id"], {}, None
        while time.monotonic() - t0 < self.a.job_limit + self.a.interrupt_wait:
            _, j = self.api.call("GET", f"/spm/v1/train/{jid}", timeout=30)
            if sent is None and j.get("status") == "running" and (j.get("step") or 0) >= 1:
                sent = self.api.call("POST", f"/spm/v1/train/{jid}/interrupt")
            if j.get("status") in ("done", "failed", "interrupted"):
                break
            if sent is None and time.monotonic() - t0 > self.a.job_limit / 2:
                sent = self.api.call("POST", f"/spm/v1/train/{jid}/interrupt")  # never reached step 1: stop anyway
            time.sleep(1.0)
        done_steps = j.get("step")
        meta = next((m for m in self.membranes() if m.get("name") == name), None)
        self.int_job = {"name": name, "status": j.get("status"), "steps_done": done_steps, "total": j.get("total"),
                        "interrupt_answer": sent, "metadata": meta, "seconds": round(time.monotonic() - t0, 1)}

    def check_lists_after_reload(self) -> None:
        names = [self.names[k] for k in ("tab", "api", "int") if k in self.names]
        self.p.load()
        self.p.tab("txt2img")
        listed = self.p.js("""() => { const e = gradioApp().querySelector('[id^=script_txt2img_][id$=_spm_membranes]');
                                     return e ? Array.from(e.querySelectorAll('label')).map(l => l.innerText.trim()) : null; }""")
        self.r.add("lists: after a reload, the txt2img SPM list shows the new membranes (no 🔄)",
                   listed is not None and all(n in listed for n in names), {"expected": names, "listed": listed})
        cards = self.open_cards()
        self.r.add("lists: after a reload, the Extra Networks SPM cards show the new membranes (no 🔄)",
                   all(n in cards for n in names), {"expected": names, "cards": cards,
                                                     "screenshot": self.p.shot(f"{self.a.webui}_cards")})
        self.cards = cards
        ij = getattr(self, "int_job", None)
        if ij:
            card = cards.get(ij["name"], "")
            meta = ij.get("metadata") or {}
            d = ij["steps_done"]
            # a card segment ("· 2 of 40 steps ·", "· 2 steps ·", "2/40 steps") must carry the steps done
            nums = [seg.strip() for seg in re.split(r"[·,;|]", card) if re.search(r"\bsteps?\b|\biterations?\b", seg, re.I)]
            card_ok = any(re.search(rf"(?<![\d.]){d}(?![\d.])", seg) for seg in nums)
            keys = ("steps_done", "done_steps", "trained_steps", "steps_trained", "steps")
            meta_key = next((k for k in keys if isinstance(meta, dict) and k in meta), None)
            meta_steps = meta.get(meta_key) if meta_key else None
            # the metadata (what the cards show) must record the steps done; the card text too when it is listed
            ok = ij["status"] == "interrupted" and meta_steps == d and (card_ok or not card)
            self.r.add("interrupt: the metadata and the card show the steps actually done", bool(ok),
                       dict(ij, card_text=card or "(card not listed)", step_segments_on_card=nums,
                            metadata_key=meta_key, metadata_steps=meta_steps))

    def open_cards(self) -> dict:
        p = self.p
        btn = p.page.locator("#txt2img_extra_tabs > .tab-nav button, #txt2img_extra_tabs button[role=tab]",
                             has_text=re.compile(r"^\s*SPM\s*$")).first
        btn.click()
        time.sleep(1.5)
        return p.js("""() => { const out = {};
            gradioApp().querySelectorAll('#txt2img_spm_cards .card, [id$=txt2img_spm_cards] .card').forEach(c => {
                out[c.dataset.name || (c.querySelector('.name') || {}).innerText] = c.innerText.replace(/\\s+/g, ' ').trim(); });
            return out; }""")

    def prompt(self) -> str:
        return self.p.page.locator("#txt2img_prompt textarea").first.input_value()

    def check_card_click(self) -> None:
        name = self.names.get("api") or self.names.get("tab")
        p = self.p
        p.page.locator("#txt2img_prompt textarea").first.fill("")
        card = p.page.locator(f'#txt2img_spm_cards .card[data-name="{name}"]').first
        needed_refresh = False
        if not card.count():  # the stale-list bug is judged above; press the refresh button to judge the click itself
            needed_refresh = True
            p.page.locator("#txt2img_spm_extra_refresh, #txt2img_extra_refresh").first.click()
            card.wait_for(state="attached", timeout=120_000)
            time.sleep(1.0)
        card.click()
        time.sleep(0.7)
        val = self.prompt()
        self.r.add("cards: a card click inserts <spm:NAME:1.0>", f"<spm:{name}:1.0>" in val,
                   {"prompt_after_click": val, "needed_the_refresh_button_first": needed_refresh,
                    "screenshot": p.shot(f"{self.a.webui}_card_click")})
        if needed_refresh:  # the panel's list too, so that the generation checks see the membranes
            try:
                p.page.locator("[id^=script_txt2img_][id$=_spm_refresh]").first.click(force=True)
                time.sleep(2.0)
            except Exception:
                pass
        p.page.locator("#txt2img_prompt textarea").first.fill("")

    def check_autocomplete(self) -> None:
        name = self.names.get("api") or self.names.get("tab")
        p = self.p
        p.tab("txt2img")
        box = p.page.locator("#txt2img_prompt textarea").first
        box.click()
        box.fill("")
        visible_before = self.visible_with(name)
        box.type("a cat <spm:" + name[:4], delay=60)
        time.sleep(1.5)
        visible_after = self.visible_with(name)
        new = [v for v in visible_after if v not in visible_before]
        shot = p.shot(f"{self.a.webui}_autocomplete")
        accepted = None
        if new:
            box.press("Enter" if False else "Tab")
            time.sleep(0.5)
            accepted = self.prompt()
            if f"<spm:{name}" not in accepted:
                box.press("Enter")
                time.sleep(0.5)
                accepted = self.prompt()
        self.r.add("javascript: <spm: autocompletion in the prompt box", bool(new),
                   {"typed": "a cat <spm:" + name[:4], "new_visible_elements_naming_it": new[:5],
                    "prompt_after_accepting": accepted, "screenshot": shot})
        box.fill("")

    def visible_with(self, name: str) -> list[str]:
        return self.p.js("""(name) => Array.from(document.querySelectorAll('body *')).filter(e => {
                if (e.closest('#txt2img_extra_tabs .extra-network-cards, [id$=_cards], textarea, [id$=_spm_membranes]')) return false;
                if (!e.offsetParent) return false;
                const own = Array.from(e.childNodes).filter(n => n.nodeType === 3).map(n => n.textContent).join('');
                return own.includes(name);
            }).map(e => e.tagName + '.' + e.className + ': ' + e.textContent.trim().slice(0, 80))""", name)

    def check_tooltips(self) -> None:
        p = self.p
        p.tab("txt2img")
        acc = p.page.locator("[id^=script_txt2img_][id$=_spm_enable]").first
        res = p.js("""() => {
            const root = gradioApp().querySelector('[id^=script_txt2img_][id$=_spm_enable]');
            if (!root) return {error: 'no SPM accordion in txt2img'};
            const ids = ['spm_membranes', 'spm_refresh', 'spm_weights', 'spm_metric', 'spm_factor', 'spm_enable'];
            const out = {};
            for (const id of ids) {
                const el = gradioApp().querySelector(`[id^=script_txt2img_][id$=_${id}]`);
                if (!el) { out[id] = null; continue; }
                // the control's own elements: not another SPM control inside it (the accordion holds them all),
                // and not the WebUI's generic widget hints ("Clear" on every dropdown)
                const others = ids.filter(x => x !== id).map(x => `[id$=_${x}]`).join(',');
                const own = [el, ...el.querySelectorAll('*')].filter(e => e === el || !e.closest(others) || e.closest(others) === null);
                const titled = own.filter(e => !(e !== el && e.closest(others) && el.contains(e.closest(others))))
                    .map(e => e.getAttribute('title')).filter(t => t && t.trim() && !/^(clear|remove|×)$/i.test(t.trim()));
                out[id] = titled[0] || '';
            }
            return out;
        }""")
        try:
            acc.scroll_into_view_if_needed()
            label = p.page.locator("[id^=script_txt2img_][id$=_spm_weights] span").first
            label.hover()
        except Exception:
            pass
        shot = p.shot(f"{self.a.webui}_tooltips")
        vals = [v for k, v in res.items() if k != "error"]
        self.r.add("javascript: tooltips on the panel's controls", bool(vals) and all(vals),
                   {"title_per_control": res, "screenshot": shot})

    def check_generation_ui(self) -> None:
        name = self.names.get("api") or self.names.get("tab")
        p = self.p
        p.tab("txt2img")
        gen_tab = p.page.locator("#txt2img_extra_tabs > .tab-nav button, #txt2img_extra_tabs button[role=tab]",
                                 has_text=re.compile(r"^\s*Generation\s*$", re.I)).first
        if gen_tab.count():
            gen_tab.click()
            time.sleep(0.5)
        for key, val in (("txt2img_width", 64), ("txt2img_height", 64), ("txt2img_steps", 4)):
            loc = p.page.locator(f"#{key} input[type=number]").first
            loc.fill(str(val))
            loc.press("Enter")
        seed = p.page.locator("#txt2img_seed input").first
        seed.fill("1234")
        seed.press("Tab")
        box = p.page.locator("#txt2img_prompt textarea").first
        box.fill(f"a photo of a cat <spm:{name}:1.0>")
        box.dispatch_event("input")
        if self.log:
            self.log.mark()
        n_console = len(p.console)
        t0 = time.monotonic()
        p.page.locator("#txt2img_generate").first.click()
        try:
            p.page.wait_for_function("""() => { const i = gradioApp().querySelector('#html_info_txt2img');
                                                 return i && /Steps:/.test(i.innerText); }""", timeout=self.a.gen_limit * 1000)
        except Exception as e:  # keep what a reader needs to tell a slow server from a stuck page
            log = self.log.since() if self.log else ""
            self.r.add("generation: a <spm:NAME:1.0> tag works and infotext shows SPM", False,
                       {"error": repr(e)[:300], "seconds": round(time.monotonic() - t0, 1),
                        "sampling_finished_in_log": "100%|" in log, "webui_log_tail": log[-2000:],
                        "browser_console": p.console[n_console:][-20:],
                        "screenshot": p.shot(f"{self.a.webui}_gen_tag_timeout")})
            return
        info = p.text("#html_info_txt2img")
        secs = round(time.monotonic() - t0, 1)
        self.r.add("generation: a <spm:NAME:1.0> tag works and infotext shows SPM", "SPM" in (info or ""),
                   {"infotext": info[:600] if info else info, "seconds": secs,
                    "screenshot": p.shot(f"{self.a.webui}_gen_tag")})
        box.fill("")

    def check_generation_api_panel(self) -> None:
        name = self.names.get("api") or self.names.get("tab")
        base_png, _ = self.api.txt2img()
        try:
            png, info = self.api.txt2img(alwayson_scripts={"spm concept erasing": {
                "args": [True, [name], f"{name}:1.0", "ngram_tokenuni", 1.0]}})
        except RuntimeError as e:
            self.r.add("generation: the panel (API alwayson_scripts) works and infotext shows SPM", False, str(e))
            return
        it = info.get("infotexts", [""])[0]
        (self.shots / f"{self.a.webui}_gen_panel.png").write_bytes(png)
        self.r.add("generation: the panel (API alwayson_scripts) works and infotext shows SPM",
                   "SPM" in it and digest(png) != digest(base_png),
                   {"infotext": it[:500], "changed_the_image": digest(png) != digest(base_png)})

    def check_forge_no_model(self) -> None:
        """Forge, before its first generation: training must say 'generate one image first'."""
        self.open_trainer()
        name = f"rw_nomodel_{self.tag}"
        self.fill_trainer(name, TRAIN["iterations"], TRAIN["resolution"])
        self.p.page.locator("#spm_train_train").first.click()
        t0, snap = time.monotonic(), {}
        while time.monotonic() - t0 < 120:
            snap = self.tab_snapshot()
            if snap.get("status") and not snap["bar"]:
                break
            time.sleep(0.5)
        shot = self.p.shot(f"{self.a.webui}_no_model")
        msg = snap.get("status") or ""
        ok = bool(re.search(r"generate (one|an|a single)? ?image|no (stable diffusion )?model (is )?loaded", msg, re.I)) \
            and "FakeInitialModel" not in msg
        self.r.add("forge: training before the first generation names the missing model (tab)", ok,
                   {"status_text": msg, "progress": snap.get("progress"), "screenshot": shot})
        code, res = self.api.call("POST", "/spm/v1/train", {"name": name + "_api", **TRAIN})
        j = res
        if code == 200:
            for _ in range(240):
                _, j = self.api.call("GET", f"/spm/v1/train/{res['id']}")
                if j.get("status") in ("done", "failed", "interrupted"):
                    break
                time.sleep(0.5)
        text = json.dumps(j)
        ok = bool(re.search(r"generate (one|an|a single)? ?image|no (stable diffusion )?model (is )?loaded", text, re.I)) \
            and "FakeInitialModel" not in text
        self.r.add("forge: training before the first generation names the missing model (API)", ok,
                   {"post": code, "job": {k: j.get(k) for k in ("status", "error", "message")} if isinstance(j, dict) else j})
        self.failed_state = snap
        self.failed_shot = shot

    # -- the whole run
    def main(self) -> None:
        from playwright.sync_api import sync_playwright

        a = self.a
        if a.make_reference:
            png, info = self.api.txt2img()
            Path(a.make_reference).write_bytes(png)
            print(json.dumps({"reference": a.make_reference, "pixels_sha256": digest(png),
                              "infotext": info.get("infotexts", [""])[0]}))
            return
        with sync_playwright() as pw:
            self.p = Page(pw, a.url, self.shots, a.webui)
            self.p.tab_snapshot = self.tab_snapshot
            t = self.p.load()
            self.r.data["meta"]["page_load_s"] = round(t, 1)
            self.run("settings", self.check_settings)
            if a.webui == "forge":
                self.run("forge_no_model", self.check_forge_no_model)
            self.run("reference_before", lambda: self.check_reference(
                "bit-identity: no membrane, before the extension was used = made without the extension", "before"))
            if a.webui != "forge":
                self.run("failure", self.check_failure_then_restart)
            before = getattr(self, "failed_state", {}) or {}
            self.r.data["meta"]["failed_state"] = before
            if a.use_membranes:  # UI checks only, on membranes already in the folder (no training here)
                self.names.update(zip(("tab", "api"), a.use_membranes.split(",")))
            else:
                self.run("tab_training", self.check_tab_training)
                if getattr(self, "tab_job", None):
                    self.judge_restart(self.tab_job, before, "tab")
                self.run("api_training", self.check_api_training)
                self.run("folder", self.check_folder_after_success)
                self.run("robust", self.check_robust_api)
                self.run("interrupt", self.check_interrupted)
            self.run("lists", self.check_lists_after_reload)
            self.run("card_click", self.check_card_click)
            self.run("autocomplete", self.check_autocomplete)
            self.run("tooltips", self.check_tooltips)
            self.run("generation_ui", self.check_generation_ui)
            self.run("generation_api", self.check_generation_api_panel)
            self.run("reference_after", lambda: self.check_reference(
                "bit-identity: no membrane, after training and SPM use = made without the extension", "after"))
            self.r.data["meta"]["browser_console"] = [c for c in self.p.console if "error" in c.lower()][:30]
            self.r.data["meta"]["finished"] = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
            self.r.data["meta"]["seconds"] = round(time.monotonic() - self.t_start, 1)
            self.r.save()
            self.p.browser.close()


def parse_args():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--webui", choices=["a1111", "forge"], required=True)
    ap.add_argument("--url", required=True)
    ap.add_argument("--root", help="the WebUI's folder (for webui.log and the membrane folder)")
    ap.add_argument("--reference", help="PNG made by --make-reference while the extension was disabled")
    ap.add_argument("--make-reference", help="only generate the reference image (API, no SPM) into this file")
    ap.add_argument("--tab-preview-steps", default=None,
                    help="sampling steps of the tab job's before/after check ('default': leave the tab's value)")
    ap.add_argument("--use-membranes", help="NAME1,NAME2 already in the folder: skip the training checks")
    ap.add_argument("--skip", type=lambda v: set(filter(None, v.split(","))), default=set(),
                    help="check names to leave out, e.g. forge_no_model,tab_training (forge_no_model starts two real "
                         "training jobs when the model is already loaded, e.g. with --use-membranes on a warm Forge)")
    ap.add_argument("--out", default="/tmp/realwebui_results.json")
    ap.add_argument("--shots", default="/tmp/realwebui_shots")
    ap.add_argument("--budget", type=float, default=3600, help="seconds for the whole run; later checks are skipped")
    ap.add_argument("--job-limit", type=float, default=1200, help="seconds a training job may take")
    ap.add_argument("--interrupt-wait", type=float, default=600, help="seconds to wait for a job to end after Interrupt")
    ap.add_argument("--gen-limit", type=float, default=300, help="seconds a generation may take")
    return ap.parse_args()


if __name__ == "__main__":
    Driver(parse_args()).main()
