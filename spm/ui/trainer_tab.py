"""The SPM Trainer tab: a host-agnostic Gradio Blocks builder (Gradio 3.41 in A1111 1.10, 4.40 in Forge).

:func:`build_trainer_tab` takes a *backend provider* (a callable returning a :class:`spm.backend.Backend`
for the model to train against, or raising :class:`~spm.train.jobs.NoModelError`) and the membrane folder,
or a ready :class:`~spm.train.jobs.TrainService`.  Two ways to run the Train button:

* **standalone** (``python -m spm.ui``): the handler is a generator; the job runs on the service's worker
  thread and the handler polls it twice a second (progress text, live loss plot, latest sample grid).
* **WebUI** (``wrap`` given: ``modules.call_queue.wrap_gradio_gpu_call``): the handler is a plain function
  that runs the job in the request thread while ``wrap_gradio_gpu_call`` holds the WebUI's queue lock, so no
  generation runs meanwhile; progress goes to ``shared.state`` (a reporter set on the service) and the
  WebUI's own progress bar polls ``/internal/progress`` with the ``task(...)`` id that the ``js`` callback
  puts in the hidden first input — the way A1111's textual-inversion *Train* button works.  The live preview
  (the loss plot) is drawn in the "Loss" box; the bar shows the phase and the WebUI's own ETA.

A new start clears the previous run's message, plot and progress; a failure says "failed" in "Progress".

Only constructor keywords that both Gradio versions accept are used; updates are ``gr.update(...)``.
"""

from __future__ import annotations

import html
from pathlib import Path
from typing import Any, Callable, Sequence

from ..train.config import CONTEXT_WORDS, LA_MODES, PRECISIONS, PRESETS, SYNONYM_MODES, TrainConfig
from ..train.jobs import DEFAULT_CONTROLS, RequestError, TrainJob, TrainService, loss_plot, preset_values

PREFIX = "spm_train"

# the form, in input order (after the hidden task id in WebUI mode)
FORM = ("name", "target", "surrogate", "preset", "iterations", "lr", "la_mode", "la_strength", "anchors",
        "resolution", "seed", "precision", "save_every", "sample_every", "control_prompts", "preview_steps",
        "overwrite", "keep_state", "robust", "neighbours", "synonyms", "contexts", "context_words")

START_JS = """(...args) => {
    var status = gradioApp().getElementById('%(p)s_status');
    if (status) {  // the previous run's message goes away now, not when this run ends
        status.querySelectorAll('.spm-error, .spm-ok, .spm-warn, .spm-info').forEach(function(e) {
            e.style.display = 'none';
        });
    }
    var prog = gradioApp().getElementById('%(p)s_progress');  // nor does the old run's "failed (…)" stay
    var box = prog && prog.querySelector('textarea, input');
    if (box) { box.value = 'starting…'; }
    var id = randomId();
    requestProgress(id, status, gradioApp().getElementById('%(p)s_live'),
                    function() {});
    args[0] = id;
    return args;
}""" % {"p": PREFIX}


def form_to_request(values: dict[str, Any]) -> dict[str, Any]:
    """The tab's field values → the request dict of :func:`spm.train.jobs.parse_request`.

    Empty text and 0 in "resolution" mean "the default"; Gradio numbers arrive as floats or ints.
    """
    data: dict[str, Any] = {}
    for key in FORM:
        v = values.get(key)
        if isinstance(v, str) and key not in ("name", "target", "surrogate", "control_prompts"):
            v = v.strip() or None
        data[key] = v
    for key in ("resolution", "preview_steps"):  # 0: the default (the model's size; sized to the job)
        if data.get(key) in (0, 0.0):
            data[key] = None
    if data.get("control_prompts") is None:
        data["control_prompts"] = ""
    data["overwrite"] = bool(data.get("overwrite"))
    data["keep_state"] = bool(data.get("keep_state"))
    for key in ("robust", "neighbours"):
        if data.get(key) is not None:
            data[key] = bool(data[key])
    return data


def status_html(job: TrainJob | None, error: str | None = None) -> str:
    if error is not None:
        return f"<div class='error spm-error'>{html.escape(error)}</div>"
    if job is None:
        return ""
    cls = {"done": "spm-ok", "interrupted": "spm-warn", "failed": "error spm-error"}.get(job.status, "spm-info")
    text = job.message if job.status != "failed" else f"Training failed: {job.error}"
    out = f"<div class='{cls}' data-status='{job.status}'>{html.escape(text)}</div>"
    summary = job.phase_summary() if job.status in ("done", "failed", "interrupted") else ""
    if summary:  # where the time went, phases shorter than a progress poll included
        out += f"<div class='spm-phases'>Time per phase: {html.escape(summary)}</div>"
    return out


def job_outputs(job: TrainJob, final: bool = False) -> tuple:
    """``(progress text, loss plot, preview image, saved file, status html)`` for one poll of ``job``."""
    import gradio as gr

    plot: Any = loss_plot(job.losses) if job.losses else (None if final else gr.update())
    image: Any = gr.update()
    if final and job.preview_file and Path(job.preview_file).exists():
        image = _load(job.preview_file)
    elif job.sample_file and Path(job.sample_file).exists():
        image = _load(job.sample_file)
    saved = job.output if (final and job.output) else gr.update()
    return job.progress_text(), plot, image, saved, status_html(job)


def _load(path: str):
    from PIL import Image

    with Image.open(path) as im:
        return im.convert("RGB")


def error_outputs(message: str) -> tuple:
    """A request that did not start: the message, and nothing left of the previous run."""
    return "not started", None, None, "", status_html(None, message)


def start_outputs(job: TrainJob) -> tuple:
    """The first answer to a new start: the previous run's progress, plot, image, file and message cleared."""
    return job.progress_text(), None, None, "", status_html(job)


def train_stream(service: TrainService, *values, poll_s: float = 0.5):
    """Standalone Train handler (a generator): queue the job, then report until it ends."""
    data = form_to_request(dict(zip(FORM, values)))
    try:
        job = service.submit(data)
    except RequestError as e:
        yield error_outputs(str(e))
        return
    yield start_outputs(job)
    while not job.done_event.wait(poll_s):
        yield job_outputs(job)
    yield job_outputs(job, final=True)


def train_blocking(service: TrainService, id_task: str, *values) -> tuple:
    """WebUI Train handler: the caller (``wrap_gradio_gpu_call``) already holds the queue lock."""
    data = form_to_request(dict(zip(FORM, values)))
    try:
        job = service.create(data)
    except RequestError as e:
        return error_outputs(str(e))
    service.run(job, take_lock=False)
    return job_outputs(job, final=True)


def interrupt(service: TrainService, extra: Callable[[], None] | None = None) -> Any:
    """Interrupt button: stop the running job after its current step (it is saved)."""
    import gradio as gr

    stopped = service.interrupt()
    if extra is not None:
        extra()
    return "<div class='spm-warn'>Interrupting after this step…</div>" if stopped else gr.update()


def apply_preset(name: str) -> tuple:
    """The preset's values for iterations, lr, LA mode, LA strength and anchors."""
    import gradio as gr

    v = preset_values(name)
    return (gr.update(value=v["iterations"]), gr.update(value=v["lr"]), gr.update(value=v["la_mode"]),
            gr.update(value=v["la_strength"]), gr.update(value=v["anchors"]))


def build_trainer_tab(backend_provider: Callable[[], Any] | None = None, membranes_dir: str | Path | None = None, *,
                      service: TrainService | None = None, wrap: Callable | None = None,
                      on_interrupt: Callable[[], None] | None = None, title: str = "SPM Trainer",
                      controls: Sequence[str] = DEFAULT_CONTROLS):
    """The tab as a ``gr.Blocks``.  Give ``service``, or ``backend_provider`` and ``membranes_dir``.

    ``wrap`` switches to WebUI mode (see the module docstring); ``on_interrupt`` is called by the
    Interrupt button as well (the WebUI passes ``shared.state.interrupt``).  ``controls``: the default control
    prompts of the before/after check.
    """
    import gradio as gr

    if service is None:
        if backend_provider is None or membranes_dir is None:
            raise ValueError("build_trainer_tab needs a service, or a backend_provider and a membranes_dir")
        service = TrainService(backend_provider, membranes_dir)
    webui = wrap is not None
    defaults = preset_values("object")
    p = PREFIX
    with gr.Blocks(analytics_enabled=False, title=title) as tab:
        task_id = gr.Textbox(visible=False, elem_id=f"{p}_task")
        with gr.Row():
            with gr.Column():
                name = gr.Textbox(label="Name (saved as NAME.safetensors in the membrane folder)", value="",
                                  elem_id=f"{p}_name")
                target = gr.Textbox(label="Target concept(s) to erase (commas separate several)", value="",
                                    elem_id=f"{p}_target")
                surrogate = gr.Textbox(label="Surrogate concept (what the target should look like instead; "
                                             "empty = nothing in particular)", value="", elem_id=f"{p}_surrogate")
                with gr.Row():
                    preset = gr.Dropdown(label="Preset", choices=list(PRESETS), value="object", elem_id=f"{p}_preset")
                    iterations = gr.Number(label="Iterations", value=defaults["iterations"], precision=0,
                                           elem_id=f"{p}_iterations")
                    lr = gr.Number(label="Learning rate", value=defaults["lr"], elem_id=f"{p}_lr")
                with gr.Row():
                    la_mode = gr.Dropdown(label="Latent Anchoring", choices=list(LA_MODES), value=defaults["la_mode"],
                                          elem_id=f"{p}_la_mode")
                    la_strength = gr.Number(label="LA strength (fixed: the weight; adaptive: its upper bound)",
                                            value=defaults["la_strength"], elem_id=f"{p}_la_strength")
                    anchors = gr.Number(label="Anchors per step", value=defaults["anchors"], precision=0,
                                        elem_id=f"{p}_anchors")
                with gr.Accordion("More settings", open=False):
                    with gr.Row():
                        resolution = gr.Number(label="Resolution (px; 0 = the model's default)", value=0,
                                               precision=0, elem_id=f"{p}_resolution")
                        seed = gr.Number(label="Seed", value=0, precision=0, elem_id=f"{p}_seed")
                        precision = gr.Dropdown(label="Precision", choices=list(PRECISIONS), value="fp32",
                                                elem_id=f"{p}_precision")
                        save_every = gr.Number(label="Save every N steps (0 = only at the end)", value=0,
                                               precision=0, elem_id=f"{p}_save_every")
                        sample_every = gr.Number(label="Sample previews every N steps (0 = none)", value=0,
                                                 precision=0, elem_id=f"{p}_sample_every")
                    control = gr.Textbox(label="Control prompts for the before/after check (commas separate)",
                                         value=", ".join(controls), elem_id=f"{p}_controls")
                    preview_steps = gr.Number(label="Sampling steps of the before/after check (0 = sized to the job)",
                                              value=0, precision=0, elem_id=f"{p}_preview_steps")
                    keep_state = gr.Checkbox(label="Keep the resume state (NAME.safetensors.trainstate) after a "
                                                   "finished run", value=False, elem_id=f"{p}_keep_state")
                robust = gr.Checkbox(label="Robust to adversarial prompts (slower)", value=defaults["robust"],
                                     info="While training, search text embeddings that bring the concept back "
                                          "through the membrane and erase them too (spm/train/robust.py); use "
                                          "the membrane with the 'response' transport metric, which then also "
                                          "opens it for text that avoids the concept's words but draws it; "
                                          "see the README for what it costs and what it buys",
                                     elem_id=f"{p}_robust")
                neighbours = gr.Checkbox(label="Also erase the words its transport opens for (synonyms)",
                                         value=defaults["neighbours"],
                                         info="Finds every vocabulary word that alone switches this membrane on "
                                              "(as `spm explain --vocabulary` lists them) and erases those too; "
                                              "measured on the toy worlds: a few more paraphrases erased, a few "
                                              "literal images fewer (README)",
                                         elem_id=f"{p}_neighbours")
                synonyms = gr.Radio(label="Model synonyms", choices=list(SYNONYM_MODES), value=defaults["synonyms"],
                                    info="Measures which words the loaded model itself draws as the target (against "
                                         "random words, on held-out noise). gate: the membrane also switches on for "
                                         "them; erase: and training erases them too; off: neither",
                                    elem_id=f"{p}_synonyms")
                contexts = gr.Number(label="Context prompts per target (0 = off)", value=defaults["contexts"],
                                     precision=0,
                                     info="Also erases the target inside short prompts of other words around it "
                                          "(\"the car of\", \"harbor car with\") and checks the erasure there too; pairs whose words alone "
                                          "draw the target are left out. About a fifth more UNet work per step",
                                     elem_id=f"{p}_contexts")
                context_words = gr.Radio(label="Words around the target in the context prompts",
                                         choices=list(CONTEXT_WORDS), value=TrainConfig.context_words,
                                         info="mixed: English function words and random whole words of the CLIP "
                                              "vocabulary; function: function words only (the earlier default)",
                                         elem_id=f"{p}_context_words")
                overwrite = gr.Checkbox(label="Overwrite an existing file of the same name", value=False,
                                        elem_id=f"{p}_overwrite")
                with gr.Row():
                    train = gr.Button("Train", variant="primary", elem_id=f"{p}_train")
                    stop = gr.Button("Interrupt", elem_id=f"{p}_interrupt")
            with gr.Column():
                status = gr.HTML(value="", elem_id=f"{p}_status")
                progress = gr.Textbox(label="Progress", value="", interactive=False, elem_id=f"{p}_progress")
                with gr.Column(elem_id=f"{p}_live"):  # the WebUI draws its live preview (the loss plot) here
                    plot = gr.Image(label="Loss", type="pil", interactive=False, elem_id=f"{p}_loss")
                image = gr.Image(label="Before / after", type="pil", interactive=False, elem_id=f"{p}_preview")
                gr.HTML(value="<small>Rows: the target and the control prompts. Left: without the membrane; "
                              "right: with it (same seeds).</small>", elem_id=f"{p}_preview_help")
                saved = gr.Textbox(label="Saved file", value="", interactive=False, elem_id=f"{p}_file")
        form = [name, target, surrogate, preset, iterations, lr, la_mode, la_strength, anchors, resolution, seed,
                precision, save_every, sample_every, control, preview_steps, overwrite, keep_state, robust, neighbours,
                synonyms, contexts, context_words]
        outputs = [progress, plot, image, saved, status]
        preset.change(fn=apply_preset, inputs=[preset], outputs=[iterations, lr, la_mode, la_strength, anchors])
        if webui:
            fn = wrap(lambda id_task, *vals: train_blocking(service, id_task, *vals),
                      extra_outputs=[gr.update()] * (len(outputs) - 1))
            js_kw = {"_js" if _gradio_major() < 4 else "js": START_JS}
            train.click(fn=fn, inputs=[task_id] + form, outputs=outputs, **js_kw)
        else:
            def stream(*vals):
                yield from train_stream(service, *vals)

            train.click(fn=stream, inputs=form, outputs=outputs)
        stop.click(fn=lambda: interrupt(service, on_interrupt), inputs=[], outputs=[status], queue=False)
    tab.spm_service = service  # for the API, tests and the standalone entry
    return tab


def _gradio_major() -> int:
    import gradio as gr

    try:
        return int(str(gr.__version__).split(".")[0])
    except ValueError:
        return 4


__all__ = ["FORM", "START_JS", "apply_preset", "build_trainer_tab", "error_outputs", "form_to_request", "interrupt",
           "job_outputs", "start_outputs", "status_html", "train_blocking", "train_stream"]
