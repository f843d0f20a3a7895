"""MLLM fine-tuning: the edits sample, the InstructPix2Pix reader, the DeepSpeed job, and its adapter in use."""
from __future__ import annotations

import base64
import io
import json
from pathlib import Path

import lance
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image
from torch_load_guard import only_weights_only_torch_load
from typer.testing import CliRunner

from img.data import shapes_world as sw
from img.errors import UserError
from img.features import GuidanceEncoder
from img.finetune.adapter import adapter_id, with_mllm_adapter
from img.finetune.data import EditLoader, gather_plans, list_edit_shards, plan_shards
from img.finetune.edit_sample import EDIT_CORRUPTIONS, write_edits_sample
from img.finetune.edits import EDIT_KINDS, INSTRUCTION_WORDS, applicable, edit_scene
from img.models.profiles import get_profile
from schemas import instructpix2pix as ip2p

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # fixture in conftest.py

# Small and quick: a higher lr than LLaVA's, and an adapter on lm_head too: the tiny random model's frozen
# lm_head and final norm (std 0.02 weights) cap its logits near +-1.3, so LoRA on the decoder layers alone
# lowers the loss only slowly (the shipped recipe: 5.40 -> 4.70 in 200 steps; see README).
TOML = """
lr = 2e-3
projector_lr = 2e-4
batch_size = 8
warmup_ratio = 0.0
heldout_fraction = 0.15
eval_max_records = 16
eval_generate_records = 2
max_new_tokens = 6
log_every = 5
checkpoint_every = 1000
{extra}
[lora]
r = 8
alpha = 16
dropout = 0.05
target_modules = '.*\\.language_model\\..*\\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)|lm_head'
"""


def _toml(tmp_path: Path, extra: str = "", name: str = "ft.toml") -> str:
    """TOML with the lines of ``extra`` replacing those of the same keys."""
    keys = {line.split("=")[0].strip() for line in extra.splitlines() if "=" in line}
    base = "\n".join(line for line in TOML.splitlines() if line.split("=")[0].strip() not in keys)
    p = tmp_path / name
    p.write_text(base.format(extra=extra))
    return str(p)


def _cli(args: list[str], ok: bool = True):
    """Run the CLI in-process; with ``ok=False`` a UserError becomes (2, its message) as ``img.cli.main`` prints it."""
    from img.cli import app, cli_message

    result = CliRunner().invoke(app, args)
    if ok:
        if result.exception is not None and not isinstance(result.exception, SystemExit):
            raise result.exception
        assert result.exit_code == 0, result.output
        return result
    if isinstance(result.exception, UserError):
        return 2, f"error: {cli_message(result.exception)}"
    return result.exit_code, result.output


def _metrics(lake: str, run_id: str) -> dict[str, dict[int, float]]:
    t = lance.dataset(f"{lake}/metrics.lance").to_table(filter=f"run_id = '{run_id}'")
    out: dict[str, dict[int, float]] = {}
    for s, n, v in zip(t["step"].to_pylist(), t["name"].to_pylist(), t["value"].to_pylist()):
        assert s not in out.get(n, {}), (n, s)  # never recorded twice
        out.setdefault(n, {})[s] = v
    return out


def _run_id(run_dir: Path) -> str:
    return json.loads((run_dir / "run.json").read_text())["run_id"]


def _jpeg(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


# ----------------------------------------------------------------------------- data
def test_edits_are_exact_and_in_the_tiny_vocabulary():
    from img.models.tiny import vocabulary_words

    vocab = set(vocabulary_words())
    rng = np.random.default_rng(0)
    seen = set()
    for _ in range(60):
        scene = sw.sample_scene(rng)
        for kind in applicable(scene):
            edited, instruction = edit_scene(scene, kind, rng)
            seen.add(kind)
            assert edited != scene and sw.parse_caption(edited.caption()) == edited
            assert sum(g.count for g in edited.groups) <= sw.MAX_SHAPES
            assert set(instruction.split()) <= vocab, instruction
    assert seen == set(EDIT_KINDS) and set(INSTRUCTION_WORDS) <= vocab
    with pytest.raises(ValueError, match="does not apply"):
        edit_scene(sw.Scene((sw.Group("red", "circle", 1),)), "relation", rng)


def test_edits_sample_layout_pixels_and_determinism(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    summary = write_edits_sample(a, records=60, seed=4, corrupt=0.1, shard_rows=25)
    write_edits_sample(b, records=60, seed=4, corrupt=0.1, shard_rows=25)
    assert "60 edit records" in summary and "3 shard(s)" in summary and all(k in summary for k in EDIT_CORRUPTIONS)
    files = sorted(a.iterdir())
    assert [f.read_bytes() for f in files] == [f.read_bytes() for f in sorted(b.iterdir())]
    table = pa.concat_tables([pq.read_table(f) for f in files])
    assert pa.schema(list(table.schema)).equals(pa.schema(list(ip2p.SAMPLE_SCHEMA)))
    assert table.schema.field("original_image").type == pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    assert json.loads(table.schema.metadata[b"huggingface"])["info"]["features"]["edited_image"] == {"_type": "Image"}
    rows = table.to_pylist()
    assert sorted({r["edit_kind"] for r in rows}) == sorted(EDIT_KINDS)
    damaged = 0
    for r in rows:
        edited = Image.open(io.BytesIO(r["edited_image"]["bytes"]))
        assert sw.describe(edited) == sw.parse_caption(r["edited_prompt"]).canonical()  # the pixels show the caption
        try:
            original = Image.open(io.BytesIO(r["original_image"]["bytes"]))
            original.load()
        except Exception:  # noqa: BLE001 - a damaged record
            damaged += 1
            continue
        if not r["edit_prompt"]:
            damaged += 1
        assert sw.describe(original) == sw.parse_caption(r["original_prompt"]).canonical()
    assert damaged == 6  # round(0.1 * 60), every kind of damage
    # the CLI writes the same files; --ties is refused for edits
    _cli(["data", "sample", "--kind", "edits", "--out", str(tmp_path / "c"), "--pairs", "60", "--seed", "4",
          "--corrupt", "0.1", "--shard-rows", "25"])
    assert [f.read_bytes() for f in sorted((tmp_path / "c").iterdir())] == [f.read_bytes() for f in files]
    code, msg = _cli(["data", "sample", "--kind", "edits", "--out", str(tmp_path / "d"), "--ties", "0.2"], ok=False)
    assert code == 2 and "--ties" in msg and not (tmp_path / "d").exists()


def test_reader_takes_every_published_image_form_and_quarantines_bad_records(tmp_path):
    rng = np.random.default_rng(1)
    scenes = [sw.sample_scene(rng) for _ in range(8)]
    jpgs = [_jpeg(sw.render(s, np.random.default_rng(i))) for i, s in enumerate(scenes)]
    data = tmp_path / "data"
    (data / "images").mkdir(parents=True)
    (data / "images" / "x.jpg").write_bytes(jpgs[2])

    def rec(i, image, instruction="make the circle red", caption="a red circle"):
        return {"original_prompt": scenes[i].caption(), "original_image": image, "edit_prompt": instruction,
                "edited_prompt": caption, "edited_image": None}

    lines = [rec(0, base64.b64encode(jpgs[0]).decode()),  # base64 text
             rec(1, {"bytes": base64.b64encode(jpgs[1]).decode(), "path": "a.jpg"}),  # struct, base64 bytes
             rec(2, {"bytes": None, "path": "images/x.jpg"}),  # by path, beside the shard
             rec(3, base64.b64encode(jpgs[3]).decode(), instruction="  "),
             rec(4, "not base64!"),
             rec(5, {"bytes": None, "path": "images/missing.jpg"})]
    text = "\n".join(json.dumps(x) for x in lines[:3]) + "\n\n[1, 2]\n{broken json\n" + \
        "\n".join(json.dumps(x) for x in lines[3:]) + "\n" + json.dumps({"edit_prompt": "add a star"}) + "\n"
    (data / "a.jsonl").write_text(text)
    # parquet with plain binary images (another common export)
    pq.write_table(pa.table({"original_image": [jpgs[6], b"", jpgs[7][:100]],
                             "edited_prompt": ["a red circle", "a blue star", "two green stars"],
                             "edit_prompt": ["make it red", "add a star", "add a star"]}), data / "b.parquet")
    shards = list_edit_shards(data)
    assert [s.name for s in shards] == ["a.jsonl", "b.parquet"] and [s.format for s in shards] == ["jsonl", "parquet"]
    plan = plan_shards(shards)
    assert plan.rows == 12 and [plan.record_id(g) for g in plan.good] == ["a.jsonl#0", "a.jsonl#1", "a.jsonl#2",
                                                                          "b.parquet#0"]
    reasons = {q["pair_id"]: q["reason"] for q in plan.quarantine}
    assert reasons == {"a.jsonl#3": "not a JSON object", "a.jsonl#4": "not a JSON object (Expecting property name "
                       "enclosed in double quotes)", "a.jsonl#5": "empty instruction (edit_prompt)",
                       "a.jsonl#6": "original_image: image text is not base64",
                       "a.jsonl#7": "original_image: image file 'images/missing.jpg' cannot be read (No such file or "
                                    "directory)",
                       "a.jsonl#8": "missing field(s) ['original_image', 'edited_prompt']",
                       "b.parquet#1": "original_image: empty image bytes",
                       "b.parquet#2": reasons["b.parquet#2"]}
    assert reasons["b.parquet#2"].startswith("original_image: does not decode")
    # planning split over two ranks and gathered is the same plan
    both = gather_plans([plan_shards(shards, 0, 2), plan_shards(shards, 1, 2)])
    assert both.good == plan.good and both.blocks == plan.blocks and both.quarantine == plan.quarantine
    loader = EditLoader(plan, batch_size=2, heldout_fraction=0.0)
    records = loader.records([tuple(g) for g in plan.good])
    for r, j in zip(records, [0, 1, 2, 6]):
        assert np.array_equal(np.asarray(r.image), np.asarray(Image.open(io.BytesIO(jpgs[j])).convert("RGB")))
    with pytest.raises(UserError, match="does not exist"):
        list_edit_shards(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no \\*.parquet or \\*.jsonl"):
        list_edit_shards(tmp_path / "empty")
    pq.write_table(pa.table({"edit_prompt": ["x"]}), tmp_path / "empty" / "c.parquet")
    with pytest.raises(UserError, match=r"lacks InstructPix2Pix column\(s\) \['original_image', 'edited_prompt'\]"):
        plan_shards(list_edit_shards(tmp_path / "empty"))


@pytest.fixture(scope="module")
def edits(tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("edits")
    write_edits_sample(root / "data", records=200, seed=3, corrupt=0.04, shard_rows=100)
    return str(root / "data")


def test_loader_order_is_seeded_sharded_and_resumable(edits):
    plan = plan_shards(list_edit_shards(edits))
    one = EditLoader(plan, batch_size=8, seed=2, shuffle_blocks=2)
    assert not {plan.record_id(r) for r in one.train_refs} & {plan.record_id(r) for r in one.heldout_refs}
    it = iter(one)
    n = one.steps_in_epoch(0) + 3  # crosses an epoch boundary
    order = [[r.record_id for r in next(it)] for _ in range(n)]
    assert len({x for b in order[: one.steps_in_epoch(0)] for x in b}) == one.steps_in_epoch(0) * 8  # no repeats
    assert order[:3] != order[one.steps_in_epoch(0):]  # a new order per epoch
    part = EditLoader(plan, batch_size=8, seed=2, shuffle_blocks=2)
    it = iter(part)
    head = [[r.record_id for r in next(it)] for _ in range(4)]
    again = EditLoader(plan, batch_size=8, seed=2, shuffle_blocks=2)
    again.load_state_dict(part.state_dict())
    it = iter(again)
    assert head + [[r.record_id for r in next(it)] for _ in range(n - 4)] == order
    with pytest.raises(UserError, match="batch_size"):
        EditLoader(plan, batch_size=4, seed=2).load_state_dict(part.state_dict())
    r0, r1 = (EditLoader(plan, rank=r, world_size=2, batch_size=8, seed=2) for r in (0, 1))
    assert r0.steps_in_epoch(0) == r1.steps_in_epoch(0) >= 1
    assert not set(r0.epoch_order(0)) & set(r1.epoch_order(0))
    assert not set(r0.heldout()) & set(r1.heldout()) and len(r0.heldout()) + len(r1.heldout()) == len(r0.heldout_refs)
    with pytest.raises(UserError, match="do not fill one batch"):
        EditLoader(plan, batch_size=1000)


def test_examples_read_the_guidance_prompt_and_train_on_the_answer_only(edits):
    from img.finetune.train import IGNORE, Batcher, FinetuneConfig

    plan = plan_shards(list_edit_shards(edits))
    loader = EditLoader(plan, batch_size=4)
    records = next(iter(loader))
    enc = GuidanceEncoder(get_profile("tiny"))
    batcher = Batcher(enc, FinetuneConfig())
    batch = batcher(records)
    questions = [batcher.question(r) for r in records]
    assert all(r.caption in q for r, q in zip(records, questions))  # the *edited* caption
    ref = enc.inputs([r.image for r in records], questions)  # exactly what guidance extraction feeds the MLLM
    tok = enc.processor.tokenizer
    for i, r in enumerate(records):
        n = int(ref["attention_mask"][i].sum())
        assert torch.equal(batch["input_ids"][i, :n], ref["input_ids"][i, :n])
        assert (batch["labels"][i, :n] == IGNORE).all()
        answer = tok(r.instruction, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        m = int(batch["attention_mask"][i].sum())
        assert batch["labels"][i, n:m].tolist() == answer == batch["input_ids"][i, n:m].tolist()
        assert (batch["labels"][i, m:] == IGNORE).all()
        assert tok.decode(answer, skip_special_tokens=True) == r.instruction
    assert torch.equal(batch["pixel_values"], ref["pixel_values"])


# ----------------------------------------------------------------------------- the job
@pytest.fixture(scope="module")
def finetuned(edits, tmp_path_factory) -> tuple[Path, str]:
    root = tmp_path_factory.mktemp("ft")
    run, lake = root / "run", str(root / "lake")
    out = _cli(["jobs", "finetune-mllm", "--profile", "tiny", "--data", edits, "--steps", "30", "--run-dir", str(run),
                "--lake", lake, "--config", _toml(root)])
    assert "fine-tuned" in out.output
    return run, lake


@pytest.mark.slow
def test_finetune_learns_and_records_metrics_and_quarantine(finetuned, edits):
    run, lake = finetuned
    m = _metrics(lake, _run_id(run))
    assert sorted(m["loss"]) == list(range(1, 31)) and sorted(m["lr"]) == [5, 10, 15, 20, 25, 30]
    before, after = m["heldout_loss_before"][0], m["heldout_loss_after"][30]
    assert after < 0.9 * before, (before, after)
    assert 0 <= m["heldout_exact_match"][30] <= 1 and m["heldout_exact_match_before"][0] == 0.0
    assert np.mean([m["loss"][s] for s in range(26, 31)]) < np.mean([m["loss"][s] for s in range(1, 6)])
    q = lance.dataset(f"{lake}/finetune_quarantine.lance").to_table().to_pylist()
    assert len(q) == 8 and {x["run_id"] for x in q} == {_run_id(run)}  # round(0.04 * 200)
    source = {f"{f.name}#{i}": r for f in sorted(Path(edits).iterdir()) for i, r in enumerate(pq.read_table(f).to_pylist())}
    for x in q:
        src = source[x["pair_id"]]
        assert x["pair_id"] == f"{Path(x['source']).name}#{x['row']}" and x["caption"] == src["edited_prompt"]
        assert ("instruction" in x["reason"]) == (src["edit_prompt"] == "")
    assert {"adapter_config.json", "adapter_model.safetensors", "img_adapter.json"} <= \
        {p.name for p in (run / "adapter").iterdir()}
    assert json.loads((run / "adapter" / "img_adapter.json").read_text())["mllm_hidden"] == 64
    assert (run / "latest_checkpoint").read_text().strip() == "step_00000030"
    # the SQL the external check runs
    sql = json.loads(_cli(["sql", "--lake", lake, "--json", "select name, value from metrics where name in "
                           "('heldout_loss_before', 'heldout_loss_after')"]).output)
    assert {r["name"] for r in sql} == {"heldout_loss_before", "heldout_loss_after"}
    # a second start in the same folder must be explicit
    code, msg = _cli(["jobs", "finetune-mllm", "--data", edits, "--steps", "5", "--run-dir", str(run), "--lake", lake],
                     ok=False)
    assert code == 2 and "--resume" in msg


@pytest.mark.slow
def test_resume_continues_exactly(edits, tmp_path, monkeypatch):
    from safetensors.torch import load_file

    cfg = _toml(tmp_path, extra="schedule_steps = 8\nwarmup_ratio = 0.25\nlog_every = 2\n")
    lake = str(tmp_path / "lake")
    base = ["jobs", "finetune-mllm", "--profile", "tiny", "--data", edits, "--lake", lake, "--config", cfg,
            "--checkpoint-every", "4"]
    a, b = tmp_path / "a", tmp_path / "b"
    _cli([*base, "--steps", "8", "--run-dir", str(a)])
    _cli([*base, "--steps", "4", "--run-dir", str(b)])
    loaded = only_weights_only_torch_load(monkeypatch)
    _cli([*base, "--steps", "8", "--run-dir", str(b), "--resume"])
    monkeypatch.undo()
    assert set(loaded) == {"mp_rank_00_model_states.pt"}  # every DeepSpeed file read with weights_only=True
    ma, mb = _metrics(lake, _run_id(a)), _metrics(lake, _run_id(b))
    assert sorted(mb["loss"]) == list(range(1, 9))
    for s in range(1, 9):
        assert abs(ma["loss"][s] - mb["loss"][s]) <= 1e-6, (s, ma["loss"][s], mb["loss"][s])
    assert ma["lr"] == mb["lr"] and abs(ma["heldout_loss_after"][8] - mb["heldout_loss_after"][8]) <= 1e-6
    wa, wb = load_file(str(a / "adapter" / "adapter_model.safetensors")), load_file(
        str(b / "adapter" / "adapter_model.safetensors"))
    assert wa.keys() == wb.keys() and all(torch.allclose(wa[k], wb[k], atol=1e-6) for k in wa)
    # a resume with other settings is refused, naming the fingerprints
    code, msg = _cli([*base[:-2], "--config", _toml(tmp_path, extra="seed = 5\n", name="other.toml"), "--steps", "9",
                      "--run-dir", str(b), "--resume"], ok=False)
    assert code == 2 and "fingerprint" in msg


# ----------------------------------------------------------------------------- the adapter in use
@pytest.mark.slow
def test_adapter_changes_guidance_and_merged_export_matches(finetuned, tmp_path, monkeypatch):
    import dataclasses

    from img.finetune.train import export_merged
    from img.models.profiles import ModelRef

    run, _ = finetuned
    tiny = get_profile("tiny")
    tuned = with_mllm_adapter(tiny, run / "adapter")
    assert tuned.model_ids()["mllm_adapter"] == adapter_id(run / "adapter") != ""
    image = sw.render(sw.sample_scene(np.random.default_rng(5)), np.random.default_rng(5))
    q = ["How should this image change to match: a red circle above a blue star?"]
    base_h = GuidanceEncoder(tiny)([image], q)[0]
    tuned_h = GuidanceEncoder(tuned)([image], q)[0]
    assert base_h.shape == tuned_h.shape and (base_h - tuned_h).abs().max() > 0.05
    merged = export_merged(tiny, run / "adapter", tmp_path / "merged")
    plain = dataclasses.replace(tiny, mllm=ModelRef(str(merged)))
    assert torch.allclose(GuidanceEncoder(plain)([image], q)[0], tuned_h, atol=1e-5)
    with pytest.raises(UserError, match="not a peft adapter folder"):
        with_mllm_adapter(tiny, run)
    # a profile names one in jobs/profiles/<name>.toml
    (tmp_path / "profiles").mkdir()
    (tmp_path / "profiles" / "tiny.toml").write_text(f'mllm_adapter = "{run / "adapter"}"\n')
    monkeypatch.setenv("IMG_PROFILES_DIR", str(tmp_path / "profiles"))
    named = get_profile("tiny")
    assert named.mllm_adapter == str(run / "adapter") and named.model_ids() == tuned.model_ids()
    with pytest.raises(UserError, match="width 64"):
        with_mllm_adapter(get_profile("bench"), run / "adapter")


def _stored_vs_encoders(lake: str, data: str, adapter: Path, n: int = 2) -> None:
    """The guidance stored for ``n`` pairs equals the fine-tuned MLLM's and differs from the base MLLM's."""
    feats = lance.dataset(f"{lake}/features.lance")
    pairs = {p["pair_id"]: p for p in lance.dataset(f"{lake}/pairs.lance").to_table().to_pylist()}
    t = feats.to_table(columns=["pair_id", "guidance_len"])
    rows = pq.read_table(next(Path(data).iterdir())).to_pylist()
    tiny = get_profile("tiny")
    base_enc, tuned_enc = GuidanceEncoder(tiny), GuidanceEncoder(with_mllm_adapter(tiny, adapter))
    for i, blob in enumerate(feats.take_blobs("guidance", indices=list(range(n)))):
        pid, length = t["pair_id"][i].as_py(), t["guidance_len"][i].as_py()
        stored = torch.from_numpy(np.frombuffer(blob.readall(), np.float16).reshape(length, 64).astype(np.float32))
        row = rows[int(pid.split("#")[1])]
        image = Image.open(io.BytesIO(row["jpg_1"] if row["label_0"] == 1.0 else row["jpg_0"])).convert("RGB")
        tuned = tuned_enc([image], [pairs[pid]["question"]])[0]
        base = base_enc([image], [pairs[pid]["question"]])[0]
        assert torch.allclose(stored, tuned, atol=2e-2, rtol=1e-2)  # the stored guidance is the fine-tuned MLLM's
        assert (stored - base).abs().max() > 0.05  # ... and not the base MLLM's
    assert json.loads(feats.schema.metadata[b"img.model_ids"])["mllm_adapter"] == adapter_id(adapter)


@pytest.mark.slow
def test_embed_stage_and_fingerprint_use_the_adapter(finetuned, tmp_path):
    """The embed job's Guidance stage (as its Ray actors build it) and its table fingerprint, without Ray."""
    from img.data.sample import write_sample
    from img.lake import tables as lake_mod
    from pipelines.embed import Decode, Guidance, embed_fingerprint, read_units, run_embed, table_schemas
    from pipelines.embed_config import EmbedConfig
    from pipelines.source import list_shards, plan_units

    run, _ = finetuned
    adapter = run / "adapter"
    data = str(tmp_path / "pick")
    write_sample(data, pairs=4, seed=2, ties=0.0)
    units, _, _ = plan_units(list_shards(data), set(), None)
    batch = Decode(16, 60_000_000, 0)(read_units({k: np.array([u[k] for u in units]) for k in units[0]}))
    aid = adapter_id(adapter)
    base = Guidance("tiny", "cpu", 1)(batch)
    tuned = Guidance("tiny", "cpu", 1, mllm_adapter=str(adapter), mllm_adapter_id=aid)(batch)
    tiny = get_profile("tiny")
    enc = GuidanceEncoder(with_mllm_adapter(tiny, adapter))
    for i in range(len(batch["pair_id"])):
        a = np.frombuffer(base["guidance"][i], np.float16)
        b = np.frombuffer(tuned["guidance"][i], np.float16)
        assert a.shape == b.shape and np.abs(a.astype(np.float32) - b.astype(np.float32)).max() > 0.05
        want = enc([Image.fromarray(batch["loser_image"][i])], [batch["question"][i]])[0].half().numpy().ravel()
        assert np.allclose(b, want, atol=1e-3)
    with pytest.raises(UserError, match="changed since the embed job started"):
        Guidance("tiny", "cpu", 1, mllm_adapter=str(adapter), mllm_adapter_id="sha256:0000000000000000")
    # a lake whose tables were made with the adapter refuses guidance without it (and vice versa) unless --new-table
    lake, cfg = str(tmp_path / "lake"), EmbedConfig()
    tuned_profile = with_mllm_adapter(tiny, adapter)
    fp = embed_fingerprint(tuned_profile, cfg)
    assert fp != embed_fingerprint(tiny, cfg)
    for name, schema in table_schemas(tuned_profile, cfg, fp).items():
        lake_mod.ensure_table(lake, name, schema)
    with pytest.raises(UserError, match=r"models differ: mllm_adapter 'sha256:[0-9a-f]{16}' -> None.*`new_table`"):
        run_embed(data, lake, "tiny", cfg, progress=False)
    code, msg = _cli(["jobs", "embed", "--source", data, "--lake", lake, "--mllm-adapter", str(tmp_path / "none")],
                     ok=False)
    assert code == 2 and "--mllm-adapter" in msg


@pytest.mark.slow
def test_embed_job_with_the_adapter_stores_the_fine_tuned_guidance(finetuned, tmp_path):
    """The external check's command end to end (Ray): `img jobs embed ... --mllm-adapter R/adapter`."""
    import ray

    from img.data.sample import write_sample

    run, _ = finetuned
    data, lake = str(tmp_path / "pick"), str(tmp_path / "lake")
    write_sample(data, pairs=8, seed=2, ties=0.0)
    try:
        s = _cli(["jobs", "embed", "--dataset", "pickapic", "--source", data, "--profile", "tiny", "--lake", lake,
                  "--mllm-adapter", str(run / "adapter")])
    finally:
        ray.shutdown()
    assert "8 pairs written" in s.output
    _stored_vs_encoders(lake, data, run / "adapter")


@pytest.mark.slow
def test_infer_records_the_adapter(finetuned, tmp_path):
    from img.inference.generation import GenerationSettings
    from img.inference.infer import run_infer

    run, _ = finetuned
    lake = str(tmp_path / "lake")
    s = run_infer(["a red circle"], "tiny", tmp_path / "out", rounds=1, settings=GenerationSettings(steps=2), lake=lake,
                  progress=False,
                  mllm_adapter=run / "adapter")
    assert s.images == 2
    rows = lance.dataset(f"{lake}/generations.lance").to_table().to_pylist()
    assert {json.loads(r["model_ids"])["mllm_adapter"] for r in rows} == {adapter_id(run / "adapter")}


@pytest.mark.slow
def test_user_errors_are_one_line(tmp_path, edits, repo_root):
    cases = [
        (["--data", str(tmp_path / "nope"), "--steps", "5"], "--data"),
        (["--data", edits, "--steps", "0"], "--steps must be >= 1"),
        (["--data", edits, "--steps", "5", "--method", "half"], "--method 'half'"),
        (["--data", edits, "--steps", "5", "--resume"], "no complete checkpoint"),
        (["--data", edits, "--steps", "5", "--config", _toml(tmp_path, extra="lrr = 1\n")], "unknown config key 'lrr'"),
    ]
    for args, msg in cases:
        code, out = _cli(["jobs", "finetune-mllm", "--run-dir", str(tmp_path / "r"), "--lake", str(tmp_path / "l"),
                          *args], ok=False)
        assert code == 2 and msg in out, (args, out)
    assert not (tmp_path / "r").exists() and not (tmp_path / "l").exists()
    # through the console entry point: one line on stderr, exit 2, no traceback
    import os
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "img.cli", "jobs", "finetune-mllm", "--data", str(tmp_path / "nope"),
                           "--steps", "5", "--run-dir", str(tmp_path / "r"), "--lake", str(tmp_path / "l")],
                          capture_output=True, text=True, timeout=300, cwd=str(repo_root),
                          env={**os.environ, "PYTHONPATH": str(repo_root)})
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "--data" in proc.stderr, proc.stderr


def test_the_shipped_config_states_the_defaults(repo_root):
    from img.config import load_config
    from img.finetune.train import FinetuneConfig

    assert load_config(FinetuneConfig, repo_root / "jobs" / "finetune_mllm.toml") == FinetuneConfig()
    big = load_config(FinetuneConfig, repo_root / "jobs" / "finetune_mllm_13b.toml")
    assert big.gradient_checkpointing and big.zero_stage == 2 and big.lora == FinetuneConfig().lora
