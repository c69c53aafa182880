"""The quantize stage of `kiln compile`: calibrate on the fp32 pipeline, quantize each component to its
planned precision, then gate on fidelity against fp32.

Fidelity is measured on prompts held out from calibration (the end of the prompt set), one seed each, at
the bundle's default steps, size, sampler and guidance:
- per component: the relative L2 error of its output on the inputs the fp32 pipeline fed it, and the final
  images with only that component quantized (PSNR, SSIM vs fp32);
- overall: the final images with every component at its final precision.
A component fails when its relative error exceeds `max_rel_error` or its images' mean PSNR is below
`min_psnr`; the bundle fails when the overall PSNR is below `min_psnr`. A plan entry like `int8?` (the VAE in
a bundle-wide int8/nf4/int4 plan) falls back to fp32 instead of failing. Any other failure raises
FidelityError naming the component and figure, unless `allow_low_fidelity`.
"""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from model_store.onnx_files import save_model
from quantize import embedding_int8, fp16, int4, int8, nf4
from quantize.calibration import Run, prompts, run_pipeline
from quantize.config import QuantizeConfig
from quantize.fidelity import FidelityError, ImageFidelity, rel_error
from quantize.precision import for_components, resolved
from runtime.pipeline import to_vae_input

FIDELITY_SEED = 1000
REL_ERROR_FEEDS = 8
"""Recorded feeds per component the relative error is averaged over."""
STATIC_INT8 = ("unet", "vae_decoder", "vae_encoder")
"""Components quantized statically (calibrated); the text encoder's int8 is dynamic."""


@dataclasses.dataclass
class ComponentResult:
    precision: str
    quantization: dict[str, Any] = dataclasses.field(default_factory=dict)
    fidelity: dict[str, Any] = dataclasses.field(default_factory=dict)
    gpu_only: bool = False
    external_data: str | None = None


@dataclasses.dataclass
class StageResult:
    components: dict[str, ComponentResult]
    fidelity: dict[str, Any]
    """Overall figures, thresholds, prompts, steps, `passed` and `low_fidelity`."""


def _wanted(plan: dict[str, str]) -> dict[str, str]:
    return {c: p for c, p in plan.items() if resolved(p) != "fp32"}


def _needs_calibration(wanted: dict[str, str]) -> bool:
    """A component quantized statically: int8, or the int8 convolutions of a 4-bit UNet/VAE."""
    return any(c in STATIC_INT8 and resolved(p) in ("int8", "nf4", "int4") for c, p in wanted.items())


def stage_count(plan: dict[str, str], components=None) -> int:  # type: ignore[no-untyped-def]
    """Progress stages `run` shows for `plan` over `components` (default: the plan's own): calibrate (if needed),
    reference, quantize + fidelity per component, bundle fidelity."""
    wanted = _wanted(for_components(plan, components) if components is not None else plan)
    if not wanted:
        return 0
    return int(_needs_calibration(wanted)) + 2 + 2 * len(wanted)


def run(staging: Path, files: dict[str, str], model: Any, plan: dict[str, str], config: QuantizeConfig,
        steps: int, stage: Any) -> StageResult | None:
    """Quantize the fp32 components in `staging` (file names in `files`) per `plan`; None if all are fp32.

    `model` is a runtime LoadedModel over the fp32 files; `stage(label)` is the compile's progress context.
    """
    from runtime.sessions import OrtSession

    wanted = _wanted(for_components(plan, files))
    if not wanted:
        return None
    texts = prompts(config.calibration_file)
    fidelity_texts = texts[::-1][: config.fidelity_prompts]
    calibration_texts = [texts[i % len(texts)] for i in range(config.calibration_prompts)]
    feeds: dict[str, list[dict[str, np.ndarray]]] = {}
    if _needs_calibration(wanted):
        with stage(f"calibrate ({len(calibration_texts)} prompts)"):
            feeds = run_pipeline(model, calibration_texts, config.calibration_steps or steps,
                                 size=config.calibration_size).feeds
    with stage(f"fp32 reference ({len(fidelity_texts)} prompts)"):
        # its outputs too: a component's relative error then needs no fp32 session of it beside the quantized one
        ref = run_pipeline(model, fidelity_texts, steps, seed=FIDELITY_SEED, size=config.fidelity_size, outputs=True)

    fp32_dir = staging / ".fp32"
    fp32_dir.mkdir()
    results: dict[str, ComponentResult] = {}
    final_sessions = dict(model.sessions)
    names = list(model.sessions)  # a gate leaves its component's fp32 session closed: model.sessions lacks it then
    for component, want in wanted.items():
        src, dst = fp32_dir / files[component], staging / files[component]
        _move(dst, src)
        precision = resolved(want)
        with stage(f"quantize {component} to {precision}"):
            # the quantizer loads this component's weights (and, for static int8, a calibration session over
            # them): let go of every fp32 session meanwhile (the SD v1 UNet's alone is 3.4 GB) and open them again
            # for the fidelity check, so the quantizer's copy and the sessions are never in memory together
            # an fp32 graph is in .fp32/ once its component was quantized (and back in staging if it fell back)
            fp32 = {c: fp32_dir / files[c] if (fp32_dir / files[c]).exists() else staging / files[c]
                    for c in names}
            shared = {c for c, s in model.sessions.items() if final_sessions.get(c) is s}
            model.sessions.clear()
            for c in shared:
                del final_sessions[c]
            result = _quantize(component, precision, src, dst, feeds.get(component, []), config)
            if component.startswith("text_encoder") and result.precision in ("int8", "nf4", "int4"):
                _int8_embeddings(dst, result)  # SD's only lookup tables: token and position embeddings
        with stage(f"fidelity {component}"):
            for c, path in fp32.items():
                if c == component and ref.outputs.get(c):
                    continue  # its relative error reads the reference run's outputs (SDXL's UNet alone is 10 GB)
                model.sessions[c] = OrtSession(c, path)
                if c in shared or c == component:
                    final_sessions[c] = model.sessions[c]
            session = _gate_session(component, dst, result.quantization)
            result.fidelity = _component_fidelity(component, session, model, ref, fidelity_texts, steps,
                                                  config.fidelity_size)
            problem = _problem(result.fidelity, config)
        if problem and want.endswith("?"):
            _remove(dst)
            _move(src, dst)
            if component not in model.sessions:  # not reopened for the gate: the fp32 graph serves again
                final_sessions[component] = OrtSession(component, dst)
            result = ComponentResult("fp32", {"fallback": f"{precision} failed the fidelity gate: {problem}",
                                              "tried": result.quantization}, result.fidelity)
        else:
            final_sessions[component] = session
            result.fidelity["passed"] = problem is None
            if problem:
                result.fidelity["problem"] = problem
        data = staging / (files[component] + ".data")
        result.external_data = data.name if data.exists() else None
        results[component] = result
    shutil.rmtree(fp32_dir)

    with stage("fidelity of the bundle"):
        final = dataclasses.replace(model, sessions=final_sessions)
        got = run_pipeline(final, fidelity_texts, steps, seed=FIDELITY_SEED, record=False, size=config.fidelity_size)
        overall = ImageFidelity.compare(ref.images, got.images).as_dict()
    failures = [f"{c} ({r.precision}): {r.fidelity['problem']}" for c, r in results.items() if "problem" in r.fidelity]
    if overall["psnr"] < config.min_psnr:
        failures.append(f"bundle: final-image PSNR {overall['psnr']:.1f} dB vs fp32 is below min_psnr="
                        f"{config.min_psnr:g} dB")
    summary = {
        **overall, "prompts": fidelity_texts, "seed": FIDELITY_SEED, "steps": steps,
        "size": config.fidelity_size or int(model.manifest.defaults["width"]), "min_psnr": config.min_psnr,
        "max_rel_error": config.max_rel_error, "passed": not failures, "low_fidelity": bool(failures),
        "failures": failures,
    }
    if failures and not config.allow_low_fidelity:
        raise FidelityError(
            "fidelity gate failed: " + "; ".join(failures) + ". Lower the thresholds (--min-psnr, --max-rel-error), "
            "choose another precision for that component, or publish anyway with --allow-low-fidelity."
        )
    return StageResult(results, summary)


def _problem(fid: dict[str, Any], config: QuantizeConfig) -> str | None:
    if not fid["rel_error"] <= config.max_rel_error:
        return f"relative error {fid['rel_error']:.3g} is above max_rel_error={config.max_rel_error:g}"
    if fid["psnr"] < config.min_psnr:
        return f"final-image PSNR {fid['psnr']:.1f} dB vs fp32 is below min_psnr={config.min_psnr:g} dB"
    return None


def _quantize(component: str, precision: str, src: Path, dst: Path, feeds: list[dict[str, np.ndarray]],
              config: QuantizeConfig) -> ComponentResult:
    external = src.with_name(src.name + ".data").exists()
    if precision == "int8":
        if component.startswith("text_encoder"):
            return ComponentResult("int8", int8.quantize_dynamic(src, dst, external, config.int8_weight_bits))
        return ComponentResult("int8", int8.quantize_static(src, dst, feeds, activations=config.int8_activations,
                                                            external_data=external,
                                                            min_elements=config.weight_min_elements,
                                                            weight_bits=config.int8_weight_bits))
    if precision in ("nf4", "int4"):
        model = onnx.load(str(src), load_external_data=False)
        if precision == "nf4":
            model, report = nf4.apply(model, block_size=config.nf4_block_size,
                                      min_elements=config.weight_min_elements, base_dir=src.parent)
        else:
            model, report = int4.apply(model, block_size=config.int4_block_size,
                                       accuracy_level=config.int4_accuracy_level,
                                       min_elements=config.weight_min_elements, base_dir=src.parent)
        info: dict[str, Any] = {"matmul": report}
        if not report["converted"] and component not in STATIC_INT8:
            shutil.copy(src, dst)  # nothing qualified: say fp32 rather than a precision it does not have
            return ComponentResult("fp32", {"note": f"no MatMul/Gemm weight of {config.weight_min_elements} or "
                                            f"more elements for {precision}", "matmul": report})
        if component in STATIC_INT8 and any(n.op_type == "Conv" for n in model.graph.node):
            tmp = dst.with_name(dst.stem + ".4bit.onnx")
            written = save_model(model, tmp)  # SD v1's fp32 convolutions alone pass 2 GB
            del model
            info["conv"] = int8.quantize_static(tmp, dst, feeds, op_types=("Conv",),
                                                activations=config.int8_activations, external_data=len(written) > 1,
                                                weight_bits=config.int8_weight_bits)
            _remove(tmp)
        else:
            save_model(model, dst)
        return ComponentResult(precision, info)
    if precision == "fp16":
        half, info = fp16.convert(onnx.load(str(src)))
        save_model(half, dst)
        error = fp16.runs_on_cpu(str(dst))
        if error:
            info["cpu_error"] = error
        return ComponentResult("fp16", info, gpu_only=error is not None)
    raise ValueError(f"precision={precision!r} for {component} is not one of int8, nf4, int4, fp16")


def _int8_embeddings(path: Path, result: ComponentResult) -> None:
    """Store the embedding tables of a quantized graph as int8 rows (`quantize.embedding_int8`)."""
    external = path.with_name(path.name + ".data").exists()
    model = onnx.load(str(path))
    report = embedding_int8.apply(model)
    if report["converted"]:
        save_model(model, path, external=external)
    if report["converted"] or report["skipped"]:
        result.quantization["embeddings"] = report


def _component_fidelity(component: str, session: Any, model: Any, ref: Run, texts: list[str],
                        steps: int, size: int | None = None) -> dict[str, Any]:
    """Relative error on recorded inputs, and final images with only this component quantized."""
    fp32 = model.sessions.get(component)  # None when the reference run recorded its outputs
    errors = []
    every = max(1, len(ref.feeds[component]) // REL_ERROR_FEEDS)
    recorded: list[Any] = [None] * len(ref.feeds[component])  # outputs the reference run kept, else computed
    recorded = ref.outputs.get(component) or recorded
    for feed, outputs in list(zip(ref.feeds[component], recorded, strict=True))[::every][:REL_ERROR_FEEDS]:
        want = next(iter((outputs if outputs is not None else fp32.run(feed)).values()))
        got = next(iter(session.run(feed).values()))
        errors.append(rel_error(want, got))
    out: dict[str, Any] = {"rel_error": round(float(np.mean(errors)), 6)}
    if component in ("text_encoder", "text_encoder_2", "unet"):
        swapped = dataclasses.replace(model, sessions={**model.sessions, component: session})
        images = run_pipeline(swapped, texts, steps, seed=FIDELITY_SEED, record=False, size=size).images
    elif component == "vae_decoder":
        images = [_decode(model, session, z) for z in ref.latents]
    else:  # vae_encoder: round trip through the fp32 decoder, against the fp32 encoder's round trip
        c, s = model.manifest.model["latent_channels"], model.manifest.model["vae_scaling_factor"]
        refs, images = [], []
        for im in ref.images:
            x = to_vae_input(im)
            refs.append(_decode(model, model.sessions["vae_decoder"], fp32.run({"sample": x})["latent_moments"][:, :c] * s))
            images.append(_decode(model, model.sessions["vae_decoder"], session.run({"sample": x})["latent_moments"][:, :c] * s))
        out.update(ImageFidelity.compare(refs, images).as_dict())
        return out
    out.update(ImageFidelity.compare(ref.images, images).as_dict())
    return out


def _gate_session(component: str, path: Path, quantization: dict[str, Any]) -> Any:
    """The gate's session over a quantized component. Full-range (8-bit) int8 is measured on ONNX Runtime's exact
    kernels on every CPU: the integers a VNNI or AMX CPU computes, which is also what the runtime serves on a CPU
    whose int8 kernels saturate (runtime/cpu.py); without them a compile there would gate saturated numbers."""
    from runtime import cpu
    from runtime.sessions import OrtSession

    if not cpu.full_range_int8(quantization):
        return OrtSession(component, path)
    try:
        return OrtSession(component, path, config=cpu.EXACT_KERNELS)
    except Exception as e:  # ONNX Runtime 1.32 cannot move int8 weights shared by two products to those kernels
        raise FidelityError(
            f"{component} (int8, 8-bit weights): ONNX Runtime's exact int8 kernels cannot load it ({e}), so a CPU "
            "without VNNI could not serve it exactly; compile with --int8-weight-bits 7 (the default)") from e


def _decode(model: Any, decoder: Any, latents: np.ndarray) -> np.ndarray:
    """The runtime's decode stage (runtime.pipeline) with the given decoder session."""
    from runtime.pipeline import Pipeline

    return Pipeline(dataclasses.replace(model, sessions={**model.sessions, "vae_decoder": decoder})).vae_decode(latents)[0]


def _move(src: Path, dst: Path) -> None:
    src.replace(dst)
    data = src.with_name(src.name + ".data")
    if data.exists():
        data.replace(dst.with_name(dst.name + ".data"))


def _remove(path: Path) -> None:
    path.unlink(missing_ok=True)
    path.with_name(path.name + ".data").unlink(missing_ok=True)
