"""The conformance suite: every property a peftkit method must satisfy, drawn with hypothesis.

A method package subclasses :class:`ConformanceSuite` in one of its test files, names its method and
says how to build a config for a drawn model::

    from hypothesis import strategies as st
    from peftkit.testing import ConformanceSuite
    from peftkit_lora import LoraConfig

    class TestLoraConformance(ConformanceSuite):
        method = "lora"
        model_kinds = ("llama", "gpt2")

        def make_config(self, draw, case):
            r = draw(st.integers(1, 8), label="r")
            targets = draw(st.sets(st.sampled_from(case.linear_targets), min_size=1), label="targets")
            return LoraConfig(r=r, lora_alpha=draw(st.integers(1, 16)), target_modules=sorted(targets))

pytest then runs each property as a test, on ``cpu`` and ``cuda`` (skipped without a GPU).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import math
import tempfile
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

import pytest
import torch
from hypothesis import assume, given, note, seed
from hypothesis import settings as Settings
from hypothesis import strategies as st
from torch import nn

from peftkit import plugins, serialization
from peftkit.config import CONFIG_NAME, PeftConfig, read_config_dict
from peftkit.errors import ConfigError, MergeNotSupportedError
from peftkit.method import MethodSpec
from peftkit.model import PeftModel, get_peft_model
from peftkit.modules_to_save import ModulesToSaveWrapper
from peftkit.testing import profiles
from peftkit.testing.cases import (
    DEVICES,
    DTYPES,
    MODEL_KINDS,
    ModelCase,
    autocast_dtypes,
    build_model,
    make_inputs,
    supported_dtypes,
)
from peftkit.testing.checks import (
    DEFAULT_TOLERANCES,
    ConformanceError,
    Tolerance,
    difference,
    hook_counts,
    leftovers,
    main_output,
    max_abs_diff,
    norm_difference,
    snapshot,
)

# The properties, by the short name the tests and failure messages use.
PROPERTIES: dict[str, str] = {
    "registered": "the method is registered and builds its own configs",
    "identity_at_init": "a freshly injected adapter at its identity init leaves outputs unchanged",
    "changes_at_init": "a freshly injected adapter changes outputs (the suite declares identity_at_init = False)",
    "merge": "merged and unmerged forwards agree",
    "merge_not_supported": "merging a method that cannot merge raises MergeNotSupportedError and changes nothing",
    "unmerge": "unmerge gives back the base weights",
    "merge_and_unload": "merge_and_unload leaves no peftkit module or hook behind, and outputs agree",
    "unload": "unload gives back the base model (with trained modules_to_save copies), its outputs exactly",
    "save_load": "save then load reproduces outputs exactly, and the files hold only adapter tensors",
    "training_step": "after a training step only adapter (and declared) parameters changed",
    "autocast_training_step": "a training step under torch.autocast (bfloat16, float16) runs, and its loss and "
    "gradients are close to float32's",
    "compiles": "a training step and an inference forward each compile as one graph (no graph break) and run "
    "again without recompiling",
    "disable_adapter": "disable_adapter reproduces the base model's outputs exactly",
    "multiple_adapters": "adding, switching and deleting adapters leaves the others untouched",
}

FIRST, SECOND = "default", "other"
conformance = pytest.mark.peftkit_conformance
# the compile property checks tracing, not numerics: dev.sh's second kernel set leaves it out
compile_property = pytest.mark.peftkit_compile


def _config_summary(config: PeftConfig) -> str:
    """The config's class and the fields that differ from their defaults."""
    parts = []
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        else:
            default = dataclasses.MISSING
        if value != default and f.name not in ("peft_type", "base_model_name_or_path"):
            parts.append(f"{f.name}={value!r}")
    return f"{type(config).__name__}({', '.join(parts)})"


class Example:
    """One drawn example of one property: the case, its inputs, the config, the base model and its outputs.

    Everything is drawn through ``draw`` (hypothesis' ``data.draw``), each draw labelled, so a failure
    prints the exact draw that broke the property.
    """

    def __init__(
        self,
        suite: ConformanceSuite,
        prop: str,
        draw: Callable[..., Any],
        device: str,
        model_dtypes: tuple[str, ...] | None = None,
    ) -> None:
        self.suite, self.prop, self.draw, self.device = suite, prop, draw, device
        kind = draw(st.sampled_from(suite.model_kinds), label="model kind")
        hidden = draw(st.sampled_from(MODEL_KINDS[kind].hidden_sizes), label="hidden size")
        allowed = suite.dtypes if model_dtypes is None else model_dtypes
        dtypes = [d for d in allowed if d in supported_dtypes(device)]
        if not dtypes:
            raise ConformanceError(f"none of the dtypes {allowed} runs on {device}")
        dtype = draw(st.sampled_from(dtypes), label="dtype")
        base_seed = draw(st.integers(0, 3), label="base model seed")
        self.case = ModelCase.of(kind, hidden, dtype, device, base_seed)
        batch = draw(st.integers(1, 2), label="batch size")
        length = draw(st.integers(2, 6), label="sequence length")
        input_seed = draw(st.integers(0, 2**16), label="input seed")
        self.inputs = suite.make_inputs(self.case, batch, length, input_seed)
        self.config = self._config(FIRST)
        self.base = suite.build_model(self.case)
        self.hooks_before = hook_counts(self.base)
        self.base_types = {type(module) for module in self.base.modules()}
        self.base_keys = list(self.base.state_dict().keys())
        self.base_out = self.forward(self.base)
        note(f"case: {self.case}; inputs: {tuple(self.inputs['input_ids'].shape)}")

    # --- building ----------------------------------------------------------------------------------
    def _config(self, adapter_name: str) -> PeftConfig:
        config = (
            self.suite.make_config(self.draw, self.case)
            if adapter_name == FIRST
            else self.suite.second_config(self.draw, self.case)
        )
        if not isinstance(config, PeftConfig):
            raise ConformanceError(f"make_config must return a peftkit config, got {type(config).__name__}")
        note(f"config of adapter {adapter_name!r}: {_config_summary(config)}")
        return config

    def second_config(self) -> PeftConfig:
        return self._config(SECOND)

    def base_copy(self) -> nn.Module:
        return copy.deepcopy(self.base)

    def peft_model(self, randomize: bool = True) -> PeftModel:
        """The base model (a copy) with adapter "default" of the drawn config, randomized unless asked not."""
        peft_model = get_peft_model(self.base_copy(), self.config, adapter_name=FIRST)
        if randomize:
            self.randomize(peft_model, FIRST)
        return peft_model

    def randomize(self, peft_model: PeftModel, adapter_name: str) -> None:
        """Give the adapter drawn weight values, so the merge and save properties are not vacuous."""
        weight_seed = self.draw(st.integers(0, 2**16), label=f"weight seed of {adapter_name!r}")
        scales = self.suite.weight_scales
        scales = scales[self.case.dtype] if isinstance(scales, dict) else scales  # one tuple: every dtype
        scale = self.draw(st.sampled_from(scales), label=f"weight scale of {adapter_name!r}")
        self.suite.randomize_adapter(
            peft_model, adapter_name, torch.Generator().manual_seed(weight_seed), scale
        )

    def forward(self, model: nn.Module) -> torch.Tensor:
        with torch.no_grad():
            return main_output(model(**self.inputs)).detach()

    # --- checking ----------------------------------------------------------------------------------
    def fail(self, what: str, prop: str | None = None) -> None:
        prop = prop or self.prop
        raise ConformanceError(
            f"{self.suite.method}: property {prop!r} ({PROPERTIES.get(prop, prop)}) does not hold\n"
            f"  case: {self.case}, inputs {tuple(self.inputs['input_ids'].shape)}\n"
            f"  config: {_config_summary(self.config)}\n"
            f"  {what}"
        )

    def check(self, condition: bool, what: str) -> None:
        if not condition:
            self.fail(what)

    def tolerance(self, comparison: str) -> Tolerance:
        return self.suite.tolerance(comparison, self.case.dtype)

    def same(self, actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
        """Bitwise equal."""
        problem = difference(actual, expected, Tolerance.exact())
        if problem:
            self.fail(f"{what}: {problem}")

    def close(
        self,
        actual: torch.Tensor,
        expected: torch.Tensor,
        comparison: str,
        what: str,
        scale: float | None = None,
    ):
        """Within the suite's tolerance for ``comparison`` ("merge", "unmerge", "identity") and the dtype."""
        tolerance = self.tolerance(comparison)
        problem = difference(actual, expected, tolerance, scale)
        if problem:
            self.fail(f"{what}: {problem} [tolerance {comparison!r} for {self.case.dtype}]")

    def require_effect(self, adapted: torch.Tensor) -> None:
        """Discard a float32 draw whose adapter moves the outputs by less than 100x the merge tolerance:
        merging it wrongly would not show. (Low precision cannot promise that; float32 draws can.)"""
        if self.case.dtype != "float32" or tuple(adapted.shape) != tuple(self.base_out.shape):
            return
        tolerance = self.tolerance("merge")
        allowed = tolerance.atol + tolerance.rtol * self.base_out.double().abs().max().item()
        assume(max_abs_diff(adapted, self.base_out) > 100 * allowed)

    def differs(self, actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
        if tuple(actual.shape) == tuple(expected.shape) and torch.equal(actual, expected):
            self.fail(f"{what}: the outputs are bitwise equal to the base model's")


# --- what the properties inspect -----------------------------------------------------------------
def adapter_parameters(peft_model: PeftModel, adapter_name: str) -> dict[int, tuple[str, nn.Parameter]]:
    """The adapter's parameters by id: its tensors in every adapter layer, its prompt module's, and what
    its method declares as trainable beyond them (``peftkit_trainable_parameters``: biases, ...)."""
    out: dict[int, tuple[str, nn.Parameter]] = {}
    for path, layer in peft_model.adapter_layers():
        for local, param in layer.adapter_parameters(adapter_name):
            out.setdefault(id(param), (f"{path}.{local}", param))
    if adapter_name in peft_model.prompt_modules:
        for local, param in peft_model.prompt_modules[adapter_name].named_parameters():
            out.setdefault(id(param), (f"prompt_modules.{adapter_name}.{local}", param))
    config = peft_model.peft_config[adapter_name]
    for name, param in plugins.trainable_parameters(peft_model, config, adapter_name):
        out.setdefault(id(param), (name, param))
    return out


def layer_adapter_parameter_ids(peft_model: PeftModel) -> set[int]:
    """Ids of every adapter's tensors in the adapter layers (of every adapter name)."""
    ids = set()
    for _, layer in peft_model.adapter_layers():
        for name in list(peft_model.peft_config):
            ids.update(id(param) for _, param in layer.adapter_parameters(name))
    return ids


def base_tensors(peft_model: PeftModel) -> list[tuple[str, torch.Tensor]]:
    """The base model's own parameters and buffers, adapter tensors left out."""
    skip = layer_adapter_parameter_ids(peft_model)
    model = peft_model.base_model.model
    tensors = [(name, p) for name, p in model.named_parameters() if id(p) not in skip]
    adapter_buffers = {
        id(buffer)
        for _, layer in peft_model.adapter_layers()
        for container in layer.adapter_tensor_names
        for buffer in getattr(layer, container).buffers()
    }
    tensors += [(name, b) for name, b in model.named_buffers() if id(b) not in adapter_buffers]
    return tensors


class ConformanceSuite:
    """Subclass in a test file to run every conformance property against one method.

    Set ``method`` (the name the plugin registers) and implement :meth:`make_config`. Everything else
    has a default you may override:

    ``model_kinds``
        architectures to draw from (keys of :data:`peftkit.testing.MODEL_KINDS`): ``"llama"``
        (nn.Linear), ``"gpt2"`` (transformers' Conv1D), ``"bert"`` (SEQ_CLS head), ``"plain"`` (a
        plain nn.Module with Embedding, Conv1d and Linear layers).
    ``dtypes``
        float dtypes to draw from; those a device cannot run are left out there.
    ``identity_at_init``
        True when a fresh adapter leaves outputs unchanged (LoRA, IA3); False for methods that change
        them from the start (prompt tuning): the kit then checks that outputs do change.
    ``tolerances``
        ``{comparison: {dtype: Tolerance}}``, see :data:`peftkit.testing.DEFAULT_TOLERANCES` (the
        comparisons: "identity", "merge", "unmerge", and "autocast", keyed by the autocast dtype). Override
        per entry: ``tolerances = {**ConformanceSuite.tolerances, "merge": {..., "bfloat16": Tolerance(...)}}``.
    ``weight_scales``
        ``{dtype: stds}`` (or one tuple for every dtype): the standard deviations the kit draws from when it fills an adapter with
        random values. In float32 they are large, so that a wrong merge shows far above rounding (the
        merge properties also discard float32 draws whose adapter barely moves the outputs); in
        bfloat16 and float16 they give deltas of the size trained adapters have (transformers
        initialise base weights with std 0.02): far larger ones make low-precision merges
        legitimately lose more than the default tolerances allow.
    ``max_examples``
        examples per property, replacing the hypothesis profile's count (None: the profile's).
    ``compile_backend``, ``compile_examples``
        the ``torch.compile`` backend of the compile property (``"aot_eager"``: dynamo and AOT autograd
        trace the forward and backward graphs, as for inductor, without generating code) and its
        examples at most (each compiles twice).

    Whether the method can merge and whether several of its adapters can be active at once are read
    from its :class:`peftkit.MethodSpec` (``mergeable``, ``supports_multiple_active``).

    Every property is a test method ``test_<property>`` taking the ``device`` fixture (``cpu``;
    ``cuda``, skipped without a GPU). Choose devices with ``--peftkit-device``, the hypothesis
    profile with ``--peftkit-profile`` (``peftkit-ci`` by default: 5 examples per property, the
    same draws on every run) and the count with ``--peftkit-examples``.
    """

    method: ClassVar[str] = ""
    model_kinds: ClassVar[tuple[str, ...]] = ("llama", "gpt2")
    dtypes: ClassVar[tuple[str, ...]] = ("float32", "bfloat16", "float16")
    identity_at_init: ClassVar[bool] = True
    tolerances: ClassVar[dict[str, dict[str, Tolerance]]] = DEFAULT_TOLERANCES
    weight_scales: ClassVar[dict[str, tuple[float, ...]]] = {
        "float32": (0.03, 0.1, 0.3),
        "bfloat16": (0.01, 0.03, 0.1),
        "float16": (0.01, 0.03, 0.1),
    }
    max_examples: ClassVar[int | None] = None
    compile_backend: ClassVar[str] = "aot_eager"
    compile_examples: ClassVar[int] = 3

    # --- what a method provides ----------------------------------------------------------------------
    def make_config(self, draw: Callable[..., Any], case: ModelCase) -> PeftConfig:
        """A config of this method that fits the drawn model ``case``, at the method's default init.

        ``draw(strategy, label=None)`` draws a value from a hypothesis strategy (label it: failures
        print each draw under its label). ``case`` says which layers the model has
        (``case.linear_targets``, ``case.embedding_targets``, ``case.conv_targets``) and its
        ``task_type``. Leave the adapter at its identity init (if the method has one): the kit fills
        in random weights itself where a property needs them.
        """
        raise NotImplementedError(f"{type(self).__name__} must implement make_config(draw, case)")

    def second_config(self, draw: Callable[..., Any], case: ModelCase) -> PeftConfig:
        """The config of the second adapter in the multi-adapter and save properties (default: another draw)."""
        return self.make_config(draw, case)

    def randomize_adapter(
        self, peft_model: PeftModel, adapter_name: str, generator: torch.Generator, scale: float
    ) -> None:
        """Fill the adapter's tensors with random values (normal, std ``scale``).

        Covers the tensors in its adapter layers and the parameters its method declares trainable,
        except the base model's own (a trained bias stays as it is). Override for methods whose
        tensors must keep a structure (positive scales, orthogonal blocks).
        """
        base_owned = {id(p) for p in peft_model.base_model.model.parameters()} - layer_adapter_parameter_ids(
            peft_model
        )
        with torch.no_grad():
            for _, param in adapter_parameters(peft_model, adapter_name).values():
                if id(param) in base_owned or not param.is_floating_point():
                    continue
                values = torch.randn(param.shape, generator=generator, dtype=torch.float32) * scale
                param.copy_(values.to(device=param.device, dtype=param.dtype))

    def expected_saved_tensors(self, peft_model: PeftModel, adapter_name: str) -> dict[str, torch.Tensor]:
        """The tensors the adapter's saved file must hold, by any name (default: :func:`adapter_parameters`).

        Override for methods that save something other than their trainable tensors (a frozen random
        projection, a precomputed prompt).
        """
        return {name: param for name, param in adapter_parameters(peft_model, adapter_name).values()}

    def build_model(self, case: ModelCase) -> nn.Module:
        return build_model(case)

    def make_inputs(self, case: ModelCase, batch: int, length: int, seed: int) -> dict[str, Any]:
        return make_inputs(case, batch, length, seed)

    def loss(self, output: Any) -> torch.Tensor:
        """The loss of the training-step property: the mean square of the main output."""
        return main_output(output).float().square().mean()

    def tolerance(self, comparison: str, dtype: str) -> Tolerance:
        return self.tolerances[comparison][dtype]

    # --- plumbing ------------------------------------------------------------------------------------
    @property
    def spec(self) -> MethodSpec:
        return plugins.method_named(self.method)

    def plugin_packages(self) -> tuple[str, ...]:
        """Top-level packages whose classes must not stay in an unloaded model."""
        packages = {"peftkit", self.spec.config_class.__module__.split(".")[0]}
        return tuple(sorted(packages))

    @pytest.fixture(params=DEVICES)
    def device(self, request: pytest.FixtureRequest) -> str:
        """The device a property runs on: ``cpu`` always, ``cuda`` where torch sees a GPU."""
        if request.param == "cuda" and not torch.cuda.is_available():
            pytest.skip("CUDA is not available: the kit's cuda cases run only on a machine with a GPU")
        return request.param

    @pytest.fixture
    def peftkit_settings(self, request: pytest.FixtureRequest) -> Settings:
        """The hypothesis settings chosen by ``--peftkit-profile`` and ``--peftkit-examples``."""
        profile = request.config.getoption("peftkit_profile", default=None)
        examples = request.config.getoption("peftkit_examples", default=None)
        if examples is None:
            examples = self.max_examples
        return profiles.chosen_settings(profile, examples)

    def run_property(
        self,
        prop: str,
        check: Callable[[Example], None],
        device: str,
        settings: Settings,
        model_dtypes: tuple[str, ...] | None = None,
    ) -> None:
        """Run ``check`` on examples drawn by hypothesis under ``settings`` (models in ``model_dtypes``,
        by default the suite's ``dtypes``)."""
        if not self.method:
            raise ConformanceError(f"{type(self).__name__} sets no 'method': name the method under test")
        suite = self

        def run(data: Any) -> None:
            check(Example(suite, prop, data.draw, device, model_dtypes))

        run.__name__ = prop
        run.__qualname__ = f"{type(self).__qualname__}.test_{prop}[{device}]"
        test = Settings(settings)(given(data=st.data())(run))
        if settings.derandomize:  # a fixed seed per suite and property: same draws every run
            test = seed(zlib.crc32(f"{self.method}:{type(self).__qualname__}:{prop}:{device}".encode()))(test)
        test()

    # --- the properties ------------------------------------------------------------------------------
    @conformance
    def test_registered(self) -> None:
        """The method is registered, and its spec names a peftkit config class."""
        if not self.method:
            raise ConformanceError(f"{type(self).__name__} sets no 'method': name the method under test")
        spec = self.spec
        if spec.name != self.method or not issubclass(spec.config_class, PeftConfig):
            raise ConformanceError(
                f"{self.method}: the registered spec {spec!r} does not describe a peftkit method"
            )

    @conformance
    def test_identity_at_init(self, device: str, peftkit_settings: Settings) -> None:
        prop = "identity_at_init" if self.identity_at_init else "changes_at_init"
        self.run_property(prop, self.check_identity_at_init, device, peftkit_settings)

    def check_identity_at_init(self, ex: Example) -> None:
        spec = plugins.method_for_config(ex.config)
        ex.check(
            spec.name == self.method, f"make_config returned a {spec.name} config, not a {self.method} one"
        )
        peft_model = ex.peft_model(randomize=False)
        out = ex.forward(peft_model)
        if not self.identity_at_init:
            ex.differs(out, ex.base_out, "a fresh adapter")
            return
        ex.close(out, ex.base_out, "identity", "outputs with a fresh adapter against the base model's")
        if ex.case.dtype == "float32":
            # otherwise the kit's other properties would pass without the adapter doing anything
            ex.randomize(peft_model, FIRST)
            ex.differs(ex.forward(peft_model), ex.base_out, "an adapter with random weights (it should act)")

    @conformance
    def test_merge(self, device: str, peftkit_settings: Settings) -> None:
        prop = "merge" if self.spec.mergeable else "merge_not_supported"
        self.run_property(prop, self.check_merge, device, peftkit_settings)

    def check_merge(self, ex: Example) -> None:
        peft_model = ex.peft_model()
        unmerged = ex.forward(peft_model)
        if self.spec.mergeable:
            ex.require_effect(unmerged)
        if not self.spec.mergeable:
            self._expect_merge_refused(ex, peft_model, lambda: peft_model.merge_adapter(), "merge_adapter()")
            ex.same(ex.forward(peft_model), unmerged, "outputs after a refused merge against before it")
            return
        peft_model.merge_adapter()
        merged = ex.forward(peft_model)
        ex.close(merged, unmerged, "merge", "merged outputs against unmerged outputs")
        for path, layer in peft_model.adapter_layers():
            if isinstance(
                layer, ModulesToSaveWrapper
            ):  # a trained copy of a whole module: nothing to fold in
                continue
            if layer.holds(FIRST) and FIRST not in layer.merged_adapters:
                ex.fail(
                    f"after merge_adapter(), layer {path} holds adapter {FIRST!r} but does not list it as merged"
                )
        peft_model.merge_adapter()
        ex.same(ex.forward(peft_model), merged, "outputs after merging an already merged adapter again")

    def _expect_merge_refused(
        self, ex: Example, peft_model: PeftModel, call: Callable[[], Any], what: str
    ) -> None:
        try:
            call()
        except MergeNotSupportedError as exc:
            ex.check(
                self.method in str(exc),
                f"{what} raised MergeNotSupportedError without naming the method: {exc}",
            )
            return
        ex.fail(f"{what} did not raise MergeNotSupportedError, though the spec says mergeable=False")

    @conformance
    def test_unmerge(self, device: str, peftkit_settings: Settings) -> None:
        self.run_property("unmerge", self.check_unmerge, device, peftkit_settings)

    def check_unmerge(self, ex: Example) -> None:
        peft_model = ex.peft_model()
        unmerged = ex.forward(peft_model)
        if self.spec.mergeable:
            ex.require_effect(unmerged)
        before = snapshot(base_tensors(peft_model))
        merged_scale = {}
        if self.spec.mergeable:
            peft_model.merge_adapter()
            merged_scale = {
                name: t.detach().double().abs().max().item() if t.numel() else 0.0 for name, t, _ in before
            }
        peft_model.unmerge_adapter()
        for path, layer in peft_model.adapter_layers():
            ex.check(
                not layer.merged_adapters,
                f"after unmerge_adapter(), layer {path} still lists {layer.merged_adapters} merged",
            )
        for name, tensor, old in before:
            if not self.spec.mergeable:
                ex.same(tensor, old, f"base tensor {name} after unmerge_adapter() with nothing merged")
                continue
            scale = max(old.double().abs().max().item() if old.numel() else 0.0, merged_scale[name])
            ex.close(tensor, old, "unmerge", f"base tensor {name} after merge then unmerge", scale=scale)
        ex.close(ex.forward(peft_model), unmerged, "merge", "outputs after merge then unmerge against before")

    @conformance
    def test_merge_and_unload(self, device: str, peftkit_settings: Settings) -> None:
        prop = "merge_and_unload" if self.spec.mergeable else "merge_not_supported"
        self.run_property(prop, self.check_merge_and_unload, device, peftkit_settings)

    def check_merge_and_unload(self, ex: Example) -> None:
        peft_model = ex.peft_model()
        unmerged = ex.forward(peft_model)
        if self.spec.mergeable:
            ex.require_effect(unmerged)
        if not self.spec.mergeable:
            self._expect_merge_refused(ex, peft_model, peft_model.merge_and_unload, "merge_and_unload()")
            ex.same(
                ex.forward(peft_model), unmerged, "outputs after a refused merge_and_unload against before it"
            )
            return
        model = peft_model.merge_and_unload()
        self._check_clean(ex, model, "merge_and_unload()")
        ex.close(
            ex.forward(model), unmerged, "merge", "outputs of the merged and unloaded model against unmerged"
        )

    def _check_clean(self, ex: Example, model: nn.Module, what: str) -> None:
        problems = leftovers(model, self.plugin_packages(), ex.hooks_before, ex.base_types)
        if problems:
            ex.fail(
                f"{what} left peftkit behind: "
                + "; ".join(problems[:5])
                + (" ..." if len(problems) > 5 else "")
            )
        keys = list(model.state_dict().keys())
        if keys != ex.base_keys:
            extra = sorted(set(keys) - set(ex.base_keys))[:3]
            missing = sorted(set(ex.base_keys) - set(keys))[:3]
            ex.fail(
                f"{what} gave a model whose state_dict keys differ from the base model's: extra {extra}, missing {missing}"
            )

    @conformance
    def test_unload(self, device: str, peftkit_settings: Settings) -> None:
        self.run_property("unload", self.check_unload, device, peftkit_settings)

    def check_unload(self, ex: Example) -> None:
        peft_model = ex.peft_model()
        # As in PEFT, unload drops the adapters but keeps the trained copies of modules_to_save (task heads).
        expected_model, kept = ex.base_copy(), []
        for path, layer in peft_model.adapter_layers():
            if isinstance(layer, ModulesToSaveWrapper) and layer.active_adapters:
                expected_model.set_submodule(
                    path, copy.deepcopy(layer.modules_to_save[layer.active_adapters[0]])
                )
                kept.append(path)
        expected = ex.forward(expected_model) if kept else ex.base_out
        model = peft_model.unload()
        self._check_clean(ex, model, "unload()")
        with_heads = f" with the trained copies of {kept}" if kept else ""
        ex.same(
            ex.forward(model), expected, f"outputs of the unloaded model against the base model's{with_heads}"
        )

    @conformance
    def test_save_load(self, device: str, peftkit_settings: Settings) -> None:
        self.run_property("save_load", self.check_save_load, device, peftkit_settings)

    def check_save_load(self, ex: Example) -> None:
        peft_model = ex.peft_model()
        peft_model.add_adapter(SECOND, ex.second_config())
        ex.randomize(peft_model, SECOND)
        out_first = ex.forward(peft_model)
        peft_model.set_adapter(SECOND)
        out_second = ex.forward(peft_model)
        peft_model.set_adapter(FIRST)
        with tempfile.TemporaryDirectory(prefix="peftkit-conformance-") as tmp:
            peft_model.save_pretrained(tmp)
            for name, folder in ((FIRST, Path(tmp)), (SECOND, Path(tmp, SECOND))):
                self._check_saved_folder(ex, peft_model, name, folder)
            loaded = PeftModel.from_pretrained(ex.base_copy(), tmp)
            ex.same(
                ex.forward(loaded),
                out_first,
                f"outputs after loading adapter {FIRST!r} against before saving",
            )
            trainable = [name for name, p in loaded.named_parameters() if p.requires_grad]
            ex.check(
                not trainable,
                f"from_pretrained without is_trainable left parameters trainable: {trainable[:3]}",
            )
            loaded.load_adapter(Path(tmp, SECOND), SECOND)
            ex.same(ex.forward(loaded), out_first, f"outputs after load_adapter({SECOND!r}) (not activated)")
            loaded.set_adapter(SECOND)
            ex.same(
                ex.forward(loaded),
                out_second,
                f"outputs after loading adapter {SECOND!r} against before saving",
            )

    def _check_saved_folder(self, ex: Example, peft_model: PeftModel, name: str, folder: Path) -> None:
        if not (folder / CONFIG_NAME).is_file() or not (folder / serialization.WEIGHTS_NAME).is_file():
            ex.fail(
                f"adapter {name!r} was saved without {CONFIG_NAME} or {serialization.WEIGHTS_NAME} in {folder}"
            )
        peft_type = read_config_dict(folder).get("peft_type")
        ex.check(
            peft_type == self.spec.peft_type,
            f"adapter {name!r} saved peft_type {peft_type!r}, not {self.spec.peft_type!r}",
        )
        saved = serialization.read_tensors(folder)
        expected = {key: t.detach().cpu() for key, t in self.expected_saved_tensors(peft_model, name).items()}
        where = f"the file of adapter {name!r}"
        for key in saved:
            if name in key.split("."):
                ex.fail(f"{where} keys its tensor {key!r} with the adapter name (PEFT's keys leave it out)")
        # pair each adapter tensor with a saved tensor of equal value: then nothing else can be in the file
        unmatched = dict(saved)
        for key, tensor in expected.items():
            match = next(
                (
                    k
                    for k, t in unmatched.items()
                    if t.shape == tensor.shape and torch.equal(t.to(tensor.dtype), tensor)
                ),
                None,
            )
            if match is None:
                ex.fail(f"{where} holds no tensor equal to the adapter's {key} {tuple(tensor.shape)}")
            del unmatched[match]
        if unmatched:
            base = {
                base_name: tensor.detach().cpu()
                for base_name, tensor in base_tensors(peft_model)
                if tensor.is_floating_point()
            }
            described = []
            for key, t in sorted(unmatched.items())[:4]:
                copy_of = next((n for n, b in base.items() if b.shape == t.shape and torch.equal(b, t)), None)
                described.append(f"{key!r}" + (f" (a copy of the base model's {copy_of})" if copy_of else ""))
            ex.fail(
                f"{where} holds {len(saved)} tensors but the adapter has {len(expected)}; not the adapter's: "
                + ", ".join(described)
            )

    @conformance
    def test_training_step(self, device: str, peftkit_settings: Settings) -> None:
        self.run_property("training_step", self.check_training_step, device, peftkit_settings)

    def check_training_step(self, ex: Example) -> None:
        peft_model = ex.peft_model()
        expected = adapter_parameters(peft_model, FIRST)
        trainable = {id(p): name for name, p in peft_model.named_parameters() if p.requires_grad}
        extra = sorted(name for pid, name in trainable.items() if pid not in expected)
        frozen = sorted(name for pid, (name, _) in expected.items() if pid not in trainable)
        ex.check(
            not extra, f"parameters that are neither the adapter's nor declared are trainable: {extra[:5]}"
        )
        ex.check(not frozen, f"adapter parameters are not trainable: {frozen[:5]}")
        count = sum(p.numel() for _, p in expected.values())
        reported = peft_model.get_nb_trainable_parameters()[0]
        ex.check(
            reported == count,
            f"get_nb_trainable_parameters() says {reported} trainable, the adapter has {count}",
        )
        before = snapshot(list(peft_model.named_parameters()))
        peft_model.train()
        optimizer = torch.optim.Adam([p for _, p in expected.values()], lr=1e-2)
        loss = self.loss(peft_model(**ex.inputs))
        ex.check(bool(torch.isfinite(loss)), f"the loss is not finite: {loss.item()}")
        loss.backward()
        optimizer.step()
        changed = []
        for name, param, old in before:
            now_equal = torch.equal(param.detach(), old)
            if id(param) in expected:
                changed += [] if now_equal else [name]
            elif not now_equal:
                ex.fail(
                    f"the training step changed {name}, which is neither the adapter's nor declared trainable"
                )
            elif param.grad is not None:
                ex.fail(f"the training step computed a gradient for frozen {name}")
        ex.check(
            bool(changed), "the training step changed no adapter parameter (no gradient reaches the adapter)"
        )

    @conformance
    def test_autocast_training_step(self, device: str, peftkit_settings: Settings) -> None:
        if not autocast_dtypes(device):
            pytest.skip(f"torch.autocast runs neither bfloat16 nor float16 on {device} here")
        self.run_property(
            "autocast_training_step",
            self.check_autocast_training_step,
            device,
            peftkit_settings,
            model_dtypes=("float32",),
        )

    def check_autocast_training_step(self, ex: Example) -> None:
        """A float32 model (as mixed precision trains one) takes the same step in float32 and under
        ``torch.autocast``, from the same random state, so dropout drops the same elements in both (on
        the CPU; on other devices the two are compared in eval mode, see below)."""
        amp = ex.draw(st.sampled_from(autocast_dtypes(ex.device)), label="autocast dtype")
        peft_model = ex.peft_model()
        peft_model.train()
        params = adapter_parameters(peft_model, FIRST)
        step_seed = ex.draw(st.integers(0, 2**16), label="step seed")
        if ex.device != "cpu":
            # The CPU's dropout drops the same elements from one random state whatever the dtype; CUDA's
            # draws its mask per dtype (a plain tiny BERT's gradient is 26 % off float32's under either
            # autocast dtype, 0.4 % without dropout). There the train-mode step under autocast must run
            # and give a finite loss, and the comparison runs in eval mode, where nothing drops.
            where = f"under torch.autocast({ex.device!r}, dtype=torch.{amp}) in train mode"
            try:
                train_loss, _ = self._loss_and_grads(ex, peft_model, params, step_seed, DTYPES[amp])
            except Exception as exc:
                ex.fail(f"the training step {where} raised {type(exc).__name__}: {exc}")
            ex.check(bool(torch.isfinite(train_loss)), f"the loss {where} is not finite: {train_loss.item()}")
            peft_model.eval()
        loss, grads = self._loss_and_grads(ex, peft_model, params, step_seed, None)
        # float16 training scales the loss up first (torch.amp.GradScaler), else small gradients
        # underflow float16's range: the largest power of two up to 2^16 whose gradients stay finite
        scale = 2.0**16 if amp == "float16" else 1.0
        where = f"under torch.autocast({ex.device!r}, dtype=torch.{amp})"
        while True:
            try:
                amp_loss, amp_grads = self._loss_and_grads(
                    ex, peft_model, params, step_seed, DTYPES[amp], scale
                )
            except Exception as exc:  # the property is that it runs: say so, with the error
                ex.fail(f"the training step {where} raised {type(exc).__name__}: {exc}")
            if scale <= 1 or all(torch.isfinite(grad).all() for grad in amp_grads.values()):
                break
            scale /= 2
        note(f"loss scale under autocast: {scale:g}")
        tolerance = self.tolerance("autocast", amp)
        ex.check(bool(torch.isfinite(amp_loss)), f"the loss {where} is not finite: {amp_loss.item()}")
        problem = norm_difference(amp_loss, loss, tolerance)
        if problem:
            ex.fail(f"the loss {where} against float32's: {problem} [tolerance 'autocast' for {amp}]")
        # A tensor whose gradient cancels toward zero (a key projection's bias: softmax ignores a shift)
        # rounds by the magnitudes that cancelled: it is held to its share of the whole adapter's
        # gradient, ‖G‖ · √(its elements / all elements), where that is more than its own norm.
        whole = math.sqrt(sum(grad.double().norm().item() ** 2 for grad in grads.values()))
        elements = sum(grad.numel() for grad in grads.values())
        for pid, (name, param) in params.items():
            if pid not in grads:
                continue  # the float32 step gives it no gradient either (an adapter the inputs never reach)
            grad = amp_grads.get(pid)
            if grad is None:
                ex.fail(f"no gradient reached {name} {where}, though one does in float32")
            ex.check(
                grad.dtype == param.dtype,
                f"the gradient of {name} {where} is {grad.dtype}, not its parameter's {param.dtype}",
            )
            problem = norm_difference(grad, grads[pid], tolerance, whole * math.sqrt(grad.numel() / elements))
            if problem:
                ex.fail(
                    f"the gradient of {name} {where} against float32's: {problem} [tolerance 'autocast' for {amp}]"
                )

    def _loss_and_grads(
        self,
        ex: Example,
        peft_model: PeftModel,
        params: dict[int, tuple[str, nn.Parameter]],
        seed: int,
        amp: torch.dtype | None,
        loss_scale: float = 1.0,
    ) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
        """The loss and the adapter's gradients (by parameter id) of one step from RNG state ``seed``."""
        for _, param in params.values():
            param.grad = None
        torch.manual_seed(seed)
        with torch.autocast(ex.device, dtype=amp) if amp is not None else contextlib.nullcontext():
            loss = self.loss(peft_model(**ex.inputs))
        (loss * loss_scale).backward()
        grads = {
            pid: param.grad.detach() / loss_scale
            for pid, (_, param) in params.items()
            if param.grad is not None
        }
        return loss.detach().float(), grads

    @conformance
    @compile_property
    def test_compiles(self, device: str, peftkit_settings: Settings) -> None:
        examples = min(peftkit_settings.max_examples, self.compile_examples)
        self.run_property(
            "compiles", self.check_compiles, device, Settings(peftkit_settings, max_examples=examples)
        )

    def check_compiles(self, ex: Example) -> None:
        """``torch.compile(fullgraph=True)`` of a training step (forward and loss; backward through the
        compiled graph) and of an inference forward: a graph break fails with dynamo's reason, and so
        does a recompile on the second call of each (``error_on_recompile``)."""
        peft_model = ex.peft_model()
        params = [param for _, param in adapter_parameters(peft_model, FIRST).values()]
        optimizer = torch.optim.SGD(params, lr=1e-3)

        def step(inputs: dict[str, Any]) -> torch.Tensor:
            return self.loss(peft_model(**inputs))

        torch._dynamo.reset()
        compiled = torch.compile(step, backend=self.compile_backend, fullgraph=True)
        for mode, calls in (("training step", 2), ("inference forward", 2)):
            peft_model.train(mode == "training step")
            for call in range(calls):
                try:
                    with torch._dynamo.config.patch(error_on_recompile=call > 0):
                        if mode == "training step":
                            compiled(ex.inputs).backward()
                            optimizer.step()  # parameters change in place: no guard may depend on them
                            optimizer.zero_grad()
                        else:
                            with torch.no_grad():
                                compiled(ex.inputs)
                except Exception as exc:
                    what = "compiling" if call == 0 else "running again (a recompile)"
                    reason = str(exc).strip().split("\n")
                    ex.fail(
                        f"a compiled {mode} failed {what}: {type(exc).__name__}: {' | '.join(reason[:6])}"
                    )
        torch._dynamo.reset()

    @conformance
    def test_disable_adapter(self, device: str, peftkit_settings: Settings) -> None:
        self.run_property("disable_adapter", self.check_disable_adapter, device, peftkit_settings)

    def check_disable_adapter(self, ex: Example) -> None:
        peft_model = ex.peft_model()
        out = ex.forward(peft_model)
        with peft_model.disable_adapter():
            ex.same(
                ex.forward(peft_model),
                ex.base_out,
                "outputs inside disable_adapter() against the base model's",
            )
        ex.same(ex.forward(peft_model), out, "outputs after leaving disable_adapter() against before it")

    @conformance
    def test_multiple_adapters(self, device: str, peftkit_settings: Settings) -> None:
        self.run_property("multiple_adapters", self.check_multiple_adapters, device, peftkit_settings)

    def check_multiple_adapters(self, ex: Example) -> None:
        peft_model = ex.peft_model()
        out_first = ex.forward(peft_model)
        first_tensors = snapshot([(name, p) for name, p in adapter_parameters(peft_model, FIRST).values()])

        def first_untouched(after: str) -> None:
            for name, tensor, old in first_tensors:
                ex.same(tensor.detach(), old, f"adapter {FIRST!r}'s tensor {name} after {after}")
            self._check_layer_bookkeeping(ex, peft_model)

        second_config = ex.second_config()
        peft_model.add_adapter(SECOND, second_config)
        ex.randomize(peft_model, SECOND)
        first_untouched(f"add_adapter({SECOND!r})")
        ex.same(ex.forward(peft_model), out_first, f"outputs of {FIRST!r} after add_adapter({SECOND!r})")
        peft_model.set_adapter(SECOND)
        out_second = ex.forward(peft_model)
        peft_model.set_adapter(FIRST)
        ex.same(
            ex.forward(peft_model), out_first, f"outputs of {FIRST!r} after switching to {SECOND!r} and back"
        )
        peft_model.set_adapter(SECOND)
        ex.same(
            ex.forward(peft_model), out_second, f"outputs of {SECOND!r} after switching to {FIRST!r} and back"
        )
        peft_model.set_adapter(FIRST)
        if self.spec.supports_multiple_active:
            peft_model.set_adapter([FIRST, SECOND])
            ex.forward(peft_model)
            peft_model.set_adapter(FIRST)
            ex.same(ex.forward(peft_model), out_first, f"outputs of {FIRST!r} after both were active")
        else:
            try:
                peft_model.set_adapter([FIRST, SECOND])
            except ConfigError:
                pass
            else:
                ex.fail(
                    "set_adapter of two adapters succeeded though the spec says supports_multiple_active=False"
                )
            ex.same(
                ex.forward(peft_model), out_first, f"outputs of {FIRST!r} after a refused set_adapter of both"
            )
        peft_model.delete_adapter(SECOND)
        first_untouched(f"delete_adapter({SECOND!r})")
        self._check_gone(ex, peft_model, SECOND)
        ex.same(ex.forward(peft_model), out_first, f"outputs of {FIRST!r} after delete_adapter({SECOND!r})")
        # the other way round: deleting the active first adapter leaves the second one working
        peft_model.add_adapter(SECOND, second_config)
        ex.randomize(peft_model, SECOND)
        peft_model.set_adapter(SECOND)
        out_second = ex.forward(peft_model)
        peft_model.set_adapter(FIRST)
        peft_model.delete_adapter(FIRST)
        self._check_gone(ex, peft_model, FIRST)
        active = peft_model.active_adapters
        ex.check(
            active == [SECOND],
            f"after deleting the active adapter {FIRST!r}, {active} is active, not [{SECOND!r}]",
        )
        ex.same(ex.forward(peft_model), out_second, f"outputs of {SECOND!r} after delete_adapter({FIRST!r})")

    def _check_layer_bookkeeping(self, ex: Example, peft_model: PeftModel) -> None:
        for path, layer in peft_model.adapter_layers():
            for name in peft_model.peft_config:
                if layer.holds(name) != (name in layer.adapter_names):
                    ex.fail(
                        f"layer {path} holds({name!r}) is {layer.holds(name)} but its adapter_names are {layer.adapter_names}"
                    )

    def _check_gone(self, ex: Example, peft_model: PeftModel, name: str) -> None:
        ex.check(name not in peft_model.peft_config, f"delete_adapter({name!r}) left its config")
        for path, layer in peft_model.adapter_layers():
            ex.check(not layer.holds(name), f"delete_adapter({name!r}) left it in layer {path}")
        for key in list(peft_model.state_dict()):
            ex.check(name not in key.split("."), f"delete_adapter({name!r}) left the tensor {key}")
