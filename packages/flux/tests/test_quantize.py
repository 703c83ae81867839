"""FLUX.1 with a 4-bit DiT (`from_pretrained(..., quantize={"dit": ...})`, runtime's `quant.py`): its Linears are
stored in NF4 and the image is exactly the one of plain layers holding the rounded weights. Integration: it needs
the runtime's `quant` extra (bitsandbytes), which the integration session installs."""

from __future__ import annotations

import numpy as np
import pytest
from torch import nn

from diffsynth.flux.pipeline import FluxImagePipeline
from diffsynth.runtime.quant import QuantizeConfig, is_quantized_linear

pytestmark = pytest.mark.integration
FAST = {"height": 32, "width": 32, "num_inference_steps": 2, "progress_bar": False, "seed": 0}


def test_a_4bit_dit_draws_what_plain_layers_with_the_rounded_weights_draw(tiny_repo):
    pytest.importorskip("bitsandbytes")
    quantized = FluxImagePipeline.from_pretrained(
        str(tiny_repo), torch_dtype="float32", device="cpu", quantize={"dit": "bitsandbytes_nf4"}
    )
    linears = [m for m in quantized.dit.modules() if isinstance(m, nn.Linear)]
    assert linears and all(is_quantized_linear(m) for m in linears)
    rounded = FluxImagePipeline.from_pretrained(
        str(tiny_repo),
        torch_dtype="float32",
        device="cpu",
        quantize={"dit": QuantizeConfig(method="bitsandbytes_nf4", mode="dequant_once")},
    )
    image = np.asarray(quantized("a red circle", **FAST), dtype=np.int16)
    assert np.array_equal(image, np.asarray(rounded("a red circle", **FAST), dtype=np.int16))
