"""LoraConfig: PEFT's LoRA fields, names, defaults and meaning."""

from __future__ import annotations

import dataclasses
import re
import warnings
from dataclasses import dataclass, field
from typing import Any, ClassVar

from peftkit.config import (
    PeftConfig,
    check_choice,
    check_layer_selection,
    check_positive_int,
    check_probability,
    check_str_list,
    fail,
)

INIT_CHOICES = (True, False, "gaussian", "pissa", "olora", "loftq", "eva", "corda")  # and "pissa_niter_<N>"
PISSA_NITER = re.compile(r"pissa_niter_(\d+)")  # PiSSA by a fast SVD of N subspace iterations
BIAS_CHOICES = ("none", "all", "lora_only")


@dataclass
class LoftQConfig:
    """LoftQ's settings (``init_lora_weights="loftq"``): quantize to ``loftq_bits`` (4: NF4, 8: int8) and
    alternate quantizing and fitting the rank-r adapter to the residual ``loftq_iter`` times."""

    loftq_bits: int = 4
    loftq_iter: int = 1

    def __post_init__(self) -> None:
        check_choice(self, "loftq_bits", (4, 8))
        check_positive_int(self, "loftq_iter")


@dataclass
class EvaConfig:
    """EVA's settings (``init_lora_weights="eva"``, then :func:`peftkit_lora.initialize_lora_eva_weights`).

    Each targeted layer computes up to ``round(r · rho)`` principal directions of its inputs; the layers'
    ranks, summing to the total of their ``r``, go to the directions that explain the most variance. A
    direction has converged when its cosine similarity to the previous batch's is at least ``tau``.
    ``use_label_mask``: tokens whose label is ``label_mask_value`` are left out. ``whiten``: A's rows are
    divided by the square root of their singular values. ``adjust_scaling_factors``: a layer whose rank
    changed gets ``lora_alpha · new rank / r``, so its scale ``alpha / r`` stays as configured.
    """

    rho: float = 2.0
    tau: float = 0.99
    use_label_mask: bool = True
    label_mask_value: int = -100
    whiten: bool = False
    adjust_scaling_factors: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.rho, bool) or not isinstance(self.rho, (int, float)) or self.rho < 1.0:
            raise fail(self, "rho", self.rho, "a number >= 1.0 (the most a layer's rank may grow: r · rho)")
        if isinstance(self.tau, bool) or not isinstance(self.tau, (int, float)) or not 0.0 <= self.tau <= 1.0:
            raise fail(self, "tau", self.tau, "a cosine similarity in [0, 1]")
        for name in ("use_label_mask", "whiten", "adjust_scaling_factors"):
            if not isinstance(getattr(self, name), bool):
                raise fail(self, name, getattr(self, name), "True or False")
        if isinstance(self.label_mask_value, bool) or not isinstance(self.label_mask_value, int):
            raise fail(self, "label_mask_value", self.label_mask_value, "an integer label (PEFT's -100)")


@dataclass
class CordaConfig:
    """CorDA's settings (``init_lora_weights="corda"``, then :func:`peftkit.initialize_from_data`).

    ``corda_method``: ``"ipm"`` starts the adapter from the top components of ``W·C`` (C: the covariance
    of the layer's inputs on the data), ``"kpm"`` from the bottom ones. ``cache_file`` keeps the chosen
    components and ``covariance_file`` the covariances (read instead of the data when they exist).
    ``use_float16_for_covariance``: the covariance is summed in the inputs' own dtype, not float32.
    ``verbose``: a progress bar over the layers' decompositions. ``prune_temporary_fields``: PEFT's; peftkit
    keeps nothing temporary on the layers, so it changes nothing.
    """

    cache_file: str | None = None
    covariance_file: str | None = None
    corda_method: str = "ipm"
    verbose: bool = False
    use_float16_for_covariance: bool = False
    prune_temporary_fields: bool = True

    def __post_init__(self) -> None:
        check_choice(self, "corda_method", ("ipm", "kpm"))
        for name in ("cache_file", "covariance_file"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value):
                raise fail(self, name, value, "None or a file path (a non-empty string)")
        for name in ("verbose", "use_float16_for_covariance", "prune_temporary_fields"):
            if not isinstance(getattr(self, name), bool):
                raise fail(self, name, getattr(self, name), "True or False")


@dataclass
class LoraConfig(PeftConfig):
    """LoRA: adds ``scaling · B A`` to each targeted layer, ``scaling = lora_alpha / r`` (``/ sqrt(r)`` with rsLoRA).

    ``target_modules``: names or name suffixes, a regex matched against the full module path, or
    ``"all-linear"``; None picks PEFT's default for known architectures. ``rank_pattern`` and
    ``alpha_pattern`` map regexes (matched on the end of the module path) to per-module values.
    """

    method: ClassVar[str] = "lora"
    peft_only_fields: ClassVar[dict[str, Any]] = {
        "use_qalora": False,
        "lora_ga_config": None,
        "velora_config": None,
        "alora_invocation_tokens": None,
        "monteclora_config": None,
        "megatron_config": None,
        "layer_replication": None,
        "use_bdlora": None,
        "arrow_config": None,
        "kasa_config": None,
        # PEFT fields that change nothing unless one of the above is set
        "megatron_core": "megatron.core",
        "qalora_group_size": 16,
        "ensure_weight_tying": False,
        "runtime_config": None,
    }

    peft_type: str = "LORA"
    r: int = 8
    target_modules: list[str] | str | None = None
    exclude_modules: list[str] | str | None = None
    lora_alpha: int | float = 8
    lora_dropout: float = 0.0
    fan_in_fan_out: bool = False
    bias: str = "none"
    use_rslora: bool = False
    init_lora_weights: bool | str = True
    layers_to_transform: list[int] | int | None = None
    layers_pattern: list[str] | str | None = None
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    use_dora: bool = False
    lora_bias: bool = False
    # parameters (not modules) to adapt, by full name or name suffix: the fused 3-D expert tensors of
    # mixture-of-experts models (peftkit_lora.parameter)
    target_parameters: list[str] | None = None
    # LoftQ's settings as a dict, as PEFT stores them ({} unless init_lora_weights="loftq")
    loftq_config: LoftQConfig | dict = field(default_factory=dict)
    # EVA's settings (init_lora_weights="eva"); saved as a dict, as PEFT saves them
    eva_config: EvaConfig | dict | None = None
    # CorDA's settings (init_lora_weights="corda"); saved as a dict, as PEFT saves them
    corda_config: CordaConfig | dict | None = None
    # rows of embeddings that train beside the adapter (peftkit_lora.tokens): a list for the input
    # embedding, or {embedding name: rows}
    trainable_token_indices: list[int] | dict[str, list[int]] | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        check_positive_int(self, "r")
        if (
            isinstance(self.lora_alpha, bool)
            or not isinstance(self.lora_alpha, (int, float))
            or self.lora_alpha <= 0
        ):
            raise fail(self, "lora_alpha", self.lora_alpha, "a positive number")
        check_probability(self, "lora_dropout")
        check_choice(self, "bias", BIAS_CHOICES)
        self._check_init()
        if self.lora_bias is not False:
            raise fail(self, "lora_bias", self.lora_bias, "False: peftkit-lora does not implement lora_bias")
        for name in ("use_rslora", "fan_in_fan_out", "use_dora"):
            if not isinstance(getattr(self, name), bool):
                raise fail(self, name, getattr(self, name), "True or False")
        check_str_list(self, "target_modules", allow_str=True)
        check_str_list(self, "exclude_modules", allow_str=True)
        check_layer_selection(self)
        self._check_patterns()
        self._check_target_parameters()
        self._check_loftq()
        self._check_eva()
        self._check_corda()
        self._check_trainable_token_indices()

    def _check_init(self) -> None:
        init = self.init_lora_weights
        valid = (isinstance(init, bool) or isinstance(init, str)) and (
            init in INIT_CHOICES or isinstance(init, str) and PISSA_NITER.fullmatch(init) is not None
        )
        if not valid or init == "pissa_niter_0":
            raise fail(
                self,
                "init_lora_weights",
                init,
                "True, False, 'gaussian', 'pissa', 'pissa_niter_<N>' (N >= 1 iterations), 'olora', 'loftq', 'eva' or 'corda'",
            )

    def _check_patterns(self) -> None:
        for key, value in self.rank_pattern.items():
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise fail(
                    self, "rank_pattern", {key: value}, "a dict of module regex to positive integer rank"
                )
        for key, value in self.alpha_pattern.items():
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
                raise fail(self, "alpha_pattern", {key: value}, "a dict of module regex to positive alpha")

    def _check_target_parameters(self) -> None:
        """A list of parameter names; LoRA on a parameter never sees the layer's input, so what acts on the
        input (dropout, DoRA's norm of the weight, fan_in_fan_out, lora_bias) is refused, as PEFT refuses it."""
        value = self.target_parameters
        if value is None:
            return
        if isinstance(value, str) or not isinstance(value, (list, tuple, set, frozenset)):
            raise fail(
                self, "target_parameters", value, "a list of parameter names or None (no regex string)"
            )
        if not all(isinstance(name, str) and name for name in value):
            raise fail(self, "target_parameters", value, "a list of parameter names (non-empty strings)")
        self.target_parameters = sorted(value)  # as PEFT writes it
        if not self.target_parameters:
            return  # PEFT's "no parameters": nothing to refuse
        refused = {"lora_dropout": 0.0, "use_dora": False, "fan_in_fan_out": False}
        for name, allowed in refused.items():
            if getattr(self, name) != allowed:
                raise fail(
                    self,
                    name,
                    getattr(self, name),
                    f"{allowed} when target_parameters is set (LoRA on a parameter cannot apply it)",
                )

    def _check_trainable_token_indices(self) -> None:
        """PEFT's two forms: a list of token ids (the input embedding's rows) or {embedding name: token ids}."""
        value = self.trainable_token_indices
        if value is None:
            return
        expected = "a list of token ids, or a dict of embedding name to a list of token ids"
        rows_by_name = dict(value) if isinstance(value, dict) else {"": value}
        if not rows_by_name or not isinstance(value, (list, tuple, dict)):
            raise fail(self, "trainable_token_indices", value, expected)
        for name, rows in rows_by_name.items():
            if not isinstance(name, str) or (isinstance(value, dict) and not name):
                raise fail(self, "trainable_token_indices", value, expected + " (names: non-empty strings)")
            if isinstance(rows, tuple):
                rows = list(rows)
            if (
                not isinstance(rows, list)
                or not rows
                or not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in rows)
            ):
                raise fail(
                    self, "trainable_token_indices", value, expected + " (non-empty lists of ids >= 0)"
                )
            repeated = sorted({i for i in rows if rows.count(i) > 1})
            if repeated:
                raise fail(
                    self, "trainable_token_indices", value, f"lists that name each token once ({repeated} repeat)"
                )
            rows_by_name[name] = rows
        self.trainable_token_indices = rows_by_name if isinstance(value, dict) else rows_by_name[""]
        overlap = sorted(set(rows_by_name) & set(self.modules_to_save or []))
        if overlap:
            raise fail(
                self,
                "trainable_token_indices",
                value,
                f"no embedding that modules_to_save also names ({overlap[0]!r}): train it whole with "
                "modules_to_save, or only some of its rows with trainable_token_indices, not both",
            )

    def save_pretrained(self, directory) -> None:
        """A LoftQ adapter is saved as PEFT's LoftQ recipe saves it, with ``init_lora_weights=True``: its A
        and B are fitted to the Q that the saved base holds, and loading them onto that base (quantized,
        as it is meant to be) must not fit them again. A CorDA adapter likewise (as PEFT's CorDA
        preprocessing script saves it): it belongs to the residual base, which no config can rebuild
        without the data."""
        if self.init_lora_weights == "loftq":
            self.replace(init_lora_weights=True, loftq_config={}).save_pretrained(directory)
        elif self.init_lora_weights == "corda":  # A and B belong to the residual base saved beside them
            self.replace(init_lora_weights=True, corda_config=None).save_pretrained(directory)
        else:
            super().save_pretrained(directory)

    def _check_loftq(self) -> None:
        """PEFT's rule: "loftq" needs a loftq_config, kept as a plain dict; a loftq_config without it is ignored."""
        value = self.loftq_config
        if isinstance(value, LoftQConfig):
            value = dataclasses.asdict(value)
        elif isinstance(value, dict) and value:
            unknown = sorted(set(value) - {"loftq_bits", "loftq_iter"})
            if unknown:
                raise fail(
                    self, "loftq_config", value, "a LoftQConfig or a dict of loftq_bits and loftq_iter"
                )
            value = dataclasses.asdict(LoftQConfig(**value))
        elif not isinstance(value, dict):
            raise fail(self, "loftq_config", value, "a LoftQConfig, a dict of its fields, or {}")
        self.loftq_config = value
        if self.init_lora_weights == "loftq" and not value:
            raise fail(
                self,
                "loftq_config",
                value,
                "a LoftQConfig (e.g. LoftQConfig(loftq_bits=4)) with init_lora_weights='loftq'",
            )
        if value and self.init_lora_weights != "loftq":
            warnings.warn(
                "LoraConfig.loftq_config is ignored unless init_lora_weights='loftq'",
                UserWarning,
                stacklevel=3,
            )

    def _check_eva(self) -> None:
        """PEFT's rules: "eva" without an eva_config takes EvaConfig's defaults, an eva_config without "eva" is
        ignored (both with a warning); a dict becomes an EvaConfig. EVA reads a layer's inputs, which LoRA on
        a parameter never sees."""
        value = self.eva_config
        if isinstance(value, dict):
            unknown = sorted(set(value) - {f.name for f in dataclasses.fields(EvaConfig)})
            if unknown:
                raise fail(self, "eva_config", value, f"an EvaConfig or a dict of its fields (unknown: {unknown})")
            value = EvaConfig(**value)
        elif value is not None and not isinstance(value, EvaConfig):
            raise fail(self, "eva_config", value, "an EvaConfig, a dict of its fields, or None")
        if self.init_lora_weights == "eva":
            if value is None:
                warnings.warn(
                    "LoraConfig: init_lora_weights='eva' without an eva_config; using EvaConfig()'s defaults",
                    UserWarning,
                    stacklevel=3,
                )
                value = EvaConfig()
            if self.target_parameters:
                raise fail(
                    self,
                    "init_lora_weights",
                    "eva",
                    "anything but 'eva' with target_parameters (EVA reads a layer's inputs; LoRA on a parameter sees none)",
                )
        elif value is not None:
            warnings.warn(
                "LoraConfig.eva_config is ignored unless init_lora_weights='eva'", UserWarning, stacklevel=3
            )
        self.eva_config = value

    def _check_corda(self) -> None:
        """PEFT's rules, as for EVA: "corda" without a corda_config takes CordaConfig's defaults, a
        corda_config without "corda" is ignored (both with a warning); a dict becomes a CordaConfig."""
        value = self.corda_config
        if isinstance(value, dict):
            unknown = sorted(set(value) - {f.name for f in dataclasses.fields(CordaConfig)})
            if unknown:
                raise fail(
                    self, "corda_config", value, f"a CordaConfig or a dict of its fields (unknown: {unknown})"
                )
            value = CordaConfig(**value)
        elif value is not None and not isinstance(value, CordaConfig):
            raise fail(self, "corda_config", value, "a CordaConfig, a dict of its fields, or None")
        if self.init_lora_weights == "corda":
            if value is None:
                warnings.warn(
                    "LoraConfig: init_lora_weights='corda' without a corda_config; using CordaConfig()'s defaults",
                    UserWarning,
                    stacklevel=3,
                )
                value = CordaConfig()
            if self.target_parameters:
                raise fail(
                    self,
                    "init_lora_weights",
                    "corda",
                    "anything but 'corda' with target_parameters (CorDA reads a layer's inputs; LoRA on a parameter sees none)",
                )
        elif value is not None:
            warnings.warn(
                "LoraConfig.corda_config is ignored unless init_lora_weights='corda'",
                UserWarning,
                stacklevel=3,
            )
        self.corda_config = value

    def to_dict(self) -> dict[str, Any]:
        """As PEFT writes it: eva_config and corda_config as plain dicts."""
        out = super().to_dict()
        for name in ("eva_config", "corda_config"):
            if isinstance(getattr(self, name), (EvaConfig, CordaConfig)):
                out[name] = dataclasses.asdict(getattr(self, name))
        return out
