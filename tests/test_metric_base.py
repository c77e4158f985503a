"""The metric base class: options checked and built from a scoring context (no metric named by the
scorer), bootstrap settings owned by the base, the sample set loaded once by the template."""
import math
import types
from dataclasses import dataclass

import numpy as np
import pytest

from fewstep.registry import METRICS
from fewstep.toy import world
from fewstep.toy.features import shipped_feature_net
from metrics.base import Metric, PerImageMetric
from metrics.fid import ToyFID
from metrics.geneval import ToyGenEval
from metrics.geneval_m2f import GenEvalM2F
from metrics.sampleset import SampleSetError, write_sample_set
from metrics.toy_preference import ToyHPS

SEEDS = (0, 1)


def context(rows, **kw):
    """What a scoring job hands every metric (Metric.from_options)."""
    base = dict(n_resamples=17, level=0.9, seed=5, prompts="prompts.jsonl", prompt_rows=rows,
                feature_net=None, reference_images=100, cache="cache")
    return types.SimpleNamespace(**{**base, **kw})


@pytest.fixture(scope="module")
def sample_set(tmp_path_factory):
    metas = world.prompt_set("eval")[:6]
    images, records = [], []
    for m in metas:
        for s in SEEDS:
            images.append(world.render(m, s, 16)[0])
            records.append({"prompt_id": m["prompt_id"], "prompt": m["prompt"], "seed": s,
                            "family": "toy", "method": "render", "nfe": 0, "meta": m})
    return write_sample_set(tmp_path_factory.mktemp("base") / "set", np.stack(images), records)


@dataclass
class Brightness(PerImageMetric):
    """A per-image metric that implements only its image scores and identity."""
    name = "brightness"
    version = "1"
    loads: int = 0

    def image_scores(self, ss):
        self.loads += 1
        values = np.array([ss.load_image(i).mean() / 255.0 for i in range(len(ss))])
        return {"raw": values * 255.0, "score": values}

    def identity(self, ss):
        return {"metric": self.name, "n_images": len(ss)}

    def score_details(self, columns):
        return {"max_raw": float(columns["raw"].max())}


def test_bootstrap_settings_are_keyword_only_fields_of_the_base_not_options():
    assert Brightness().n_resamples == 1000 and Brightness().level == 0.95
    with pytest.raises(TypeError):
        Brightness(0, 10)  # loads is positional, the bootstrap settings are not
    assert Brightness.option_names() == ["loads"]
    with pytest.raises(ValueError, match="has no option 'n_resamples'"):
        Brightness.check_options({"n_resamples": 10})


@pytest.mark.parametrize("name", sorted(METRICS.names()))
def test_every_registered_metric_takes_the_bootstrap_settings_from_the_base(name):
    cls = METRICS.get(name)
    assert issubclass(cls, Metric)
    for reserved in ("n_resamples", "level", "seed"):
        assert reserved not in cls.option_names()


def test_unknown_option_is_named_with_the_close_names():
    with pytest.raises(ValueError, match=r"metric_options/toy_hps: ToyHPS has no option "
                                         r"'batchsize'\. Did you mean 'batch_size'\?"):
        ToyHPS.check_options({"batchsize": 8})
    with pytest.raises(ValueError, match="metric_options/toy_fid must be a mapping"):
        ToyFID.check_options(["renders_per_prompt"])
    with pytest.raises(ValueError, match="metric_options/my_fid:"):
        ToyFID.check_options({"typo": 1}, name="my_fid")


def test_from_options_refuses_an_unknown_option_before_building():
    with pytest.raises(ValueError, match="Did you mean 'require_all_tasks'"):
        ToyGenEval.from_options({"require_all_task": False}, context([]))


def test_from_options_sets_the_jobs_bootstrap_settings():
    metric = ToyHPS.from_options({"batch_size": 8}, context([]))
    assert (metric.n_resamples, metric.level, metric.seed, metric.batch_size) == (17, 0.9, 5, 8)


def test_toy_geneval_scores_a_class_conditional_set_as_a_partial_set():
    text_rows, class_rows = [{"prompt_id": "a"}], [{"prompt_id": "a", "class_label": 3}]
    assert ToyGenEval.from_options({}, context(text_rows)).require_all_tasks
    assert not ToyGenEval.from_options({}, context(class_rows)).require_all_tasks
    # the config's option wins over the context's default
    assert ToyGenEval.from_options({"require_all_tasks": True}, context(class_rows)).require_all_tasks


def test_real_geneval_route_never_relaxes_the_task_check_from_the_prompt_file():
    metric = GenEvalM2F.from_options({}, context([{"prompt_id": "a", "class_label": 3}]))
    assert metric.require_all_tasks


def test_toy_fid_takes_its_net_renders_and_cache_from_the_context(tmp_path):
    rows = [{"prompt_id": str(i)} for i in range(7)]
    ctx = context(rows, feature_net=str(shipped_feature_net(16)), reference_images=100,
                  prompts=tmp_path / "p.jsonl", cache=str(tmp_path / "cache"))
    metric = ToyFID.from_options({"batch_size": 16}, ctx)
    assert metric.renders_per_prompt == math.ceil(100 / 7) == 15
    assert (metric.reference_prompts, metric.cache_dir) == (str(tmp_path / "p.jsonl"), ctx.cache)
    assert (metric.batch_size, metric.n_resamples) == (16, 17)
    assert ToyFID.from_options({"renders_per_prompt": 2}, ctx).renders_per_prompt == 2


def test_per_image_template_scores_the_set_once_with_columns_and_details(sample_set):
    metric = Brightness(n_resamples=30, seed=1)
    result = metric.score(sample_set, allow_blank=False)
    assert metric.loads == 1 and result.n == len(result.per_sample) == 12
    row = result.per_sample[0]
    assert list(row) == ["prompt_id", "seed", "path", "raw", "score"]
    assert row["raw"] == pytest.approx(row["score"] * 255.0)
    assert result.value == pytest.approx(np.mean([r["score"] for r in result.per_sample]))
    assert result.details["n_resamples"] == 30 and result.details["blank_images_allowed"] is False
    assert result.details["max_raw"] == max(r["raw"] for r in result.per_sample)
    assert result.identity == {"metric": "brightness", "n_images": 12}


def test_the_template_checks_the_set_against_the_expected_grid(sample_set):
    with pytest.raises(SampleSetError):
        Brightness().score(sample_set, expected=[("nope", 0)])


def test_weights_load_before_any_image_is_read(tmp_path):
    @dataclass
    class NeedsWeights(Brightness):
        def load_weights(self):
            raise FileNotFoundError("weights missing")

    with pytest.raises(FileNotFoundError, match="weights missing"):
        NeedsWeights().score(tmp_path / "no-such-set")


def test_a_metric_without_its_columns_says_which_hooks_to_give():
    """The base's sharded-scoring hooks: a metric that gives neither image_columns nor
    image_scores is told what to implement instead of failing somewhere inside score_set."""
    from metrics.base import Metric

    class Bare(Metric):
        name = "bare"

    with pytest.raises(NotImplementedError, match=r"Bare must implement image_columns\(ss\)"):
        Bare().score_set(None, allow_blank=False)
    with pytest.raises(NotImplementedError, match="Bare must implement result_from_columns"):
        Bare().result_from_columns(None, {}, allow_blank=False)


def test_feature_metrics_without_their_extractor_say_which_hook_to_give():
    """Diversity and precision/recall bases name the feature hooks a subclass must give."""
    from metrics.diversity import Diversity
    from metrics.precision_recall import PrecisionRecall

    for hook in ("features", "feature_identity"):
        with pytest.raises(NotImplementedError, match=rf"Diversity must implement {hook}\(ss\)"):
            getattr(Diversity(), hook)(None)
    for hook in ("sample_features", "reference_features", "feature_identity"):
        with pytest.raises(NotImplementedError,
                           match=rf"PrecisionRecall must implement {hook}\(ss\)"):
            getattr(PrecisionRecall(), hook)(None)
