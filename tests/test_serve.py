"""``img serve`` on the tiny profile: the real command as a server process, ``/generate`` through ``gradio_client``,
and the page driven in headless Chromium (Debian's ``chromium`` package, through Playwright).

Covers: (prompt, seed) alone is a full API call; the served images are the pixels ``img infer`` writes for the same
prompt and seed; every generation lands in the lake's ``generations`` table and as PNGs; bad input is a clear
message (API and page), never a traceback, and writes nothing; the page loads nothing from another host; the CLI
refuses bad flags with one line and exit 2 before loading any model.

The browser is required: if ``/usr/bin/chromium`` (or ``$IMG_CHROMIUM``) is missing the test FAILS; ``make test``
and ``.ci/run`` install it (``make browser``).
"""
from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from img.net import free_port

REPO = Path(__file__).resolve().parent.parent
PROMPT = "a red circle left of a blue star"
CHROMIUM = os.environ.get("IMG_CHROMIUM", "/usr/bin/chromium")
SIZE = (64, 64)  # the tiny profile's image size


@dataclass
class Server:
    url: str
    lake: Path
    out: Path
    log: Path


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """``img serve --profile tiny --port P --lake L --out O`` as its own process; stopped with Ctrl-C at the end."""
    tmp = tmp_path_factory.mktemp("serve")
    port = free_port()
    log = tmp / "server.log"
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", GRADIO_TEMP_DIR=str(tmp / "gradio"),
               PYTHONPATH=str(REPO))
    env.pop("GRADIO_ANALYTICS_ENABLED", None)  # img serve must switch analytics off itself
    with open(log, "wb") as f:
        proc = subprocess.Popen(
            [sys.executable, "-m", "img.cli", "serve", "--profile", "tiny", "--port", str(port),
             "--lake", str(tmp / "lake"), "--out", str(tmp / "out")],
            cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.monotonic() + 120
        while True:
            if proc.poll() is not None:
                pytest.fail(f"img serve exited with {proc.returncode}:\n{log.read_text()}")
            try:
                with urllib.request.urlopen(url, timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"img serve did not answer on {url} within 120 s:\n{log.read_text()}")
            time.sleep(0.3)
        yield Server(url, tmp / "lake", tmp / "out", log)
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def client(server, tmp_path_factory):
    from gradio_client import Client

    c = Client(server.url, verbose=False, download_files=str(tmp_path_factory.mktemp("downloads")))
    yield c
    c.close()  # its heartbeat stream would hold the server's shutdown


def pixels(path_or_image) -> np.ndarray:
    im = path_or_image if isinstance(path_or_image, Image.Image) else Image.open(path_or_image)
    return np.asarray(im.convert("RGB"))


def assert_real_image(im: Image.Image) -> None:
    assert im.size == SIZE and im.mode == "RGB"
    assert pixels(im).std() > 1.0  # a picture, not a blank


def generation_rows(lake: Path) -> list[dict]:
    import lance

    path = lake / "generations.lance"
    return lance.dataset(str(path)).to_table().to_pylist() if path.exists() else []


# ----------------------------------------------------------------------------- the API
@pytest.mark.slow
def test_generate_with_prompt_and_seed_only_matches_img_infer(server, client, tmp_path):
    from img.inference.infer import run_infer

    base, final, gallery, timings, aligner = client.predict(PROMPT, 3, api_name="/generate")
    assert_real_image(Image.open(base))
    assert_real_image(Image.open(final))
    assert [g["caption"] for g in gallery] == ["round 0: base", "round 1: IMG"]
    assert set(timings) == {"base", "ip", "mllm", "aligner", "regen", "total"}
    assert all(timings[k] > 0 for k in ("base", "ip", "mllm", "regen")) and timings["aligner"] >= 0
    assert aligner.startswith("fresh") and "sha256:" in aligner

    # the same code as `img infer`: same prompt, seed and (default) settings -> the same pixels
    summary = run_infer([PROMPT], "tiny", tmp_path / "infer", seed=3, rounds=1, progress=False)
    infer_base, infer_final = summary.files
    assert np.array_equal(pixels(base), pixels(infer_base))
    assert np.array_equal(pixels(final), pixels(infer_final))

    # settings after the seed are honoured: another seed, other pixels; two rounds, three gallery images
    other = client.predict(PROMPT, 4, 2, api_name="/generate")
    assert not np.array_equal(pixels(other[0]), pixels(base))
    assert len(other[2]) == 3 and not np.array_equal(pixels(other[1]), pixels(other[2][1]["image"]))

    # every generation: PNGs under --out and one generations row per image, written by img infer's code
    rows = generation_rows(server.lake)
    mine = [r for r in rows if r["seed"] == 3 and r["prompt"] == PROMPT]
    assert sorted(r["round"] for r in mine) == [0, 1]
    for r in mine:
        assert Path(r["path"]).is_file() and Path(r["path"]).is_relative_to(server.out)
        assert r["aligner_id"] == "fresh" and r["profile"] == "tiny" and r["steps"] == 20
    by_round = {r["round"]: r["path"] for r in mine}
    assert np.array_equal(pixels(by_round[0]), pixels(base)) and np.array_equal(pixels(by_round[1]), pixels(final))
    assert sorted(r["round"] for r in rows if r["seed"] == 4) == [0, 1, 2]
    assert len({r["run_id"] for r in rows}) == 1


@pytest.mark.parametrize("args, message", [
    (("", 3), "The prompt is empty"),
    (("   ", 3), "The prompt is empty"),
    ((PROMPT, -1), "Seed must be a whole number from 0 to 4294967295, got -1"),
    ((PROMPT, 3, 99), "Rounds must be a whole number from 1 to 8, got 99"),
    ((PROMPT, 3, 1, 3, 5.0), "IP scale must be a number from 0.0 to 2.0, got 5.0"),
    ((PROMPT, 3, 1, 3, 0.2, 0), "Steps must be a whole number from 1 to 200, got 0"),
    ((PROMPT, 3, 1, 3, 0.2, 20, -2.0), "Guidance scale must be a number from 0.0 to 30.0, got -2.0"),
])
@pytest.mark.slow
def test_bad_input_is_a_clear_message_and_writes_nothing(server, client, args, message):
    from gradio_client.exceptions import AppError

    before = len(generation_rows(server.lake))
    with pytest.raises(AppError) as exc:
        client.predict(*args, api_name="/generate")
    assert message in str(exc.value) and "Traceback" not in str(exc.value)
    assert len(generation_rows(server.lake)) == before


# ----------------------------------------------------------------------------- the page, in a real browser
@pytest.mark.slow
def test_page_in_headless_chromium(server, tmp_path):
    if not Path(CHROMIUM).is_file():
        pytest.fail(f"no browser at {CHROMIUM}: install Debian's chromium (`make browser`, or "
                    "`apt-get install chromium`), or point IMG_CHROMIUM at a Chromium binary.")
    import io

    from playwright.sync_api import expect, sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1200, "height": 1000})
            elsewhere: list[str] = []
            page.on("request", lambda r: elsewhere.append(r.url)
                    if not r.url.startswith((server.url, "data:", "blob:")) else None)
            page.goto(server.url, wait_until="networkidle")

            page.locator("#prompt textarea").fill(PROMPT)
            page.locator("#seed input").fill("5")
            page.locator("#generate").click()
            images = {}
            for name in ("base-image", "img-image"):
                img = page.locator(f"#{name} img").first
                img.wait_for(state="visible", timeout=45_000)
                expect(img).to_have_js_property("complete", True)
                body = page.request.get(img.get_attribute("src")).body()
                images[name] = Image.open(io.BytesIO(body))
                assert images[name].format == "PNG"
                assert_real_image(images[name].convert("RGB"))
                assert page.evaluate("(el) => [el.naturalWidth, el.naturalHeight]", img.element_handle()) == list(SIZE)
            expect(page.locator("#gallery img")).to_have_count(2)
            expect(page.locator("#timings")).to_contain_text("mllm")
            expect(page.locator("#aligner textarea, #aligner input").first).to_have_value(
                re.compile(r"sha256:[0-9a-f]{16}"))
            page.screenshot(path=str(tmp_path / "serve-page.png"), full_page=True)
            assert Image.open(tmp_path / "serve-page.png").size[0] == 1200

            # the page's seed reached the server: the row of seed 5 holds the base image the page shows
            rows = {r["round"]: r for r in generation_rows(server.lake) if r["seed"] == 5}
            assert sorted(rows) == [0, 1]
            assert np.array_equal(pixels(rows[0]["path"]), pixels(images["base-image"]))
            assert np.array_equal(pixels(rows[1]["path"]), pixels(images["img-image"]))

            # bad input: a message in the page, not a traceback, and nothing generated or written
            n_rows = len(generation_rows(server.lake))
            page.locator("#prompt textarea").fill("")
            page.locator("#generate").click()
            expect(page.get_by_text("The prompt is empty")).to_be_visible(timeout=20_000)
            page.locator("#prompt textarea").fill(PROMPT)
            page.get_by_text("Advanced").click()
            page.locator("#rounds input").fill("99")
            page.locator("#generate").click()
            expect(page.get_by_text("Rounds must be a whole number from 1 to 8, got 99")).to_be_visible(timeout=20_000)
            assert "Traceback" not in page.content()
            page.screenshot(path=str(tmp_path / "serve-page-error.png"))
            assert len(generation_rows(server.lake)) == n_rows
            assert not elsewhere, f"the page fetched from other hosts: {elsewhere}"
        finally:
            browser.close()


# ----------------------------------------------------------------------------- the command line
def run_main(args: list[str], monkeypatch, capsys) -> tuple[int, str, str]:
    from img.cli import main

    monkeypatch.setattr(sys, "argv", ["img", *args])
    with pytest.raises(SystemExit) as exc:
        main()
    out, err = capsys.readouterr()
    return (0 if exc.value.code is None else int(exc.value.code)), out, err


@pytest.mark.parametrize("case", ["port-out-of-range", "port-busy", "bad-host", "unknown-profile", "no-aligner-file",
                                  "real-profile-needs-aligner", "mllm-adapter"])
def test_cli_refuses_bad_flags_in_one_line_before_loading(case, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    port = str(free_port())
    args = {
        "port-out-of-range": ["--profile", "tiny", "--port", "70000"],
        "port-busy": ["--profile", "tiny", "--port", "{busy}"],
        "bad-host": ["--profile", "tiny", "--host", "no-such-host.invalid", "--port", port],
        "unknown-profile": ["--profile", "nope", "--port", port],
        "no-aligner-file": ["--profile", "tiny", "--aligner", str(tmp_path / "missing.pth"), "--port", port],
        "real-profile-needs-aligner": ["--profile", "sdxl", "--port", port],
        "mllm-adapter": ["--profile", "tiny", "--mllm-adapter", str(tmp_path), "--port", port],
    }[case]
    expect = {
        "port-out-of-range": "--port 70000 is not a TCP port",
        "port-busy": "cannot listen on 127.0.0.1:",
        "bad-host": "--host 'no-such-host.invalid'",
        "unknown-profile": "nope",
        "no-aligner-file": "does not exist",
        "real-profile-needs-aligner": "--aligner",
        "mllm-adapter": "--mllm-adapter",
    }[case]
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        args = [a.replace("{busy}", str(busy.getsockname()[1])) for a in args]
        code, out, err = run_main(["serve", "--lake", str(tmp_path / "lake"), *args], monkeypatch, capsys)
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error:") and expect in lines[0], err
    assert "img serve: loading" not in out + err
    assert not (tmp_path / "lake").exists() and not (tmp_path / "serve-out").exists()


def test_check_request_limits():
    from img.app.serve import check_request
    from img.errors import UserError

    ok = check_request("  a red circle ", 2**32 - 1, 8, 0, 2.0, 1, 0.0)
    assert ok.prompt == "a red circle" and ok.seed == 2**32 - 1 and isinstance(ok.settings.steps, int)
    assert (ok.rounds, ok.settings.passes, ok.settings.ip_scale, ok.settings.guidance_scale) == (8, 0, 2.0, 0.0)
    assert check_request("x", 3.0, 1.0, 3, 0.2, 20.0, 7.5).seed == 3
    for bad in [("x", 3.5, 1, 3, 0.2, 20, 7.5), ("x", 3, 1, 3, float("nan"), 20, 7.5),
                ("x", 3, 1, 3, 0.2, 20, float("inf")), ("x", None, 1, 3, 0.2, 20, 7.5), ("x", 3, True, 3, 0.2, 20, 7.5),
                ("x", "three", 1, 3, 0.2, 20, 7.5), ("x" * 2001, 3, 1, 3, 0.2, 20, 7.5), (None, 3, 1, 3, 0.2, 20, 7.5)]:
        with pytest.raises(UserError):
            check_request(*bad)
