"""peftkit-bottleneck against AdapterHub's adapters 1.3 itself: the same adapter weights give the same outputs,
read from AdapterHub's save_adapter folders and written for its load_adapter.

Needs adapters 1.3, which needs transformers 4.57: the transformers 4 stage runs this file, the first stage
leaves it out (dev.sh's ADAPTERHUB_TESTS).
"""

from __future__ import annotations

import adapters
import pytest
import torch
from adapters import DoubleSeqBnConfig, ParBnConfig, SeqBnConfig
from peftkit import PeftModel, get_peft_model
from peftkit.testing.models import randomize_trainable, tiny_bert, tiny_gpt2, tiny_llama
from peftkit_bottleneck import BottleneckConfig

IDS = torch.randint(1, 128, (2, 7), generator=torch.Generator().manual_seed(0))
TOLERANCE = 1e-5  # relative to the largest output
# the AdapterHub preset of each peftkit-bottleneck style
PRESETS = {"houlsby": DoubleSeqBnConfig, "pfeiffer": SeqBnConfig, "parallel": ParBnConfig}
CASES = [
    (tiny_bert, "houlsby"),
    (tiny_bert, "pfeiffer"),
    (tiny_bert, "parallel"),
    (tiny_llama, "houlsby"),
    (tiny_llama, "pfeiffer"),
    (tiny_llama, "parallel"),
    (tiny_gpt2, "pfeiffer"),
    (tiny_gpt2, "parallel"),
]
ids = [f"{build.__name__}-{style}" for build, style in CASES]


def twin(model):
    """A second model with the same weights, built as the first and given its state."""
    other = type(model)(model.config).eval()
    other.load_state_dict(model.state_dict())
    return other


def outputs(model):
    with torch.no_grad():
        return model(input_ids=IDS).logits


def relative_difference(ours, theirs):
    return ((ours - theirs).abs().max() / theirs.abs().max()).item()


def adapterhub_model(base, style, weights=None):
    """``base`` with AdapterHub's adapter "task" of ``style``: given ``weights`` or random ones, active."""
    adapters.init(base)
    base.add_adapter("task", config=PRESETS[style](reduction_factor=4))
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, parameter in base.named_parameters():
            if ".adapters.task." in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.3)
    base.set_active_adapters("task")
    return base.eval()


@pytest.mark.parametrize(("build", "style"), CASES, ids=ids)
def test_an_adapterhub_folder_loads_with_adapterhubs_outputs(build, style, tmp_path):
    base = build()
    reference_model = adapterhub_model(twin(base), style)
    reference_model.save_adapter(str(tmp_path), "task")
    plain = outputs(base)

    model = PeftModel.from_pretrained(base, tmp_path)

    assert model.peft_config["default"].style == style
    reference = outputs(reference_model)
    assert relative_difference(plain, reference) > 0.1, "the adapter should change the outputs"
    assert relative_difference(outputs(model), reference) < TOLERANCE


@pytest.mark.parametrize(("build", "style"), CASES, ids=ids)
def test_a_peftkit_adapter_saved_for_adapterhub_loads_there_with_the_same_outputs(build, style, tmp_path):
    base = build()
    theirs = twin(base)
    plain = outputs(base)
    model = get_peft_model(base, BottleneckConfig(style=style, reduction_factor=4))
    randomize_trainable(model, scale=0.3)
    model.save_pretrained(tmp_path, format="adapterhub")

    adapters.init(theirs)
    name = theirs.load_adapter(str(tmp_path), set_active=True)

    assert name == "default"
    ours = outputs(model)
    assert relative_difference(plain, ours) > 0.1, "the adapter should change the outputs"
    assert relative_difference(ours, outputs(theirs.eval())) < TOLERANCE


def test_a_decoder_parallel_adapter_reading_the_block_input_is_not_written_for_adapterhub(tmp_path):
    model = get_peft_model(tiny_llama(), BottleneckConfig(style="parallel", parallel_input="block_input"))
    with pytest.raises(
        Exception, match="AdapterHub's parallel adapters on model_type 'llama' read the residual"
    ):
        model.save_pretrained(tmp_path, format="adapterhub")
