"""GenEval route B on tiny random models of the real classes (Mask2Former, open_clip CLIP)."""
from __future__ import annotations

import hashlib
import json

import numpy as np
import open_clip
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file
from transformers import Mask2FormerConfig, Mask2FormerForUniversalSegmentation, SwinConfig

from fewstep.backbones.weights import MissingWeightsError, WeightFile
from fewstep.geneval_prompts import COLOURS, TASKS
from fewstep.registry import METRICS
from metrics.clip_score import VARIANTS, CLIPVariant
from metrics.geneval_m2f import (APPROXIMATE, COLOUR_TEMPLATES, DETECTOR_WEIGHTS, GENEVAL_CLASSES,
                                 CLIPColourClassifier, Detection, GenEvalM2F, M2FDetector,
                                 class_probabilities, grey_canvas_crop, instance_postprocess,
                                 label_names, masks_to_boxes, padded_shape, preprocess,
                                 resized_shape, top_pairs, uses_plain_gelu)
from metrics.sampleset import write_sample_set
from test_metric_clip_score import TINY_CONFIG as TINY_CLIP_CONFIG

CAT = GENEVAL_CLASSES.index("cat")
TINY_CLIP = "fewstep-test-tiny-clip-geneval"
PLAIN_CLIP = "fewstep-test-tiny-clip-plain-gelu"
CLIP_CONFIG = TINY_CLIP_CONFIG  # the CLIP-score tests' tiny ViT-L-14-quickgelu stand-in
CLIP_WEIGHTS = "clip/tiny-geneval/open_clip_model.safetensors"


def _tiny_m2f_config(num_labels=80) -> Mask2FormerConfig:
    swin = SwinConfig(image_size=224, patch_size=4, embed_dim=16, depths=[1, 1, 1, 1],
                      num_heads=[1, 1, 2, 2], window_size=7,
                      out_features=["stage1", "stage2", "stage3", "stage4"])
    return Mask2FormerConfig(backbone_config=swin, feature_size=32, mask_feature_size=32,
                             hidden_dim=32, encoder_feedforward_dim=32, encoder_layers=1,
                             decoder_layers=2, num_attention_heads=2, dim_feedforward=32,
                             num_queries=6, num_labels=num_labels)


def _register_clip(tmp_path_factory, name, quick_gelu):
    config = tmp_path_factory.mktemp("clipcfg") / f"{name}.json"
    config.write_text(json.dumps({**CLIP_CONFIG, "quick_gelu": quick_gelu}))
    open_clip.add_model_config(config)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(weights root, CLIP variant, CLIP model): a random Mask2Former whose classifier always says
    "cat" (so detections pass GenEval's thresholds) and a random QuickGELU CLIP, in the cache."""
    root = tmp_path_factory.mktemp("weights")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        detector = Mask2FormerForUniversalSegmentation(_tiny_m2f_config()).eval()
        with torch.no_grad():
            detector.class_predictor.weight.zero_()
            detector.class_predictor.bias.fill_(-10.0)
            detector.class_predictor.bias[CAT] = 10.0
        detector.save_pretrained(root / DETECTOR_WEIGHTS.path)
        _register_clip(tmp_path_factory, TINY_CLIP, True)
        _register_clip(tmp_path_factory, PLAIN_CLIP, False)
        clip = open_clip.create_model(TINY_CLIP).eval()
    (root / CLIP_WEIGHTS).parent.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in clip.state_dict().items()}, str(root / CLIP_WEIGHTS))
    variant = CLIPVariant("tiny-geneval", TINY_CLIP, "random-init",
                          WeightFile(CLIP_WEIGHTS, "built by the test"))
    return root, variant, clip


@pytest.fixture
def cache(tiny, monkeypatch):
    monkeypatch.setenv("FEWSTEP_WEIGHTS", str(tiny[0]))
    return tiny


# ------------------------------------------------------------------- (a) post-processing

def _logits_for(probs_row):
    return torch.log(torch.tensor(probs_row, dtype=torch.float64))


def test_postprocess_on_hand_made_logits():
    height, width, n = 12, 16, len(GENEVAL_CLASSES)
    high = [0.2 / n] * n + [0.0]
    high[5], high[-1] = 0.8, 0.2 - 0.2 / n * (n - 1)          # class 5 at 0.8
    low = [0.01 / n] * n + [0.99]                               # mostly no-object
    class_logits = torch.stack([_logits_for(high), _logits_for(low)]).float()
    mask_logits = torch.full((2, height, width), -4.0)
    inside = torch.linspace(0.5, 3.0, 4 * 6).view(4, 6)
    mask_logits[0, 2:6, 3:9] = inside                           # rows 2..5, columns 3..8
    probs = class_probabilities(class_logits)
    assert probs.shape == (2, n)                                 # no-object column dropped
    assert probs[0, 5] == pytest.approx(0.8, abs=1e-6) and probs[1].sum() < 0.02
    result = instance_postprocess(class_logits, mask_logits, k=3)
    assert result["labels"][0] == 5 and result["queries"][0] == 0
    assert (result["class_scores"][:-1] >= result["class_scores"][1:]).all()   # best first
    assert result["boxes"][0].tolist() == [3.0, 2.0, 9.0, 6.0]
    expected = 0.8 * float(inside.sigmoid().mean())
    assert float(result["scores"][0]) == pytest.approx(expected, rel=1e-5)
    assert result["masks"][0].sum() == 24


def test_top_pairs_order_and_empty_masks():
    probs = torch.tensor([[0.1, 0.6, 0.0], [0.3, 0.05, 0.5]])
    scores, queries, labels = top_pairs(probs, k=4)
    assert scores.tolist() == pytest.approx([0.6, 0.5, 0.3, 0.1])
    assert queries.tolist() == [0, 1, 1, 0] and labels.tolist() == [1, 2, 0, 0]
    assert len(top_pairs(probs, k=100)[0]) == 6                  # k capped at Q x C
    empty = torch.zeros(1, 5, 5, dtype=torch.bool)
    assert masks_to_boxes(empty).tolist() == [[0.0, 0.0, 0.0, 0.0]]
    result = instance_postprocess(torch.zeros(1, 3), torch.full((1, 5, 5), -1.0), k=1)
    assert float(result["scores"][0]) == 0.0 and result["boxes"][0].tolist() == [0, 0, 0, 0]


# -------------------------------------------------------------------------- (b) labels

def test_label_mapping_is_coco_order_with_geneval_names():
    assert len(GENEVAL_CLASSES) == 80 and len(set(GENEVAL_CLASSES)) == 80
    assert GENEVAL_CLASSES[0] == "person" and GENEVAL_CLASSES[62] == "tv"
    assert GENEVAL_CLASSES[64:67] == ("computer mouse", "tv remote", "computer keyboard")
    assert GENEVAL_CLASSES[78:] == ("hair drier", "toothbrush")
    assert label_names(_tiny_m2f_config()) == GENEVAL_CLASSES
    with pytest.raises(ValueError, match="133 labels"):
        label_names(_tiny_m2f_config(num_labels=133))


# --------------------------------------------------------------------------- (c) resize

def test_resize_geometry_follows_mmdet():
    assert resized_shape(512, 512) == (800, 800)                 # shorter side to 800
    assert resized_shape(600, 2000) == (400, 1333)               # longer side capped at 1333
    assert resized_shape(1000, 500) == (1333, 667)
    assert padded_shape(800, 800) == (800, 800) and padded_shape(400, 1333) == (416, 1344)
    image = np.random.default_rng(0).integers(0, 256, (30, 100, 3), dtype=np.uint8)
    pixels, resized, padded = preprocess(image, (0, 0, 0), (1, 1, 1))
    assert resized == (400, 1333) and padded == (416, 1344)      # 100 px wide -> 1333 wide
    assert pixels.shape == (1, 3, 416, 1344) and torch.equal(pixels, pixels.round())
    assert (pixels[..., 400:, :] == 0).all() and (pixels[..., 1333:] == 0).all()


# ---------------------------------------------------------------------- (d) grey crop

def test_grey_canvas_crop():
    image = np.random.default_rng(1).integers(0, 256, (20, 30, 3), dtype=np.uint8)
    mask = np.zeros((20, 30), dtype=bool)
    mask[4:12, 5:15] = True
    mask[6, 7] = False                                           # a hole inside the box
    crop = grey_canvas_crop(image, mask, (5.0, 4.0, 15.0, 12.0))
    assert crop.shape == (8, 10, 3)
    inside = mask[4:12, 5:15]
    np.testing.assert_array_equal(crop[inside], image[4:12, 5:15][inside])
    assert (crop[~inside] == 0x99).all() and (~inside).sum() == 1
    np.testing.assert_array_equal(grey_canvas_crop(image, None, (0, 0, 3, 2)), image[:2, :3])


# ---------------------------------------------------------------- (e) colour classifier

def test_colour_classifier_equals_direct_open_clip(cache):
    _, variant, model = cache
    clf = CLIPColourClassifier(variant, device="cpu")
    tokenizer = open_clip.get_tokenizer(TINY_CLIP)
    with torch.no_grad():
        rows = []
        for colour in COLOURS:
            emb = model.encode_text(tokenizer([t.format(colour=colour, object="cat")
                                               for t in COLOUR_TEMPLATES]))
            mean = (emb / emb.norm(dim=-1, keepdim=True)).mean(0)
            rows.append(mean / mean.norm())
        direct = torch.stack(rows)
        torch.testing.assert_close(clf.class_embeddings("cat"), direct, atol=1e-6, rtol=0)
        image = np.random.default_rng(2).integers(0, 256, (40, 48, 3), dtype=np.uint8)
        mask = np.zeros((40, 48), dtype=bool)
        mask[5:30, 10:40] = True
        det = Detection("cat", (10.0, 5.0, 40.0, 30.0), 0.9, mask, CAT)
        crop = grey_canvas_crop(image, mask, det.box)
        pixels = open_clip.image_transform(32, is_train=False)(Image.fromarray(crop))[None]
        e_img = model.encode_image(pixels)
        logits = 100 * (e_img / e_img.norm()) @ direct.T
    torch.testing.assert_close(clf.logits(image, det), logits[0], atol=1e-4, rtol=0)
    assert clf.classify(image, det) == COLOURS[int(logits.argmax())]
    assert clf.identity()["precision"].startswith("fp32")


def test_plain_gelu_is_refused(cache):
    _, variant, _ = cache
    plain = CLIPVariant("plain", PLAIN_CLIP, "random-init", variant.weights)
    with pytest.raises(ValueError, match="QuickGELU"):
        CLIPColourClassifier(plain, device="cpu")
    assert uses_plain_gelu(open_clip.create_model(PLAIN_CLIP))
    assert not uses_plain_gelu(open_clip.create_model(TINY_CLIP))
    assert VARIANTS["clip-l14-openai"].model_name == "ViT-L-14-quickgelu"


# ------------------------------------------------------------------------ (f) detector

def test_detector_end_to_end_returns_well_formed_detections(cache):
    detector = M2FDetector(device="cpu", top_k=10)
    image = np.random.default_rng(3).integers(0, 256, (48, 64, 3), dtype=np.uint8)
    dets = detector.detect(image)
    assert len(dets) == 10                                       # 6 queries x 80 classes, top 10
    for d in dets:
        x0, y0, x1, y1 = d.box
        assert 0 <= x0 <= x1 <= 64 and 0 <= y0 <= y1 <= 48
        assert d.mask.shape == (48, 64) and d.mask.dtype == bool
        assert d.cls in GENEVAL_CLASSES and 0.0 <= d.score <= 1.0
        if d.mask.any():
            ys, xs = np.nonzero(d.mask)
            assert (x0, y0, x1, y1) == (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)
    assert dets[0].cls == "cat" and any(d.score > 0.3 for d in dets)
    assert detector.identity()["label_names_differing_from_coco"] == []


# -------------------------------------------------------------------------- (g) metric

def _meta(pid, tag, prompt, include):
    return {"prompt_id": pid, "tag": tag, "prompt": prompt, "include": include}


METAS = [_meta("p0", "single_object", "a photo of a cat", [{"class": "cat", "count": 1}]),
         _meta("p1", "single_object", "a photo of a dog", [{"class": "dog", "count": 1}]),
         _meta("p2", "colors", "a photo of a red cat", [{"class": "cat", "count": 1,
                                                          "color": "red"}])]


def test_metric_scores_a_small_set_and_says_approximate(cache, tmp_path):
    _, variant, _ = cache
    rng = np.random.default_rng(4)
    images = rng.integers(0, 256, (len(METAS) * 2, 32, 32, 3), dtype=np.uint8)
    records = [{"prompt_id": m["prompt_id"], "prompt": m["prompt"], "seed": s, "family": "test",
                "method": "random", "nfe": 1, "meta": m} for m in METAS for s in (0, 1)]
    folder = write_sample_set(tmp_path / "set", images, records)
    metric = GenEvalM2F(device="cpu", clip_variant=variant, require_all_tasks=False,
                        n_resamples=50)
    assert metric.detector is None and metric.colour is None     # nothing loaded yet
    result = metric.score(folder)
    scores = {(r["prompt_id"], r["seed"]): r for r in result.per_sample}
    assert scores[("p0", 0)]["score"] == scores[("p0", 1)]["score"] == 1.0
    assert scores[("p1", 0)]["score"] == 0.0 and "expected dog" in scores[("p1", 0)]["reason"]
    for seed in (0, 1):
        row = scores[("p2", seed)]
        assert row["reason"] == "" or row["reason"].startswith("expected red cat")
    assert list(metric.colour._classes) == ["cat"]               # the colour check ran
    assert set(result.details["tasks"]) == {"single_object", "colors"} <= set(TASKS)
    assert result.value == pytest.approx(np.mean(list(result.details["tasks"].values())))
    ident = result.identity
    assert result.name == "geneval_hf_m2f" and result.n == 6 and result.higher_is_better
    assert ident["approximate"] == APPROXIMATE and "approximate" in ident["approximate"]
    assert ident["route"] == "geneval-hf-m2f" and ident["thresholds"]["confidence"] == 0.3
    weights = cache[0] / DETECTOR_WEIGHTS.path / "model.safetensors"
    assert ident["detector_details"]["files_sha256"]["model.safetensors"] == hashlib.sha256(
        weights.read_bytes()).hexdigest()
    assert ident["colour_details"]["checkpoint_sha256"] == hashlib.sha256(
        (cache[0] / CLIP_WEIGHTS).read_bytes()).hexdigest()
    json.dumps(result.to_dict())


# ------------------------------------------------------------------ (h) missing weights

def test_missing_detector_folder_names_path_and_source(tmp_path, monkeypatch):
    monkeypatch.setenv("FEWSTEP_WEIGHTS", str(tmp_path / "empty"))
    metric = METRICS.get("geneval_hf_m2f")()                     # building reads nothing
    assert metric.weight_files() == [DETECTOR_WEIGHTS, VARIANTS["clip-l14-openai"].weights]
    with pytest.raises(MissingWeightsError) as err:
        metric.load_models()
    text = str(err.value)
    for part in (str(tmp_path / "empty" / "hf" / "facebook--mask2former-swin-small-coco-instance"),
                 "Hugging Face facebook/mask2former-swin-small-coco-instance", "FEWSTEP_WEIGHTS"):
        assert part in text
    partial = tmp_path / "partial"
    partial.mkdir()
    (partial / "README.md").write_text("no weights here")
    with pytest.raises(MissingWeightsError, match="config.json"):
        M2FDetector(partial, device="cpu")
