"""A cohort of different networks (``model.members``, docs/cohorts.md): the config, the refusals, and DML and KDCL
runs of a registered network beside the user's own that train, resume exactly, report per member and deploy
the member chosen."""

from __future__ import annotations

import copy
import csv
import logging
import re
import textwrap
from types import SimpleNamespace

import helpers
import numpy as np
import pytest
import torch
import yaml
from cohort_fixtures import SMALL, mixed_overrides, user_module

from okd.cli import main
from okd.config import OptimConfig
from okd.engine.trainer import default_run_name, train
from okd.errors import ConfigError
from okd.io import load_checkpoint
from okd.methods import METHODS, MethodContext
from okd.methods.build import build_config, build_method, load_config
from okd.methods.cohort import accepting_methods, deployed_spec
from okd.models import create_model
from okd.models.members import cohort_label, member_entries, member_labels
from okd.models.spec import check_stored_config
from okd.report.export import export, load_deployable
from okd.report.predict import load_predictor
from okd.report.scoring import score_checkpoint
from okd.runs.metrics import read_metrics_csv
from okd.runs.reader import Run
from okd.runs.records import deploy_record

TAPPED = {"name": SMALL, "taps": ["layer1", "layer2"]}  # the user's network with feature taps (for attention)
MIXED = ["model.members=[resnet20,wrn16_2]"]
ACCEPTING = (
    "dml",
    "kdcl",
    "lmcl",
    "switokd",
    "switokd_1t2s",
    "switokd_2t1s",
)  # the methods that train different networks


@pytest.fixture(scope="module")
def code(tmp_path_factory):
    with user_module(tmp_path_factory.mktemp("code")) as folder:
        yield folder


# ------------------------------------------------------------------------------------------------ the config
def test_members_fill_the_cohort_size_and_stay_out_of_a_config_of_copies():
    cfg = load_config(None, ["method.name=dml", "model.members=[resnet20,wrn16_2,resnet32]"])
    assert cfg.method_params.num_nets == 3 and cfg.to_dict()["model"]["members"] == ["resnet20", "wrn16_2", "resnet32"]
    kdcl = load_config(None, ["method.name=kdcl", *MIXED])
    assert kdcl.method_params.num_students == 2 and METHODS.get("kdcl").views_for(kdcl.method_params) == 2
    assert "members" not in load_config("cifar10/dml_resnet32").to_dict()["model"]  # resolved as before members
    old = load_config("cifar10/kdcl_resnet32_wrn16_2")  # the older spelling keeps its resolved form
    assert old.method_params.models == ["resnet32", "wrn16_2"] and "members" not in old.to_dict()["model"]
    named = load_config(None, ["method.name=dml", f"model.members=[resnet20,'{SMALL}']", "seed=3"])
    assert default_run_name(named) == "cifar100_dml_resnet20+okd_cohort_nets-small_s3"  # no ':' in folder names


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["model.members=[resnet20,nope]"], "model.members[1]: unknown model 'nope'; choose one of: cmff_vgg16"),
        (["model.members=[]"], "model.members is empty"),
        (["model.members=[resnet20,3]"], "model.members[1]=3 is not a network"),
        (["model.members=[resnet20,{name: resnet20, depth: 3}]"], "model.members[1] has unknown keys ['depth']"),
        (["model.members=[resnet20,{kwargs: {a: 1}}]"], "model.members[1] needs a name"),
        (["model.members=[resnet20,{name: wrn16_2, taps: [a]}]"], "model.members[1].taps and"),
        (["model.members=[resnet20,{name: 'my.mod:build', weights: w.pt}]"], "model.members[1].pretrained/"),
        (["model.members=[resnet20,'mod:']"], "is not an import path of the form"),
        ([*MIXED, "method.num_nets=3"], "model.members lists 2 networks, but method.num_nets=3"),
        ([*MIXED, "model.kwargs.width=4"], "model.kwargs describes model.name, which model.members replaces"),
        ([*MIXED, "model.taps=[layer1]"], "model.taps describes model.name"),
    ],
)
def test_bad_members_are_config_errors_naming_the_entry(overrides, message):
    with pytest.raises(ConfigError) as err:
        load_config(None, ["method.name=dml", *overrides])
    assert message in str(err.value)


def test_kdcl_takes_its_cohort_once_and_its_older_spelling_gains_every_entry_form():
    with pytest.raises(ConfigError, match="method.models is the older spelling of model.members; give the cohort once"):
        load_config(None, ["method.name=kdcl", *MIXED, "method.models=[resnet20,wrn16_2]"])
    with pytest.raises(ConfigError, match=r"method.models\[1\]: unknown model 'nope'"):
        load_config(None, ["method.name=kdcl", "method.models=[resnet20,nope]"])
    cfg = load_config(None, ["method.name=kdcl", "model.name=resnet20", "method.models=[resnet20,'timm:resnet18']"])
    assert cfg.method_params.student_count() == 2  # a timm: entry is accepted (built only with the timm extra)


def test_only_dml_kdcl_lmcl_and_switokd_take_different_networks():
    assert sorted(accepting_methods()) == sorted(ACCEPTING)
    assert all(METHODS.get(n).mixed_cohort for n in METHODS.names() if n not in ACCEPTING)


@pytest.mark.parametrize("name", [n for n in METHODS.names() if n not in ACCEPTING])
def test_every_other_method_refuses_a_mixed_cohort_before_any_data_is_read(name, tmp_path, capsys):
    """The refusal comes from ``okd train`` itself, with the method's reason, before the (missing) data set is
    looked at and before a run folder is made."""
    extra = ["method.teacher_model=resnet20", "method.teacher_checkpoint=t.pt"] if name == "kd" else []
    config = tmp_path / "mixed.yaml"
    config.write_text(f"method: {{name: {name}}}\nmodel: {{members: [resnet20, wrn16_2]}}\n")
    out = tmp_path / "runs"
    argv = ["train", str(config), *extra, "data.root=/nonexistent", "data.download=false", f"output_dir={out}"]
    assert main(argv) == 2
    err = "".join(capsys.readouterr().err.split())
    assert "".join(f"okd: error: {name} cannot train a cohort of different networks".split()) in err
    assert "".join(METHODS.get(name).mixed_cohort.split()) in err
    assert "trainthemixedcohortwith" + ",".join(ACCEPTING) in err and not out.exists()


def test_copies_listed_as_members_are_the_cohort_of_copies():
    """Equal entries are not a mixed cohort: every method takes them, built exactly as from the model section."""
    torch.manual_seed(0)
    members = build_method(load_config(None, ["method.name=dml", "model.members=[resnet20,resnet20]"]), 10)
    torch.manual_seed(0)
    section = build_method(load_config(None, ["method.name=dml", "model.name=resnet20"]), 10)
    helpers.assert_same(members.state_dict(), section.state_dict())
    assert members.head_networks() == {}
    one = load_config(None, ["method.name=one", "model.members=[wrn16_2,wrn16_2]"])
    assert one.method_params.num_branches == 2
    method = build_method(one, 10)
    assert type(method.deployable()).__name__ == "WideResNet"
    record = deploy_record(one, method, 0)
    assert record["model"] == "wrn16_2" and record["model_spec"]["name"] == "wrn16_2"
    with pytest.raises(ConfigError, match="model.members lists 2 networks, but baseline builds 1"):
        load_config(None, ["method.name=baseline", "model.members=[resnet20,resnet20]"])
    single = load_config(None, ["model.members=[wrn16_2]"])
    single_method = build_method(single, 10)
    assert single_method.net.__class__.__name__ == "WideResNet"
    assert deploy_record(single, single_method, 0)["model_spec"]["name"] == "wrn16_2"  # a cohort of one deploys it


def test_a_mixed_cohort_method_must_say_which_member_it_deploys():
    mixed = load_config(None, ["method.name=dml", *MIXED])
    assert build_method(mixed, 10).head_networks() == {"net0": "resnet20", "net1": "wrn16_2"}  # every head labelled
    assert deployed_spec(mixed, SimpleNamespace(deployed_member=1))["name"] == "wrn16_2"
    with pytest.raises(ValueError, match="dml trains a mixed cohort but does not say which member it deploys"):
        deployed_spec(mixed, SimpleNamespace(deployed_member=None))


def test_labels_tell_members_of_one_name_apart_and_the_stored_members_need_consent(monkeypatch):
    entries = member_entries(["resnet20", {"name": "m.n:f", "kwargs": {"width": 4}}, {"name": "m.n:f"}])
    assert member_labels(entries) == ["resnet20", "m.n:f(width=4)", "m.n:f"]
    assert cohort_label({"name": "resnet32", "members": ["resnet20", "wrn16_2"]}) == "resnet20+wrn16_2"
    assert cohort_label({"name": "resnet32", "members": ["wrn16_2", "wrn16_2"]}) == "wrn16_2"
    monkeypatch.delenv("OKD_ALLOW_IMPORT", raising=False)
    for config in ({"model": {"members": ["resnet20", {"name": "m.n:f"}]}}, {"method": {"models": ["m.n:f"]}}):
        with pytest.raises(ConfigError, match="OKD_ALLOW_IMPORT=m.n"):
            check_stored_config(config)


def test_kd_takes_its_teacher_in_the_member_form(code, tmp_path):
    torch.manual_seed(1)
    teacher = create_model(f"{SMALL}", 10, width=6)
    torch.save(teacher.state_dict(), tmp_path / "teacher.pt")
    given = {"name": SMALL, "kwargs": {"width": 6}}
    cfg = build_config(
        {"method": {"name": "kd", "teacher_model": given, "teacher_checkpoint": str(tmp_path / "teacher.pt")}}
    )
    kd = build_method(cfg, 10)
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(kd.teacher(x), teacher.eval()(x))
    with pytest.raises(ConfigError, match=r"method.teacher_model has unknown keys \['depth'\]"):
        build_config(
            {"method": {"name": "kd", "teacher_model": {"name": "resnet20", "depth": 2}, "teacher_checkpoint": "t"}}
        )


def test_a_method_context_without_members_builds_copies():
    """Methods built directly (tests, user code) from a context without members keep building copies."""
    ctx = MethodContext("resnet20", 10, OptimConfig(), METHODS.get("dml").Params(), 300)
    assert ctx.cohort(2) == ["resnet20", "resnet20"]
    with pytest.raises(ConfigError, match="model.members lists 1 networks, but the method builds 2"):
        MethodContext("resnet20", 10, OptimConfig(), None, 300, members=["resnet20"]).cohort(2)


# ---------------------------------------------------------------------------------------------- DML, end to end
class _Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


@pytest.fixture(scope="module")
def dml_runs(code, cifar10_root, tmp_path_factory):
    """DML of resnet20 (net0) and the user's network with taps (net1), written as a user writes it: a YAML
    file. Two epochs straight, and one epoch then resumed to two; the epoch lines as logged."""
    out = tmp_path_factory.mktemp("dml")
    config = out / "mixed_dml.yaml"
    config.write_text(
        textwrap.dedent(f"""\
        method: {{name: dml}}
        model:
          members:
            - resnet20
            - {{name: "{SMALL}", taps: [layer1, layer2]}}
        """)
    )
    logger, lines = logging.getLogger("okd"), _Lines()
    level = logger.level
    logger.addHandler(lines)
    logger.setLevel(logging.INFO)
    try:
        full, resumed = helpers.train_and_resume(
            config, lambda name, epochs: mixed_overrides(cifar10_root, out, name, epochs, "train.progress=log")
        )
    finally:
        logger.removeHandler(lines)
        logger.setLevel(level)
    return full, resumed, config, lines.lines


@pytest.mark.slow
def test_dml_mixed_cohort_trains_resumes_exactly_and_names_its_heads(dml_runs):
    full, resumed, _, lines = dml_runs
    last, _ = helpers.assert_same_runs(full, resumed)
    assert last["head_networks"] == {"net0": "resnet20", "net1": SMALL}
    assert [k for k in read_metrics_csv(full / "metrics.csv")[-1] if k.endswith("/top1")][:2] == [
        "test/net0/top1",
        "test/net1/top1",
    ]  # metrics.csv keeps the head keys; config.yaml's model.members says which network each is
    assert yaml.safe_load((full / "config.yaml").read_text())["model"]["members"][1] == TAPPED
    assert any(f"dml / net0=resnet20, net1={SMALL} / cifar10" in line for line in lines)
    epoch = next(line for line in lines if line.startswith("epoch 2/2"))
    assert re.search(rf"top1 \[\*net0\(resnet20\)=\d+\.\d\d ensemble=.* net1\({SMALL}\)=\d+\.\d\d ", epoch), epoch


def test_dml_mixed_cohort_reports_every_member(dml_runs, capsys, tmp_path):
    full = dml_runs[0]
    assert main(["test", str(full)]) == 0
    table = capsys.readouterr().out
    assert re.search(r"^\*net0 \(resnet20\)\s+\d+\.\d\d", table, re.M), table
    assert re.search(rf"^net1 \({SMALL}\)\s+\d+\.\d\d", table, re.M), table
    text = helpers.cli("report", full, "--csv", tmp_path / "report.csv")
    assert f"## cifar10 · resnet20+{SMALL} · dml" in text
    assert re.search(r"^\| \*\*net0 \(resnet20\)\*\* \(deployed\) \| \d", text, re.M), text
    assert re.search(rf"^\| net1 \({SMALL}\) \| \d", text, re.M), text
    with open(tmp_path / "report.csv", newline="") as f:
        rows = {r["head"]: r for r in csv.DictReader(f)}
    assert (
        rows["net1"]["network"] == SMALL and rows["net0"]["network"] == "resnet20" and rows["ensemble"]["network"] == ""
    )


@pytest.mark.slow
def test_dml_mixed_cohort_deploys_each_member_in_turn(dml_runs, cifar10_root, tmp_path):
    """deploy.pt holds net0 (method.deploy_net's default) as a resnet20; ``okd export RUN method.deploy_net=1``
    rebuilds and writes the user's network instead, which predict, ``okd test`` and a KD teacher read back."""
    full = dml_runs[0]
    deploy = load_checkpoint(full / "deploy.pt")
    assert deploy["model"] == "resnet20" and deploy["model_spec"]["name"] == "resnet20" and deploy["head"] == "net0"
    metrics, info = score_checkpoint(full)
    for i, (model, spec_name) in enumerate([("resnet20", "resnet20"), (SMALL, SMALL)]):
        out = tmp_path / f"net{i}.pt"
        res = export(full, "state_dict", out, overrides=[f"method.deploy_net={i}"])
        assert res.training_diff is not None and res.training_diff <= 1e-5  # the method's own head net{i}
        saved = load_checkpoint(out)
        assert saved["model"] == model and saved["model_spec"]["name"] == spec_name and saved["head"] == f"net{i}"
        if i == 1:
            assert saved["model_spec"]["taps"] == ["layer1", "layer2"]
        predictor = load_predictor(out)
        assert predictor.model == model and predictor.head == f"net{i}"
        member = load_deployable(out, check=False).net
        x = torch.randn(3, 3, 32, 32)
        method = Run(full).method()
        torch.testing.assert_close(member(x), method.nets[i](x))
        config = copy.deepcopy(Run(full).config_dict)
        (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))  # the run's test split for okd test FILE
        scored, info_i = score_checkpoint(out)
        assert info_i["deploy_head"] == f"net{i}" and info_i["labels"] == {f"net{i}": model}
        assert scored[f"net{i}/top1"] == pytest.approx(metrics[f"net{i}/top1"], abs=1e-6)
    # KD from the run: its deployed member (a resnet20) as the teacher, and the other member from its export
    for teacher, ckpt in (("resnet20", full / "deploy.pt"), (SMALL, tmp_path / "net1.pt")):
        kd = train(
            load_config(
                None,
                mixed_overrides(
                    cifar10_root,
                    tmp_path,
                    f"kd_{teacher[-5:]}",
                    1,
                    "method.name=kd",
                    "model.name=resnet20",
                    f"method.teacher_model={teacher}",
                    f"method.teacher_checkpoint={ckpt}",
                ),  # fmt: skip
            )
        )
        assert load_checkpoint(kd / "last.pt")["epoch"] == 1


def test_dml_mixed_cohort_attention_draws_each_member(dml_runs, tmp_path):
    pytest.importorskip("matplotlib")
    from okd.report.attention import draw_attention

    res = draw_attention(dml_runs[0], tmp_path / "att.png", num_images=2, similarity_images=8)
    assert res.names == ["net0 (resnet20)", f"net1 ({SMALL})"]  # 8 x 8 and 16 x 16 maps, compared at 16 x 16
    assert np.isfinite(res.cosine).all() and res.similarity_csv.is_file()


def test_resume_refuses_a_changed_member_list_by_name(dml_runs, capsys):
    full, _, config, _ = dml_runs
    before = (full / "last.pt").read_bytes()
    assert main(["train", "--resume", str(full), "model.members=[resnet20,wrn16_2]", "train.epochs=3"]) == 2
    err = "".join(capsys.readouterr().err.split())
    assert "itwastrainedasmethod/model/datasetdml/resnet20+okd_cohort_nets:small/cifar10" in err
    assert "Thecohortchanged:model.members=['resnet20',{'name':'okd_cohort_nets:small'" in err
    assert "['resnet20','wrn16_2']asked" in err
    other = config.with_name("other.yaml")  # a config file naming other members
    other.write_text(config.read_text().replace("resnet20", "resnet32"))
    assert main(["train", str(other), "--resume", str(full), "train.epochs=3"]) == 2
    assert "Thecohortchanged:model.members=" in "".join(capsys.readouterr().err.split())
    untapped = f"model.members=[resnet20,{{name: '{SMALL}'}}]"  # the same networks by name, without the taps
    assert main(["train", "--resume", str(full), untapped, "train.epochs=3"]) == 2
    err = "".join(capsys.readouterr().err.split())
    assert "cannotchangemodel.membersonresume" in err and "(asked['resnet20',{'name':'okd_cohort_nets:small'}])" in err
    assert (full / "last.pt").read_bytes() == before


# --------------------------------------------------------------------------------------------- KDCL, end to end
@pytest.mark.slow
def test_kdcl_mixed_cohort_trains_resumes_reports_and_deploys_the_chosen_student(code, cifar10_root, tmp_path, capsys):
    members = f"model.members=[resnet20,'{SMALL}']"
    full, resumed = helpers.train_and_resume(
        None,
        lambda name, epochs: mixed_overrides(
            cifar10_root, tmp_path, name, epochs, "method.name=kdcl", members, "method.deploy_student=1"
        ),
    )
    last, _ = helpers.assert_same_runs(full, resumed)
    assert last["head_networks"] == {"student0": "resnet20", "student1": SMALL}
    deploy = load_checkpoint(full / "deploy.pt")
    assert (deploy["model"], deploy["head"], deploy["model_spec"]["kind"]) == (SMALL, "student1", "import")
    assert last["best"]["head"] == "student1"
    assert main(["test", str(full / "deploy.pt")]) == 0  # the deployed student alone, scored as its head
    table = capsys.readouterr().out
    assert re.search(rf"^\*student1 \({SMALL}\)\s+\d+\.\d\d", table, re.M), table
    assert main(["test", str(full)]) == 0
    table = capsys.readouterr().out
    assert re.search(r"^student0 \(resnet20\)\s+\d+\.\d\d", table, re.M), table
    res = export(full, "state_dict", tmp_path / "s0.pt", overrides=["method.deploy_student=0"])
    assert load_checkpoint(res.path)["model"] == "resnet20" and res.training_diff <= 1e-5
    text = helpers.cli("report", full)
    assert re.search(rf"^\| \*\*student1 \({SMALL}\)\*\* \(deployed\) \| \d", text, re.M), text


def test_kdcl_older_spelling_deploys_the_model_name_student_as_before(cifar10_root, tmp_path):
    """method.models: model.name picks the deployed student and deploy.pt has no head key (as before members)."""
    run = train(
        load_config(
            None,
            mixed_overrides(
                cifar10_root,
                tmp_path,
                "old",
                1,
                "method.name=kdcl",
                "model.name=wrn16_2",
                "method.models=[resnet20,wrn16_2]",
            ),  # fmt: skip
        )
    )
    deploy = load_checkpoint(run / "deploy.pt")
    assert deploy["model"] == "wrn16_2" and "head" not in deploy and deploy["model_spec"]["name"] == "wrn16_2"
    assert load_checkpoint(run / "last.pt")["head_networks"] == {"student0": "resnet20", "student1": "wrn16_2"}
