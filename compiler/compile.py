"""`kiln compile`: source folder -> export -> optimize -> verify -> bundle in the store."""

from __future__ import annotations

import contextlib
import hashlib
import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import onnx

from compiler import lora_inputs, reuse
from compiler.config import CompileConfig
from compiler.export import COMPONENTS, TINY_DECODER, components_for, export_component
from compiler.passes import attention_slicing, fusions, tome, unpack_attention
from compiler.preview import fit_latent_rgb
from compiler.progress import Progress
from compiler.source import embeddings, load_source, prepare
from compiler.source.load import TOKENIZER_FILES
from compiler.source.options import SourceOptions
from compiler.verify import Reference, check_parity, reference
from model_store import ComponentEntry, Manifest, Store
from model_store.onnx_files import load_graph, save_model
from quantize import stage
from quantize.precision import FOLLOWERS, for_components, resolved
from runtime.samplers import SAMPLERS, NoiseSchedule

# release a source module once the last component that needs it is done
LAST_USE = {"text_encoder": "text_encoder", "text_encoder_2": "text_encoder_2", "unet": "unet", "vae_encoder": "vae",
            "vae_decoder_tiny": "vae_tiny"}


@dataclass
class CompileResult:
    path: Path
    manifest: Manifest


def kiln_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("kiln")
    except PackageNotFoundError:
        return "0+unknown"


def compile_model(source_path: str | Path, store_root: str | Path, config: CompileConfig,
                  progress: bool = True, options: SourceOptions | None = None) -> CompileResult:
    """Compile a local diffusers folder or single-file checkpoint, with `options` (LoRAs, embeddings, a VAE)
    applied, into a new bundle version; nothing is published on failure."""
    options = options or SourceOptions()
    store = Store(store_root)
    sdxl = _is_sdxl(source_path)  # read before the source is (the progress count needs it)
    exported = [*COMPONENTS, *(("text_encoder_2",) if sdxl else ())]
    quantize_stages = 1 + stage.stage_count(config.plan, exported) if config.quantized else 0
    tiny = bool(options.tiny_decoder)
    steps = Progress(total=3 + 3 * (len(exported) + tiny) + tiny + quantize_stages
                     + prepare.stage_count(source_path, options), enabled=progress)
    staging = store.staging_dir(config.name)
    work = staging.with_name(staging.name + "-source")
    try:
        prepared = prepare.prepare(source_path, options, work, steps.stage)
        source = load_source(prepared.path)
        request_defaults = _request_defaults(config, source)  # a bad default fails here, before any export
        if options.tiny_decoder:
            from compiler.source import vae

            with steps.stage(f"check the tiny decoder {Path(options.tiny_decoder).name}"):
                prepared.info["tiny_decoder"] = vae.check_tiny_decoder(Path(options.tiny_decoder), source.vae_config)
            source.tiny_decoder = Path(options.tiny_decoder)
        with steps.stage("hash source model"):
            source_hash = source.content_hash()
        identity = reuse.exporter_identity(config.opset, config.fusions)
        donor = reuse.find_donor(store, source_hash, identity, config.fusions) if config.reuse_exports else None
        components: dict[str, ComponentEntry] = {}
        refs: dict[str, Reference] = {}
        for name, spec in components_for(source).items():
            out = staging / f"{name}.onnx"
            if config.lora_inputs and name in lora_inputs.COMPONENTS:
                spec = lora_inputs.extend_spec(spec, lora_inputs.targets(name, source.module(spec.source_module),
                                                                         spec.kind))
            # the source hash does not cover the tiny decoder: a donor's may be another one
            given = donor.manifest.components.get(name) if donor and name != TINY_DECODER.name else None
            unet_passes = name == "unet" and config.unet_passes
            # the tiny decoder stays fp32 (quantize/stage.py quantizes what the plan names)
            quantized = resolved(for_components(config.plan, [name])[name]) in ("int8", "nf4", "int4")
            # a graph with other inputs (LoRA inputs or none) is another graph
            same_inputs = given is not None and given.inputs == list(spec.inputs)
            if donor and reuse.donates(given, config.fusions) and not unet_passes and same_inputs:
                assert given is not None
                with steps.stage(f"export {name}: reuse {donor.manifest.name}/{donor.manifest.version}"):
                    reuse.copy_component(donor, given, out)
                passes = list(given.passes)
            else:
                given = None
                with steps.stage(f"export {name}"), _merging(name, source, config):
                    # weights in a data file even under 2 GB when passes follow: they then never load them
                    export_component(spec, source, out, config.opset, external=config.fusions or unet_passes)
                    # PyTorch's side of the parity check now, while the module is loaded anyway
                    refs[name] = reference(spec, source)
                passes = []
            if name == "vae_encoder":
                with steps.stage("fit the latent preview map"):
                    latent_rgb = fit_latent_rgb(source.module("vae"), _vae_scaling(source), source.vae_scale_factor)
            if name in LAST_USE:
                source.release(LAST_USE[name])  # before its graph is optimized and loaded into ONNX Runtime
            with steps.stage(f"optimize {name}"):
                if (config.fusions and (given is None or quantized)) or unet_passes:
                    # the weights stay in the data file (only a donor's graph under 2 GB is inline and loads
                    # whole); the passes read the few they rewrite from there, through the working directory
                    graph = load_graph(out)
                    with contextlib.chdir(out.parent):
                        if config.fusions and given is None:
                            graph = fusions.apply(graph, name)
                            passes.append("fusions")
                        if unet_passes:
                            graph = _unet_passes(graph, config, passes)
                        unpacked = 0
                        if quantized:
                            # quantizers rewrite MatMul; fused self-attention hides its Q/K/V weights
                            graph, unpacked = unpack_attention.apply(graph)
                            if unpacked:
                                passes.append("unpack_attention")
                    if given is None or unpacked:
                        save_model(graph, out, base_dir=out.parent)
                    del graph
            with steps.stage(f"verify {name}"):
                threshold = _parity_threshold(config, name)
                if given is not None and passes == given.passes and \
                        given.parity.get("max_abs_diff", float("inf")) <= threshold:
                    parity = {**given.parity, "threshold": threshold}  # the same graph
                else:
                    ref = refs.pop(name, None)
                    if ref is None:  # a donor's graph another pass changed: PyTorch's side afresh
                        with _merging(name, source, config):  # token merging is part of the reference too
                            ref = reference(spec, source)
                        if name in LAST_USE:
                            source.release(LAST_USE[name])
                    parity = check_parity(spec, source, out, threshold, ref)
            data = out.with_name(out.name + ".data")
            components[name] = ComponentEntry(
                file=out.name, inputs=list(spec.inputs), outputs=list(spec.outputs), precision="fp32",
                external_data=data.name if data.exists() else None, passes=passes, parity=parity,
                op_counts=fusions.op_counts(load_graph(out)),
            )
        source.release_all()
        with steps.stage("tokenizer and manifest"):
            tokenizer = _write_tokenizer(source.tokenizer_dir, staging / "tokenizer")
            if source.sdxl:  # the second text encoder's: same vocabulary, its own padding
                tokenizer["second"] = _write_tokenizer(source.path / "tokenizer_2", staging / "tokenizer_2",
                                                       "tokenizer_2")
            if prepared.info.get("embeddings"):  # textual inversion: the tokens prompts write and what they expand to
                tokenizer["embeddings"] = embeddings.tokenizer_section(staging / tokenizer["file"],
                                                                       prepared.info["embeddings"])
                if source.sdxl:  # SDXL embeddings add the same tokens to the second tokenizer
                    tokenizer["second"]["embeddings"] = embeddings.tokenizer_section(
                        staging / tokenizer["second"]["file"], prepared.info["embeddings"], ids="token_ids_2")
            manifest = _manifest(config, source, source_hash, components, tokenizer, request_defaults,
                                 prepared.info.get("tiny_decoder", {}).get("sha256"))
            manifest.source = {**manifest.source, "path": str(Path(source_path).resolve()), **prepared.info}
            manifest.model["latent_rgb"] = latent_rgb
            manifest.tool_versions = reuse.recorded_versions(identity, config.quantized)
            if config.lora_inputs:
                _write_lora_configs(source, staging, manifest, config)
            if donor:
                manifest.source["reused_exports_from"] = f"{donor.manifest.name}/{donor.manifest.version}"
        if config.quantized:
            _quantize(staging, manifest, config, steps)
        manifest.compile_stats = steps.stats()
        ref = store.publish(staging, manifest)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return CompileResult(ref.path, ref.manifest)


def _merging(name: str, source, config: CompileConfig):  # type: ignore[no-untyped-def]
    """Token merging patched into the PyTorch UNet (for export and for the parity reference), else nothing."""
    if name == "unet" and config.tome:
        unet = source.module("unet")  # SDXL's first level has no attention: merge at its first that has
        return tome.patched(unet, config.tome, max_downsample=tome.first_attention_downsample(unet))
    return contextlib.nullcontext()


def _unet_passes(model: onnx.ModelProto, config: CompileConfig, passes: list[str]) -> onnx.ModelProto:
    """The UNet's graph passes after the fusions: token merging's own attention fusion, then slicing."""
    if config.tome:
        if config.fusions:  # the merged self-attention, which ONNX Runtime's fusion does not match
            model, _ = tome.fuse_attention(model)
        passes.append("tome")
    if config.attention_slicing != "off":
        model, _ = attention_slicing.apply(model, config.attention_slicing)
        passes.append(f"attention_slicing={config.attention_slicing}")
    return model


def _quantize(staging: Path, manifest: Manifest, config: CompileConfig, steps: Progress) -> None:
    """The quantize stage over the fp32 components in `staging`; updates `manifest` in place."""
    from runtime.model import open_bundle_dir

    with steps.stage("load the fp32 components"):
        model = open_bundle_dir(staging, manifest)
    result = stage.run(staging, {n: c.file for n, c in manifest.components.items()}, model, _plan(config, model),
                       config.quantize, int(manifest.defaults["steps"]), steps.stage)
    del model
    if result is None:
        return
    for name, r in result.components.items():
        entry = manifest.components[name]
        entry.precision, entry.quantization, entry.fidelity = r.precision, r.quantization, r.fidelity
        entry.gpu_only, entry.external_data = r.gpu_only, r.external_data
        entry.op_counts = fusions.op_counts(onnx.load(str(staging / entry.file), load_external_data=False))
    manifest.fidelity = result.fidelity


def _plan(config: CompileConfig, model) -> dict[str, str]:  # type: ignore[no-untyped-def]
    """The precision plan for the bundle's components. A VAE that diffusers upcasts (`force_upcast`, SDXL's: its
    activations overflow fp16) stays fp32 in an fp16 plan."""
    plan = for_components(config.plan, model.manifest.components)
    if model.manifest.model.get("vae_force_upcast"):
        plan.update({c: "fp32" for c in ("vae_decoder", "vae_encoder") if plan.get(c) == "fp16"})
    return plan


def _parity_threshold(config: CompileConfig, name: str) -> float:
    """The component's threshold; the tiny decoder's is the full decoder's (same output, an image in [-1, 1]);
    SDXL's second text encoder's is the first's unless given (quantize.precision.FOLLOWERS)."""
    if name not in config.parity_threshold:
        name = FOLLOWERS.get(name, "vae_decoder" if name == "vae_decoder_tiny" else name)
    return config.parity_threshold[name]


def _write_lora_configs(source, staging: Path, manifest: Manifest, config: CompileConfig) -> None:  # type: ignore[no-untyped-def]
    """The UNet and text encoder configs `kiln lora add` builds the models' shapes from (no weights), and the
    manifest's note of how many layers take LoRA inputs."""
    folder = staging / "lora"
    folder.mkdir()
    (folder / "unet_config.json").write_text(json.dumps(source.unet_config, indent=2, sort_keys=True) + "\n")
    shutil.copy(source.path / "text_encoder/config.json", folder / "text_encoder_config.json")
    manifest.model["lora_inputs"] = {
        "targets": {n: sum(i.startswith(lora_inputs.DOWN) for i in manifest.components[n].inputs)
                    for n in lora_inputs.COMPONENTS if n in manifest.components},
        "unet_config": "lora/unet_config.json", "text_encoder_config": "lora/text_encoder_config.json",
    }
    if source.sdxl:  # the second text encoder's shapes, for `kiln lora add`
        shutil.copy(source.path / "text_encoder_2/config.json", folder / "text_encoder_2_config.json")
        manifest.model["lora_inputs"]["text_encoder_2_config"] = "lora/text_encoder_2_config.json"
    manifest.limits["max_loras"] = config.max_loras


def _vae_scaling(source) -> float:  # type: ignore[no-untyped-def]
    # diffusers' class defaults: SD's 0.18215; AutoencoderTiny (TAESD) works on the UNet's scaled latents: 1.0
    default = 1.0 if source.vae_config.get("_class_name") == "AutoencoderTiny" else 0.18215
    return float(source.vae_config.get("scaling_factor", default))


def _decoders(source) -> dict[str, dict[str, object]]:  # type: ignore[no-untyped-def]
    """The decoders a request may pick (GenerateRequest.decoder): the component each runs, and the factor the
    UNet's latents are divided by before it (each VAE's own `scaling_factor`, as diffusers' pipelines do)."""
    out: dict[str, dict[str, object]] = {"full": {"component": "vae_decoder", "scaling_factor": _vae_scaling(source)}}
    if source.tiny_decoder is not None:
        out["tiny"] = {"component": "vae_decoder_tiny",
                       "scaling_factor": float(source.tiny_decoder_config.get("scaling_factor", 1.0))}
    return out


def _is_sdxl(source_path: str | Path) -> bool:
    """A diffusers folder with SDXL's second text encoder, or a single file with one (for the progress count)."""
    path = Path(source_path)
    if path.is_file():
        from compiler.source.single_file import names_sdxl

        return names_sdxl(path)
    return (path / "text_encoder_2").is_dir()


def _write_tokenizer(src: Path, dst: Path, folder: str = "tokenizer") -> dict:
    """Copy the CLIP tokenizer files and add `tokenizer.json`, which the runtime loads with `tokenizers`."""
    from transformers import CLIPTokenizerFast

    dst.mkdir()
    for f in TOKENIZER_FILES:
        if (src / f).exists():
            shutil.copy(src / f, dst / f)
    fast = CLIPTokenizerFast.from_pretrained(str(src))
    fast.backend_tokenizer.save(str(dst / "tokenizer.json"))
    max_length = min(int(fast.model_max_length), 77)
    return {
        "file": f"{folder}/tokenizer.json",
        "files": sorted(p.name for p in dst.iterdir()),
        "max_length": max_length,
        "bos_id": fast.bos_token_id,
        "eos_id": fast.eos_token_id,
        "pad_id": fast.pad_token_id,
    }


def _request_defaults(config: CompileConfig, source) -> tuple[dict[str, object], int]:  # type: ignore[no-untyped-def]
    """The bundle's request defaults (steps, guidance_scale, sampler) and default size, checked against the
    model: its VAE's factor, and the default sampler's step limit on its schedule."""
    defaults = config.resolve_defaults(source.recommended_defaults(), source.default_size)
    size = int(defaults.pop("size"))  # type: ignore[call-overload]
    if size < 8 * source.vae_scale_factor or size % source.vae_scale_factor:
        raise ValueError(f"default size={size} must be a multiple of the VAE's factor {source.vae_scale_factor} "
                         f"and at least {8 * source.vae_scale_factor}; give --default-size")
    most = SAMPLERS[str(defaults["sampler"])].max_steps(NoiseSchedule.from_config(source.scheduler_config))
    if int(defaults["steps"]) > most:  # type: ignore[call-overload]
        raise ValueError(f"default steps={defaults['steps']} must be between 1 and {most} for default sampler "
                         f"{defaults['sampler']!r}; give --default-steps")
    return defaults, size


def _manifest(config: CompileConfig, source, source_hash: str, components, tokenizer,  # type: ignore[no-untyped-def]
              request_defaults: tuple[dict[str, object], int], tiny_sha256: str | None = None) -> Manifest:
    """`request_defaults`: `_request_defaults`' (request defaults, default size)."""
    import onnxruntime

    text_cfg = json.loads((source.path / "text_encoder/config.json").read_text())
    text_hidden = int(text_cfg["hidden_size"])
    sdxl: dict[str, object] = {}
    if source.sdxl:
        text_cfg_2 = json.loads((source.path / "text_encoder_2/config.json").read_text())
        text_hidden += int(text_cfg_2["hidden_size"])
        sdxl = {
            "pooled_dim": int(text_cfg_2["projection_dim"]),
            # diffusers' SDXL pipelines: an empty negative prompt is all-zero embeddings, not the encoded ""
            "force_zeros_for_empty_prompt": bool(source.model_index.get("force_zeros_for_empty_prompt", True)),
        }
    defaults, size = request_defaults
    key = f"{source_hash}:{config.hash()}"
    if tiny_sha256:  # the tiny decoder is not part of the source folder's hash (vae.check_tiny_decoder hashed it)
        key += f":tiny={tiny_sha256}"
    identity = hashlib.sha256(key.encode()).hexdigest()[:8]
    return Manifest(
        name=config.name,
        version=f"{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}-{identity}",
        created_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        kiln_version=kiln_version(),
        source={"path": str(source.path.resolve()), "sha256": source_hash},
        compile_config=config.to_dict(),
        config_hash=config.hash(),
        opset=config.opset,
        onnxruntime_version=onnxruntime.__version__,
        components=components,
        files=[],
        scheduler_config=source.scheduler_config,
        tokenizer=tokenizer,
        model={
            "latent_channels": int(source.vae_config["latent_channels"]),
            "vae_scale_factor": source.vae_scale_factor,
            "vae_scaling_factor": _vae_scaling(source),
            "unet_in_channels": int(source.unet_config["in_channels"]),
            # 9 input channels (latents, mask, masked-image latents): a dedicated inpainting UNet
            "inpainting": int(source.unet_config["in_channels"]) == 9,
            "text_hidden_size": text_hidden,
            "architecture": source.architecture,
            **({"sdxl": sdxl} if sdxl else {}),
            "vae_class": source.vae_config.get("_class_name", "AutoencoderKL"),
            # diffusers' SDXL pipelines run such a VAE in fp32 (SDXL's overflows fp16); its SD pipelines do not
            "vae_force_upcast": source.sdxl and bool(source.vae_config.get("force_upcast", True)),
            "decoders": _decoders(source),
        },
        defaults={"width": size, "height": size, **defaults},
        limits={
            "min_size": 8 * source.vae_scale_factor, "max_size": max(config.max_size, size),
            "max_steps": config.max_steps, "max_images": config.max_images, "max_guidance_scale": 30.0,
        },
    )

