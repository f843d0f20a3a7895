"""``img serve``: the IMG web demo (Gradio), like the authors' SDXL and FLUX demos, for any profile.

    img serve --profile tiny                                     # http://127.0.0.1:7860, CPU, seconds
    img serve --profile sdxl --aligner ckpts/aligner_sdxl.pth    # a GPU box
    img serve --profile tiny --host 0.0.0.0 --port 8080 --lake lake   # reachable from other machines; rows in lake

The models load once at start-up; requests wait in Gradio's queue and run one at a time. A request is a prompt
and a seed, plus (under "Advanced") rounds, aligner passes, IP scale, steps and guidance scale, which default to
the profile's settings. The page shows the base image and the final IMG image side by side, every round in a
gallery, the seconds per stage (base, IP, MLLM, aligner, regeneration) and the aligner's identity (sha256 of its
weights). A bad value is one clear message in the page (``gr.Error``), never a traceback.

With ``--lake``, every generation's PNGs go under ``<out>/<run_id>/`` and its rows are appended to the lake's
``generations`` table by ``img.inference.infer.save_generation``, the code ``img infer`` uses.

The API endpoint ``/generate`` takes (prompt, seed, rounds, passes, ip_scale, steps, guidance_scale); every input
after the seed has a default, so::

    from gradio_client import Client
    base, final, rounds, timings, aligner = Client("http://127.0.0.1:7860/").predict(
        "a red circle left of a blue star", 3, api_name="/generate")        # base, final: PNG file paths

In Python: ``demo = Demo.load("tiny"); build_app(demo).launch()``; ``demo.generate(...)`` without a server.
Offline: no analytics or version check (``GRADIO_ANALYTICS_ENABLED=False``), no share link, no SSR (Node),
fonts and scripts are served by the app itself.
"""
from __future__ import annotations

import html
import importlib.util
import json
import logging
import math
import os
import socket
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from img.errors import UserError
from img.finetune.adapter import with_mllm_adapter
from img.inference.generation import GenerationSettings, IMGPipeline, IMGResult, weights_id
from img.inference.infer import (
    _set_threads,
    check_lake,
    check_models,
    check_out_dir,
    load_pipeline,
    resolve_device,
    save_generation,
)
from img.models.profiles import Profile, get_profile

log = logging.getLogger(__name__)

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 7860
DEFAULT_OUT = Path("serve-out")  # PNGs of each generation when --lake is given without --out


@dataclass(frozen=True)
class Limits:
    """What a request may ask for; anything else is refused with a message naming the value."""

    prompt_chars: int = 2000
    seed: tuple[int, int] = (0, 2**32 - 1)
    rounds: tuple[int, int] = (1, 8)
    passes: tuple[int, int] = (0, 10)
    ip_scale: tuple[float, float] = (0.0, 2.0)
    steps: tuple[int, int] = (1, 200)
    guidance_scale: tuple[float, float] = (0.0, 30.0)


@dataclass
class Request:
    """One validated request: what to draw, and the settings it overrides (the profile fills in the rest)."""

    prompt: str
    seed: int
    rounds: int
    settings: GenerationSettings


def _number(name: str, value: Any, lo: float, hi: float, integer: bool) -> Any:
    kind = "a whole number" if integer else "a number"
    if value is None or value == "":
        raise UserError(f"{name} is empty. Enter {kind} from {lo} to {hi}.")
    if isinstance(value, bool):
        raise UserError(f"{name} must be {kind} from {lo} to {hi}, got {value!r}.")
    try:
        number = value if isinstance(value, int) else float(value)  # ints stay exact (seeds up to 2**63 - 1)
    except (TypeError, ValueError):
        raise UserError(f"{name} must be {kind} from {lo} to {hi}, got {value!r}.") from None
    if not math.isfinite(number) or (integer and number != int(number)):  # NaN/inf, or a fraction for a count
        raise UserError(f"{name} must be {kind} from {lo} to {hi}, got {value!r}.")
    if not lo <= number <= hi:
        raise UserError(f"{name} must be {kind} from {lo} to {hi}, got {value!r}.")
    return int(number) if integer else number


def check_request(prompt: Any, seed: Any, rounds: Any, passes: Any, ip_scale: Any, steps: Any,
                  guidance_scale: Any, limits: Limits = Limits()) -> Request:
    """The request, or ``UserError`` naming the first bad value and its allowed range.

        check_request("a red circle", 3, 1, 3, 0.2, 20, 7.5)    # -> Request(...)
        check_request("", 3, 1, 3, 0.2, 20, 7.5)                # UserError: the prompt is empty
    """
    if not isinstance(prompt, str) or not prompt.strip():
        raise UserError("The prompt is empty. Type what the image should show, "
                        "e.g. \"a red circle left of a blue star\".")
    if len(prompt) > limits.prompt_chars:
        raise UserError(f"The prompt has {len(prompt)} characters; at most {limits.prompt_chars} are allowed. "
                        "Shorten it.")
    return Request(
        prompt=prompt.strip(),
        seed=_number("Seed", seed, *limits.seed, integer=True),
        rounds=_number("Rounds", rounds, *limits.rounds, integer=True),
        settings=GenerationSettings(
            passes=_number("Aligner passes", passes, *limits.passes, integer=True),
            ip_scale=_number("IP scale", ip_scale, *limits.ip_scale, integer=False),
            steps=_number("Steps", steps, *limits.steps, integer=True),
            guidance_scale=_number("Guidance scale", guidance_scale, *limits.guidance_scale, integer=False),
        ),
    )


@dataclass
class Served:
    """What one request produced: the pipeline's result, its timings and any files written."""

    request: Request
    result: IMGResult
    timings: dict[str, float]
    paths: list[Path] = field(default_factory=list)

    @property
    def base(self) -> Any:
        return self.result.initial

    @property
    def final(self) -> Any:
        return self.result.images[-1]


class Demo:
    """The loaded models and the settings every request starts from; ``generate`` serves one request.

        demo = Demo.load("tiny")
        served = demo.generate("a red circle", seed=3)
        served.base, served.final, served.timings
    """

    def __init__(self, pipe: IMGPipeline, *, lake: Optional[str] = None, out: Optional[Path] = None,
                 limits: Limits = Limits(), load_s: float = 0.0) -> None:
        self.pipe = pipe
        self.profile: Profile = pipe.profile
        self.lake = lake
        self.out = Path(out) if out is not None else None
        self.limits = limits
        self.load_s = load_s
        self.run_id = uuid.uuid4().hex[:12]
        self.model_ids = json.dumps(self.profile.model_ids(), sort_keys=True)
        self.defaults: GenerationSettings = pipe.settings()
        self._lock = threading.Lock()
        self._count = 0
        aid = pipe.aligner_id
        # "fresh" is what the generations table records for an untrained tiny aligner; the page shows its hash too
        self.aligner_label = (f"fresh, untrained (identity): {weights_id(pipe.aligner)}" if aid == "fresh" else aid)

    @classmethod
    def load(cls, profile: str, aligner: Optional[str | Path] = None, *, mllm_adapter: Optional[str | Path] = None,
             lake: Optional[str] = None, out: Optional[str | Path] = None, device: str = "auto",
             echo: Callable[[str], None] = print) -> "Demo":
        """Check everything a user can get wrong, then load the models once (one progress line each way)."""
        prof = with_mllm_adapter(get_profile(profile), mllm_adapter)  # a fine-tuned MLLM (img jobs finetune-mllm)
        dev = resolve_device(device)
        aligner_model, aid = check_models(prof, aligner)
        if lake is not None:
            check_lake(str(lake))
            out = DEFAULT_OUT if out is None else out
        if out is not None:
            check_out_dir(Path(out).expanduser())
        _set_threads(prof, dev)  # tiny profiles on CPU run single-threaded, as in img infer (for the server's life)
        echo(f"img serve: loading profile {prof.name} on {dev} (diffusion, IP encoder, MLLM, aligner) ...")
        t0 = time.perf_counter()
        pipe = load_pipeline(prof, aligner, aligner_model, aid, dev)
        load_s = time.perf_counter() - t0
        echo(f"img serve: models loaded in {load_s:.1f}s; aligner {pipe.aligner_id}")
        return cls(pipe, lake=str(lake) if lake is not None else None,
                   out=Path(out).expanduser() if out is not None else None, load_s=load_s)

    def generate(self, prompt: Any, seed: Any = 0, rounds: Any = 1, passes: Any = None, ip_scale: Any = None,
                 steps: Any = None, guidance_scale: Any = None,
                 on_step: Optional[Callable[[str, int, int], None]] = None) -> Served:
        """Validate, run the base image and ``rounds`` IMG rounds, and (with a lake) save PNGs and rows.

        ``None`` settings take the profile's defaults; a bad value raises ``UserError``.
        """
        d = self.defaults
        req = check_request(prompt, seed, rounds, d.passes if passes is None else passes,
                            d.ip_scale if ip_scale is None else ip_scale, d.steps if steps is None else steps,
                            d.guidance_scale if guidance_scale is None else guidance_scale, self.limits)
        with self._lock:  # the models are not re-entrant; the queue already runs one request at a time
            idx = self._count
            self._count += 1
            result = self.pipe(req.prompt, seed=req.seed, rounds=req.rounds, settings=req.settings, on_step=on_step)
            paths: list[Path] = []
            if self.out is not None:
                out_dir = self.out / self.run_id
                out_dir.mkdir(parents=True, exist_ok=True)
                paths = save_generation(result, idx, out_dir, profile=self.profile, run_id=self.run_id,
                                        aligner_id=self.pipe.aligner_id, model_ids=self.model_ids, lake=self.lake,
                                        job="serve")
        timings = {k: round(v, 4) for k, v in result.timings().items()}
        return Served(req, result, timings, paths)


# ----------------------------------------------------------------------------- the page
CSS = """
#base-image img, #img-image img { width: 100%; height: 100%; object-fit: contain; image-rendering: pixelated; }
#gallery img { image-rendering: pixelated; }
"""


def _import_gradio() -> Any:
    """gradio (heavy: imported only once the flags are checked), with analytics and its version check off."""
    os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"  # read at import and at launch
    import gradio

    return gradio


def _request_handler(demo: Demo, gr: Any) -> Callable[..., tuple]:
    """The ``/generate`` handler: a refused request becomes a gradio error (no traceback); progress per step."""

    def generate(prompt: str, seed: float, rounds: float, passes: float, ip_scale: float, steps: float,
                 guidance_scale: float, progress: Any = gr.Progress()) -> tuple:
        """Base image and IMG image for a prompt and a seed (the other inputs default to the profile's settings)."""
        state = {"round": 0}

        def on_step(stage: str, step: int, total: int) -> None:
            if stage == "regen" and step == 1:
                state["round"] += 1
            desc = "base image" if stage == "base" else f"IMG round {state['round']}"
            progress((step, total), desc=desc)

        try:
            served = demo.generate(prompt, seed, rounds, passes, ip_scale, steps, guidance_scale, on_step=on_step)
        except UserError as e:
            log.info("refused a request: %s", e)
            # the message is rendered as HTML: escape what a client may have sent
            raise gr.Error(html.escape(str(e), quote=False), title="Invalid input", print_exception=False) from None
        except torch.cuda.OutOfMemoryError:
            log.warning("out of GPU memory on %r (seed %s, %s rounds, %s steps)", prompt, seed, rounds, steps)
            raise gr.Error("The GPU ran out of memory for this request. Try fewer rounds or steps, or retry when "
                           "the server is less busy.", title="Out of memory", print_exception=False) from None
        images = served.result.images
        gallery = [(im, "round 0: base" if r == 0 else f"round {r}: IMG") for r, im in enumerate(images)]
        return served.base, served.final, gallery, served.timings, demo.aligner_label

    return generate


def build_app(demo: Demo) -> Any:
    """The Gradio page and its ``/generate`` endpoint (call ``.queue()`` and ``.launch()`` on it)."""
    gr = _import_gradio()
    d, lim, prof = demo.defaults, demo.limits, demo.profile
    generate = _request_handler(demo, gr)

    with gr.Blocks(title=f"IMG demo ({prof.name})", analytics_enabled=False, delete_cache=(3600, 3600)) as app:
        gr.Markdown(
            f"# IMG: Implicit Multimodal Guidance\n"
            f"Profile **{prof.name}** ({prof.family}). Type a prompt and a seed: the base model draws an image, "
            f"the MLLM reads it, the Implicit Aligner refines its IP-Adapter tokens, and the model regenerates "
            f"with them. Defaults: {d.steps} steps, guidance {d.guidance_scale}, IP scale {d.ip_scale}, "
            f"{d.passes} aligner passes, {d.width}x{d.height} px."
        )
        with gr.Row():
            prompt = gr.Textbox(label="Prompt", value="", placeholder="a red circle left of a blue star", lines=2,
                                scale=4, elem_id="prompt")
            seed = gr.Number(label="Seed", value=0, precision=0, elem_id="seed", scale=1,
                             info=f"{lim.seed[0]} to {lim.seed[1]}")
        with gr.Accordion("Advanced", open=False):
            with gr.Row():
                rounds = gr.Number(label="Rounds", value=1, precision=0, elem_id="rounds",
                                   info=f"analysis → alignment → regeneration; {lim.rounds[0]} to {lim.rounds[1]}")
                passes = gr.Number(label="Aligner passes", value=d.passes, precision=0, elem_id="passes",
                                   info=f"{lim.passes[0]} to {lim.passes[1]}")
                ip_scale = gr.Number(label="IP scale", value=d.ip_scale, elem_id="ip_scale",
                                     info=f"IP-Adapter scale at regeneration; {lim.ip_scale[0]} to {lim.ip_scale[1]}")
                steps = gr.Number(label="Steps", value=d.steps, precision=0, elem_id="steps",
                                  info=f"diffusion steps; {lim.steps[0]} to {lim.steps[1]}")
                guidance = gr.Number(label="Guidance scale", value=d.guidance_scale, elem_id="guidance_scale",
                                     info=f"{lim.guidance_scale[0]} to {lim.guidance_scale[1]}")
        button = gr.Button("Generate", variant="primary", elem_id="generate")
        with gr.Row():
            base = gr.Image(label="Base model", type="pil", format="png", interactive=False, height=320,
                            buttons=["download", "fullscreen"], elem_id="base-image")
            final = gr.Image(label="IMG (last round)", type="pil", format="png", interactive=False, height=320,
                             buttons=["download", "fullscreen"], elem_id="img-image")
        gallery = gr.Gallery(label="Every round (0 = base)", format="png", columns=6, height=200,
                             object_fit="contain", fit_columns=False, buttons=["download"], interactive=False,
                             elem_id="gallery")
        with gr.Row():
            timings = gr.JSON(label="Seconds per stage (base, IP, MLLM, aligner, regeneration)", elem_id="timings")
            aligner = gr.Textbox(label="Aligner (sha256 of its weights)", value=demo.aligner_label,
                                 interactive=False, elem_id="aligner")
        inputs = [prompt, seed, rounds, passes, ip_scale, steps, guidance]
        outputs = [base, final, gallery, timings, aligner]
        button.click(generate, inputs, outputs, api_name="generate", concurrency_limit=1)
        prompt.submit(generate, inputs, outputs, api_visibility="private", concurrency_limit=1)
    return app


# ----------------------------------------------------------------------------- the server
def check_address(host: str, port: int) -> None:
    """``UserError`` unless ``host:port`` can be bound now (checked before the models load)."""
    if not 1 <= port <= 65535:
        raise UserError(f"--port {port} is not a TCP port. Pass a number from 1 to 65535, e.g. --port 7860.")
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        raise UserError(f"--host {host!r} is not an address of this machine ({e.strerror}). "
                        f"Use 127.0.0.1 (default), 0.0.0.0 (every interface) or one of this machine's IPs.") from None
    family, _, _, _, addr = infos[0]
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(addr)
        except OSError as e:
            raise UserError(f"cannot listen on {host}:{port} ({e.strerror}). Pass a free --port, or another "
                            f"--host (127.0.0.1 by default).") from None


def run_server(profile: str, aligner: Optional[str | Path] = None, *, mllm_adapter: Optional[str | Path] = None,
               host: str = DEFAULT_HOST, port: int = DEFAULT_PORT, lake: Optional[str] = None,
               out: Optional[str | Path] = None, device: str = "auto", echo: Callable[[str], None] = print) -> None:
    """Check the address, load the models, serve until interrupted (Ctrl-C)."""
    if importlib.util.find_spec("gradio") is None:
        raise UserError("img serve needs gradio, which is not installed. Install it with: pip install -e '.[serve]'")
    check_address(host, port)
    demo = Demo.load(profile, aligner, mllm_adapter=mllm_adapter, lake=lake, out=out, device=device, echo=echo)
    app = build_app(demo)
    app.queue(default_concurrency_limit=1, max_size=64)
    if host not in ("127.0.0.1", "localhost", "::1"):
        echo(f"img serve: listening on {host}: anyone who can reach this machine on port {port} can use the demo")
    if demo.lake is not None:
        echo(f"img serve: each generation -> {demo.out / demo.run_id}/ and {demo.lake}/generations.lance")
    app.launch(server_name=host, server_port=port, share=False, ssr_mode=False, mcp_server=False,
               enable_monitoring=False, run_history=False, footer_links=["api", "settings"], show_error=False,
               inbrowser=False, quiet=True, prevent_thread_lock=True, css=CSS)
    url_host = f"[{host}]" if ":" in host else host
    echo(f"img serve: serving http://{url_host}:{port}/ (API: /generate; Ctrl-C stops)")
    app.block_thread()  # until Ctrl-C; then gradio closes the server
    echo("img serve: stopped")
