"""``PeftModel.forward`` as other libraries read it: the base model's parameters, plus ``adapter_names``.

``PeftModel.forward`` takes ``*args, **kwargs`` and hands them on to the base model. Libraries decide what
to pass a model by reading ``inspect.signature(model.forward)``: transformers' ``Trainer`` keeps only the
dataset columns it names, and passes loss arguments (``num_items_in_batch``) only if it has ``**kwargs``.
So, read on a model, ``forward`` is a :class:`BoundForward`, whose signature is the base model's forward
signature with ``adapter_names`` added, computed when asked: it follows the base model if that changes.

Read on the class (transformers' ``find_labels(type(model))`` does), ``forward`` is the plain function,
whose signature names ``labels`` as PEFT's task models do: a class cannot know its instances' base models.
"""

from __future__ import annotations

import inspect
import types
import weakref
from collections.abc import Callable
from typing import Any

ADAPTER_NAMES = inspect.Parameter(
    "adapter_names", inspect.Parameter.KEYWORD_ONLY, default=None, annotation="list[str] | None"
)
TASK_IDS = inspect.Parameter("task_ids", inspect.Parameter.KEYWORD_ONLY, default=None)
LABELS = inspect.Parameter("labels", inspect.Parameter.KEYWORD_ONLY, default=None)
SELF = inspect.Parameter("self", inspect.Parameter.POSITIONAL_ONLY)


def _insert_before_var_keyword(
    signature: inspect.Signature, parameter: inspect.Parameter
) -> inspect.Signature:
    if parameter.name in signature.parameters:
        return signature
    parameters = list(signature.parameters.values())
    end = next((i for i, p in enumerate(parameters) if p.kind is p.VAR_KEYWORD), len(parameters))
    return signature.replace(parameters=[*parameters[:end], parameter, *parameters[end:]])


def with_adapter_names(signature: inspect.Signature) -> inspect.Signature:
    """``signature`` with the keyword-only ``adapter_names`` and ``task_ids`` (for a ``MultiTask``
    composition) added, before any ``**kwargs``."""
    return _insert_before_var_keyword(_insert_before_var_keyword(signature, ADAPTER_NAMES), TASK_IDS)


def model_signature(model: Any) -> inspect.Signature | None:
    """The base model's forward signature plus ``adapter_names``; None where it cannot be read."""
    try:
        return with_adapter_names(inspect.signature(model.get_base_model().forward))
    except (TypeError, ValueError):
        return None


class BoundForward:
    """``model.forward``: calls the function on the model, and is signed like the model's base model.

    Like a bound method it has ``__self__`` and ``__func__``, which accelerate's mixed precision rebinds
    with autocast around it. It is not one, because torch.compile must be able to build it while tracing.
    """

    __slots__ = ("function", "__self__")

    def __init__(self, function: Callable[..., Any], model: Any) -> None:
        self.function = function
        self.__self__ = model

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.function(self.__self__, *args, **kwargs)

    @property
    def __signature__(self) -> inspect.Signature:
        signature = model_signature(self.__self__)
        return signature if signature is not None else inspect.signature(self.function.__get__(self.__self__))

    @property
    def __name__(self) -> str:
        return self.function.__name__

    @property
    def __func__(self) -> types.FunctionType:
        """A copy of the function, signed (through ``__wrapped__``) like this model's base model plus self."""
        original = self.function
        copy = types.FunctionType(
            original.__code__,
            original.__globals__,
            original.__name__,
            original.__defaults__,
            original.__closure__,
        )
        copy.__kwdefaults__ = original.__kwdefaults__
        copy.__qualname__ = original.__qualname__
        copy.__module__ = original.__module__
        copy.__doc__ = original.__doc__
        copy.__wrapped__ = UnboundForward(original, self.__self__)
        return copy

    # Both read the slots with defaults: torch.compile (torch 2.11) hashes the object it builds while
    # tracing before the slots are set, as its attributes live in dynamo's side effects until then.
    def __eq__(self, other: object) -> bool:
        return (
            isinstance(other, BoundForward)
            and getattr(other, "function", None) is getattr(self, "function", None)
            and getattr(other, "__self__", None) is getattr(self, "__self__", None)
        )

    def __hash__(self) -> int:
        return hash((getattr(self, "function", None), id(getattr(self, "__self__", None))))

    def __repr__(self) -> str:
        return f"<bound method {self.function.__qualname__} of {type(self.__self__).__name__}>"


class UnboundForward:
    """The function, called with the model first, and signed like ``model``'s base model plus ``self``.

    It holds ``model`` weakly: wrappers that keep it may outlive the model, or be copied with it.
    """

    __slots__ = ("function", "model")

    def __init__(self, function: Callable[..., Any], model: Any) -> None:
        self.function = function
        self.model = weakref.ref(model)

    def __call__(self, model: Any, *args: Any, **kwargs: Any) -> Any:
        return self.function(model, *args, **kwargs)

    @property
    def __signature__(self) -> inspect.Signature:
        model = self.model()
        signature = model_signature(model) if model is not None else None
        if signature is None:
            return inspect.signature(self.function)
        return signature.replace(parameters=[SELF, *signature.parameters.values()])


class forward_with_base_signature:  # noqa: N801 (a decorator, spelled like property)
    """Decorate a model class's ``forward`` so that it reads as this module's docstring describes."""

    def __init__(self, function: Callable[..., Any]) -> None:
        function.__signature__ = _insert_before_var_keyword(inspect.signature(function), LABELS)
        self.function = function
        self.__doc__ = function.__doc__

    def __get__(self, model: Any, owner: type | None = None) -> Any:
        if model is None:
            return self.function
        return BoundForward(self.function, model)
