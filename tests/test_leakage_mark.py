"""The leakage mark L: a student trained on a metric's model or objective is marked wherever that
metric scores it (fewstep.reporting.tables.trained_on)."""
from fewstep.io import file_sha256
from fewstep.reporting.tables import trained_on
from fewstep.toy.features import SHIPPED_DIR, SHIPPED_FILES


def student_row(**student) -> dict:
    return {"method": "amd", "sampling_provenance": {"student": student}}


def test_the_default_toy_reward_shares_no_metric():
    reward = SHIPPED_DIR / SHIPPED_FILES["reward"].format(size=16)
    row = student_row(reward="toy:results/metrics/toy_reward_net.safetensors",
                      inputs={"reward_sha256": file_sha256(reward)})
    assert trained_on(row) == set()


def test_a_toy_reward_built_on_a_metric_slots_own_net_is_leakage():
    hps_net = SHIPPED_DIR / SHIPPED_FILES["hps"].format(size=16)
    row = student_row(reward=f"toy:{hps_net}", inputs={"reward_sha256": file_sha256(hps_net)})
    assert trained_on(row) == {"toy_hps"}


def test_a_real_reward_named_like_a_metric_is_leakage():
    assert trained_on(student_row(reward="hpsv2:v2.1")) == {"hpsv2.1"}
    assert trained_on({"method": "teacher"}) == set()
