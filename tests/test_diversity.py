"""Per-prompt diversity (metrics/diversity.py): a collapsed generator scores 0, the lowest; the toy
net is its own; the real route reads DINOv2 from the weights cache (a tiny random model here)."""
import numpy as np
import pytest

from fewstep.registry import METRICS, UnknownNameError
from fewstep.toy import world
from metrics.sampleset import write_sample_set

SEEDS = (0, 1, 2, 3)


def _write(folder, metas, collapsed=False, size=16):
    images, records = [], []
    for m in metas:
        for s in SEEDS:
            images.append(world.render(m, 0 if collapsed else s, size)[0])
            records.append({"prompt_id": m["prompt_id"], "prompt": m["prompt"], "seed": s,
                            "family": "toy", "method": "render", "nfe": 0, "meta": m})
    return write_sample_set(folder, np.stack(images), records)


@pytest.fixture(scope="module")
def sets(tmp_path_factory):
    metas = world.prompt_set("eval")[:12]
    root = tmp_path_factory.mktemp("div")
    return _write(root / "varied", metas), _write(root / "collapsed", metas, collapsed=True)


def test_pairwise_distances_average_to_the_prompts_mean_pairwise_distance():
    from metrics.diversity import per_image_diversity

    rng = np.random.default_rng(0)
    feats = rng.normal(size=(7, 5))
    prompts = ["a", "a", "a", "b", "b", "b", "b"]
    scores = per_image_diversity(feats, prompts)
    unit = feats / np.linalg.norm(feats, axis=1, keepdims=True)
    for group in (range(0, 3), range(3, 7)):
        pairs = [1.0 - unit[i] @ unit[j] for i in group for j in group if i < j]
        assert np.mean(scores[list(group)]) == pytest.approx(np.mean(pairs))
    # the image's own row: mean distance to the other images of its prompt
    assert scores[0] == pytest.approx(np.mean([1 - unit[0] @ unit[1], 1 - unit[0] @ unit[2]]))


def test_identical_features_are_exactly_zero_and_a_lone_image_is_refused():
    from metrics.diversity import per_image_diversity

    feats = np.tile(np.array([[0.3, -1.2, 2.0]]), (4, 1))
    assert (per_image_diversity(feats, ["p"] * 4) == 0.0).all()
    with pytest.raises(ValueError, match="at least 2 images per prompt.*'q'"):
        per_image_diversity(np.ones((3, 3)), ["p", "p", "q"])


def test_collapsed_generator_scores_zero_and_below_varied_renders(sets):
    from metrics.diversity import ToyDiversity

    metric = ToyDiversity(n_resamples=200)
    varied, collapsed = (metric.score(folder) for folder in sets)
    assert collapsed.value == 0.0 and collapsed.ci_high == 0.0
    assert all(r["score"] == 0.0 for r in collapsed.per_sample)
    assert varied.ci_low > 0.0 and varied.higher_is_better and varied.n == 48
    diff = metric.paired_difference(collapsed, varied)
    assert diff["verdict"] == "worse" and diff["difference"] == pytest.approx(-varied.value)


def test_per_image_noise_neither_hides_nor_fakes_diversity(tmp_path):
    """Diversity is about what is drawn and where, not image quality: per-image noise keeps most
    of varied renders' diversity and leaves a collapsed generator near 0."""
    from metrics.diversity import ToyDiversity

    metas = world.prompt_set("eval")[:16]
    rng = np.random.default_rng(0)

    def noisy(folder, collapsed):
        images, records = [], []
        for m in metas:
            for s in SEEDS:
                image = world.render(m, 0 if collapsed else s, 16)[0].astype(np.float64)
                images.append(np.clip(image + rng.normal(0, 25.5, image.shape), 0, 255))
                records.append({"prompt_id": m["prompt_id"], "prompt": m["prompt"], "seed": s,
                                "family": "toy", "method": "render", "nfe": 0, "meta": m})
        return write_sample_set(folder, np.round(np.stack(images)).astype(np.uint8), records)

    metric = ToyDiversity(n_resamples=10)
    clean = metric.score(_write(tmp_path / "clean", metas)).value
    varied = metric.score(noisy(tmp_path / "varied", False)).value
    collapsed = metric.score(noisy(tmp_path / "collapsed", True)).value
    assert varied >= 0.6 * clean and collapsed <= 0.15 * varied


def test_toy_net_is_its_own_shipped_net(sets):
    from fewstep.toy.features import SHIPPED_SEEDS, load_feature_net
    from metrics.diversity import DIVERSITY_SEED, ToyDiversity, shipped_diversity_net
    from metrics.toy_reward import REWARD_SEED

    result = ToyDiversity(n_resamples=10).score(sets[0])
    ident = result.identity
    net = load_feature_net(shipped_diversity_net(16))
    assert ident["feature_net_sha256"] == net.sha256 and net.recipe["seed"] == DIVERSITY_SEED
    assert net.recipe["degrade_share"] == 0.0    # content features, not a quality detector
    assert DIVERSITY_SEED not in (REWARD_SEED, *SHIPPED_SEEDS.values())
    for key in ("distance", "features", "images_per_prompt", "prompt_set_sha256", "resolution"):
        assert key in ident
    assert ident["images_per_prompt"] == len(SEEDS)


def test_a_replaced_net_file_and_another_size_are_clear_errors(sets, tmp_path, monkeypatch):
    import shutil

    from metrics import diversity
    from metrics.diversity import ToyDiversity

    with pytest.raises(ValueError, match="no shipped toy diversity net for 32 px"):
        diversity.shipped_diversity_net(32)
    fake = tmp_path / diversity.SHIPPED_FILE.format(size=16)
    from fewstep.toy.features import shipped_feature_net
    shutil.copyfile(shipped_feature_net(16, "hps"), fake)     # a valid net, but not the pinned one
    monkeypatch.setattr(diversity, "SHIPPED_DIR", tmp_path)
    with pytest.raises(ValueError, match="not the pinned"):
        ToyDiversity(n_resamples=10).score(sets[0])


def test_registered_with_did_you_mean():
    from metrics.diversity import DINOv2Diversity, ToyDiversity

    assert METRICS.get("toy_diversity") is ToyDiversity
    assert METRICS.get("diversity_dinov2") is DINOv2Diversity
    with pytest.raises(UnknownNameError, match="toy_diversity"):
        METRICS.check("toy_diversty")


# ------------------------------------------------------------------ real route: DINOv2 (tiny)

@pytest.fixture(scope="module")
def dino_cache(tmp_path_factory):
    """A weights cache holding a tiny random-initialised Dinov2Model under the variant's folder."""
    import torch
    from transformers import BitImageProcessor, Dinov2Config, Dinov2Model

    from metrics.diversity import DINOV2_VARIANTS

    root = tmp_path_factory.mktemp("weights")
    torch.manual_seed(0)
    config = Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                          intermediate_size=64, image_size=28, patch_size=14)
    folder = root / DINOV2_VARIANTS["dinov2-vitl14"].folder
    Dinov2Model(config).save_pretrained(folder)
    BitImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 28, "width": 28},
                      do_center_crop=True, image_mean=[0.485, 0.456, 0.406],
                      image_std=[0.229, 0.224, 0.225]).save_pretrained(folder)
    return root


def test_dinov2_route_collapsed_is_zero_varied_is_positive(sets, dino_cache, monkeypatch):
    from metrics.diversity import DINOv2Diversity

    monkeypatch.setenv("FEWSTEP_WEIGHTS", str(dino_cache))
    metric = DINOv2Diversity(n_resamples=50, device="cpu")
    varied, collapsed = (metric.score(folder) for folder in sets)
    assert collapsed.value == 0.0 and varied.value > 0.0
    ident = varied.identity
    assert ident["model"] == "Dinov2Model" and len(ident["checkpoint_sha256"]) == 64
    assert ident["features"].startswith("CLS") and "crop_size" in ident["preprocessing"]


def test_dinov2_missing_weights_name_the_file_where_and_the_check_command(sets, tmp_path,
                                                                          monkeypatch):
    from fewstep.backbones.weights import MissingWeightsError
    from metrics.diversity import DINOv2Diversity

    monkeypatch.setenv("FEWSTEP_WEIGHTS", str(tmp_path / "empty"))
    metric = DINOv2Diversity(n_resamples=10)
    paths = [wf.path for wf in metric.weight_files()]
    assert any(p.endswith("model.safetensors") for p in paths)
    with pytest.raises(MissingWeightsError) as err:
        metric.score(sets[0])
    text = str(err.value)
    assert "model.safetensors" in text and str(tmp_path / "empty") in text
    assert "FEWSTEP_WEIGHTS" in text and "fewstep weights check" in text
    assert "facebook/dinov2-large" in text
