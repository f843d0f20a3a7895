"""Guidance in the authors' format: the conversation text, pad-to-square images, question files, and the same
guidance bytes at embed time and at infer time (tiny profile: random models of the real classes)."""
from __future__ import annotations

import dataclasses
import io
import json
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from img.conversation import LLAVA_V0_SYSTEM
from img.errors import UserError
from img.features import format_mllm_prompt, llava_input_ids, pad_to_square
from img.models.profiles import PROFILES, get_profile
from img.questions import QUESTIONS, QuestionFileError, load_questions, question_for, question_index, questions_id

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # fixture in conftest.py

SYSTEM = ("A chat between a curious human and an artificial intelligence assistant. The assistant gives helpful, "
          "detailed, and polite answers to the human's questions.")
Q = "How can the image be changed to match the prompt: a red circle left of a blue star?"


@pytest.fixture(scope="module")
def profile():
    return get_profile("tiny")


@pytest.fixture(scope="module")
def mllm(profile):
    from img.features import GuidanceEncoder

    return GuidanceEncoder(profile)


def authors_style_file(path, templates=None):
    """A question file in the authors' format: a JSON list of strings with {prompt}."""
    templates = templates or ["How can the image be changed to match the prompt: {prompt}?",
                              "What should be edited in this image so that it shows {prompt}?",
                              "Describe how to fix this picture for the prompt \"{prompt}\"."]
    path.write_text(json.dumps(templates, indent=2))
    return path


def wide_image(w: int = 96, h: int = 48) -> Image.Image:
    """A non-square image whose left and right 8-px edges are pure red, the rest a dark blue."""
    a = np.zeros((h, w, 3), np.uint8)
    a[...] = (20, 30, 140)
    a[:, :8] = a[:, -8:] = (255, 0, 0)
    return Image.fromarray(a)


# ---------------------------------------------------------------- the exact text
def test_llava_v0_text_is_the_original_v0_conversation():
    assert LLAVA_V0_SYSTEM == SYSTEM
    text = format_mllm_prompt(Q, template="llava_v0")
    assert text == SYSTEM + "###Human: <image>\n" + Q + "###Assistant:"
    assert text == (
        "A chat between a curious human and an artificial intelligence assistant. The assistant gives helpful, "
        "detailed, and polite answers to the human's questions.###Human: <image>\nHow can the image be changed to "
        "match the prompt: a red circle left of a blue star?###Assistant:")


def test_llava_hf_text_and_the_processor_chat_template(mllm):
    assert format_mllm_prompt(Q, template="llava_hf") == f"USER: <image>\n{Q} ASSISTANT:"
    # the tiny processor carries llava-hf's chat template, which gives the same text
    assert format_mllm_prompt(Q, "chat_template", mllm.processor) == f"USER: <image>\n{Q} ASSISTANT:"
    # the question goes in verbatim (braces are not format fields)
    odd = "Match {prompt} and {0}?"
    assert format_mllm_prompt(odd, "llava_v0").endswith(f"<image>\n{odd}###Assistant:")
    with pytest.raises(ValueError, match="unknown MLLM prompt template 'llava_v1'"):
        format_mllm_prompt(Q, "llava_v1")
    with pytest.raises(ValueError, match="needs a processor"):
        format_mllm_prompt(Q, "chat_template")


def test_profiles_name_their_template_and_image_mode():
    for name in ("sdxl", "sdxl-dpo", "flux", "sdxl-llava7b", "tiny", "bench"):
        p = PROFILES[name]
        assert (p.mllm_template, p.mllm_image) == ("llava_v0", "pad"), name
    assert (PROFILES["sdxl-qwen"].mllm_template, PROFILES["sdxl-qwen"].mllm_image) == ("chat_template", "crop")


def test_profile_toml_switches_template_and_rejects_bad_values(tmp_path, monkeypatch):
    monkeypatch.setenv("IMG_PROFILES_DIR", str(tmp_path))
    (tmp_path / "sdxl.toml").write_text('mllm_template = "llava_hf"\nmllm_image = "crop"\n')
    p = get_profile("sdxl")
    assert (p.mllm_template, p.mllm_image) == ("llava_hf", "crop")
    (tmp_path / "sdxl.toml").write_text('mllm_template = "llava_v1"\n')
    with pytest.raises(UserError, match="mllm_template' = 'llava_v1' is not one of"):
        get_profile("sdxl")
    (tmp_path / "sdxl-qwen.toml").write_text('mllm_template = "llava_v0"\n')
    with pytest.raises(UserError, match="is a LLaVA conversation, but profile 'sdxl-qwen' uses qwen2_5_vl"):
        get_profile("sdxl-qwen")


# ---------------------------------------------------------------- token ids around the image
def _ids(tok, text):
    return tok(text, add_special_tokens=False).input_ids


def test_llava_v0_ids_put_the_image_tokens_between_human_and_the_question(mllm):
    tok = mllm.processor.tokenizer
    cfg = mllm.model.config
    batch = mllm.inputs([wide_image()], [Q])
    ids = batch["input_ids"][0].tolist()
    n = cfg.image_seq_length
    assert n == (64 // 8) ** 2  # tiny vision tower: 64 px, patch 8, CLS dropped
    first = ids.index(cfg.image_token_id)
    assert ids[first: first + n] == [cfg.image_token_id] * n and ids.count(cfg.image_token_id) == n
    before, after = ids[:first], ids[first + n:]
    assert before == [tok.bos_token_id] + _ids(tok, SYSTEM + "###Human: ")
    assert after == _ids(tok, "\n" + Q + "###Assistant:")
    assert tok.convert_ids_to_tokens(before[-5:]) == ["#", "#", "#", "human", ":"]
    assert tok.convert_ids_to_tokens(after[:3]) == ["how", "can", "the"]
    assert tok.convert_ids_to_tokens(after[-5:]) == ["#", "#", "#", "assistant", ":"]
    assert tok.unk_token_id not in ids  # the tiny vocabulary covers the whole conversation
    # the model reads exactly this sequence: guidance has one row per token
    (h,) = mllm([wide_image()], [Q])
    assert h.shape == (len(ids), cfg.text_config.hidden_size)


def test_llava_hf_ids_come_from_the_processor(profile):
    from img.features import GuidanceEncoder

    enc = GuidanceEncoder(dataclasses.replace(profile, mllm_template="llava_hf"))
    tok, cfg = enc.processor.tokenizer, enc.model.config
    ids = enc.inputs([wide_image()], [Q])["input_ids"][0].tolist()
    first = ids.index(cfg.image_token_id)
    assert ids[:first] == [tok.bos_token_id] + _ids(tok, "USER: ")
    assert ids[first: first + cfg.image_seq_length] == [cfg.image_token_id] * cfg.image_seq_length
    assert ids[first + cfg.image_seq_length:] == _ids(tok, "\n" + Q + " ASSISTANT:")
    # a different conversation text: different guidance for the same image and question
    v0 = GuidanceEncoder(profile)
    (a,), (b,) = enc([wide_image()], [Q]), v0([wide_image()], [Q])
    assert a.shape[0] != b.shape[0]


def test_text_around_the_image_is_tokenized_separately_as_the_original_llava_does():
    """With a SentencePiece-style tokenizer that adds the word-boundary mark only at the start of a text, the text
    after <image> starts with that mark when tokenized on its own (the original LLaVA code), not when the whole
    prompt is tokenized at once."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "<pad>": 3, "<image>": 4, "\u2581human:": 5, "\u2581": 6,
             "\u2581\nhow?": 7, "\nhow?": 8}
    t = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    t.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first", split=True)
    t.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tok = PreTrainedTokenizerFast(tokenizer_object=t, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                  pad_token="<pad>")
    tok.add_special_tokens({"additional_special_tokens": ["<image>"]})
    prompt = "human: <image>\nhow?"
    assert tok(prompt).input_ids == [1, 5, 6, 4, 8]  # whole prompt at once: no mark after the image
    assert llava_input_ids(prompt, tok, image_token_id=4, n_image_tokens=3) == [1, 5, 6, 4, 4, 4, 7]
    # a tokenizer without BOS: nothing is stripped
    t.post_processor = None
    tok2 = PreTrainedTokenizerFast(tokenizer_object=t, unk_token="<unk>", pad_token="<pad>")
    tok2.add_special_tokens({"additional_special_tokens": ["<image>"]})
    assert llava_input_ids(prompt, tok2, image_token_id=4, n_image_tokens=2) == [5, 6, 4, 4, 7]


# ---------------------------------------------------------------- pad to square
def test_pad_to_square_matches_llava_expand2square():
    im = wide_image(96, 48)
    sq = pad_to_square(im, (122, 116, 104))
    a = np.asarray(sq)
    assert sq.size == (96, 96)
    assert (a[:24] == (122, 116, 104)).all() and (a[72:] == (122, 116, 104)).all()  # (96 - 48) // 2 = 24 rows
    assert np.array_equal(a[24:72], np.asarray(im))
    tall = pad_to_square(Image.new("RGB", (5, 8), (1, 2, 3)), (9, 9, 9))
    assert tall.size == (8, 8) and np.asarray(tall)[:, 1:6].tolist() == [[[1, 2, 3]] * 5] * 8  # offset (8-5)//2 = 1
    square = Image.new("RGB", (7, 7))
    assert pad_to_square(square, (0, 0, 0)) is square


def test_pad_keeps_the_whole_image_where_crop_cuts_the_edges(mllm, profile):
    from img.features import GuidanceEncoder

    mean = mllm.processor.image_processor.image_mean
    fill = tuple(int(x * 255) for x in mean)
    assert fill == (122, 116, 104)  # CLIP's mean colour, as LLaVA-1.5 pads
    im = wide_image(96, 48)
    (padded,) = mllm.images([im])
    assert padded.size == (96, 96) and np.asarray(padded)[0, 0].tolist() == list(fill)
    crop = GuidanceEncoder(dataclasses.replace(profile, mllm_image="crop"))
    pix_pad = mllm.inputs([im], [Q])["pixel_values"][0]
    pix_crop = crop.inputs([im], [Q])["pixel_values"][0]
    red = torch.tensor([(1.0 - mean[0]) / 0.26862954, (0 - mean[1]) / 0.26130258, (0 - mean[2]) / 0.27577711])
    col = lambda pix, x: pix[:, 32, x]  # noqa: E731 - a pixel of the middle row
    assert torch.allclose(col(pix_pad, 0), red, atol=0.05)  # pad: the red left edge is still there
    assert not torch.allclose(col(pix_crop, 0), red, atol=0.5)  # crop: the centre crop cut it off
    # a square image: both modes give the same pixels
    sq = Image.fromarray(np.asarray(im.resize((64, 64))))
    assert torch.equal(mllm.inputs([sq], [Q])["pixel_values"], crop.inputs([sq], [Q])["pixel_values"])


# ---------------------------------------------------------------- question files
def test_load_questions_reads_the_authors_format(tmp_path):
    path = authors_style_file(tmp_path / "q.json")
    pool = load_questions(path)
    assert isinstance(pool, tuple) and len(pool) == 3 and all("{prompt}" in q for q in pool)
    q = question_for("  a red circle ", key="pair-9", seed=0, questions=pool)
    assert q in {t.replace("{prompt}", "a red circle") for t in pool}
    assert q == question_for("a red circle", key="pair-9", seed=0, questions=pool)  # deterministic
    picks = {question_for("x", key=f"k{i}", questions=pool) for i in range(60)}
    assert len(picks) == 3  # every template gets used
    # the content decides the id, not the path or the JSON layout
    other = tmp_path / "sub"
    other.mkdir()
    (other / "q2.json").write_text(json.dumps(list(pool)))
    assert questions_id(load_questions(other / "q2.json")) == questions_id(pool) != questions_id(None)
    assert questions_id(None) == questions_id(QUESTIONS)
    # our own pool is unchanged by the new placeholder handling
    assert question_for("a red circle", key="pair-7") == QUESTIONS[question_index("pair-7", 0)].format(
        caption="a red circle")


@pytest.mark.parametrize("content, match", [
    (None, "does not exist"),
    ("[\"How {prompt}?\",", "is not readable JSON"),
    ('{"q": "How {prompt}?"}', "holds a JSON dict, not a list of strings"),
    ("[]", "holds an empty list"),
    ('["How {prompt}?", 3]', "entry 1 is 3, not a string"),
    ('["How {prompt}?", "How should it change to match {caption}?"]', "entry 1 .* has no {prompt} placeholder"),
])
def test_load_questions_errors_name_the_problem(tmp_path, content, match):
    path = tmp_path / "q.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(QuestionFileError, match=match) as e:
        load_questions(path)
    assert isinstance(e.value, ValueError) and isinstance(e.value, UserError)
    assert str(path) in str(e.value) and "{prompt}" in str(e.value)


# ---------------------------------------------------------------- embed and infer: one code path, same bytes
def _rejpeg(data: bytes, box: tuple[int, int, int, int]) -> bytes:
    with Image.open(io.BytesIO(data)) as im:
        out = io.BytesIO()
        im.convert("RGB").crop(box).save(out, format="JPEG", quality=95)
        return out.getvalue()


def test_embed_and_infer_guidance_are_bit_identical(tmp_path, profile):
    """The embed job's decode + guidance stages (batched, as its actors run them) and ``img infer``'s pipeline
    give byte-identical stored guidance for the same image and question, with the authors' question file."""
    from img.data.sample import write_sample
    from img.inference.generation import IMGPipeline
    from pipelines.embed import Decode, Guidance, _pil, _to_storage, read_units
    from pipelines.source import list_shards, plan_units

    qfile = authors_style_file(tmp_path / "questions.json")
    pool = load_questions(qfile)
    data = tmp_path / "data"
    write_sample(data, pairs=12, seed=3, corrupt=0.0, ties=0.0, shard_rows=12)
    units, _, _ = plan_units(list_shards(str(data)), set(), None, unit_rows=12)
    batch = {k: np.array([u[k] for u in units], dtype=object) for k in units[0]}
    rows = read_units(batch)
    # Pick-a-Pic images are not all square: make the losers wide or tall so the padding matters
    s = Image.open(io.BytesIO(rows["loser_jpg"][0])).size[0]
    boxes = [(0, 0, s, s // 2), (0, 0, s // 3, s), (0, 0, s, s)]
    rows["loser_jpg"] = np.array([_rejpeg(b, boxes[i % 3]) for i, b in enumerate(rows["loser_jpg"])], dtype=object)
    decoded = Decode(16, 60_000_000, question_seed=0, questions=pool)(rows)
    assert all(e == "" for e in decoded["error"])
    stage = Guidance(profile.name, "cpu", 1)
    out = stage(decoded)  # one batch, right-padded, as the job's actor gets it

    pipe = IMGPipeline.from_profile(profile, questions=qfile)
    assert pipe.questions == pool
    assert pipe.question("a red circle", seed=4) == question_for("a red circle", key="a red circle", seed=4,
                                                                 questions=pool)
    for i in range(len(decoded["pair_id"])):
        caption, question = str(decoded["caption"][i]), str(decoded["question"][i])
        assert question == question_for(caption, str(decoded["pair_id"][i]), 0, pool)
        assert question in {t.replace("{prompt}", caption) for t in pool}
        image = _pil(decoded["loser_image"][i])
        h = pipe.guidance(image, question)[0]  # infer-time guidance
        assert h.shape[0] == out["guidance_len"][i]
        assert _to_storage(h, profile.tensor_dtype).tobytes() == bytes(out["guidance"][i])
        (h_embed,) = stage.encoder([image], [question])
        assert torch.equal(h_embed, h)  # also before the storage cast
    shapes = {np.asarray(im).shape[:2] for im in decoded["loser_image"]}
    assert any(h != w for h, w in shapes) and any(h == w for h, w in shapes)  # wide, tall and square losers


def test_embed_fingerprint_covers_questions_template_and_image_mode(tmp_path, profile):
    from pipelines.embed import embed_fingerprint
    from pipelines.embed_config import EmbedConfig

    a = authors_style_file(tmp_path / "a.json")
    b = tmp_path / "b.json"
    b.write_text(a.read_text())
    pool = load_questions(a)
    base = embed_fingerprint(profile, EmbedConfig())
    with_file = embed_fingerprint(profile, EmbedConfig(questions=str(a)), pool)
    assert with_file != base
    assert embed_fingerprint(profile, EmbedConfig(questions=str(b)), load_questions(b)) == with_file  # same content
    assert embed_fingerprint(profile, EmbedConfig(), pool[:2]) != with_file
    assert embed_fingerprint(dataclasses.replace(profile, mllm_template="llava_hf"), EmbedConfig()) != base
    assert embed_fingerprint(dataclasses.replace(profile, mllm_image="crop"), EmbedConfig()) != base


# ---------------------------------------------------------------- the CLI
def run_main(args, monkeypatch, capsys):
    from img.cli import main

    monkeypatch.setattr(sys, "argv", ["img", *args])
    with pytest.raises(SystemExit) as exc:
        main()
    out, err = capsys.readouterr()
    return (0 if exc.value.code is None else int(exc.value.code)), out, err


def test_cli_bad_questions_file_is_one_line_and_writes_nothing(tmp_path, monkeypatch, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text('["How should this change?"]')
    cfg = tmp_path / "embed.toml"
    cfg.write_text(f'questions = "{bad}"\n')
    lake, out = tmp_path / "lake", tmp_path / "out"
    for args in (["jobs", "embed", "--source", str(tmp_path), "--profile", "tiny", "--lake", str(lake),
                  "--config", str(cfg)],
                 ["infer", "--profile", "tiny", "--prompt", "a red circle", "--out", str(out), "--lake", str(lake),
                  "--questions", str(bad)]):
        code, stdout, stderr = run_main(args, monkeypatch, capsys)
        lines = [ln for ln in stderr.splitlines() if ln.startswith("error:")]
        assert code == 2 and len(lines) == 1 and "entry 0 'How should this change?' has no {prompt}" in lines[0], \
            stderr
        assert not lake.exists() and not out.exists()


def test_cli_infer_asks_the_questions_of_the_file(tmp_path, monkeypatch, capsys):
    import lance

    qfile = authors_style_file(tmp_path / "q.json", ["Fix this image for: {prompt}?"])
    cfg = tmp_path / "infer.toml"
    cfg.write_text(f'questions = "{qfile}"\n')
    lake = tmp_path / "lake"
    code, stdout, _ = run_main(["infer", "--profile", "tiny", "--prompt", "a red circle", "--steps", "2",
                                "--out", str(tmp_path / "out"), "--lake", str(lake), "--config", str(cfg)],
                               monkeypatch, capsys)
    assert code == 0, stdout
    rows = lance.dataset(str(lake / "generations.lance")).to_table().to_pylist()
    assert [r["question"] for r in sorted(rows, key=lambda r: r["round"])] == ["", "Fix this image for: a red circle?"]
