"""SwitOKD's heterogeneous cells (paper Tables 4 and 7; docs/cohorts.md#switokds-heterogeneous-cells): the packaged
DML/KDCL configs of those cohorts build their networks, train under the ``switokd`` recipe, and ``okd report``
puts each published figure beside the head of its network (and the Vanilla figures beside the single networks'
baselines)."""

from __future__ import annotations

import pytest
from recipe_fixtures import fake_run

from okd.methods.build import build_method, load_config
from okd.report.published import find_published
from okd.report.tables import build_report, to_markdown

#: Table 4's and Table 7's networks as the README counts them (SwitOKD's Table 4 parameter counts; docs/models.md)
PARAMS = {
    ("wrn16_1_switokd", 10): 175_626,
    ("wrn16_8_switokd", 10): 10_965_866,
    ("mobilenetv2_x0_5", 100): 812_836,
    ("wrn16_2_switokd", 100): 704_420,
    ("mobilenetv1", 100): 3_309_476,
    ("wrn16_10_switokd", 100): 17_179_940,
}
PAIR10 = ["wrn16_1_switokd", "wrn16_8_switokd"]
PAIR100 = ["mobilenetv2_x0_5", "wrn16_2_switokd"]
TRIPLE = ["mobilenetv1", "wrn16_2_switokd", "wrn16_10_switokd"]
CONFIGS = {
    "cifar10/dml_wrn16_1_wrn16_8": PAIR10,
    "cifar10/kdcl_wrn16_1_wrn16_8": PAIR10,
    "cifar100/dml_mobilenetv2_x0_5_wrn16_2": PAIR100,
    "cifar100/kdcl_mobilenetv2_x0_5_wrn16_2": PAIR100,
    "cifar100/dml_mobilenetv1_wrn16_2_wrn16_10": TRIPLE,
    "cifar100/kdcl_mobilenetv1_wrn16_2_wrn16_10": TRIPLE,
}


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_each_config_builds_its_cohort_under_the_switokd_recipe(name):
    cfg = load_config(name)
    d = cfg.to_dict()
    dataset = d["data"]["dataset"]
    classes = 10 if dataset == "cifar10" else 100
    assert d["recipe"] == "switokd" and d["model"]["members"] == CONFIGS[name]
    assert d["seed"] == 1 and d["train"]["epochs"] == 299 and d["data"]["test_batch_size"] == 100
    assert d["optim"]["milestones"] == ([99, 149, 199] if dataset == "cifar10" else [139, 199, 249])
    method = build_method(cfg, classes)
    nets = list(method.nets if d["method"]["name"] == "dml" else method.students)
    counts = [sum(p.numel() for p in net.parameters()) for net in nets]
    assert counts == [PARAMS[(m, classes)] for m in CONFIGS[name]]
    assert method.deploy_head == ("net0" if d["method"]["name"] == "dml" else "student0")  # the student


def _heads(group):
    return {r.head: (r.published.value if r.published else None) for r in group.rows}


def test_report_puts_table4_figures_beside_each_network(tmp_path):
    dml = fake_run(
        tmp_path / "dml",
        "cifar100/dml_mobilenetv2_x0_5_wrn16_2",
        [],
        [{"test/net0/top1": 50.0, "test/net1/top1": 60.0}],
    )
    kdcl = fake_run(
        tmp_path / "kdcl",
        "cifar10/kdcl_wrn16_1_wrn16_8",
        [],
        [{"test/student0/top1": 80.0, "test/student1/top1": 85.0}],
    )
    groups = {g.method: g for g in build_report([dml, kdcl])}
    assert groups["dml"].model == "mobilenetv2_x0_5+wrn16_2_switokd" and groups["dml"].recipe == "switokd"
    assert _heads(groups["dml"])["net0"] == "66.23" and _heads(groups["dml"])["net1"] == "73.85"
    assert _heads(groups["kdcl"])["student0"] == "91.86" and _heads(groups["kdcl"])["student1"] == "95.33"
    md = to_markdown(list(groups.values()))
    assert (
        "| **net0** (deployed) | 50.00 | 50.00 | — | — | 66.23 ± 0.36 | -16.23 | -16.23 | SwitOKD README, Table 4" in md
    )
    assert "| student1 | 85.00 | 85.00 | — | — | 95.33 ± 0.17 | -10.33 | -10.33 | SwitOKD README, Table 4" in md
    assert "SwitOKD README, Table 4 [recipe unstated] (student top-1 (pair 0.5MobileNetV2 + WRN-16-2))" in md


def test_report_puts_table7_figures_beside_each_of_three_networks(tmp_path):
    row = {"test/student0/top1": 60.0, "test/student1/top1": 70.0, "test/student2/top1": 75.0}
    run = fake_run(tmp_path / "kdcl3", "cifar100/kdcl_mobilenetv1_wrn16_2_wrn16_10", [], [row])
    (g,) = build_report([run])
    assert {k: v for k, v in _heads(g).items() if k[:-1] == "student"} == {
        "student0": "62.13",
        "student1": "73.94",
        "student2": "80.71",
    }
    net_row = {"test/net0/top1": 60.0, "test/net1/top1": 70.0, "test/net2/top1": 75.0}
    (g,) = build_report([fake_run(tmp_path / "dml3", "cifar100/dml_mobilenetv1_wrn16_2_wrn16_10", [], [net_row])])
    assert [_heads(g)[f"net{i}"] for i in range(3)] == ["63.75", "74.30", "77.82"]
    # the three-network DML rows are not the pair's: a two-net run of the same label never sees them
    assert all(r.params == {"num_nets": "3"} for r in find_published("dml", g.model, "cifar100"))


def test_vanilla_figures_are_the_single_networks_baselines():
    assert [r.value for r in find_published("baseline", "wrn16_1_switokd", "cifar10")] == ["91.45"]
    assert [r.value for r in find_published("baseline", "mobilenetv1", "cifar100")] == ["58.65"]
    # WRN-16-2 appears in both tables: Table 4's figure first, Table 7's beside it
    assert [(r.table, r.value) for r in find_published("baseline", "wrn16_2_switokd", "cifar100")] == [
        ("Table 4", "72.90"),
        ("Table 7", "73.37"),
    ]
    assert not any(
        r.recipes for m in ("dml", "kdcl", "baseline") for r in find_published(m, "wrn16_8_switokd", "cifar10")
    )


@pytest.mark.parametrize(
    ("name", "student", "teacher"),
    [
        ("cifar10/switokd_wrn16_8_wrn16_1", "92.50", "94.76"),
        ("cifar100/switokd_wrn16_2_mobilenetv2_x0_5", "67.24", "73.90"),
    ],
)
def test_report_puts_switokds_own_figures_beside_its_student_and_teacher(tmp_path, name, student, teacher):
    """SwitOKD's Table 4 figures (each network's best test epoch) beside the heads of the same networks; the
    final and best-epoch numbers of each head are okd's own."""
    rows = [
        {"test/teacher/top1": 70.0, "test/student/top1": 60.0},
        {"test/teacher/top1": 69.0, "test/student/top1": 61.0},
    ]
    (g,) = build_report([fake_run(tmp_path / "run", name, [], rows)])
    assert g.recipe == "switokd" and _heads(g) == {"student": student, "teacher": teacher}
    md = to_markdown([g])
    assert "| **student** (deployed) | 61.00 | 61.00 |" in md and "| teacher | 69.00 | 70.00 |" in md


@pytest.mark.parametrize(
    ("name", "heads"),
    [
        (
            "cifar100/switokd_1t2s_wrn16_10_wrn16_2_mobilenetv1",
            {"student2": "64.62", "student1": "75.02", "teacher": "77.33"},
        ),
        (
            "cifar100/switokd_2t1s_wrn16_2_wrn16_10_mobilenetv1",
            {"student": "65.03", "teacher1": "71.73", "teacher2": "77.07"},
        ),
    ],
)
def test_report_puts_switokds_table7_figures_beside_each_of_its_three_networks(tmp_path, name, heads):
    """SwitOKD 1T2S and 2T1S (Table 7): each network's published figure beside its head."""
    rows = [{f"test/{h}/top1": 50.0 for h in heads}]
    (g,) = build_report([fake_run(tmp_path / "run", name, [], rows)])
    assert g.recipe == "switokd_multi"
    assert heads.items() <= _heads(g).items()
