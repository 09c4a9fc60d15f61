"""A NaN or inf in the text conditioning or the final latents is an error naming the backend and precision,
never a NaN image (engine.backends.check_finite, called by the Runner once per generation for each). The
tiny model is poisoned with a NaN weight; the graph backends' case is in tests/test_graph_backends.py."""
from __future__ import annotations

import pytest
import torch

from engine import Runner
from engine.backends import NonFiniteError

ARGS = dict(num_inference_steps=2, height=64, width=64, seed=0, preprocess=False)


@pytest.mark.parametrize("poisoned, stage", [
    (lambda b: b.text_encoder.text_encoder.get_parameter("final_layer_norm.weight"),
     r"text conditioning \(encoder_hidden_states\)"),
    (lambda b: b.unet_model.unet.conv_in.weight, "final latents"),
], ids=["text_encoder", "unet"])
def test_nan_weight_is_an_error_naming_backend_and_precision(photo, poisoned, stage):
    runner = Runner(model="tiny", controlnet="canny", device="cpu")
    with torch.no_grad():
        poisoned(runner.backend).view(-1)[0] = float("nan")
    for output_type in ("pil", "latent"):
        with pytest.raises(NonFiniteError, match=rf"the torch backend \(fp32\) produced NaN or inf in the {stage}"):
            runner.generate("a photo", photo, output_type=output_type, **ARGS)

