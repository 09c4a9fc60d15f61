"""The browser demo: a Gradio Blocks UI with the knobs ControlNet's own demos expose.

It knows nothing about Ray: `build_demo(run, limits, size)` takes an async
`run(fields, image, init_image, mask_image)` that returns (control map, image, seed) and raises
`api.ApiError` for bad input; the app mounts the result on its FastAPI ingress at /demo, so the demo goes
through the same validation and batching as the API.

img2img and inpaint: an init image in a brush editor. With nothing drawn on it, it is img2img; strokes
drawn with the brush are the mask (inpaint: what is painted is repainted). "Denoising strength" is the
img2img/inpaint strength.
"""
from __future__ import annotations

from typing import Awaitable, Callable

from engine.serve import api


def init_and_mask(editor) -> tuple[object, object]:
    """(init image RGB | None, mask "L" | None) from a Gradio ImageMask value: its background is the init
    image, and every pixel a brush layer painted (alpha > 0) is white in the mask; no strokes, no mask."""
    import numpy as np
    import PIL.Image

    if not editor or editor.get("background") is None:
        return None, None
    background = editor["background"]
    init = background.convert("RGB")
    painted = np.zeros((init.height, init.width), dtype=bool)
    for layer in editor.get("layers") or []:
        alpha = np.asarray(layer.convert("RGBA"))[..., 3]
        if alpha.shape == painted.shape:
            painted |= alpha > 0
    if not painted.any():
        return init, None
    return init, PIL.Image.fromarray(painted.astype(np.uint8) * 255, mode="L")


def build_demo(run: Callable[..., Awaitable[tuple]], limits: api.Limits, size: int,
               loras: list[str] | None = None):
    """`loras`: the names of the server's --lora-dir, offered with a weight (none: no LoRA controls)."""
    import gradio as gr

    async def on_generate(image, prompt, negative, strength, guess, low, high, steps, guidance, seed,
                          start, end, side, editor=None, denoise=None, lora=None, lora_weight=1.0):
        init, mask = init_and_mask(editor)
        if image is None and mask is None:
            raise gr.Error("upload a control image first (or draw a mask on an init image to inpaint)")
        fields = dict(
            prompt=prompt, negative_prompt=negative or None, controlnet_conditioning_scale=float(strength),
            guess_mode=bool(guess), canny_low=int(low), canny_high=int(high), num_inference_steps=int(steps),
            guidance_scale=float(guidance), seed=int(seed) if seed is not None and seed >= 0 else None,
            control_guidance_start=float(start), control_guidance_end=float(end), height=int(side),
            width=int(side),
        )
        if init is not None:
            fields["strength"] = float(denoise)
        if lora:
            fields["loras"] = [[lora, float(lora_weight)]]
        try:
            control_map, result, used_seed = await run(fields, image, init, mask)
        except api.ApiError as err:
            raise gr.Error(f"{err.field}: {err.message}" if err.field else err.message) from None
        return control_map, result, used_seed

    with gr.Blocks(title="ControlNet engine") as demo:
        gr.Markdown("## SD1.5 + ControlNet\nUpload a picture; its canny edges steer the generation.")
        with gr.Row():
            with gr.Column():
                image = gr.Image(label="Control image", type="pil", elem_id="control-image")
                prompt = gr.Textbox(label="Prompt", elem_id="prompt")
                negative = gr.Textbox(label="Negative prompt", elem_id="negative-prompt")
                with gr.Accordion("img2img / inpaint", open=False):
                    editor = gr.ImageMask(label="Init image (brush strokes: the part to repaint)", type="pil",
                                          elem_id="init-image", brush=gr.Brush(colors=["#ffffff"], color_mode="fixed"))
                    denoise = gr.Slider(0.05, 1.0, value=0.75, step=0.05, label="Denoising strength",
                                        elem_id="denoising-strength")
                button = gr.Button("Generate", variant="primary", elem_id="generate")
                with gr.Accordion("Options", open=False):
                    strength = gr.Slider(0.0, 2.0, value=1.0, step=0.05, label="Control strength")
                    guess = gr.Checkbox(value=False, label="Guess mode")
                    low = gr.Slider(0, 255, value=100, step=1, label="Canny low threshold")
                    high = gr.Slider(0, 255, value=200, step=1, label="Canny high threshold")
                    steps = gr.Slider(1, limits.max_steps, value=min(20, limits.max_steps), step=1, label="Steps")
                    guidance = gr.Slider(0.0, 30.0, value=7.5, step=0.5, label="Guidance scale")
                    seed = gr.Number(value=-1, precision=0, label="Seed (-1: random)")
                    start = gr.Slider(0.0, 1.0, value=0.0, step=0.05, label="ControlNet start")
                    end = gr.Slider(0.0, 1.0, value=1.0, step=0.05, label="ControlNet end")
                    side = gr.Slider(64, limits.max_side, value=min(size, limits.max_side), step=64, label="Size")
                lora_inputs = []
                if loras:
                    with gr.Accordion("LoRA", open=False):
                        lora_inputs = [gr.Dropdown(["", *loras], value="", label="LoRA (from --lora-dir)"),
                                       gr.Slider(-2.0, 2.0, value=1.0, step=0.05, label="LoRA weight")]
            with gr.Column():
                with gr.Row():
                    control_map = gr.Image(label="Control map", elem_id="control-map")
                    result = gr.Image(label="Result", elem_id="result")
                used_seed = gr.Number(label="Seed used", precision=0, interactive=False)
        button.click(
            on_generate,
            inputs=[image, prompt, negative, strength, guess, low, high, steps, guidance, seed, start, end, side,
                    editor, denoise, *lora_inputs],
            outputs=[control_map, result, used_seed],
        )
    return demo
