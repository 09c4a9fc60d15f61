"""The A1111 web UI API's request and response bodies, as pydantic models (they make the OpenAPI schema).

Field names, types and defaults are A1111's (`modules/api/models.py`, `modules/processing.py`) and the
ControlNet extension's (`internal_controlnet/args.py`), so existing clients' bodies validate unchanged.
Unknown fields are refused (extra="forbid"): A1111 drops them silently, which hides typos. Whether a
field's *value* is one this engine implements is checked in `engine/serve/a1111/plan.py`, which also says
per field what happens to it (see INERT there).
"""
from typing import Any, Optional, Union

from pydantic import BaseModel, ConfigDict, Field

Number = Union[int, float]


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class ControlNetImage(_Body):
    image: str = Field(description="The unit's picture, base64 (a data URL is fine)")
    mask: Optional[str] = Field(None, description="Inpaint mask, base64; only for inpaint modules (none here)")


class ControlNetUnit(_Body):
    """One unit of `alwayson_scripts.controlnet.args`, with the extension's names and defaults."""

    enabled: bool = Field(True, description="False: the unit is skipped (the extension up to v1.1.447 defaulted to "
                                            "True, as here, so a unit sent without `enabled` is used)")
    module: str = Field("none", description="Preprocessor: none, canny, invert, tile_resample")
    model: str = Field("None", description="A loaded ControlNet as GET /controlnet/model_list names it, e.g. "
                                           "'control_v11p_sd15_canny [d14c016b]' (the name without [hash] works too)")
    weight: float = Field(1.0, ge=0.0, le=2.0)
    image: Union[str, ControlNetImage, list[str], None] = Field(
        None, description="base64 picture, {image, mask}, or [image, mask]; empty in img2img: the init image")
    mask: Optional[str] = None
    mask_image: Optional[str] = Field(None, description="Forge's name for mask")
    resize_mode: Union[str, int] = Field("Crop and Resize", description="Just Resize (0), Crop and Resize (1), "
                                                                          "Resize and Fill (2)")
    low_vram: bool = False
    processor_res: int = Field(-1, description="Preprocessor resolution (short side); -1: the module's default (512)")
    threshold_a: float = Field(-1, description="canny: low threshold (1..255, default 100); tile_resample: rate")
    threshold_b: float = Field(-1, description="canny: high threshold (1..255, default 200)")
    guidance_start: float = Field(0.0, ge=0.0, le=1.0)
    guidance_end: float = Field(1.0, ge=0.0, le=1.0)
    control_mode: Union[str, int] = Field("Balanced", description="Balanced (0), My prompt is more important (1), "
                                                                  "ControlNet is more important (2)")
    pixel_perfect: bool = Field(False, description="True: processor_res from the generation size")
    hr_option: str = Field("Both", description="Applies with hires fix only, which this server does not run")
    save_detected_map: bool = Field(True, description="Append the control map to the response's images")
    union_control_type: Optional[str] = Field("Unknown", description="ControlNet-Union models: OpenPose, Depth, Soft "
                                              "Edge, Hard Edge, Normal Map, Segmentation, Tile, Inpaint; Unknown: "
                                              "the module's (canny: Hard Edge, tile_resample: Tile)")
    # Legacy aliases the extension still accepts.
    input_image: Optional[str] = Field(None, description="Legacy name for image")
    guidance: Optional[float] = Field(None, description="Legacy name for guidance_end")
    lowvram: Optional[bool] = Field(None, description="Legacy name for low_vram")
    # Extension fields accepted at their defaults only (see plan.INERT_UNIT).
    is_ui: bool = False
    input_mode: str = "simple"
    batch_images: Optional[Any] = None
    output_dir: str = ""
    loopback: bool = False
    inpaint_crop_input_image: bool = True
    advanced_weighting: Optional[list[float]] = None
    effective_region_mask: Optional[str] = None
    pulid_mode: str = "Fidelity"
    ipadapter_input: Optional[Any] = None
    batch_mask_dir: Optional[str] = None
    animatediff_batch: bool = False
    batch_modifiers: list = Field(default_factory=list)
    batch_image_files: list = Field(default_factory=list)
    batch_keyframe_idx: Optional[Any] = None


class ControlNetScript(_Body):
    args: list[ControlNetUnit] = Field(default_factory=list)


class _Processing(_Body):
    """Fields txt2img and img2img share (A1111's StableDiffusionProcessing)."""

    prompt: str = Field("", description="May hold <lora:NAME:WEIGHT> tags (when the server has LoRA support)")
    negative_prompt: str = ""
    styles: Optional[list[str]] = None
    seed: int = Field(-1, ge=-1, le=2**32 - 1, description="-1: random (the seed used is in info)")
    subseed: int = -1
    subseed_strength: float = 0.0
    seed_resize_from_h: int = -1
    seed_resize_from_w: int = -1
    seed_enable_extras: bool = True
    sampler_name: Optional[str] = Field(None, description="UniPC, DDIM, Euler, Euler a, DPM++ 2M (or legacy "
                                                          "'DPM++ 2M Karras'); see GET /sdapi/v1/samplers")
    scheduler: Optional[str] = Field(None, description="Automatic, Uniform, Karras; see GET /sdapi/v1/schedulers")
    sampler_index: str = Field("Euler", description="Used when sampler_name is not given")
    batch_size: int = Field(1, ge=1, le=64)
    n_iter: int = Field(1, ge=1, le=64)
    steps: int = Field(50, ge=1, le=1000)
    cfg_scale: float = Field(7.0, ge=0.0, le=30.0)
    # Left out: the model's own size (512 for SD1.5, 1024 for SDXL; plan.with_model_size)
    width: Optional[int] = Field(None, ge=64, le=4096, multiple_of=8, description="default: the model's (SD1.5 512, SDXL 1024)")
    height: Optional[int] = Field(None, ge=64, le=4096, multiple_of=8, description="default: the model's (SD1.5 512, SDXL 1024)")
    restore_faces: Optional[bool] = None
    tiling: Optional[bool] = None
    do_not_save_samples: bool = False
    do_not_save_grid: bool = False
    eta: Optional[float] = None
    s_min_uncond: Optional[float] = None
    s_churn: Optional[float] = None
    s_tmax: Optional[float] = None
    s_tmin: Optional[float] = None
    s_noise: Optional[float] = None
    override_settings: Optional[dict[str, Any]] = None
    override_settings_restore_afterwards: bool = True
    refiner_checkpoint: Optional[str] = None
    refiner_switch_at: Optional[float] = None
    disable_extra_networks: bool = False
    firstpass_image: Optional[str] = None
    comments: Optional[dict[str, Any]] = None
    script_name: Optional[str] = None
    script_args: list = Field(default_factory=list)
    send_images: bool = True
    save_images: bool = False
    alwayson_scripts: dict[str, ControlNetScript] = Field(
        default_factory=dict, description="Only the ControlNet script: {\"controlnet\": {\"args\": [unit, ...]}}")
    force_task_id: Optional[str] = None
    infotext: Optional[str] = None


class Txt2ImgRequest(_Processing):
    enable_hr: bool = False
    denoising_strength: Optional[float] = None
    firstphase_width: int = 0
    firstphase_height: int = 0
    hr_scale: float = 2.0
    hr_upscaler: Optional[str] = None
    hr_second_pass_steps: int = 0
    hr_resize_x: int = 0
    hr_resize_y: int = 0
    hr_checkpoint_name: Optional[str] = None
    hr_sampler_name: Optional[str] = None
    hr_scheduler: Optional[str] = None
    hr_prompt: str = ""
    hr_negative_prompt: str = ""


class Img2ImgRequest(_Processing):
    init_images: Optional[list[str]] = Field(None, description="base64 pictures (one is used per image, cycling)")
    resize_mode: int = Field(0, description="0 Just resize, 1 Crop and resize (2, 3 are not implemented)")
    denoising_strength: float = Field(0.75, ge=0.0, le=1.0)
    image_cfg_scale: Optional[float] = None
    mask: Optional[str] = Field(None, description="base64 inpaint mask: white is repainted; an RGBA mask that is "
                                                  "not all opaque is read by its alpha (a canvas mask)")
    mask_blur_x: int = Field(4, description="Gaussian blur of the mask across, 0..64")
    mask_blur_y: int = Field(4, description="Gaussian blur of the mask down, 0..64")
    mask_blur: Optional[int] = Field(None, description="Both blurs at once")
    mask_round: bool = True
    inpainting_fill: int = Field(0, description="Masked content: 0 fill, 1 original (2 latent noise and 3 latent "
                                                "nothing are not implemented)")
    inpaint_full_res: bool = Field(True, description="True: only the box around the mask is generated and pasted "
                                                     "back (Only masked); False: the whole picture")
    inpaint_full_res_padding: int = Field(0, description="Only masked: pixels around the mask's box, 0..256")
    inpainting_mask_invert: int = 0
    initial_noise_multiplier: Optional[float] = None
    latent_mask: Optional[str] = None
    include_init_images: bool = False


class ImageResponse(BaseModel):
    images: Optional[list[str]] = Field(None, description="base64 PNGs: the generations, then the units' control maps")
    parameters: dict = Field(description="The request as applied (seed, sampler and scheduler resolved)")
    info: str = Field(description="JSON text: seed, all_seeds, infotexts, width, height, sampler_name, ...")


class DetectRequest(_Body):
    controlnet_module: str = "none"
    controlnet_input_images: list[str] = Field(default_factory=list)
    controlnet_images: Optional[list[str]] = Field(None, description="webuiapi's name for controlnet_input_images")
    controlnet_processor_res: int = -1
    controlnet_threshold_a: float = -1
    controlnet_threshold_b: float = -1
    controlnet_masks: list[str] = Field(default_factory=list)
    low_vram: bool = False


class DetectResponse(BaseModel):
    images: list[str]
    info: str


class SamplerItem(BaseModel):
    name: str
    aliases: list[str]
    options: dict[str, Any]


class SchedulerItem(BaseModel):
    name: str
    label: str
    aliases: Optional[list[str]] = None
    default_rho: Optional[float] = None
    need_inner_model: Optional[bool] = None


class SDModelItem(BaseModel):
    model_config = ConfigDict(protected_namespaces=())

    title: str
    model_name: str
    hash: Optional[str] = None
    sha256: Optional[str] = None
    filename: str
    config: Optional[str] = None


class SDVaeItem(BaseModel):
    model_config = ConfigDict(protected_namespaces=())

    model_name: str
    filename: str


class ProgressResponse(BaseModel):
    progress: float
    eta_relative: float
    state: dict
    current_image: Optional[str] = None
    textinfo: Optional[str] = None


class ScriptsList(BaseModel):
    txt2img: list[str]
    img2img: list[str]


class VersionResponse(BaseModel):
    version: int


class ModelListResponse(BaseModel):
    model_list: list[str]


class ModuleListResponse(BaseModel):
    module_list: list[str]
    module_detail: dict[str, Any]


class ControlTypesResponse(BaseModel):
    control_types: dict[str, Any]


class ControlNetSettingsResponse(BaseModel):
    control_net_unit_count: int


class ErrorResponse(BaseModel):
    error: str = Field(description="The error's kind")
    detail: str = Field(description="What is wrong and what is allowed")
    body: str = ""
    errors: str = ""
    field: Optional[str] = Field(None, description="The offending field, dotted (alwayson_scripts.controlnet.args.0.model)")
