"""TRL's trainers with peftkit models: ready-made classes, and the mixin that makes them.

TRL tells a PEFT model from a plain one with accelerate's ``is_peft_model``, an ``isinstance`` check on
PEFT's own ``PeftModel``. A peftkit model fails it, so TRL treats it as a plain model. Per place:

- checkpoints: ``Trainer._save`` writes the whole model; :class:`PeftkitTrainerMixin` writes the adapter
  and resumes from it (see :mod:`peftkit.integrations.transformers`);
- the fused LM head: TRL patches the forward of the model it trains so that ``fused_lm_head=True`` runs
  the backbone (``model.base_model``) and scores the labels through ``lm_head.weight`` in tiles. It must
  patch the *base* model, as it does for PEFT's models: on a peftkit ``PeftModel``, ``base_model`` is the
  wrapper around the whole causal LM, whose output has no ``last_hidden_state``. The mixin moves the patch,
  with the arguments TRL gave it, onto ``model.get_base_model()``;
- an adapter on ``lm_head`` would never train there (the head's weight is read directly), which TRL
  refuses for PEFT's layers; the mixin refuses peftkit's;
- ``peft_config=``: TRL's trainers take PEFT's configs only; the mixin takes peftkit's, and applies
  :func:`peftkit.get_peft_model` before TRL sees the model, as TRL applies PEFT's;
- gradient checkpointing: TRL calls ``enable_input_require_grads`` on PEFT models, so that the frozen
  embeddings' output carries gradients into the checkpointed blocks; the mixin does it for peftkit's;
- the model card: names peftkit, the adapter's methods and the base model, and is tagged ``library_name:
  peft`` as PEFT tags the cards of adapters (the files are in PEFT's format).

``class MyTrainer(PeftkitTRLMixin, trl.SomeTrainer)`` puts all of this into any TRL trainer;
:class:`SFTTrainer` is the ready-made one for supervised fine-tuning.

DPO and GRPO compare the model with a frozen reference. For PEFT's models TRL keeps no reference model:
it runs the model itself with its adapters disabled (or with a frozen copy of a given adapter); for any
other model it loads a second copy of the base model. Those two modules ask ``is_peft_model`` at
construction and at every step, so importing this module points their ``is_peft_model`` at
:func:`is_peft_model` here, which answers True for peftkit models too (and as before for the rest), and
TRL's own classes take the PEFT route for them. :class:`DPOTrainer` and :class:`GRPOTrainer` add what the
mixin adds (see :class:`PeftkitReferenceMixin`).
"""

from __future__ import annotations

import inspect
import os
from importlib.metadata import PackageNotFoundError, version
from typing import Any

import trl
from accelerate.utils import extract_model_from_parallel
from accelerate.utils import is_peft_model as is_peft_library_model
from huggingface_hub import ModelCard
from transformers import TrainingArguments, set_seed
from trl.trainer import dpo_trainer as trl_dpo_trainer
from trl.trainer import grpo_trainer as trl_grpo_trainer
from trl.trainer.utils import add_fused_lm_head, create_model_from_path

from peftkit import plugins
from peftkit.adapter_layer import AdapterLayer
from peftkit.config import PeftConfig
from peftkit.integrations.transformers import PeftkitTrainerMixin
from peftkit.model import PeftModel, get_peft_model

__all__ = [
    "DPOTrainer",
    "GRPOTrainer",
    "PeftkitReferenceMixin",
    "PeftkitTRLMixin",
    "SFTTrainer",
    "is_peft_model",
    "move_fused_lm_head_to_base_model",
]


def _from_peft_library(value: Any) -> bool:
    return type(value).__module__.split(".")[0] == "peft"


def _fused_forward_arguments(model: Any) -> dict[str, Any] | None:
    """The arguments ``add_fused_lm_head`` was called with, if it patched ``model`` itself; else None."""
    patched = model.__dict__.get("forward")
    function = getattr(patched, "__func__", None)
    code = getattr(function, "__code__", None)
    # functools.wraps gave the patch the name of the forward it replaced: only its code tells it apart
    if code is None or code.co_filename != add_fused_lm_head.__code__.co_filename:
        return None
    captured = dict(zip(code.co_freevars, (cell.cell_contents for cell in function.__closure__ or ())))
    names = [name for name in inspect.signature(add_fused_lm_head).parameters if name != "model"]
    missing = [name for name in names if name not in captured]
    if missing:
        raise RuntimeError(
            f"cannot read the arguments {missing} of the fused LM head that TRL {trl.__version__} put on this "
            "peftkit model; peftkit.integrations.trl supports the TRL versions pinned in constraints.txt"
        )
    return {name: captured[name] for name in names}


def move_fused_lm_head_to_base_model(model: PeftModel) -> bool:
    """Move TRL's fused LM head from a peftkit model's forward to its base model's; True if there was one.

    TRL calls ``add_fused_lm_head(model)`` on any model that is not PEFT's; for a peftkit model it must be
    ``add_fused_lm_head(model.get_base_model())``, with the same arguments.
    """
    arguments = _fused_forward_arguments(model)
    if arguments is None:
        return False
    del model.forward  # the instance attribute TRL set; the class's forward shows again
    head = model.get_output_embeddings()
    if isinstance(head, AdapterLayer):
        raise ValueError(
            f"this peftkit model has an adapter on its LM head ({type(head).__name__}); TRL computes the "
            "log-probabilities from the head's weight directly, so the adapter would be ignored (LoRA and "
            "other methods) or missing (modules_to_save). Leave the LM head out of target_modules and "
            "modules_to_save (target_modules='all-linear' already leaves it out)."
        )
    add_fused_lm_head(model.get_base_model(), **arguments)
    return True


def _adapter_methods(model: PeftModel) -> list[str]:
    return sorted({plugins.method_for_config(config).name for config in model.peft_config.values()})


def _distribution_versions(model: PeftModel) -> list[tuple[str, str]]:
    names = ["peftkit"]
    for config in model.peft_config.values():
        distribution = plugins.method_for_config(config).distribution
        if distribution and distribution not in names:
            names.append(distribution)
    found = []
    for name in names:
        try:
            found.append((name, version(name)))
        except PackageNotFoundError:
            continue
    return found


class PeftkitTRLMixin(PeftkitTrainerMixin):
    """A TRL trainer that trains peftkit models as it trains PEFT's: put it before the TRL class in the bases.

    Takes the TRL trainer's arguments; ``peft_config`` is a peftkit config (``peftkit.LoraConfig``, ...).
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        arguments = self._trl_arguments(args, kwargs)
        peft_config = arguments.pop("peft_config", None)
        if peft_config is not None:
            arguments["model"] = self._apply_peft_config(arguments, peft_config)
        super().__init__(**arguments)
        model = self._peftkit_model()
        if model is None:
            return
        move_fused_lm_head_to_base_model(model)
        if self.args.gradient_checkpointing and not input_require_grads_enabled(model):
            model.enable_input_require_grads()

    def _trl_trainer_class(self) -> type:
        return next(cls for cls in type(self).__mro__ if cls.__module__.split(".")[0] == "trl")

    def _trl_arguments(self, args: tuple, kwargs: dict[str, Any]) -> dict[str, Any]:
        """The call's arguments by name, as the TRL trainer's ``__init__`` names them."""
        signature = inspect.signature(self._trl_trainer_class().__init__)
        bound = signature.bind(self, *args, **kwargs)
        arguments = {}
        for name, value in list(bound.arguments.items())[1:]:
            if signature.parameters[name].kind is inspect.Parameter.VAR_KEYWORD:
                arguments.update(value)
            else:
                arguments[name] = value
        return arguments

    def _apply_peft_config(self, arguments: dict[str, Any], peft_config: Any) -> PeftModel:
        trainer = type(self).__name__
        if _from_peft_library(peft_config):
            raise TypeError(
                f"{trainer} takes a peftkit config for peft_config, got {type(peft_config).__name__} from the "
                f"peft library. Import it from peftkit instead (from peftkit import "
                f"{type(peft_config).__name__}), with the same arguments; or train with "
                f"trl.{self._trl_trainer_class().__name__}, which takes PEFT's configs."
            )
        if not isinstance(peft_config, PeftConfig):
            raise TypeError(
                f"{trainer}'s peft_config must be a peftkit config such as peftkit.LoraConfig, "
                f"got {type(peft_config).__name__}"
            )
        model = arguments["model"]
        if isinstance(model, PeftModel) or _from_peft_library(model):
            raise ValueError(
                f"{trainer} got a model that already has adapters together with peft_config. Pass either that "
                "model without peft_config, to train its adapters, or its base model with peft_config, to "
                "train a new adapter."
            )
        training_args = arguments.get("args")
        if isinstance(model, str):
            model = self._load_model(model, training_args, arguments)
        # the adapter's init draws random numbers: seed it as the run is seeded, as TRL does for PEFT
        set_seed(training_args.seed if training_args is not None else TrainingArguments.seed)
        return get_peft_model(model, peft_config)

    @staticmethod
    def _load_model(model_id: str, training_args: Any, arguments: dict[str, Any]) -> Any:
        """Load ``model_id`` as the TRL trainer would (``model_init_kwargs``, ``quantization_config``)."""
        settings = dict(getattr(training_args, "model_init_kwargs", None) or {})
        quantization_config = arguments.pop("quantization_config", None)
        if quantization_config is not None:
            if "quantization_config" in settings:
                raise ValueError(
                    "quantization_config is set both as a trainer argument and in args.model_init_kwargs; "
                    "set it in one place"
                )
            settings["quantization_config"] = quantization_config
        if training_args is not None:
            settings.setdefault("trust_remote_code", training_args.trust_remote_code)
        if getattr(training_args, "model_init_kwargs", None) is not None:
            training_args.model_init_kwargs = None  # used here; TRL would warn that they go unused
        return create_model_from_path(model_id, **settings)

    def create_model_card(
        self,
        model_name: str | None = None,
        dataset_name: str | None = None,
        tags: str | list[str] | None = None,
    ) -> None:
        """TRL's model card, for an adapter trained with peftkit: its methods, base model and how to load it."""
        model = self._peftkit_model()
        if model is None:
            return super().create_model_card(model_name, dataset_name, tags)
        methods = _adapter_methods(model)
        tags = [tags] if isinstance(tags, str) else list(tags or [])
        super().create_model_card(model_name, dataset_name, [*tags, "peftkit", *methods])
        if not self.is_world_process_zero():
            return None
        path = os.path.join(self.args.output_dir, "README.md")
        card = ModelCard.load(path)
        card.data.library_name = "peft"  # the Hub's loader for PEFT-format adapter folders
        base = model.get_base_model()
        base_id = base.config._name_or_path  # a Hub id, a local folder, or "" for a model built in memory
        if card.data.base_model is None:  # TRL links no base model that is a local folder, or unnamed
            named = f"`{base_id or type(base).__name__}`"
            card.text = card.text.replace("[None](https://huggingface.co/None)", named)
        folder = self.hub_model_id or model_name or "path/to/adapter"
        card.text = card.text.replace('model="None"', f'model="{folder}"')  # TRL's quick start, no hub id
        card.text = _with_adapter_section(card.text, methods, base_id, type(base).__name__, folder)
        versions = "".join(f"- {name}: {found}\n" for name, found in _distribution_versions(model))
        card.text = card.text.replace(
            "### Framework versions\n\n", f"### Framework versions\n\n{versions}", 1
        )
        card.save(path)
        return None


def _with_adapter_section(text: str, methods: list[str], base_id: str, base_class: str, folder: str) -> str:
    section = (
        "## Adapter\n\n"
        f"This is a peftkit adapter ({', '.join(methods)}) for `{base_id or base_class}`: "
        "`adapter_config.json` and `adapter_model.safetensors` in PEFT's format, without the base model's "
        "weights. Load it onto the base model with peftkit (or with PEFT):\n\n"
        "```python\n"
        "from peftkit import PeftModel\n"
        "from transformers import AutoModelForCausalLM\n\n"
        f'base = AutoModelForCausalLM.from_pretrained("{base_id or "path/to/base-model"}")\n'
        f'model = PeftModel.from_pretrained(base, "{folder}")\n'
        "```\n\n"
    )
    marker = "## Quick start"
    return text.replace(marker, section + marker, 1) if marker in text else text + "\n" + section


class SFTTrainer(PeftkitTRLMixin, trl.SFTTrainer):
    """``trl.SFTTrainer`` for peftkit models: adapter-only checkpoints, peftkit's ``peft_config``."""


# --- preference and online-RL trainers: the reference is the model itself ------------------------------


def is_peft_model(model: Any) -> bool:
    """accelerate's ``is_peft_model``, which TRL asks, answering True for peftkit models as for PEFT's."""
    return is_peft_library_model(model) or isinstance(extract_model_from_parallel(model), PeftModel)


# DPO and GRPO look this name up in their modules at construction and at every step (see the module's
# docstring): peftkit models take their PEFT route, with no second copy of the base model
for _module in (trl_dpo_trainer, trl_grpo_trainer):
    _module.is_peft_model = is_peft_model


def input_require_grads_enabled(model: PeftModel) -> bool:
    """Whether ``enable_input_require_grads`` ran on the base model already (TRL runs it for PEFT models)."""
    base = model.get_base_model()
    return bool(getattr(base, "_require_grads_hooks", None) or getattr(base, "_require_grads_hook", None))


REFERENCE_ADAPTER = "ref"  # the name TRL gives the frozen copy of an adapter it was given already trained


class PeftkitReferenceMixin(PeftkitTRLMixin):
    """For TRL trainers that compare the model with a frozen reference (DPO, GRPO with ``beta > 0``).

    With ``ref_model=None`` the reference is the same model: no second copy of the base model is loaded.
    With ``peft_config`` (a new adapter) the reference is the model with its adapters disabled, that is the
    base model. Given a peftkit model whose adapter "default" may be trained already (a model after SFT),
    TRL's rule for PEFT models holds: a frozen copy of that adapter, named "ref", is the reference.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        arguments = self._trl_arguments(args, kwargs)
        model = arguments.get("model")
        new_adapter = arguments.get("peft_config") is not None
        if isinstance(model, PeftModel) and not new_adapter and self._copies_adapter_as_reference(arguments):
            self._check_reference_adapter(model)
        super().__init__(**arguments)
        model = self._peftkit_model()
        if model is None:
            return
        if new_adapter and REFERENCE_ADAPTER in model.peft_config:
            # TRL copied the adapter made from peft_config as "ref"; a new adapter computes as the base model,
            # which is the model with its adapters disabled: the copy would only cost memory
            model.delete_adapter(REFERENCE_ADAPTER)
        head = model.get_output_embeddings()
        if isinstance(head, AdapterLayer):
            raise ValueError(
                f"{type(self).__name__} computes log-probabilities from the LM head's weight directly, so an "
                f"adapter on the LM head ({type(head).__name__}) would never train. Leave the LM head out of "
                "target_modules and modules_to_save ('all-linear' leaves it out)."
            )

    def _copies_adapter_as_reference(self, arguments: dict[str, Any]) -> bool:
        """Whether TRL will keep a copy of the given model's adapter "default" as the reference."""
        raise NotImplementedError

    def _check_reference_adapter(self, model: PeftModel) -> None:
        trainer = type(self).__name__
        if "default" not in model.peft_config:
            raise ValueError(
                f"{trainer} keeps a frozen copy of the adapter named 'default' as the reference, and this model's "
                f"adapters are {sorted(model.peft_config)}. Name the adapter to train 'default' "
                "(get_peft_model(base, config, adapter_name='default')), or pass ref_model=."
            )
        if REFERENCE_ADAPTER in model.peft_config:
            raise ValueError(
                f"{trainer} adds an adapter named {REFERENCE_ADAPTER!r} (a frozen copy of 'default', the "
                f"reference), and this model has one already. Delete it (model.delete_adapter("
                f"{REFERENCE_ADAPTER!r})) or rename it before training."
            )


class DPOTrainer(PeftkitReferenceMixin, trl.DPOTrainer):
    """``trl.DPOTrainer`` for peftkit models: the model itself is the reference, adapter-only checkpoints."""

    def _copies_adapter_as_reference(self, arguments: dict[str, Any]) -> bool:
        return arguments.get("ref_model") is None


class GRPOTrainer(PeftkitReferenceMixin, trl.GRPOTrainer):
    """``trl.GRPOTrainer`` for peftkit models: with ``beta > 0`` the model itself is the reference."""

    def _copies_adapter_as_reference(self, arguments: dict[str, Any]) -> bool:
        args = arguments.get("args")
        return (args.beta if args is not None else trl.GRPOConfig.beta) != 0.0
