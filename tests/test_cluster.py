"""Device/link catalogue, cluster YAML loading and the Cluster helpers."""

from __future__ import annotations

import math

import pytest
from omegaconf import OmegaConf

from dartspar.catalogue import DEVICES, LINKS
from dartspar.cluster import (
    CLUSTER_DIR,
    DTYPES,
    Cluster,
    ClusterConfigError,
    load_cluster,
    list_clusters,
)

GIB = 2**30

# Every shipped file must appear here: test_shipped_names_match_expectations keeps them in sync.
EXPECTED = {  # name -> (devices, nodes)
    "h100x8": (8, 1),
    "h100x64": (64, 8),
    "a100x16": (16, 2),
    "mixed": (36, 5),
    "mixed-small": (8, 2),
    "mixed64": (64, 8),
    "mixed1024": (1024, 128),
    "cpu4": (4, 1),
    "cpu4-calibrated": (4, 1),
    "cpu2": (2, 1),
}


def test_shipped_names_match_expectations():
    assert list_clusters() == sorted(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_shipped_cluster_loads_with_expected_size(name):
    cluster = load_cluster(name)
    devices, nodes = EXPECTED[name]
    assert cluster.name == name
    assert cluster.num_devices == devices
    assert len(cluster.nodes) == nodes
    assert len(cluster.node_of_device) == devices
    # the same file by path gives the same cluster
    assert load_cluster(CLUSTER_DIR / f"{name}.yaml") == cluster
    assert load_cluster(str(CLUSTER_DIR / f"{name}.yaml")) == cluster


def test_mixed_clusters_device_mix():
    assert {k: len(v) for k, v in load_cluster("mixed").node_types().items()} == {
        "H100-SXM": 2, "V100-32GB": 2, "T4": 1}
    mix = {}
    for node in load_cluster("mixed1024").nodes:
        mix[node.device.name] = mix.get(node.device.name, 0) + node.num_devices
    assert mix == {"H100-SXM": 256, "A100-40GB": 512, "V100-32GB": 256}
    mix64 = {}
    for node in load_cluster("mixed64").nodes:
        mix64[node.device.name] = mix64.get(node.device.name, 0) + node.num_devices
    assert mix64 == {"H100-SXM": 16, "A100-80GB": 16, "V100-32GB": 32}


def test_catalogue_device_figures():
    h100 = DEVICES["H100-SXM"]
    assert h100.peak("bf16") == 989e12
    assert h100.peak("fp16") == 989e12
    assert h100.peak("fp8") == 1979e12
    assert h100.peak("fp32") == 67e12
    assert h100.memory_bytes == 80 * GIB
    assert h100.memory_bandwidth_bytes_per_s == 3.35e12
    assert DEVICES["A100-80GB"].peak("bf16") == 312e12
    assert DEVICES["A100-80GB"].peak("tf32") == 156e12
    assert DEVICES["A100-80GB"].memory_bandwidth_bytes_per_s == 2.039e12
    assert DEVICES["A100-40GB"].memory_bandwidth_bytes_per_s == 1.555e12
    assert DEVICES["A100-40GB"].memory_bytes == 40 * GIB
    assert DEVICES["V100-32GB"].peak("fp16") == 125e12
    assert DEVICES["V100-32GB"].peak("fp32") == 15.7e12
    assert DEVICES["V100-32GB"].memory_bandwidth_bytes_per_s == 0.9e12
    assert DEVICES["L4"].peak("bf16") == 121e12
    assert DEVICES["L4"].peak("fp8") == 242.5e12
    assert DEVICES["L4"].memory_bandwidth_bytes_per_s == 0.3e12
    assert DEVICES["T4"].peak("fp16") == 65e12
    assert DEVICES["T4"].memory_bytes == 16 * GIB
    assert DEVICES["CPU"].peak("fp32") == 5e10


@pytest.mark.parametrize("name,dtype", [("V100-32GB", "bf16"), ("T4", "bf16"), ("V100-32GB", "tf32"),
                                        ("T4", "fp8"), ("A100-80GB", "fp8"), ("CPU", "bf16")])
def test_missing_units_raise_clear_error(name, dtype):
    with pytest.raises(ValueError, match=f"{name}.*{dtype}"):
        DEVICES[name].peak(dtype)


def test_catalogue_entries_are_well_formed():
    for name, spec in DEVICES.items():
        assert spec.name == name
        assert set(spec.peak_flops_per_s) <= set(DTYPES) and "fp32" in spec.peak_flops_per_s
        assert all(v > 0 and math.isfinite(v) for v in spec.peak_flops_per_s.values())
        assert spec.memory_bytes > 0 and spec.memory_bandwidth_bytes_per_s > 0
    for name, link in LINKS.items():
        assert link.kind == name
        assert 0 < link.latency_s < 1e-3 and link.bandwidth_bytes_per_s > 1e8


def test_catalogue_link_figures():
    assert LINKS["nvlink4"].bandwidth_bytes_per_s == 450e9
    assert LINKS["nvlink3"].bandwidth_bytes_per_s == 300e9
    assert LINKS["nvlink2"].bandwidth_bytes_per_s == 150e9
    assert LINKS["pcie4"].bandwidth_bytes_per_s == 31.5e9
    assert LINKS["ib-ndr"].bandwidth_bytes_per_s == 50e9
    assert LINKS["ib-hdr"].bandwidth_bytes_per_s == 25e9
    assert LINKS["ethernet-100g"].bandwidth_bytes_per_s == 12.5e9
    # the alpha-beta time of 1 GB over NVLink4: 3 us + 1e9 / 450e9 s
    assert LINKS["nvlink4"].time_s(1e9) == pytest.approx(3e-6 + 1e9 / 450e9)
    # faster generations are faster, and NVLink beats every network link
    assert (LINKS["nvlink4"].bandwidth_bytes_per_s > LINKS["nvlink3"].bandwidth_bytes_per_s
            > LINKS["nvlink2"].bandwidth_bytes_per_s > LINKS["ib-ndr"].bandwidth_bytes_per_s)


def test_link_between_intra_and_inter():
    cluster = load_cluster("mixed-small")
    assert cluster.link_between(0, 3).kind == "nvlink4"
    assert cluster.link_between(4, 7).kind == "pcie3"
    assert cluster.link_between(3, 4).kind == "ethernet-100g"
    assert cluster.link_between(7, 0).kind == "ethernet-100g"
    mixed = load_cluster("mixed")
    assert mixed.device(35).name == "T4" and mixed.device(16).name == "V100-32GB"
    assert mixed.link_between(16, 23).kind == "nvlink2"
    assert mixed.link_between(15, 16).kind == "ib-hdr"


def test_count_expands_to_named_nodes():
    assert [n.name for n in load_cluster("mixed").nodes] == ["h100-0", "h100-1", "v100-0", "v100-1", "t4"]
    cluster = load_cluster({
        "name": "unnamed", "inter_link": "ib-hdr",
        "nodes": [
            {"device": "T4", "count": 2, "devices_per_node": 1, "intra_link": "pcie3"},
            {"device": "L4", "devices_per_node": 2, "intra_link": "pcie4"},
            {"device": "T4", "devices_per_node": 3, "intra_link": "pcie3"},
        ],
    })
    assert [n.name for n in cluster.nodes] == ["t4-0", "t4-1", "l4-0", "t4-2"]
    assert cluster.node_first_device == (0, 1, 2, 4)
    assert cluster.num_devices == 7
    assert list(cluster.node_devices(3)) == [4, 5, 6]


def test_reordered_renumbers_devices():
    mixed = load_cluster("mixed")
    order = (4, 2, 3, 0, 1)  # T4 node first, then V100s, then H100s
    new = mixed.reordered(order)
    assert isinstance(new, Cluster) and new is not mixed
    assert new.num_devices == 36 and new.inter_link == mixed.inter_link
    assert [n.name for n in new.nodes] == ["t4", "v100-0", "v100-1", "h100-0", "h100-1"]
    assert new.node_first_device == (0, 4, 12, 20, 28)
    assert [new.device(d).name for d in (0, 3, 4, 19, 20, 35)] == [
        "T4", "T4", "V100-32GB", "V100-32GB", "H100-SXM", "H100-SXM"]
    assert new.link_between(0, 3).kind == "pcie3" and new.link_between(3, 4).kind == "ib-hdr"
    mapping = mixed.reorder_device_map(order)
    assert mapping[:4] == (32, 33, 34, 35) and mapping[4] == 16 and mapping[20] == 0
    assert sorted(mapping) == list(range(36))
    assert all(new.device(d) == mixed.device(mapping[d]) for d in range(36))
    # the original's cached numbering is untouched
    assert mixed.device(0).name == "H100-SXM"
    assert mixed.reordered(range(5)) == mixed


@pytest.mark.parametrize("order", [(0, 1, 2, 3), (0, 1, 2, 3, 3), (0, 1, 2, 3, 5), ("a", 1, 2, 3, 4)])
def test_reordered_rejects_non_permutations(order):
    with pytest.raises(ValueError, match="node_order"):
        load_cluster("mixed").reordered(order)


def test_devices_by_speed_and_node_order():
    mixed = load_cluster("mixed")
    assert mixed.preferred_dtype() == "fp16"  # V100 and T4 have no bf16 units
    ids = mixed.devices_by_speed()
    assert ids[:16] == tuple(range(16)) and ids[16:32] == tuple(range(16, 32))
    assert ids[32:] == (32, 33, 34, 35)
    assert mixed.node_order_by_speed() == (0, 1, 2, 3, 4)
    assert mixed.node_order_by_speed(fastest_first=False) == (4, 2, 3, 0, 1)
    assert mixed.node_peaks("fp32") == (67e12, 67e12, 15.7e12, 15.7e12, 8.1e12)
    with pytest.raises(ValueError, match="bf16"):
        mixed.devices_by_speed("bf16")
    # slow-first clusters come back fast-first
    slow_first = mixed.reordered(mixed.node_order_by_speed(fastest_first=False))
    assert slow_first.devices_by_speed()[:16] == tuple(range(20, 36))
    mixed64 = load_cluster("mixed64")
    assert mixed64.node_order_by_speed(fastest_first=False) == (4, 5, 6, 7, 2, 3, 0, 1)


def test_preferred_and_common_dtypes():
    assert load_cluster("h100x8").preferred_dtype() == "bf16"
    assert load_cluster("h100x8").common_dtypes == ("fp32", "tf32", "bf16", "fp16", "fp8")
    assert load_cluster("a100x16").common_dtypes == ("fp32", "tf32", "bf16", "fp16")
    assert load_cluster("mixed-small").preferred_dtype(("bf16", "fp16")) == "fp16"
    assert load_cluster("cpu4").preferred_dtype() == "fp32"
    with pytest.raises(ValueError, match="no dtype among"):
        load_cluster("mixed").preferred_dtype(("bf16", "fp8"))


def test_summary_is_a_short_table():
    text = load_cluster("mixed1024").summary()
    lines = text.splitlines()
    assert len(lines) == 5  # header, column titles, three runs of alike nodes
    assert "1024 devices on 128 nodes" in lines[0] and "ib-hdr 25 GB/s" in lines[0]
    assert "h100-0..h100-31" in lines[2] and "32 x 8" in lines[2] and "nvlink4 450 GB/s" in lines[2]
    assert "A100-40GB" in lines[3] and "64 x 8" in lines[3]
    assert "4 devices on 1 node;" in load_cluster("cpu4").summary()


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_to_dict_round_trip(name):
    cluster = load_cluster(name)
    again = load_cluster(cluster.to_dict())
    assert again == cluster
    assert again.summary() == cluster.summary()


def test_load_from_dict_and_dictconfig():
    data = {
        "name": "two-boxes",
        "nodes": [
            {"name": "fast", "device": "H100-SXM", "devices_per_node": 2, "intra_link": "nvlink4"},
            {"name": "slow", "device": "T4", "devices_per_node": 2,
             "intra_link": {"kind": "pcie3", "latency_s": 12e-6}},
        ],
        "inter_link": {"kind": "roce", "latency_s": 8e-6, "bandwidth_bytes_per_s": 4e10},
    }
    from_dict = load_cluster(data)
    from_config = load_cluster(OmegaConf.create(data))
    assert from_dict == from_config
    assert from_dict.num_devices == 4
    slow = from_dict.nodes[1].intra_link
    assert (slow.kind, slow.latency_s, slow.bandwidth_bytes_per_s) == ("pcie3", 12e-6, 15.75e9)
    assert from_dict.link_between(1, 2).bandwidth_bytes_per_s == 4e10


def test_hydra_cluster_group_composes():
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(CLUSTER_DIR.parent), version_base=None):
        cfg = compose(config_name=None, overrides=["+cluster=mixed", "cluster.inter_link=ib-ndr"])
    cluster = load_cluster(cfg.cluster)
    assert cluster.num_devices == 36
    assert cluster.link_between(0, 35).bandwidth_bytes_per_s == 50e9


def test_inline_devices_extend_and_override_catalogue():
    cluster = load_cluster({
        "name": "custom",
        "devices": {
            "V100-32GB": {"peak_flops_per_s": {"bf16": 14e12}},  # a rate a user measured
            "MI250X": {"peak_flops_per_s": {"bf16": 383e12, "fp32": 47.9e12},
                       "memory_bytes": 128 * GIB, "memory_bandwidth_bytes_per_s": 3.2e12},
        },
        "nodes": [
            {"device": "V100-32GB", "devices_per_node": 8, "intra_link": "nvlink2"},
            {"device": "MI250X", "devices_per_node": 4, "intra_link": "pcie4"},
        ],
        "inter_link": "ib-hdr",
    })
    v100 = cluster.device(0)
    assert v100.peak("bf16") == 14e12 and v100.peak("fp16") == 125e12
    assert cluster.device(8).peak("bf16") == 383e12 and cluster.device(8).memory_bytes == 128 * GIB
    assert cluster.preferred_dtype() == "bf16"
    assert "bf16" not in DEVICES["V100-32GB"].peak_flops_per_s  # the catalogue is untouched


def test_mutating_a_loaded_spec_does_not_touch_the_catalogue():
    cluster = load_cluster("h100x8")
    cluster.device(0).peak_flops_per_s["bf16"] = 1.0
    assert DEVICES["H100-SXM"].peak("bf16") == 989e12
    assert load_cluster("h100x8").device(0).peak("bf16") == 989e12


def _write(tmp_path, text):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    return path


GOOD_NODE = "{device: T4, devices_per_node: 4, intra_link: pcie3}"


@pytest.mark.parametrize("body,fragments", [
    (f"nodes:\n  - {GOOD_NODE}\n  - {GOOD_NODE}\n"
     "  - {device: H200, devices_per_node: 8, intra_link: nvlink4}\ninter_link: ib-ndr\n",
     ["nodes[2].device", "'H200'", "H100-SXM", "devices:"]),
    (f"nodes:\n  - {GOOD_NODE}\ninter_link: {{kind: ib-ndr, bandwidth_bytes_per_s: -5.0e9}}\n",
     ["inter_link.bandwidth_bytes_per_s", "-5000000000.0", "positive"]),
    ("nodes:\n  - {device: T4, intra_link: pcie3}\ninter_link: ib-ndr\n",
     ["nodes[0].devices_per_node", "missing"]),
    (f"nodes:\n  - {GOOD_NODE}\ninter_link: ib-ndr\n",  # no `name:` (body is prefixed below)
     []),
    (f"nodes:\n  - {{device: T4, devices_per_node: 4, intra_link: pcie3, gpus: 4}}\ninter_link: ib-ndr\n",
     ["nodes[0].gpus", "unknown key", "devices_per_node"]),
    (f"nodes:\n  - {GOOD_NODE}\ninter_link: infiniband\n",
     ["inter_link", "'infiniband'", "ib-ndr"]),
    (f"nodes:\n  - {{device: T4, count: 0, devices_per_node: 4, intra_link: pcie3}}\ninter_link: ib-ndr\n",
     ["nodes[0].count", "positive integer"]),
    (f"nodes:\n  - {GOOD_NODE}\ninter_link: {{kind: ib-ndr, latency_s: '5us'}}\n",
     ["inter_link.latency_s", "'5us'"]),
    (f"nodes:\n  - {GOOD_NODE}\ninter_link: ib-ndr\ninter_link: ib-hdr\n",
     ["duplicate key", "inter_link"]),
])
def test_bad_files_name_file_field_and_fix(tmp_path, body, fragments):
    if not fragments:  # the missing-`name` case
        path = _write(tmp_path, body)
        fragments = ["name is missing"]
    else:
        path = _write(tmp_path, "name: bad\n" + body)
    with pytest.raises(ClusterConfigError) as err:
        load_cluster(path)
    message = str(err.value)
    assert str(path) in message
    for fragment in fragments:
        assert fragment in message, message


def test_yaml_exponent_floats_parse_as_numbers(tmp_path):
    # PyYAML's YAML 1.1 rules read 450e9 as a string; Hydra/OmegaConf read it as a float.
    path = _write(tmp_path, "name: exp\nnodes:\n  - {device: T4, devices_per_node: 2, intra_link: "
                            "{kind: x, latency_s: 2e-6, bandwidth_bytes_per_s: 450e9}}\n"
                            "inter_link: ib-ndr\n")
    link = load_cluster(path).nodes[0].intra_link
    assert (link.latency_s, link.bandwidth_bytes_per_s) == (2e-6, 450e9)


def test_unknown_name_lists_available_clusters():
    with pytest.raises(ClusterConfigError, match="mixed-small") as err:
        load_cluster("mixed-large")
    assert "'mixed-large' not found" in str(err.value)
    with pytest.raises(ClusterConfigError, match="not found"):
        load_cluster("/nonexistent/dir/c.yaml")


def test_duplicate_node_names_rejected():
    with pytest.raises(ClusterConfigError, match=r"nodes\[1\]\.name.*'box-0'"):
        load_cluster({"name": "dup", "inter_link": "ib-ndr", "nodes": [
            {"name": "box-0", "device": "T4", "devices_per_node": 1, "intra_link": "pcie3"},
            {"name": "box", "count": 2, "device": "T4", "devices_per_node": 1, "intra_link": "pcie3"},
        ]})


def test_calibration_section_round_trips_and_feeds_the_cost_model(tmp_path):
    import yaml

    from dartspar.cost.model import CostModel
    from synthetic import gpt_like_profile

    data = load_cluster("cpu2").to_dict()
    data["calibration"] = {"stage_overhead_s": 0.002, "step_overhead_s": 0.01, "fit": {"mape": 0.05}}
    path = tmp_path / "cal.yaml"
    path.write_text(yaml.safe_dump(data))
    cluster = load_cluster(path)
    assert cluster.calibration["stage_overhead_s"] == 0.002
    assert cluster.calibration["fit"] == {"mape": 0.05}
    assert load_cluster(cluster.to_dict()) == cluster
    model = CostModel(gpt_like_profile(), cluster, compute_dtype="fp32")
    assert (model.stage_overhead_s, model.step_overhead_s) == (0.002, 0.01)
    data["calibration"] = {"stage_overhead_s": -1}
    with pytest.raises(ClusterConfigError, match=r"calibration\.stage_overhead_s"):
        load_cluster(data)
