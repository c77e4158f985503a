"""Registries: unknown names get a did-you-mean, an entry must subclass its registry's base, and a
plugin's entry point may not take a name that is already registered."""
import pytest

from fewstep.errors import FewstepError
from fewstep.registry import METHODS, METRICS, PluginError, Registry, UnknownNameError


def fake_distribution(root, name: str, entry_points: dict[str, dict[str, str]], module: str = ""):
    """An installed distribution (dist-info with entry points) and its module under root."""
    info = root / f"{name.replace('-', '_')}-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 0.1\n")
    lines = []
    for group, entries in entry_points.items():
        lines += [f"[{group}]"] + [f"{k} = {v}" for k, v in entries.items()]
    (info / "entry_points.txt").write_text("\n".join(lines) + "\n")
    if module:
        (root / "fake_plugin_module.py").write_text(module)


def fresh(registry: Registry) -> Registry:
    """A registry like `registry`, with its built-ins, that has not scanned entry points yet."""
    return Registry(registry.kind, registry.group, dict(registry._targets), base=registry.base)


def test_unknown_name_gets_a_did_you_mean_and_the_known_names():
    with pytest.raises(UnknownNameError) as err:
        METHODS.check("dmd3")
    assert "unknown method 'dmd3'. Did you mean 'dmd'" in str(err.value)
    assert "Known methods: amd, cdm, dmd, dmd2, dummy, rtdmd" in str(err.value)


def test_an_entry_point_that_takes_a_builtin_name_is_refused(tmp_path, monkeypatch):
    fake_distribution(tmp_path, "fewstep-clash",
                      {"fewstep.methods": {"dmd": "fake_plugin_module:X"}})
    monkeypatch.syspath_prepend(str(tmp_path))
    registry = fresh(METHODS)
    with pytest.raises(PluginError) as err:
        registry.check("dummy")  # any use of the registry refuses it, not only the clashing name
    message = str(err.value)
    assert "entry point 'dmd'" in message and "fewstep-clash 0.1" in message
    assert "fewstep (built in) already registers" in message
    assert "rename the entry point" in message and '"fewstep.methods"' in message
    assert isinstance(err.value, FewstepError)  # the CLI prints it without a traceback


def test_two_plugins_that_take_one_name_are_refused(tmp_path, monkeypatch):
    for i, name in enumerate(("fewstep-one", "fewstep-two")):
        root = tmp_path / name
        root.mkdir()
        fake_distribution(root, name, {"fewstep.metrics": {"my_metric": f"pkg{i}:M"}})
        monkeypatch.syspath_prepend(str(root))
    with pytest.raises(PluginError, match="'my_metric'.*already registers"):
        fresh(METRICS).names()


NOT_A_METHOD = '''
class Plain:
    name = "plain"


def factory():
    return None
'''


def test_a_method_entry_that_is_not_a_method_subclass_is_refused(tmp_path, monkeypatch):
    fake_distribution(tmp_path, "fewstep-plain", {"fewstep.methods": {
        "plain": "fake_plugin_module:Plain", "factory": "fake_plugin_module:factory"}},
        module=NOT_A_METHOD)
    monkeypatch.syspath_prepend(str(tmp_path))
    registry = fresh(METHODS)
    assert {"plain", "factory"} <= set(registry.names())  # listed: the check is on loading
    for name in ("plain", "factory"):
        with pytest.raises(PluginError) as err:
            registry.get(name)
        message = str(err.value)
        assert f"the method {name!r}" in message and "fewstep-plain 0.1" in message
        assert "not a subclass of fewstep.engine.method.Method" in message


def test_a_metric_entry_must_subclass_metric(tmp_path, monkeypatch):
    fake_distribution(tmp_path, "fewstep-plain", {"fewstep.metrics": {
        "plain_metric": "fake_plugin_module:Plain"}}, module=NOT_A_METHOD)
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(PluginError, match="not a subclass of metrics.base.Metric"):
        fresh(METRICS).get("plain_metric")


def test_every_builtin_entry_loads_and_passes_its_base_check():
    from fewstep.registry import BACKBONES, REWARDS

    for registry in (BACKBONES, METHODS, METRICS, REWARDS):
        for name in registry.names():
            assert registry.get(name) is not None


def test_importing_the_registry_imports_no_base_class():
    import subprocess
    import sys

    code = ("import sys, fewstep.registry; "
            "print(sorted(m for m in ('torch', 'fewstep.engine.method', 'metrics.base') "
            "if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_config_validation_reports_a_refused_plugin_as_a_config_error(tmp_path, monkeypatch):
    """Snakemake parses the config through fewstep.config: a clashing plugin is a ConfigError
    naming the entry point, not a traceback."""
    import fewstep.config as config_module
    from fewstep.config import DEFAULT, ConfigError, _read, validate

    fake_distribution(tmp_path, "fewstep-clash",
                      {"fewstep.methods": {"dmd": "fake_plugin_module:X"}})
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(config_module, "METHODS", fresh(METHODS))
    with pytest.raises(ConfigError) as err:
        validate(_read(DEFAULT), "config")
    assert "entry point 'dmd'" in str(err.value)
