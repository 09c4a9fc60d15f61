"""Build an engine dir: export every model to ONNX, compile TensorRT plans where asked, verify each
artefact against the torch reference, and write the manifest.

Reuse: each artefact has a cache key (its weights' hash, its I/O spec, precision, exporter settings,
library versions); a TensorRT plan's key adds its profile, the TensorRT version and the GPU. An
artefact whose key is unchanged and whose files still hash to what the manifest says is reused, so a
second build with nothing changed rebuilds nothing, a new ControlNet builds only its two graphs, and a
new size range rebuilds only plans (ONNX graphs have dynamic axes).

Crash safety: the manifest is rewritten (atomically) after each artefact with `complete: false`, and
`complete: true` only at the very end. Files are exported into a scratch dir inside the engine dir and
moved into place by rename. The runtime refuses incomplete manifests and files whose hash differs.
"""
from __future__ import annotations

import ctypes
import dataclasses
import gc
import json
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from engine import manifest as mf
from engine.backends import pick_backend
from engine.loading import DEFAULT_MODEL, load_controlnet, load_sd
from engine.registry import resolve
from engine.vaes import check_fits, load_vae, vae_name
from engine.vaes import info as vae_info
from engine.parity import TOLERANCE, compare, reference_module, sample_feeds, verify_point
from export import files as fs
from export import onnx_export
from export.spec import ModelConfig, Sizes, build_specs, model_config

SCRATCH_PREFIX = ".build-"
# The graphs a LoRA changes, and their wrapper's name for the diffusers model (engine/modules.py).
WEIGHT_MAPPED = {"text_encoder": "text_encoder.", "text_encoder_2": "text_encoder.", "unet": "unet."}


@dataclass
class BuildConfig:
    controlnets: tuple[str, ...] = ("canny",)
    model: str = DEFAULT_MODEL
    out: Path = Path("engines/default")
    backend: str = "auto"  # auto | onnxruntime | tensorrt | openvino
    precision: str = "fp32"  # fp32 | fp16
    sizes: Sizes = field(default_factory=Sizes)
    verify: bool = True
    export: onnx_export.ExportConfig = field(default_factory=onnx_export.ExportConfig)
    progress: bool = True
    vaes: tuple[str, ...] = ()  # extra VAEs (engine/vaes.py: TAESD), each with its own encoder/decoder graphs

    def check(self) -> None:
        if not self.controlnets:
            raise ValueError("give at least one ControlNet (--controlnet NAME|ID|PATH)")
        if self.precision not in TOLERANCE:
            raise ValueError(f"precision must be one of {', '.join(TOLERANCE)}, got {self.precision!r}")
        if self.backend not in ("auto", "onnxruntime", "tensorrt", "openvino"):
            raise ValueError(f"build backend must be auto, onnxruntime, tensorrt or openvino, got {self.backend!r}")
        self.sizes.check(64)  # SD1.5's multiple, checked before any loading; the model's own after


@dataclass
class BuildResult:
    out: Path
    backend: str
    backend_reason: str
    rows: list[dict]  # artefact, status (built | reused), size, seconds, max_abs, max_rel, ok
    manifest: mf.Manifest

    @property
    def ok(self) -> bool:
        return self.manifest.complete

    def built(self) -> list[str]:
        return [r["artefact"] for r in self.rows if r["status"] == "built"]


def _slugs(specs) -> list[str]:
    """File-name-safe, unique names for the ControlNets: registry names as they are, else the folder/id tail."""
    import re

    slugs = []
    for spec in specs:
        base = re.sub(r"[^A-Za-z0-9_.-]+", "_", Path(spec.name.rstrip("/")).name.removesuffix(".safetensors")) or "net"
        slug, n = base, 2
        while slug in slugs:
            slug, n = f"{base}{n}", n + 1
        slugs.append(slug)
    return slugs


def _versions(backend: str) -> dict:
    import diffusers
    import onnx
    import transformers

    versions = dict(python=sys.version.split()[0], torch=torch.__version__, diffusers=diffusers.__version__,
                    transformers=transformers.__version__, onnx=onnx.__version__)
    if backend == "openvino":  # verifies with OpenVINO: ONNX Runtime need not be installed
        import openvino

        versions["openvino"] = openvino.__version__
    else:
        import onnxruntime

        versions["onnxruntime"] = onnxruntime.__version__
    try:
        import onnxslim

        versions["onnxslim"] = onnxslim.__version__
    except ImportError:
        versions["onnxslim"] = None
    if backend == "tensorrt":
        import tensorrt

        versions["tensorrt"] = tensorrt.__version__
    return versions


class _Builder:
    """One build: holds the loaded models and the manifest being written."""

    def __init__(self, config: BuildConfig, log):
        self.config, self.log = config, log
        self.out = Path(config.out)
        self.backend, self.reason = pick_backend(config.backend)
        log(f"backend: {self.backend} ({self.reason})")
        self.out.mkdir(parents=True, exist_ok=True)
        for stale in self.out.glob(SCRATCH_PREFIX + "*"):  # left by a killed build; never trusted
            shutil.rmtree(stale, ignore_errors=True)
        try:
            self.old = mf.read(self.out)
        except mf.EngineDirError as err:
            log(f"ignoring the old manifest ({err}); rebuilding everything")
            self.old = None
        cpu = torch.device("cpu")
        self.sd = load_sd(config.model, cpu, torch.float32)
        self.net_specs = [resolve(name) for name in config.controlnets]
        self.nets = [load_controlnet(s, self.sd, cpu, torch.float32) for s in self.net_specs]
        self.model_config: ModelConfig = model_config(self.sd, self.nets)
        config.sizes.check(self.model_config.size_multiple)
        self.slugs = _slugs(self.net_specs)
        pools = [bool(n.config.global_pool_conditions) for n in self.nets]
        self.vaes = {}  # name -> module, then None once its graphs are built
        self.vae_infos = []
        for source in config.vaes:
            vae = load_vae(source)
            check_fits(vae, source, self.model_config.latent_channels, self.model_config.vae_scale_factor)
            found = vae_info(vae, vae_name(source), source)
            if found.name in self.vaes:
                raise ValueError(f"two --vae sources have the name {found.name!r}: give one of them")
            self.vaes[found.name] = vae
            self.vae_infos.append(found)
        self.unions = [int(n.config.num_control_type) if hasattr(n, "task_embedding") else None for n in self.nets]
        self.specs = build_specs(self.model_config, list(zip(self.slugs, pools, self.unions)), config.precision,
                                 [(v.name, v.tiny) for v in self.vae_infos])
        self.scratch = self.out / f"{SCRATCH_PREFIX}{id(self):x}"
        self.versions = _versions(self.backend)
        self.gpu = torch.cuda.get_device_name(0) if self.backend == "tensorrt" else None
        self.weights = self._weight_hashes()
        self.manifest = self._skeleton(pools)

    def _weight_hashes(self) -> dict[str, str]:
        sd = self.sd
        hashes = dict(text_encoder=fs.weights_hash(sd.text_encoder), unet=fs.weights_hash(sd.unet),
                      vae_encoder=fs.weights_hash(sd.vae, skip_prefix="decoder."),
                      vae_decoder=fs.weights_hash(sd.vae, skip_prefix="encoder."))
        if sd.text_encoder_2 is not None:
            hashes["text_encoder_2"] = fs.weights_hash(sd.text_encoder_2)
        for name, vae in self.vaes.items():
            hashes[f"vae_encoder_{name}"] = fs.weights_hash(vae, skip_prefix="decoder.")
            hashes[f"vae_decoder_{name}"] = fs.weights_hash(vae, skip_prefix="encoder.")
        for slug, net in zip(self.slugs, self.nets):
            config = fs.json_hash(dict(net.config))  # channel order and global pooling change the graph
            hint = [fs.weights_hash(net.controlnet_cond_embedding)]
            if hasattr(net, "task_embedding"):  # a union's hint encoder also runs its task transformer
                hint += [fs.weights_hash(getattr(net, part)) for part in ("transformer_layes", "spatial_ch_projs")]
                hint.append(fs.json_hash(net.task_embedding.detach().tolist()))
            hashes[f"hint_{slug}"] = fs.json_hash(hint + [config])
            hashes[f"controlnet_{slug}"] = fs.json_hash([fs.weights_hash(net, "controlnet_cond_embedding."), config])
        return hashes

    def _skeleton(self, pools: list[bool]) -> mf.Manifest:
        w = self.weights
        model_hash = fs.json_hash([w["text_encoder"], w["unet"], fs.weights_hash(self.sd.vae)]
                                  + ([w["text_encoder_2"]] if "text_encoder_2" in w else []))
        nets = [dict(name=s.name, source=mf.source_id(s.source), slug=slug, preprocessor=s.preprocessor,
                     global_pool=pool, hash=fs.json_hash([w[f"hint_{slug}"], w[f"controlnet_{slug}"]]),
                     **({"union": union} if union is not None else {}))
                for s, slug, pool, union in zip(self.net_specs, self.slugs, pools, self.unions)]
        config = dataclasses.asdict(self.model_config)
        config["num_residuals"] = self.model_config.num_residuals
        # Entries of the old manifest stay listed while this build runs, so a build killed half way
        # still lets the next one reuse what was already there (keys and hashes decide, not this list).
        artefacts = dict(self.old.artefacts) if self.old else {}
        vaes = [dict(dataclasses.asdict(v), hash=fs.json_hash([w[f"vae_encoder_{v.name}"], w[f"vae_decoder_{v.name}"]]))
                for v in self.vae_infos]
        return mf.Manifest(model=dict(source=mf.source_id(self.sd.source), hash=model_hash), controlnets=nets,
                           precision=self.config.precision, backend=self.backend,
                           sizes=dataclasses.asdict(self.config.sizes), config=config, versions=self.versions,
                           gpu=self.gpu, artefacts=artefacts, vaes=vaes)

    def _write_manifest(self) -> None:
        fs.atomic_write_text(self.out / mf.MANIFEST, self.manifest.to_json())

    def _reusable(self, name: str, key: str, plan_key: str | None = None) -> mf.Artefact | None:
        entry = self.manifest.artefacts.get(name)
        if entry is None or entry.key != key or (plan_key is not None and entry.plan_key != plan_key):
            return None
        if entry.failed():
            return None
        if self.config.verify and (entry.verify if plan_key is None else entry.plan_verify) is None:
            return None  # built with --no-verify: verify now
        try:
            mf.check_files(self.out, entry.files, name)
        except mf.EngineDirError:
            return None
        return entry

    def _modules(self, spec):
        if spec.kind in ("vae_encoder", "vae_decoder") and spec.net:
            return reference_module(spec.kind, vae=self.vaes[spec.net])
        net = self.nets[self.slugs.index(spec.net)] if spec.net else None
        return reference_module(spec.kind, self.sd, net)

    def _export_key(self, spec) -> str:
        return fs.json_hash(dict(weights=self.weights[spec.name], inputs=spec.inputs, outputs=spec.outputs,
                                 precision=self.config.precision, export=self.config.export.key(),
                                 versions={k: self.versions[k] for k in ("torch", "onnx", "onnxslim", "diffusers")}))

    def _point(self, spec) -> dict[str, int]:
        sizes = self.config.sizes
        return verify_point(spec.batch_range(sizes)[1], sizes.min_size, self.model_config.vae_scale_factor)

    def _verify(self, spec, entry: mf.Artefact, run) -> dict | None:
        if not self.config.verify:
            return None
        point = self._point(spec)
        errors = compare(self._modules(spec), run, entry, point, self.model_config.vocab_size)
        errors["ok"] = errors["max_rel"] <= TOLERANCE[self.config.precision]
        errors["against"] = "torch fp32 cpu"
        errors["runtime"] = "openvino" if self.backend == "openvino" else "onnxruntime"  # of the ONNX graph
        return errors

    def onnx_artefact(self, spec) -> dict:
        """Reuse or export one graph; returns its summary row."""
        start = time.perf_counter()
        key = self._export_key(spec)
        profile = spec.profile(self.config.sizes, self.model_config.vae_scale_factor)
        entry = self._reusable(spec.name, key)
        if entry is not None:
            entry.profile = profile  # sizes never change an ONNX graph (dynamic axes); plans check their own key
            if spec.kind in WEIGHT_MAPPED and not (entry.weights or entry.unreachable_weights):  # built before LoRA
                self._record_weights(spec, entry, self.out / entry.onnx)
            if self.config.verify and self.backend == "openvino" and entry.verify.get("runtime") != "openvino":
                # the same graph, checked so far in ONNX Runtime only: check it where it will run
                entry.verify = self._verify(spec, entry, self._graph_model(self.out / entry.onnx, entry).run)
                self._write_manifest()
                return self._row(entry, "verified", time.perf_counter() - start)
            return self._row(entry, "reused", 0.0)
        module = onnx_export.for_precision(self._modules(spec), spec.kind, _precision(spec, self.config.precision))
        # Traced at the verification point: every axis the spec calls symbolic is exported as dynamic.
        feeds = sample_feeds(list(spec.inputs), self._point(spec), self.model_config.vocab_size)
        device = onnx_export.export_device(self.config.precision)
        args = tuple(feeds[io.name].to(device, getattr(torch, io.dtype)) for io in spec.inputs)
        work = self.scratch / spec.name
        written = onnx_export.export(module, spec, args, work, self.config.export)
        del module
        entry = mf.Artefact(name=spec.name, kind=spec.kind, net=spec.net, onnx=f"{spec.name}.onnx",
                            files={p.name: mf.file_sha256(p) for p in written}, inputs=list(spec.inputs),
                            outputs=list(spec.outputs), profile=profile, key=key)
        entry.verify = self._verify(spec, entry, self._graph_model(written[0], entry).run)
        if spec.kind in WEIGHT_MAPPED:
            self._record_weights(spec, entry, written[0])
        fs.move_into(written, self.out)
        entry.build_s = round(time.perf_counter() - start, 3)
        self.manifest.artefacts[spec.name] = entry
        self._write_manifest()
        return self._row(entry, "built", entry.build_s)

    def _record_weights(self, spec, entry: mf.Artefact, onnx_path: Path) -> None:
        """Which initializer of the saved graph holds which parameter (LoRA switching without re-export)."""
        from engine.parity import sample_feeds
        from export.weight_map import unused_parameters, weight_map

        module, prefix = self._modules(spec), WEIGHT_MAPPED[spec.kind]
        unused = {}
        if spec.kind != "unet":  # a text encoder may not use its last layer (SDXL); one small forward finds out
            feeds = sample_feeds(entry.inputs, self._point(spec), self.model_config.vocab_size)
            unused = unused_parameters(module, [feeds[io.name] for io in entry.inputs], prefix)
        found = weight_map(onnx_path, module, prefix, unused)
        entry.weights, entry.weight_layouts = found["weights"], found["weight_layouts"]
        entry.unreachable_weights, entry.unused_weights = found["unreachable_weights"], found["unused_weights"]

    def _graph_model(self, path: Path, entry: mf.Artefact):
        """The graph in the runtime this build verifies with: OpenVINO (f32, no model cache) or ONNX Runtime."""
        if self.backend == "openvino":
            from engine.backends.openvino_backend import OvConfig, OvModel

            return OvModel(path, entry, OvConfig(precision="f32", cache=False))
        from engine.backends.onnxruntime_backend import OrtModel

        return OrtModel(path, entry)

    def plan_artefact(self, spec, runtime) -> dict:
        """Reuse or build one TensorRT plan from the graph already in place."""
        from engine.backends.tensorrt_backend import TrtModel
        from export import tensorrt_build as tb

        start = time.perf_counter()
        entry = self.manifest.artefacts[spec.name]
        plan_key = tb.plan_key(entry.key, entry.profile, self.config.precision, self.versions["tensorrt"], self.gpu)
        if self._reusable(spec.name, entry.key, plan_key) is not None:
            return self._row(entry, "reused", 0.0, "plan")
        plan = self.scratch / f"{spec.name}.plan"
        cache = self.out / tb.timing_cache_name(self.versions["tensorrt"], self.gpu)
        _free_gpu_memory()  # the builder times only the tactics that fit in what is free
        tb.build_plan(self.out / entry.onnx, plan, entry.profile, self.config.precision, tb.TrtBuildConfig(timing_cache=cache))
        model = TrtModel(runtime, plan, entry)
        runtime.allocate_shared_memory()
        verified = self._verify(spec, entry, model.run)
        runtime.release(model)  # engine, context, scratch block: the next plan's builder needs the memory
        del model
        fs.move_into([plan], self.out)
        entry.files = {**{k: v for k, v in entry.files.items() if not k.endswith(".plan")}, plan.name: mf.file_sha256(self.out / plan.name)}
        entry.plan, entry.plan_key, entry.plan_verify = plan.name, plan_key, verified
        entry.build_s = round(entry.build_s + time.perf_counter() - start, 3)
        self._write_manifest()
        return self._row(entry, "built", time.perf_counter() - start, "plan")

    def release(self, spec) -> None:
        """Let go of the torch module an artefact came from once it is built and checked: at full size the
        build would otherwise hold every model (5.7 GB fp32) through every later export."""
        if spec.kind in ("text_encoder", "text_encoder_2", "unet"):
            setattr(self.sd, spec.kind, None)
        elif spec.kind == "vae_decoder" and spec.net:  # an extra VAE: its encoder came just before
            self.vaes[spec.net] = None
        elif spec.kind == "vae_decoder":
            self.sd.vae = None
        elif spec.kind == "controlnet":  # its hint encoder came just before
            self.nets[self.slugs.index(spec.net)] = None
        gc.collect()
        _trim_heap()

    def _row(self, entry: mf.Artefact, status: str, seconds: float, what: str = "onnx") -> dict:
        names = [f for f in entry.files if f.endswith(".plan")] if what == "plan" else [f for f in entry.files if not f.endswith(".plan")]
        size = sum((self.out / f).stat().st_size for f in names)
        v = (entry.plan_verify if what == "plan" else entry.verify) or {}
        label = f"{entry.name}.plan" if what == "plan" else entry.name
        return dict(artefact=label, status=status, size=size, seconds=seconds, max_abs=v.get("max_abs"),
                    max_rel=v.get("max_rel"), ok=v.get("ok", True), peak_rss=_peak_rss())

    def support_files(self) -> None:
        """The tokenizer and scheduler config, so Runner(engine_dir=...) needs no torch weights."""
        tokenizer_dir = self.scratch / "tokenizer"
        self.sd.tokenizer.save_pretrained(str(tokenizer_dir))
        written = sorted(p for p in tokenizer_dir.iterdir() if p.is_file())
        fs.move_into(written, self.out / "tokenizer")
        support = {f"tokenizer/{p.name}": mf.file_sha256(self.out / "tokenizer" / p.name) for p in written}
        if self.sd.tokenizer_2 is not None:  # SDXL
            second = self.scratch / "tokenizer_2"
            self.sd.tokenizer_2.save_pretrained(str(second))
            written = sorted(p for p in second.iterdir() if p.is_file())
            fs.move_into(written, self.out / "tokenizer_2")
            support.update({f"tokenizer_2/{p.name}": mf.file_sha256(self.out / "tokenizer_2" / p.name) for p in written})
        fs.atomic_write_text(self.out / "scheduler_config.json", json.dumps(self.sd.scheduler_config, indent=2, default=str))
        support["scheduler_config.json"] = mf.file_sha256(self.out / "scheduler_config.json")
        self.manifest.support = support

    def finish(self) -> None:
        names = {spec.name for spec in self.specs}
        keep = {f for name in names for f in self.manifest.artefacts[name].files}
        for name, entry in list(self.manifest.artefacts.items()):
            if name not in names:  # an artefact of a ControlNet no longer in the set
                for f in entry.files:
                    if f not in keep:
                        (self.out / f).unlink(missing_ok=True)
                del self.manifest.artefacts[name]
        self.manifest.artefacts = {spec.name: self.manifest.artefacts[spec.name] for spec in self.specs}
        self.manifest.complete = not any(a.failed() for a in self.manifest.artefacts.values())
        self._write_manifest()


def _precision(spec, precision: str) -> str:
    """The precision a graph is exported in: the build's, or fp32 for an fp32 graph in an fp16 build (the SDXL
    VAE, which overflows in fp16: export/spec.py)."""
    return "fp32" if all(io.dtype != "float16" for io in spec.inputs + spec.outputs) else precision


def _free_gpu_memory() -> None:
    """Drop what the last artefact left on the GPU (a verified plan's engine, the fp16 export's tensors in
    torch's caching allocator) so TensorRT's builder sees the whole free memory."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _trim_heap() -> None:
    """Hand freed memory back to the OS (glibc keeps it otherwise, and the next export stacks on top)."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


def _peak_rss() -> int | None:
    """This process's peak resident memory so far, in bytes (Linux reports KiB)."""
    try:
        import resource
    except ImportError:  # not on Unix
        return None
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _progress(items, enabled: bool, desc: str):
    if not enabled:
        return items
    from tqdm import tqdm

    return tqdm(items, desc=desc, unit="graph", file=sys.stderr)


def build(config: BuildConfig, log=print) -> BuildResult:
    """Run a build; returns the summary rows and the written manifest (complete iff every check passed)."""
    config.check()
    builder = _Builder(config, log)
    try:
        builder._write_manifest()  # complete: false from here until finish()
        builder.support_files()
        runtime = None
        if builder.backend == "tensorrt":
            from engine.backends.tensorrt_backend import TrtRunConfig, TrtRuntime

            runtime = TrtRuntime.create(TrtRunConfig(cuda_graphs=False))  # verification runs each plan once
        bar = _progress(builder.specs, config.progress, "build")
        rows = []
        for spec in bar:  # graph, then its plan, then its torch module is let go
            if config.progress:
                bar.set_postfix_str(spec.name)
            rows.append(builder.onnx_artefact(spec))
            if runtime is not None:
                rows.append(builder.plan_artefact(spec, runtime))
            builder.release(spec)
        builder.finish()
    finally:
        shutil.rmtree(builder.scratch, ignore_errors=True)
    return BuildResult(builder.out, builder.backend, builder.reason, rows, builder.manifest)
