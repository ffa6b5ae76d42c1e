"""deploy: export parity, the bundle contract, and promotion through the registry."""

from __future__ import annotations

import copy
import json
import os
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import mlflow
import numpy as np
import onnx
import pytest
from conftest import ROOT
from omegaconf import OmegaConf
from onnx import TensorProto, helper, numpy_helper

from pipeline.config import Paths
from pipeline.data.splits import column, load_splits
from pipeline.stages import deploy
from pipeline.stages.evaluate import score_champion
from pipeline.tasks.scoring import ClassificationScoring, Scored
from pipeline.tasks.text_classification import export
from pipeline.tasks.text_classification.inference import load_module, predict_logits
from pipeline.tracking import lineage, registry
from serving.bundle import Bundle

BLOCK_TORCH = """
import sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("torch", "pipeline", "pytorch_lightning"):
            raise ImportError(f"{name} is blocked in this process")
sys.meta_path.insert(0, Block())
"""


@pytest.fixture
def bundle(built_bundle):
    return built_bundle


def repoint_tracking(db: Path, old: Path, new: Path) -> None:
    """Rewrite every absolute path under `old` in an MLflow sqlite database to `new`
    (experiments' and runs' artifact locations), so the copy logs into itself."""
    with sqlite3.connect(db) as conn:
        tables = [t for (t,) in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")]
        for table in tables:
            for _, column, kind, *_ in conn.execute(f"PRAGMA table_info('{table}')"):
                if any(t in kind.upper() for t in ("CHAR", "TEXT", "CLOB")):
                    conn.execute(f'UPDATE "{table}" SET "{column}" = '
                                 f'replace("{column}", ?, ?)', (str(old), str(new)))


@pytest.fixture
def own_workspace(workspace, built_bundle, tmp_path):
    """A private copy of the session workspace (its candidate bundle and its own MLflow
    database included): what a test builds, registers or promotes here, no other test
    sees. Yields (path, cfg) like `workspace`."""
    source, cfg = workspace
    path = Path(shutil.copytree(source, tmp_path / "workspace", symlinks=True))
    repoint_tracking(path / "mlflow.db", source, path)
    cfg = copy.deepcopy(cfg)
    cfg.mlflow.tracking_uri = f"sqlite:///{path}/mlflow.db"
    return path, cfg


def test_bundle_contents_and_parity_report(bundle, workspace):
    bundle_dir, meta = bundle
    path, cfg = workspace
    assert {p.name for p in bundle_dir.iterdir()} == {
        "model.onnx", "model.int8.onnx", "tokenizer.json", "bundle.json", "MODEL_CARD.md"}
    saved = json.loads((bundle_dir / "bundle.json").read_text())
    assert saved == meta
    for key in ("version", "label_names", "max_length", "metrics", "gate", "lineage",
                "profile", "parity", "int8"):
        assert key in saved, key
    assert saved["lineage"] == {"data": "t", "data_hash": "abc", "checkpoint_sha256":
                                lineage.digest(path / "models/checkpoints/best.ckpt")}
    assert saved["version"] == deploy.content_version(bundle_dir, ("tokenizer.json",))
    card = (bundle_dir / "MODEL_CARD.md").read_text()
    assert "## Intended use" in card and "## Limitations" in card and meta["version"] in card

    # The stage enforced its bounds already; what can still be wrong is the report.
    # Its figures must be what the bundle does, measured again here.
    paths = Paths(path)
    test = load_splits(paths.processed)["test"]
    texts, ids = column(test, "text"), column(test, "input_ids")
    reference = predict_logits(load_module(paths.checkpoint), ids, cfg.evaluate.batch_size)
    fp32, int8 = Bundle.load(bundle_dir, "fp32"), Bundle.load(bundle_dir, "int8")
    int8_logits = int8.predict_logits(texts)
    parity = saved["parity"]
    assert parity["rows"] == len(texts) == 60
    assert parity["fp32_max_abs_diff"] == pytest.approx(
        np.abs(fp32.predict_logits(texts) - reference).max(), rel=1e-3, abs=1e-7)
    assert parity["int8_label_agreement"] == (int8_logits.argmax(1) == reference.argmax(1)).mean()
    assert parity["int8_max_abs_diff"] == pytest.approx(np.abs(int8_logits - reference).max(),
                                                        rel=1e-3, abs=1e-7)
    alone = np.concatenate([int8.run(int8.encode([t])) for t in texts])
    together = int8.run(int8.encode(texts))
    assert parity["batch_invariance_max_abs_diff"]["int8"] == pytest.approx(
        np.abs(alone - together).max(), rel=1e-3, abs=1e-7)


def test_bundle_serves_where_torch_cannot_be_imported(bundle):
    bundle_dir, meta = bundle
    script = BLOCK_TORCH + f"""
from serving.bundle import Bundle
for precision in ("fp32", "int8"):
    b = Bundle.load({str(bundle_dir)!r}, precision)
    probs = b.predict_proba(["great superb film", "awful dull plot"])
    assert probs.shape == (2, 2) and abs(probs.sum() - 2) < 1e-5
assert "torch" not in sys.modules
import serving.api.app  # the service module too
print("ok")
"""
    result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True,
                            text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


def wrong_modes(root: Path) -> dict[str, str]:
    """Entries under `root` (itself as ".") whose permission bits are not those of an
    ordinary output: directories 0755, files 0644."""
    wrong = {}
    for path in [root, *root.rglob("*")]:
        mode, expected = path.stat().st_mode & 0o777, 0o755 if path.is_dir() else 0o644
        if mode != expected:
            wrong[str(path.relative_to(root))] = oct(mode)
    return wrong


def test_bundles_are_readable_by_every_user(bundle, tmp_path):
    """The serving image runs as its own user and mounts the bundle read-only: a bundle
    file only its writer can read (mkstemp makes them 0600) answered every request
    `not_ready`. The exported bundle and its copy in the store are world-readable,
    even when the copy is made under a strict umask."""
    bundle_dir, _ = bundle
    assert wrong_modes(bundle_dir) == {}
    strict = os.umask(0o077)
    try:
        stored = registry.store_bundle(bundle_dir, {"registry_version": "1"},
                                       tmp_path / "bundles")
    finally:
        os.umask(strict)
    assert (stored / "registry.json").exists()
    assert wrong_modes(stored) == {}


def disagreeing_past(bound: int):
    """In place of int8 quantisation: the fp32 graph with the logits negated on every
    row whose token ids sum past `bound`, so there its label is another one than
    PyTorch's (argmax becomes argmin), and elsewhere the same. Row by row (padding adds
    nothing to the sum), so nothing depends on the batch: of the parity checks, only
    the label agreement can fail."""

    def quantize(prepared, int8, *_) -> None:
        model = onnx.load(str(prepared))
        graph = model.graph
        for node in graph.node:
            node.output[:] = ["logits_true" if o == "logits" else o for o in node.output]
            node.input[:] = ["logits_true" if i == "logits" else i for i in node.input]
        graph.initializer.extend([
            numpy_helper.from_array(np.array([1], np.int64), "dp_axis"),
            numpy_helper.from_array(np.array(bound, np.float32), "dp_bound")])
        graph.node.extend([
            helper.make_node("Mul", ["input_ids", "attention_mask"], ["dp_ids"]),
            helper.make_node("Cast", ["dp_ids"], ["dp_ids_f"], to=TensorProto.FLOAT),
            helper.make_node("ReduceSum", ["dp_ids_f", "dp_axis"], ["dp_sum"], keepdims=1),
            helper.make_node("Greater", ["dp_sum", "dp_bound"], ["dp_past"]),
            helper.make_node("Neg", ["logits_true"], ["dp_negated"]),
            helper.make_node("Where", ["dp_past", "dp_negated", "logits_true"], ["logits"]),
        ])
        onnx.checker.check_model(model)
        onnx.save(model, str(int8))

    return quantize


def test_broken_parity_fails_and_leaves_the_old_bundle(own_workspace, monkeypatch):
    """An int8 model that gives other labels than PyTorch on as few test rows as take
    it under the configured `int8_min_agreement` (the project's own bound, not a raised
    one) fails the stage with the agreement it really has, and the candidate bundle
    stays as it was."""
    path, cfg = own_workspace
    candidate = path / "models/candidate"
    before = {p.name: p.read_bytes() for p in candidate.iterdir()}
    required = cfg.deploy.int8_min_agreement
    test_ids = column(load_splits(Paths(path).processed)["test"], "input_ids")
    sums = np.array([sum(ids) for ids in test_ids])
    # the highest bound that breaks enough rows: the agreement lands just under `required`
    bound = next(n for n in sorted(set(sums), reverse=True) if (sums <= n).mean() < required)
    agreement = float((sums <= bound).mean())  # the rows left alone agree
    assert 0 < agreement < required
    monkeypatch.setattr(export, "quantize_int8", disagreeing_past(int(bound)))
    with pytest.raises(deploy.DeployError) as failed:
        deploy.build_bundle(cfg, Paths(path))
    message = str(failed.value)
    assert message == (f"int8 labels agree with PyTorch on {agreement:.4f} of test rows "
                       f"(required {required})"), message
    assert {p.name: p.read_bytes() for p in candidate.iterdir()} == before


BATCH_STEP = 0.1  # logit shift per batch companion in `batch_dependent`


def batch_dependent(prepared, int8, *_) -> None:
    """In place of int8 quantisation: the fp32 graph with every logit raised by
    BATCH_STEP * (batch size - 1). A text scored alone is unchanged (so labels still
    agree with PyTorch); inside a batch of n it moves by exactly BATCH_STEP * (n - 1),
    on any CPU, since it does not rest on any kernel's rounding."""
    model = onnx.load(str(prepared))
    graph = model.graph
    for node in graph.node:
        node.output[:] = ["logits_alone" if o == "logits" else o for o in node.output]
        node.input[:] = ["logits_alone" if i == "logits" else i for i in node.input]
    graph.initializer.extend([numpy_helper.from_array(np.array([1.0], np.float32), "bd_one"),
                              numpy_helper.from_array(np.array([BATCH_STEP], np.float32),
                                                      "bd_step")])
    graph.node.extend([
        helper.make_node("Shape", ["input_ids"], ["bd_batch_i"], start=0, end=1),
        helper.make_node("Cast", ["bd_batch_i"], ["bd_batch"], to=TensorProto.FLOAT),
        helper.make_node("Sub", ["bd_batch", "bd_one"], ["bd_companions"]),
        helper.make_node("Mul", ["bd_companions", "bd_step"], ["bd_shift"]),
        helper.make_node("Add", ["logits_alone", "bd_shift"], ["logits"]),
    ])
    onnx.checker.check_model(model)
    onnx.save(model, str(int8))


def test_batch_dependent_int8_fails_the_stage(own_workspace, monkeypatch):
    """An int8 model whose answer depends on its batch companions (as dynamic
    quantisation's per-batch scales make it) is what the batch-invariance check
    exists to catch: here one that does so by construction, by a known amount."""
    path, cfg = own_workspace
    monkeypatch.setattr(export, "quantize_int8", batch_dependent)
    before = (path / "models/candidate/bundle.json").read_text()
    # the check scores the test split's 60 rows alone and as one batch of 60
    shift = BATCH_STEP * (60 - 1)
    assert shift > cfg.deploy.int8_batch_max_abs_diff
    with pytest.raises(deploy.DeployError) as failed:
        deploy.build_bundle(cfg, Paths(path))
    message = str(failed.value)
    assert f"int8: a text's logits change with its batch by {shift:.2e}" in message, message
    assert "fp32:" not in message and "int8 labels agree" not in message, message
    assert (path / "models/candidate/bundle.json").read_text() == before


def test_the_same_checkpoint_gives_the_same_bundle_bytes(own_workspace, bundle):
    """bundle.json holds nothing of one run (no time, run id or commit), and the ONNX
    export drops the stack traces with their absolute paths: a rebuild in another
    directory writes the same files, so dvc.lock repeats."""
    path, cfg = own_workspace
    deploy.build_bundle(cfg, Paths(path))
    rebuilt = path / "models/candidate"
    first = {p.name: p.read_bytes() for p in bundle[0].iterdir()}
    assert first == {p.name: p.read_bytes() for p in rebuilt.iterdir()}
    assert str(path) not in (rebuilt / "model.onnx").read_bytes().decode("latin-1")


def register_as(meta: dict, blessed: bool, bundle_dir, run_id: str) -> str:
    meta = json.loads(json.dumps(meta))
    meta["gate"] = {"blessed": blessed,
                    "reasons": ["test: blessed" if blessed else "accuracy 0.1 < floor 0.75"]}
    return registry.register(bundle_dir, meta, run_id)


def test_gate_registry_alias_current_and_rollback(own_workspace, bundle):
    path, cfg = own_workspace
    paths = Paths(path)
    mlflow.set_tracking_uri(cfg.mlflow.tracking_uri)
    client = mlflow.MlflowClient()
    bundle_dir, meta = path / "models/candidate", bundle[1]
    name = meta["model_name"]
    current = path / "models/current"
    run_id = lineage.training_run(cfg.mlflow.experiment, paths.checkpoint)

    v1 = register_as(meta, True, bundle_dir, run_id)
    registry.promote(name, v1, bundle_dir, paths)
    assert str(client.get_model_version_by_alias(name, "champion").version) == v1
    assert os.readlink(current) == f"bundles/{v1}"
    assert json.loads((current / "bundle.json").read_text())["version"] == meta["version"]
    record = json.loads((current / "registry.json").read_text())
    episode = record.pop("episode")
    assert record == {"model_name": name, "registry_version": v1, "mlflow_run_id": run_id,
                      "git_commit": client.get_model_version(name, v1).tags["git_commit"]}
    assert (episode["from_version"], episode["to_version"]) == (None, v1)

    v2 = register_as(meta, False, bundle_dir, run_id)  # an unblessed model: recorded, not promoted
    tags = client.get_model_version(name, v2).tags
    assert tags["blessed"] == "false" and "accuracy 0.1 < floor 0.75" in tags["gate_reasons"]
    assert str(client.get_model_version_by_alias(name, "champion").version) == v1
    assert os.readlink(current) == f"bundles/{v1}"

    v3 = register_as(meta, True, bundle_dir, run_id)
    registry.promote(name, v3, bundle_dir, paths)
    assert str(client.get_model_version_by_alias(name, "champion").version) == v3
    assert os.readlink(current) == f"bundles/{v3}"

    # the champion scored on the test split through its bundle, for the gate
    test = load_splits(path / "data/processed")["test"]
    labels = np.asarray(column(test, "label"))
    cfg = OmegaConf.create({"evaluate": {"calibration_bins": 15}})
    measured = Scored({}, plot_data=(None, labels, ["neg", "pos"]),
                      requests={"test": (column(test, "text"), labels)})
    scored = score_champion(name, ClassificationScoring(), measured, cfg)
    assert scored["version"] == v3 and "error" not in scored, scored
    assert scored["metrics"]["accuracy"] == pytest.approx(meta["metrics"]["accuracy"], abs=0.02)

    # rollback skips the unblessed v2 and goes to v1, even with v1's bundle gone from disk
    shutil.rmtree(path / "models/bundles" / v1)
    assert registry.rollback(name, paths) == v1
    assert str(client.get_model_version_by_alias(name, "champion").version) == v1
    assert os.readlink(current) == f"bundles/{v1}"
    assert (current / "model.int8.onnx").exists()
    assert json.loads((current / "registry.json").read_text())["registry_version"] == v1
    with pytest.raises(registry.RegistryError, match="is the first blessed version"):
        registry.rollback(name, paths)

    # by hand (textops promote / rollback VERSION): a refused version needs --force
    with pytest.raises(registry.RegistryError, match=r"v2 was refused at the gate \(accuracy"):
        registry.promote_version(name, v2, paths)
    with pytest.raises(registry.RegistryError, match="has no version 99"):
        registry.promote_version(name, "99", paths)
    registry.promote_version(name, v3, paths)
    assert os.readlink(current) == f"bundles/{v3}"
    registry.promote_version(name, v2, paths, force=True)
    assert str(client.get_model_version_by_alias(name, "champion").version) == v2
    rows = registry.history(name)
    assert [r["version"] for r in rows] == [v3, v2, v1]
    assert [(r["champion"], r["blessed"]) for r in rows] == [(False, True), (True, False),
                                                             (False, True)]
    assert "accuracy 0.1 < floor 0.75" in rows[1]["reasons"]

    # the audit trail: every move of the alias, newest first, who moved it and why
    moves = registry.moves(name)
    assert [(m["kind"], m["from_version"], m["to_version"]) for m in moves] == [
        ("promote", v3, v2), ("promote", v1, v3), ("rollback", v3, v1),
        ("deploy", v1, v3), ("deploy", None, v1)]
    assert "forced past the gate (accuracy 0.1 < floor 0.75" in moves[0]["reason"]
    assert moves[2]["reason"] == f"back to the blessed version before v{v3}"
    assert all(m["actor"] and m["alias"] == "champion" for m in moves)
    # the live bundle says which move made it the champion (/metadata shows it)
    episode = json.loads((current / "registry.json").read_text())["episode"]
    assert episode == moves[0]


def make_store(root: Path, versions: range) -> Paths:
    paths = Paths(root)
    for v in versions:
        (paths.store / str(v)).mkdir(parents=True)
        (paths.store / str(v) / "bundle.json").write_text("{}")
    (paths.store / ".7.tmp-abc").mkdir()  # an unfinished copy: not a version, left alone
    return paths


def stored(paths: Paths) -> set[str]:
    return {p.name for p in paths.store.iterdir()}


def test_prune_store_keeps_the_newest_and_never_the_live_bundle(tmp_path):
    paths = make_store(tmp_path / "a", range(1, 8))
    registry.point_current(paths.store / "2", paths.current)  # an old version is live
    registry.prune_store(3, paths)
    assert stored(paths) == {"2", "5", "6", "7", ".7.tmp-abc"}
    assert json.loads((paths.current / "bundle.json").read_text()) == {}

    # numeric order, not text order: 10 is newer than 9
    paths = make_store(tmp_path / "b", range(8, 12))
    registry.prune_store(2, paths)  # no current link at all
    assert stored(paths) == {"10", "11", ".7.tmp-abc"}

    paths = make_store(tmp_path / "c", range(1, 4))
    registry.point_current(paths.store / "3", paths.current)
    registry.prune_store(0, paths)  # keep none: only the live one stays
    assert stored(paths) == {"3", ".7.tmp-abc"}

    registry.prune_store(2, Paths(tmp_path / "missing"))  # no store yet: nothing to do


def agreeing_scheme(good: str):
    """In place of int8 quantisation: scheme `good` gives the fp32 graph itself, any other
    scheme the graph with its logits negated (every label flipped). Each output names
    its scheme in the model's doc_string."""
    def quantize(prepared, int8, calibration, scheme):
        model = onnx.load(str(prepared))
        if scheme != good:
            for node in model.graph.node:
                node.output[:] = ["logits_kept" if o == "logits" else o for o in node.output]
            model.graph.node.append(helper.make_node("Neg", ["logits_kept"], ["logits"]))
        model.doc_string = scheme
        onnx.save(model, str(int8))
    return quantize


@pytest.mark.parametrize("good", list(export.INT8_SCHEMES))
def test_quantize_best_keeps_the_scheme_that_agrees_best(good, bundle, workspace, tmp_path,
                                                           monkeypatch):
    bundle_dir, _ = bundle
    path, cfg = workspace
    paths = Paths(path)
    monkeypatch.setattr(export, "quantize_int8", agreeing_scheme(good))
    val_rows = column(load_splits(paths.processed)["val"], "input_ids")
    chosen = export.quantize_best(bundle_dir / "model.onnx", tmp_path / "int8.onnx",
                                  load_module(paths.checkpoint), val_rows, cfg)
    assert chosen["scheme"] == good
    assert chosen["validation_agreement"][good] == 1.0
    (bad,) = set(export.INT8_SCHEMES) - {good}
    assert chosen["validation_agreement"][bad] < 0.1
    assert onnx.load(str(tmp_path / "int8.onnx")).doc_string == good


def test_the_exported_model_says_nothing_of_where_the_code_lives(built_bundle):
    """The exporter names each node's source file and the dotted path of its class:
    dropped, so moving a module or cloning elsewhere leaves the bundle's bytes alone."""
    import onnx

    bundle_dir, _ = built_bundle
    model = onnx.load(str(bundle_dir / "model.onnx"))  # int8 keeps no node metadata
    values = [p.value for node in model.graph.node for p in node.metadata_props]
    assert values, "the exporter's own node metadata is kept"
    assert not [v for v in values if "pipeline" in v or str(ROOT) in v]


def test_deploy_signs_what_it_registers_and_promotes(own_workspace, bundle, monkeypatch,
                                                     tmp_path):
    """The registered and the promoted bundle carry model.sig, made with a key pair the
    first deploy makes; the candidate (a DVC output, the same bytes in every clone)
    stays unsigned; the registry's copy verifies as downloaded."""
    from serving.bundle.signature import SIGNATURE, verify

    path, cfg = own_workspace
    paths = Paths(path)
    meta = {**json.loads(json.dumps(bundle[1])), "gate": {"blessed": True, "reasons": []}}
    # the candidate is already built (own_workspace copies it): sign and register it
    monkeypatch.setattr(deploy, "build_bundle", lambda cfg, paths: json.loads(json.dumps(meta)))
    before = {p.name: p.read_bytes() for p in paths.candidate.iterdir()}
    report = deploy.deploy(cfg, paths)
    private, public = path / "keys/bundle-signing.pem", path / "keys/bundle-signing.pub"
    assert private.stat().st_mode & 0o777 == 0o600 and public.exists()
    assert {p.name: p.read_bytes() for p in paths.candidate.iterdir()} == before
    assert SIGNATURE not in before
    current = paths.current.resolve()
    assert {SIGNATURE, "registry.json"} <= {p.name for p in current.iterdir()}
    verify(current, public)
    downloaded = registry.download_bundle(meta["model_name"], tmp_path / "download",
                                          report["registry_version"])
    verify(downloaded, public)
    # a second deploy signs with the same key
    key = private.read_bytes()
    again = deploy.deploy(cfg, paths)
    assert private.read_bytes() == key
    verify(paths.current.resolve(), public)
    assert int(again["registry_version"]) == int(report["registry_version"]) + 1


def test_deploy_can_make_a_blessed_model_the_challenger(own_workspace, bundle, monkeypatch):
    """deploy.promote_to=challenger: the first blessed version still becomes the
    champion; the next gets the challenger alias and leaves models/current alone."""
    path, cfg = own_workspace
    paths = Paths(path)
    cfg.deploy.promote_to = "challenger"
    meta = {**json.loads(json.dumps(bundle[1])), "gate": {"blessed": True, "reasons": []}}
    monkeypatch.setattr(deploy, "build_bundle", lambda cfg, paths: json.loads(json.dumps(meta)))
    first = deploy.deploy(cfg, paths)
    assert first["promoted"] and not first["challenger"]
    live = os.readlink(paths.current)
    second = deploy.deploy(cfg, paths)
    assert not second["promoted"] and second["challenger"]
    assert os.readlink(paths.current) == live
    client = mlflow.MlflowClient()
    name = meta["model_name"]
    assert str(client.get_model_version_by_alias(name, "challenger").version) == \
        second["registry_version"]
    assert str(client.get_model_version_by_alias(name, "champion").version) == \
        first["registry_version"]
    latest = registry.moves(name)[0]
    assert (latest["alias"], latest["kind"]) == ("challenger", "challenge")
    assert latest["actor"].startswith("deploy (")
