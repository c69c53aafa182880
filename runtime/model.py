"""A loaded bundle: manifest, model sessions, tokenizer and noise schedule, ready to serve."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from model_store import BundleRef, HashCache, Manifest, ManifestError, Store
from model_store.manifest import ComponentEntry
from runtime.adapters import ADAPTERS_DIR, COMPONENTS, Adapter, LoraFeeds, load_adapters, lora_input_shapes
from runtime.cpu import int8_session_configs
from runtime.device import GPU_PROVIDERS, ProviderSpec, provider_names
from runtime.graph_cache import GraphCache, GraphKey, config_key
from runtime.samplers.schedule import NoiseSchedule
from runtime.sessions import ModelSession, OrtSession
from runtime.sessions_openvino import OpenVinoConfig, OpenVinoSession, UnreadableGraph, require_openvino
from runtime.tokenizer import PromptTokenizer

log = logging.getLogger(__name__)

REQUIRED = ("text_encoder", "unet", "vae_decoder")
ENGINES = ("onnxruntime", "openvino")
"""Inference engines that run a bundle's ONNX graphs: ONNX Runtime (any provider), or OpenVINO on the CPU."""


@dataclass(frozen=True)
class Decoder:
    """One VAE decoder a request may pick (GenerateRequest.decoder)."""

    component: str
    """The session that runs it: `vae_decoder`, or `vae_decoder_tiny`."""
    scaling_factor: float
    """The UNet's latents are divided by this before it (its VAE's own `scaling_factor`: SD's 0.18215; 1.0 for
    TAESD, which is trained on the scaled latents themselves)."""


class BundleFacts:
    """What a bundle's manifest says about it, for classes with a `manifest` (a loaded model, a pool's card)."""

    manifest: Manifest

    @property
    def name(self) -> str:
        return self.manifest.name

    @property
    def version(self) -> str:
        return self.manifest.version

    @property
    def sdxl(self) -> bool:
        """Two text encoders and the UNet's added conditioning (pooled text embeddings, size/crop ids)."""
        return self.manifest.model.get("architecture") == "sdxl"

    @property
    def inpainting(self) -> bool:
        """A 9-channel UNet (latents + mask + masked-image latents), like SD's inpainting checkpoints."""
        return int(self.manifest.model.get("unet_in_channels", 4)) == 9

    @property
    def decoders(self) -> dict[str, Decoder]:
        return manifest_decoders(self.manifest)


@dataclass
class LoadedModel(BundleFacts):
    manifest: Manifest
    path: Path
    sessions: dict[str, ModelSession]
    tokenizer: PromptTokenizer
    schedule: NoiseSchedule
    lora: LoraFeeds | None = None
    """Bundles compiled with --lora-inputs: their adapters and the feeds of each selection; else None."""
    tokenizer_2: PromptTokenizer | None = None
    """SDXL: the second text encoder's tokenizer (same vocabulary, its own padding); else None."""

    @property
    def adapters(self) -> dict[str, Adapter]:
        return self.lora.adapters if self.lora is not None else {}

    @property
    def max_loras(self) -> int:
        """Most adapters one request may select (0: the bundle has no LoRA inputs)."""
        return int(self.manifest.limits.get("max_loras", 0)) if self.lora is not None else 0

    def lora_feeds(self, component: str, selection) -> dict:  # type: ignore[no-untyped-def]
        """The LoRA inputs of `component` for a request's adapter selection; {} for a bundle without them."""
        if self.lora is None or component not in self.lora.shapes:
            return {}
        return self.lora.feeds(component, selection)

    def attach_adapters(self, folder: Path) -> None:
        """Read the adapters in `folder` (`STORE/NAME/adapters`) that fit this bundle's LoRA inputs."""
        shapes = {c: lora_input_shapes(self.sessions[c]) for c in COMPONENTS if c in self.sessions}
        shapes = {c: s for c, s in shapes.items() if s}
        if not shapes:
            return
        self.lora = LoraFeeds(shapes, load_adapters(folder, shapes))



def manifest_decoders(manifest: Manifest) -> dict[str, Decoder]:
    """`full`, and `tiny` for a bundle compiled with --tiny-decoder (manifest `model.decoders`; bundles from before
    it have the full one only), among the components the bundle has."""
    m = manifest.model
    given = m.get("decoders") or {"full": {"component": "vae_decoder", "scaling_factor": m["vae_scaling_factor"]}}
    return {name: Decoder(str(d["component"]), float(d["scaling_factor"])) for name, d in given.items()
            if d["component"] in manifest.components}


def load_bundle(ref: BundleRef, providers: ProviderSpec | None = None, threads: int = 0, engine: str = "onnxruntime",
                openvino: OpenVinoConfig | None = None, hashes: HashCache | None = None,
                graphs: GraphCache | None = None) -> LoadedModel:
    """Verify every file of a bundle against its manifest (size and sha256; `hashes` remembers the sha256 of files
    already verified), then open its components; raises ManifestError naming the first file that differs.
    `graphs`: ONNX Runtime's optimized graphs are cached there (runtime/graph_cache.py), keyed on the verified
    sha256 of the files they came from."""
    ref.check_files(hashes=True, cache=hashes if hashes is not None else HashCache(persist=False))
    return open_bundle_dir(ref.path, ref.manifest, providers, threads, engine, openvino, graphs)


def open_bundle_dir(path: Path, m: Manifest, providers: ProviderSpec | None = None, threads: int = 0,
                    engine: str = "onnxruntime", openvino: OpenVinoConfig | None = None,
                    graphs: GraphCache | None = None) -> LoadedModel:
    """Sessions over a bundle folder's files as `m` describes them (the compiler uses it before publishing).

    `engine` picks who runs the graphs; with "openvino", `openvino` configures it (default: OpenVINO's precision,
    `threads` threads) and `providers` is unused. Raises UnreadableGraph naming the component and ops OpenVINO
    cannot convert, OpenVinoMissing when openvino is not installed. `graphs`: cache ONNX Runtime's optimized
    graphs there, keyed on the manifest's sha256 of each component's files (so only a verified folder may use it)."""
    if engine not in ENGINES:
        raise ValueError(f"engine={engine!r} must be one of {', '.join(ENGINES)}")
    missing = [c for c in REQUIRED if c not in m.components]
    if missing:
        raise ManifestError(f"bundle {path} lacks components {missing}")
    providers = providers or ["CPUExecutionProvider"]
    gpu_only = [n for n, c in m.components.items() if c.gpu_only]
    if gpu_only and (engine == "openvino" or not GPU_PROVIDERS & set(provider_names(providers))):
        raise ManifestError(
            f"bundle {m.name} {m.version}: {', '.join(gpu_only)} ({m.components[gpu_only[0]].precision}) cannot run on "
            "the CPU; serve it with `kiln serve --device cuda` (onnxruntime-gpu), or compile --precision fp32/int8 "
            "for CPU"
        )
    if engine == "openvino" and m.model.get("lora_inputs"):
        raise ManifestError(f"bundle {m.name} {m.version} was compiled with --lora-inputs, which the OpenVINO engine "
                            "does not feed; serve it with --engine onnxruntime, or recompile it without them")
    if engine == "openvino":
        int8_session_configs(m, engine)  # refuses full-range int8 where OpenVINO's int8 kernels saturate
        config = openvino or OpenVinoConfig(threads=threads)
        sessions: dict[str, ModelSession] = {
            name: OpenVinoSession(name, path / c.file, config) for name, c in m.components.items()
        }
    else:
        exact = int8_session_configs(m)  # full-range int8 on a CPU whose int8 kernels saturate: runtime/cpu.py
        sessions = {name: OrtSession(name, path / c.file, providers, threads, config=exact.get(name),
                                     graphs=(graphs, graph_key(m, c, exact.get(name))) if graphs else None)
                    for name, c in m.components.items()}
        if graphs is not None:
            states = {name: getattr(s, "graph_cache", "off") for name, s in sessions.items()}
            log.info("%s %s: optimized graphs from the cache: %s", m.name, m.version,
                     ", ".join(f"{name} {state}" for name, state in states.items()))
    try:
        tokenizer = _tokenizer(path, m.tokenizer)
        second = m.tokenizer.get("second")  # SDXL's second tokenizer, described the same way
        tokenizer_2 = _tokenizer(path, second) if second else None
    except ValueError as e:
        raise ManifestError(f"bundle {path}: {e}") from None
    if m.model.get("architecture") == "sdxl" and (tokenizer_2 is None or "text_encoder_2" not in sessions):
        raise ManifestError(f"bundle {path}: an SDXL bundle needs text_encoder_2 and tokenizer.second")
    model = LoadedModel(m, path, sessions, tokenizer, NoiseSchedule.from_config(m.scheduler_config),
                        tokenizer_2=tokenizer_2)
    model.attach_adapters(path.parent / ADAPTERS_DIR)  # a bundle outside a store: none beside it
    return model


def graph_key(m: Manifest, c: ComponentEntry, config: dict[str, str] | None) -> GraphKey:
    """What a component's optimized graph is cached under: its files' manifest sha256 and the session entries."""
    digests = {f.path: f.sha256 for f in m.files}
    files = [c.file] + ([c.external_data] if c.external_data else [])
    return GraphKey(tuple(digests[f] for f in files), "ORT_ENABLE_ALL", config_key(config))


def _tokenizer(path: Path, section: dict) -> PromptTokenizer:
    """The tokenizer a manifest's `tokenizer` section (or its `second`) describes, with its textual-inversion tokens."""
    return PromptTokenizer(path / section["file"], section["max_length"], section["bos_id"], section["eos_id"],
                           section["pad_id"], {e["token"]: e["tokens"] for e in section.get("embeddings", [])})


def load_store(root: str | Path, providers: ProviderSpec | None = None, threads: int = 0, engine: str = "onnxruntime",
               openvino: OpenVinoConfig | None = None, hashes: HashCache | None = None) -> dict[str, LoadedModel]:
    """The newest version of every bundle in the store that verifies and loads (newest by its manifest's creation
    time). A version whose files differ from its manifest, or that fails to open (or that `engine` cannot read), is
    logged and the next older one is tried, so a broken publish never takes a model offline. A missing engine is
    not per bundle: OpenVinoMissing is raised at once."""
    if engine not in ENGINES:
        raise ValueError(f"engine={engine!r} must be one of {', '.join(ENGINES)}")
    if engine == "openvino":
        require_openvino()
    store = Store(root)
    hashes = hashes if hashes is not None else HashCache(persist=False)
    models: dict[str, LoadedModel] = {}
    for name in store.names():
        refs = store.refs(name)
        for i, ref in enumerate(refs):
            fallback = f"; trying version {refs[i + 1].manifest.version}" if i + 1 < len(refs) else ""
            try:
                models[name] = load_bundle(ref, providers, threads, engine, openvino, hashes)
            except (ManifestError, UnreadableGraph) as e:
                log.error("skipping bundle %s version %s: %s%s", name, ref.manifest.version, e, fallback)
                continue
            except Exception:  # a bundle the runtime cannot open must not stop the others from serving
                log.exception("skipping bundle %s version %s: its sessions failed to load%s", name,
                              ref.manifest.version, fallback)
                continue
            log.info("loaded %s version %s from %s", name, ref.manifest.version, ref.path)
            if models[name].adapters:
                log.info("%s: LoRA adapters %s", name, ", ".join(sorted(models[name].adapters)))
            break
        if name not in models:
            log.error("bundle %s: no version verified and loaded; it is not served", name)
    hashes.save()
    if hashes.hashed:
        log.info("verified %d file(s), %.1f MB, against their manifests' sha256", hashes.hashed,
                 hashes.hashed_bytes / 1e6)
    return models
