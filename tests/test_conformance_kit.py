"""The conformance kit itself: a third-party method passes it in a few lines, broken ones fail it, and its
pytest plugin is light and selects devices."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from dataclasses import dataclass, field

import pytest
import torch
from hypothesis import strategies as st
from peftkit import AdapterLayer, MethodSpec, PeftConfig, hookimpl, inject_into_targets, method_impl, plugins
from peftkit.testing import ConformanceError, ConformanceSuite
from peftkit.testing.profiles import chosen_settings
from torch import nn


# --- a toy method, as a third party would write it: ΔW = v uᵀ, v zero at init ----------------------
@dataclass
class RankOneConfig(PeftConfig):
    method = "rank_one"
    peft_type: str = "RANK_ONE"
    target_modules: list[str] = field(default_factory=list)


class RankOneLayer(AdapterLayer):
    adapter_tensor_names = ("rank_one_u", "rank_one_v")
    supported_kinds = ("linear",)
    merge_factor = 1.0  # a broken variant folds in more than it computes

    def __init__(self, base_layer, features=None):
        super().__init__(base_layer, features)
        self.rank_one_u, self.rank_one_v = nn.ParameterDict(), nn.ParameterDict()

    def update_layer(self, adapter_name, config, module_name):
        f = self.features
        self.rank_one_u[adapter_name] = nn.Parameter(torch.randn(f.in_features) / f.in_features**0.5)
        self.rank_one_v[adapter_name] = nn.Parameter(torch.zeros(f.out_features))
        self._move_to_base(
            self.rank_one_u[adapter_name], self.rank_one_v[adapter_name], float_dtype=torch.float32
        )

    def adapter_output(self, x, result, adapter_names):
        for name in adapter_names:
            u, v = self.rank_one_u[name], self.rank_one_v[name]
            result = result + ((x.to(u.dtype) @ u)[..., None] * v).to(result.dtype)
        return result

    def delta_weight(self, adapter_name):
        return torch.outer(self.rank_one_v[adapter_name], self.rank_one_u[adapter_name]) * self.merge_factor


class RankOnePlugin:
    layer_class = RankOneLayer

    @hookimpl
    def peftkit_register_methods(self):
        return [MethodSpec("rank_one", RankOneConfig, "RANK_ONE", family="weight-delta")]

    @method_impl("rank_one")
    def peftkit_inject_adapter(self, peft_model, config, adapter_name):
        inject_into_targets(peft_model, config, adapter_name, self.layer_class)
        return True


class RankOneSuite(ConformanceSuite):
    method = "rank_one"
    model_kinds = ("llama", "plain")
    max_examples = 3

    def make_config(self, draw, case):
        targets = draw(st.sets(st.sampled_from(case.linear_targets), min_size=1, max_size=2), label="targets")
        return RankOneConfig(target_modules=sorted(targets))


class TestToyMethodPassesTheKit(RankOneSuite):
    @pytest.fixture(autouse=True)
    def _registered(self):
        with plugins.registered(RankOnePlugin(), name="rank-one"):
            yield


# --- broken variants fail, naming the property ------------------------------------------------------
class MergesTwice(RankOneLayer):
    merge_factor = 2.0


class ForgetsToDisable(RankOneLayer):
    def forward(self, x, *args, **kwargs):
        result = self.base_layer(x, *args, **kwargs)
        return self.adapter_output(x, result, self.active_adapters)


class CrashesUnderAutocast(RankOneLayer):
    """Adds its update in place, which autocast does not cast: under autocast the base output is bf16."""

    def adapter_output(self, x, result, adapter_names):
        for name in adapter_names:
            u, v = self.rank_one_u[name], self.rank_one_v[name]
            rows = result.reshape(-1, result.shape[-1]).clone()
            rows.addmm_((x.to(u.dtype) @ u).reshape(-1, 1), v[None, :])
            result = rows.view(result.shape)
        return result


class DetachesUnderAutocast(RankOneLayer):
    """Casts its tensors for autocast by hand, and loses their gradient doing so."""

    def adapter_output(self, x, result, adapter_names):
        for name in adapter_names:
            u, v = self.rank_one_u[name], self.rank_one_v[name]
            if torch.is_autocast_enabled(x.device.type):
                u = u.detach().to(result.dtype)
            result = result + ((x.to(u.dtype) @ u)[..., None] * v).to(result.dtype)
        return result


class BranchesOnAValue(RankOneLayer):
    """Skips its update when it is small, a branch on a tensor's value, which breaks a compiled graph."""

    def adapter_output(self, x, result, adapter_names):
        for name in adapter_names:
            u, v = self.rank_one_u[name], self.rank_one_v[name]
            if v.abs().max().item() > 0:
                result = result + ((x.to(u.dtype) @ u)[..., None] * v).to(result.dtype)
        return result


class SavesABaseWeight(RankOnePlugin):
    @method_impl("rank_one")
    def peftkit_adapter_state_dict(self, peft_model, config, adapter_name):
        name, param = next(iter(peft_model.base_model.model.named_parameters()))
        return {"base_model.model." + name: param}

    @method_impl("rank_one")
    def peftkit_load_adapter_state_dict(self, peft_model, config, adapter_name, state_dict):
        return list(state_dict)


@pytest.mark.parametrize(
    ("plugin", "prop", "message"),
    [
        (
            type("P", (RankOnePlugin,), {"layer_class": MergesTwice}),
            "merge",
            "merged and unmerged forwards agree",
        ),
        (
            type("P", (RankOnePlugin,), {"layer_class": ForgetsToDisable}),
            "disable_adapter",
            "disable_adapter reproduces the base model's outputs exactly",
        ),
        (SavesABaseWeight, "save_load", "the files hold only adapter tensors"),
        (
            type("P", (RankOnePlugin,), {"layer_class": CrashesUnderAutocast}),
            "autocast_training_step",
            r"(?s)a training step under torch.autocast.*raised RuntimeError: self and mat2 must have the same dtype",
        ),
        (
            type("P", (RankOnePlugin,), {"layer_class": DetachesUnderAutocast}),
            "autocast_training_step",
            r"(?s)no gradient reached .*rank_one_u under torch.autocast\('cpu', dtype=torch.(bfloat16|float16)\)",
        ),
        (
            type("P", (RankOnePlugin,), {"layer_class": BranchesOnAValue}),
            "compiles",
            r"(?s)a compiled training step failed compiling: .*(item\(\)|data-dependent)",
        ),
    ],
)
def test_a_broken_method_fails_the_property(plugin, prop, message):
    suite = RankOneSuite()
    with plugins.registered(plugin(), name="broken-rank-one"):
        with pytest.raises(ConformanceError, match=message):
            suite.run_property(prop, getattr(suite, f"check_{prop}"), "cpu", chosen_settings("peftkit-ci", 3))


# --- the pytest plugin -----------------------------------------------------------------------------
def test_the_pytest_plugin_imports_nothing_heavy():
    code = "import sys, peftkit.testing.pytest_plugin; print(sorted({'torch', 'transformers', 'hypothesis'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_peftkit_device_selects_the_cases(tmp_path):
    (tmp_path / "test_suite.py").write_text(
        textwrap.dedent(
            """
            from peftkit.testing import ConformanceSuite

            class TestSome(ConformanceSuite):
                method = "some"
            """
        )
    )
    command = [
        sys.executable,
        "-m",
        "pytest",
        "-p",
        "no:cacheprovider",
        "--collect-only",
        "-q",
        str(tmp_path),
    ]
    every = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path).stdout
    assert "test_merge[cpu]" in every and "test_merge[cuda]" in every
    cpu_only = subprocess.run(
        command + ["--peftkit-device=cpu"], capture_output=True, text=True, cwd=tmp_path
    ).stdout
    assert "test_merge[cpu]" in cpu_only and "[cuda]" not in cpu_only
    assert f"{every.count('[cuda]')} deselected" in cpu_only
