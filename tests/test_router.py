"""The unlearning router and the model families, alone and through the nightly flow."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from flows.cli import app
from models.certified import CertifiedConfig, certify_mlp
from models.data import Split
from models.families import FamilyConfig, family_of, retrain_family, train_family
from models.network import TabularMLP
from models.sisa import SisaConfig, train_sisa
from models.training import TrainConfig
from tasks import registry
from tasks.errors import ConfigurationError
from tasks.router import family_methods, route, validate_settings
from tasks.settings import CertifiedSettings, GateSettings, ModelSettings, SisaSettings, UnlearnSettings, WorkspaceSettings
from tests.helpers import request, train_subjects, write_requests

CPU = torch.device("cpu")
MODEL = WorkspaceSettings().model_name
# Small recipes keep the family bootstraps of the flow tests to a few seconds each.
FAST_TRAIN = {"max_epochs": 8, "patience": 3}
FAST_SISA = SisaSettings(n_slices=3, epochs_per_slice=2)
runner = CliRunner()


def toy_split(n_rows: int, seed: int) -> Split:
    """A separable problem with 40 subjects of several rows each, spread over 4 shards."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n_rows, 6)).astype(np.float32)
    y = (x[:, 0] + 0.5 * x[:, 1] > 0).astype(np.int64)
    groups = rng.integers(0, 40, size=n_rows)
    return Split(x, y, groups=groups, shards=groups % 4)


@pytest.fixture(scope="module")
def toy() -> dict:
    train, val = toy_split(400, 0), toy_split(100, 1)
    recipe = TrainConfig(hidden=(8,), max_epochs=5, patience=2)
    mlp, _ = train_family(FamilyConfig("mlp"), train, val, recipe, CPU)
    return {
        "train": train, "val": val, "recipe": recipe, "mlp": mlp,
        "sisa": train_sisa(train, SisaConfig(n_shards=4, n_slices=2, epochs_per_slice=1, hidden=(8,)), CPU),
        "certified": certify_mlp(mlp, train, CertifiedConfig(), CPU),
    }


def test_family_methods_keep_family():
    assert family_methods("mlp") == ["finetune", "neggrad_plus", "retrain", "salun", "scrub"]
    assert family_methods("sisa-mlp") == ["retrain", "sisa"]
    assert family_methods("certified") == ["newton", "retrain"]


def test_auto_routes_by_family(toy):
    settings = UnlearnSettings()

    mlp = route(toy["mlp"], "auto", settings)
    assert mlp.plan == ("neggrad_plus", "retrain")
    assert mlp.reason.startswith("auto: the champion is a plain MLP")

    sisa = route(toy["sisa"], "auto", settings)
    assert sisa.plan == ("sisa",)
    assert "SISA ensemble" in sisa.reason

    certified = route(toy["certified"], "auto", settings)
    assert certified.plan == ("newton", "retrain")
    assert "budget left" in certified.reason


def test_auto_retrains_spent_certified_head(toy):
    spent = copy.deepcopy(toy["certified"])
    spent.head.residual_used.fill_(spent.head.config.residual_budget)

    chosen = route(spent, "auto", UnlearnSettings())

    assert chosen.plan == ("retrain",)
    assert "is spent" in chosen.reason


def test_auto_uses_configured_approximate(toy):
    chosen = route(toy["mlp"], "auto", UnlearnSettings(approximate="scrub"))
    assert chosen.plan == ("scrub", "retrain")


@pytest.mark.parametrize(("requested", "plan"), [("scrub", ("scrub", "retrain")), ("retrain", ("retrain",))])
def test_explicit_method_plan(toy, requested, plan):
    chosen = route(toy["mlp"], requested, UnlearnSettings())
    assert chosen.plan == plan
    assert chosen.reason == f"method {requested} requested explicitly"


@pytest.mark.parametrize(("champion", "requested"), [("mlp", "sisa"), ("mlp", "newton"), ("sisa", "neggrad_plus"),
                                                     ("certified", "scrub"), ("mlp", "bogus")])
def test_method_outside_family_rejected(toy, champion, requested):
    with pytest.raises(ConfigurationError, match=f"{requested!r}.*valid for the"):
        route(toy[champion], requested, UnlearnSettings())


@pytest.mark.parametrize(("settings", "message"), [
    (UnlearnSettings(approximate="retrain"), "an exact method"),
    (UnlearnSettings(fallback="neggrad_plus"), "must be an exact method"),
    (UnlearnSettings(fallback="sisa"), "cannot unlearn from the mlp family"),
    (UnlearnSettings(method_settings={"neggrad_pluss": {}}), "unknown methods"),
    (UnlearnSettings(method_settings={"neggrad_plus": {"bogus": 1}}), r"unknown settings \['bogus'\]"),
    (UnlearnSettings(method_settings={"neggrad_plus": {"lr": "x"}}), "neggrad_plus.lr is 'x' .* must be of type float"),
    (UnlearnSettings(method_settings={"scrub": {"epochs": 2.5}}), "scrub.epochs is 2.5 .* must be of type int"),
    (UnlearnSettings(method_settings={"sisa": {"n_slices": 2}}), "valid settings: none"),
])
def test_invalid_unlearn_settings_rejected(settings, message):
    with pytest.raises(ConfigurationError, match=message):
        validate_settings(settings, "mlp")


@pytest.mark.parametrize("family", ["mlp", "sisa", "certified"])
def test_retrain_family_keeps_family(toy, family):
    champion = toy[family]
    retain = toy["train"].take(np.arange(20, 400))

    result = retrain_family(champion, retain, toy["val"], toy["recipe"], CPU)

    assert family_of(result.model) == family_of(champion)
    assert result.record.method == "retrain"
    assert result.record.details["family"] == family_of(champion)
    if family == "certified":
        assert int(result.model.head.n_train) == len(retain)
        assert int(result.model.head.retrains) == 0
    if family == "sisa":
        assert result.model.shard_rows.sum().item() == len(retain)
        assert result.model.config == champion.config


# The nightly flow, once per family, through `lethe run --method auto`.


def bootstrap_family(tmp_path, family: str, **certified):
    from tasks.bootstrap import bootstrap
    from tasks.workspace import Workspace

    ws = Workspace(tmp_path / f"ws-{family}")
    model = ModelSettings(family=family, sisa=FAST_SISA, certified=CertifiedSettings(**certified))
    bootstrap(ws, WorkspaceSettings(model=model, train=FAST_TRAIN))
    return ws


def run_auto(ws, subjects: list[int], tag: str) -> dict[str, str]:
    """Queue requests for `subjects`, run `lethe run --method auto` and return the new champion's tags."""
    write_requests(ws, f"{tag}.jsonl", [request(f"{tag}-{i}", s) for i, s in enumerate(subjects)])
    result = runner.invoke(app, ["run", "--method", "auto", "--workspace", str(ws.root)])
    assert result.exit_code == 0, result.output
    return registry.version_tags(ws, MODEL, registry.champion_version(ws, MODEL))


@pytest.mark.usefixtures("prefect_harness", "restore_environment")
@pytest.mark.parametrize(("family", "method"), [("mlp", "neggrad_plus"), ("certified", "newton"), ("sisa-mlp", "sisa")])
def test_lethe_run_auto_per_family(tmp_path, family, method):
    ws = bootstrap_family(tmp_path, family)
    assert registry.version_tags(ws, MODEL, "1")["model_family"] == family

    tags = run_auto(ws, train_subjects(ws, 2), "auto")

    assert registry.champion_version(ws, MODEL) == "2"
    assert tags["model_family"] == family
    assert tags["method_reason"].startswith("auto: ")
    # The approximate method of the mlp family may fail a gate and escalate; the others may not.
    assert tags["method"] == method or (family == "mlp" and tags["method"] == "retrain")
    champion = registry.load_version(ws, MODEL, "2")
    assert family_of(champion) == family


@pytest.mark.usefixtures("prefect_harness")
def test_nightly_sisa_equals_scratch_training(tmp_path):
    from flows.nightly import nightly_deletion_run
    from models.sisa import SisaEnsemble
    from tasks.modeling import family_config, splits_of, train_config
    from tasks.shards import read_all

    ws = bootstrap_family(tmp_path, "sisa-mlp")
    write_requests(ws, "sisa.jsonl", [request(f"s-{i}", s) for i, s in enumerate(train_subjects(ws, 3, offset=30))])

    summary = nightly_deletion_run(workspace=str(ws.root))

    assert summary["method"] == "sisa"
    unlearned = registry.load_version(ws, MODEL, "2")
    assert isinstance(unlearned, SisaEnsemble)
    settings = WorkspaceSettings.load(ws.root)
    splits = splits_of(read_all(ws.data_dir), settings.data.n_shards)
    scratch, _ = train_family(family_config(settings), splits["train"], splits["val"], train_config(settings.train), CPU)
    # Same seeds, same rows in the same order, on the CPU: the weights match bit for bit.
    for (name, left), (_, right) in zip(unlearned.state_dict().items(), scratch.state_dict().items(), strict=True):
        assert torch.equal(left, right), name
    record = json.loads((registry_run_artifact(ws, "2", "unlearn_record.json")))
    assert 1 <= record["details"]["retrained_shards"] <= 3


def registry_run_artifact(ws, version: str, name: str) -> str:
    import mlflow

    mlflow_client = registry.client(ws)
    run_id = mlflow_client.get_model_version(MODEL, version).run_id
    return mlflow.artifacts.load_text(f"runs:/{run_id}/{name}")


@pytest.mark.usefixtures("prefect_harness")
def test_certified_budget_overrun_refits_head(tmp_path):
    from flows.nightly import nightly_deletion_run

    # A tiny noise scale leaves a budget far below one removal's residual bound.
    ws = bootstrap_family(tmp_path, "certified", noise_std=0.01)
    write_requests(ws, "tight.jsonl", [request(f"t-{i}", s) for i, s in enumerate(train_subjects(ws, 2, offset=50))])

    summary = nightly_deletion_run(workspace=str(ws.root))

    assert summary["method"] == "newton"
    tags = registry.version_tags(ws, MODEL, "2")
    assert "refit the head from scratch" in tags["method_reason"]
    champion = registry.load_version(ws, MODEL, "2")
    assert int(champion.head.retrains) == 1
    assert int(champion.head.removals) == 1


@pytest.mark.usefixtures("prefect_harness")
def test_certified_failed_gate_retrains_family(tmp_path):
    from flows.nightly import nightly_deletion_run
    from models.certified import CertifiedMLP

    ws = bootstrap_family(tmp_path, "certified")
    write_requests(ws, "gate.jsonl", [request(f"g-{i}", s) for i, s in enumerate(train_subjects(ws, 2, offset=60))])
    # |z| <= 0 holds only for z exactly 0, so both forgetting gates fail.
    impossible = GateSettings(max_accuracy_z=0.0, max_mia_z=0.0)

    summary = nightly_deletion_run(workspace=str(ws.root), gates=impossible)

    assert [a["method"] for a in summary["attempts"]] == ["newton", "retrain"]
    tags = registry.version_tags(ws, MODEL, "2")
    assert tags["method"] == "retrain"
    assert tags["model_family"] == "certified"
    assert "escalated to retrain" in tags["method_reason"]
    champion = registry.load_version(ws, MODEL, "2")
    baseline = registry.load_version(ws, MODEL, "1")
    assert isinstance(champion, CertifiedMLP)
    # The exact fallback retrains the feature extractor too, so it never saw the forget rows.
    assert not torch.equal(champion.extractor.layers[0].weight, baseline.extractor.layers[0].weight)


def test_init_rejects_unknown_family(tmp_path, restore_environment):
    result = runner.invoke(app, ["init", "--family", "forest", "--workspace", str(tmp_path / "ws")])
    assert result.exit_code != 0
    assert "Unknown model family 'forest'" in result.output
    assert not (tmp_path / "ws").exists()


@pytest.mark.usefixtures("prefect_harness")
def test_family_setting_must_match_champion(workspace):
    from flows.nightly import nightly_deletion_run

    settings = WorkspaceSettings.load(workspace.root)
    changed = settings.model_copy(update={"model": ModelSettings(family="sisa-mlp")})
    changed.save(workspace.root)
    write_requests(workspace, "family.jsonl", [request("f-1", train_subjects(workspace, 1)[0])])

    with pytest.raises(ConfigurationError, match="champion \\(version 1\\) is a 'mlp' model"):
        nightly_deletion_run(workspace=str(workspace.root))

    assert (workspace.incoming_dir / "family.jsonl").exists(), "nothing was ingested"


def test_negative_gate_threshold_rejected(tmp_path):
    from tasks.errors import WorkspaceError

    (tmp_path / "lethe.json").write_text(json.dumps({"gates": {"max_test_drop_pp": -1}}))

    with pytest.raises(WorkspaceError, match="gates.max_test_drop_pp: Input should be greater than or equal to 0"):
        WorkspaceSettings.load(tmp_path)


def val_subjects(ws, count: int) -> list[int]:
    from tasks.dataset import SPLIT, SUBJECT_KEY
    from tasks.shards import read_all

    frame = read_all(ws.data_dir)
    return frame.loc[frame[SPLIT] == "val", SUBJECT_KEY].drop_duplicates().tolist()[:count]


@pytest.mark.usefixtures("prefect_harness")
def test_heldout_only_erasure_carries_over_unless_retrain(workspace):
    from flows.nightly import nightly_deletion_run

    first, second = val_subjects(workspace, 2)
    write_requests(workspace, "val-1.jsonl", [request("v-1", first)])
    carried = nightly_deletion_run(workspace=str(workspace.root))
    assert carried["method"] == "carry_over"

    write_requests(workspace, "val-2.jsonl", [request("v-2", second)])
    retrained = nightly_deletion_run(workspace=str(workspace.root), method="retrain")
    assert retrained["method"] == "retrain"
    assert registry.version_tags(workspace, MODEL, retrained["model_version_after"])["method"] == "retrain"
