"""`kiln` subcommands. Serving and client commands never import torch; compile commands do."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from cli.config_file import ConfigError, apply, config_path

COMPILER_MODULES = frozenset({"compiler", "quantize", "train", "torch", "diffusers", "transformers", "onnx",
                              "safetensors", "accelerate"})
"""What `kiln compile`, `models init` and `train` need beyond the runtime (pip extra `compiler`)."""


def _key_values(text: str, flag: str) -> dict[str, float]:
    out = {}
    for item in filter(None, text.split(",")):
        key, sep, value = item.partition("=")
        try:
            out[key.strip()] = float(value)
        except ValueError:
            sep = ""
        if not sep:
            raise argparse.ArgumentTypeError(f"{flag} expects COMPONENT=NUMBER[,...]; got {item!r}")
    return out


def cmd_models_init(args: argparse.Namespace) -> int:
    from compiler.source import init_model

    path = init_model(args.dir, args.arch, args.seed)
    print(f"wrote {args.arch} model (seed {args.seed}) to {path}")
    return 0


def cmd_compile(args: argparse.Namespace) -> int:
    from compiler.compile import compile_model
    from compiler.config import CompileConfig
    from compiler.source.errors import SourceError
    from compiler.source.options import EmbeddingSpec, LoraSpec, SourceOptions
    from compiler.verify import ParityError
    from quantize.config import QuantizeConfig
    from quantize.fidelity import FidelityError

    quantize = QuantizeConfig(
        calibration_prompts=args.calibration_prompts, calibration_file=args.calibration_file,
        calibration_steps=args.calibration_steps, calibration_size=args.calibration_size,
        int8_activations=args.int8_activations, int8_weight_bits=args.int8_weight_bits,
        nf4_block_size=args.nf4_block_size, int4_block_size=args.int4_block_size,
        int4_accuracy_level=args.int4_accuracy_level, weight_min_elements=args.weight_min_elements,
        fidelity_prompts=args.fidelity_prompts, fidelity_size=args.fidelity_size,
        min_psnr=args.min_psnr, max_rel_error=args.max_rel_error, allow_low_fidelity=args.allow_low_fidelity,
    )
    config = CompileConfig(name=args.name, precision=args.precision, opset=args.opset, fusions=not args.no_fusions,
                           reuse_exports=not args.no_reuse, tome=args.tome, attention_slicing=args.attention_slicing,
                           default_steps=args.default_steps, default_guidance_scale=args.default_guidance,
                           default_sampler=args.default_sampler, default_size=args.default_size,
                           preset=args.preset, quantize=quantize,
                           lora_inputs=args.lora_inputs, max_loras=args.max_loras)
    if args.parity_threshold:
        config.parity_threshold.update(_key_values(args.parity_threshold, "--parity-threshold"))
        config.__post_init__()
    try:
        options = SourceOptions(loras=[LoraSpec.parse(t) for t in args.lora],
                                embeddings=[EmbeddingSpec.parse(t) for t in args.embedding], vae=args.vae,
                                tiny_decoder=args.tiny_decoder,
                                prediction_type=args.prediction_type, model_config=args.model_config)
    except (ValueError, FileNotFoundError) as e:
        print(f"kiln: {e}", file=sys.stderr)
        return 2
    try:
        result = compile_model(args.source, args.store, config, progress=not args.quiet, options=options)
    except SourceError as e:
        print(f"kiln: compile failed, nothing was published: {e}", file=sys.stderr)
        return 5
    except ParityError as e:
        print(f"kiln: compile failed, nothing was published: {e}", file=sys.stderr)
        return 3
    except FidelityError as e:
        print(f"kiln: compile failed, nothing was published: {e}", file=sys.stderr)
        return 4
    m = result.manifest
    src = m.source
    if "file_sha256" in src:
        print(f"source: {src['file']} (sha256 {src['file_sha256'][:16]}...), family {src['family']}, "
              f"{src['prediction_type']} (from {src['prediction_type_from']}), "
              f"{'EMA' if src['ema'] else 'non-EMA'} weights from {'/'.join(src['file_dtypes'])}")
    for lo in src.get("loras", []):
        print(f"lora: {lo['name']} at {lo['scale']:g} (rank {lo['rank']}, sha256 {lo['sha256'][:16]}...)")
    for name, c in m.components.items():
        fid = ""
        if c.fidelity:
            fid = f"  vs fp32: rel err {c.fidelity['rel_error']:.3g}, PSNR {c.fidelity['psnr']:.1f} dB"
        fallback = f"  ({c.quantization['fallback']})" if "fallback" in c.quantization else ""
        print(f"{name:<13} {c.precision:<5} max|diff| vs PyTorch {c.parity['max_abs_diff']:.2e}  passes: "
              f"{', '.join(c.passes) or '-'}{fid}{fallback}")
    if m.fidelity:
        f = m.fidelity
        print(f"bundle vs fp32: PSNR {f['psnr']:.1f} dB (min {f['psnr_min']:.1f}), SSIM {f['ssim']:.4f} over "
              f"{len(f['prompts'])} prompts at {f['steps']} steps"
              + ("  LOW FIDELITY: " + "; ".join(f["failures"]) if f["low_fidelity"] else ""))
    d, preset = m.defaults, m.compile_config.get("preset")
    print(f"request defaults: {d['width']}x{d['height']}, {d['sampler']}, {d['steps']} steps, guidance "
          f"{d['guidance_scale']:g}" + (f" (preset {preset})" if preset else ""))
    print(f"bundle {m.name} version {m.version} at {result.path}")
    return 0


def cmd_lora_add(args: argparse.Namespace) -> int:
    from compiler.adapters import add_adapter
    from compiler.source.errors import SourceError

    try:
        info = add_adapter(args.file, args.store, args.model, args.name)
    except SourceError as e:
        print(f"kiln: lora add failed, nothing was written: {e}", file=sys.stderr)
        return 5
    print(f"adapter {info['name']} of {args.model}: rank {info['rank']}, "
          f"{sum(info['targets'].values())} layers, sha256 {info['sha256'][:16]}...")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from train.shapes.trainer import TrainConfig, train

    overrides = {k: v for k, v in (("unet_steps", args.unet_steps), ("vae_steps", args.vae_steps),
                                   ("dataset_size", args.dataset_size)) if v is not None}
    path = train(args.out, TrainConfig(seed=args.seed, **overrides), resume=args.resume, progress=not args.quiet)
    print(f"trained model (EMA weights, fp16) written to {path}")
    return 0


def cmd_train_dreambooth(args: argparse.Namespace) -> int:
    from cli.flags import from_args
    from train.dreambooth.config import DreamboothConfig
    from train.dreambooth.trainer import train as train_dreambooth

    try:
        config = from_args(DreamboothConfig, args)
        path = train_dreambooth(args.base, args.out, args.instance_images, config, resume=args.resume,
                                progress=not args.quiet)
    except (ValueError, FileNotFoundError, FileExistsError) as e:
        print(f"kiln: train dreambooth: {e}", file=sys.stderr)
        return 2
    print(f"{'LoRA (kohya format)' if config.lora else 'fine-tuned model (diffusers folder)'} written to {path}")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    import asyncio

    from cli.flags import from_args
    from runtime.accounts.accounts import AccountsConfig
    from runtime.accounts.tiers import DEFAULT_TIERS
    from runtime.device import DeviceConfig
    from runtime.engine import EngineConfig
    from runtime.pool.config import PoolConfig
    from runtime.server.app import ServeConfig, serve
    from runtime.server.tracing_config import TracingConfig

    accounts = None
    if args.auth_db:
        accounts = AccountsConfig(args.auth_db, Path(args.tiers) if args.tiers else DEFAULT_TIERS, args.hold_ttl)
    elif args.tiers:
        raise ValueError("--tiers needs --auth-db (the ledger the tiers' credits are kept in)")
    engine = EngineConfig(batching=not args.no_batching, max_batch_size=args.max_batch,
                          max_wait_s=args.max_wait_ms / 1000, max_queue=args.max_queue)
    device = DeviceConfig(args.device, tuple(filter(None, args.providers.split(","))),
                          Path(args.trt_cache) if args.trt_cache else None)
    extra = {}
    if args.cache_dir:
        extra["cache_dir"] = None if args.cache_dir == "none" else Path(args.cache_dir)
    extra["graph_cache"] = not args.no_graph_cache
    tls = None
    if args.tls_cert or args.tls_key or args.tls_client_ca:
        from runtime.tls import ServerTls

        if not (args.tls_cert and args.tls_key):
            print("kiln serve: error: TLS needs both --tls-cert and --tls-key (--tls-client-ca adds mutual TLS to "
                  "them)", file=sys.stderr)
            return 2
        tls = ServerTls(Path(args.tls_cert), Path(args.tls_key),
                        Path(args.tls_client_ca) if args.tls_client_ca else None)
    extra["tls"] = tls
    extra["metrics_port"], extra["metrics_host"] = args.metrics_port, args.metrics_host
    extra["pool"] = from_args(PoolConfig, args)
    extra["tracing"] = from_args(TracingConfig, args)
    config = ServeConfig(store=Path(args.store), host=args.host, port=args.port, threads=args.threads,
                         shutdown_grace_s=args.shutdown_grace, lame_duck_s=args.lame_duck, accounts=accounts,
                         insecure_open=args.insecure_open,
                         engine=engine, inference_engine=args.engine, openvino_precision=args.openvino_precision,
                         openvino_static_shapes=args.openvino_static_shapes, device=device, **extra)
    gateway = None
    if args.gateway_port is not None:  # the HTTP gateway beside the server, in the same process (a single box)
        from gateway.config import GatewayConfig

        # the server's own accounts decide: the gateway beside an open server is as open as the server
        gateway = from_args(GatewayConfig, args, port=args.gateway_port, host=args.gateway_host,
                            insecure_open=args.insecure_open or bool(accounts))
    if gateway is None:
        return asyncio.run(serve(config))
    from gateway.server import Exposed

    try:
        return asyncio.run(serve(config, gateway))
    except Exposed as e:
        print(f"kiln serve: the gateway: {e}", file=sys.stderr)
        return 2


def cmd_gateway(args: argparse.Namespace) -> int:
    import asyncio

    from cli.flags import from_args
    from gateway.config import GatewayConfig
    from gateway.server import Exposed, serve

    try:
        config = from_args(GatewayConfig, args)
    except ValueError as e:
        print(f"kiln gateway: error: {e}", file=sys.stderr)
        return 2
    try:
        return asyncio.run(serve(config))
    except Exposed as e:
        print(f"kiln gateway: {e}", file=sys.stderr)
        return 2


def _accounts(args: argparse.Namespace):  # type: ignore[no-untyped-def]
    from runtime.accounts.accounts import Accounts, AccountsConfig
    from runtime.accounts.tiers import DEFAULT_TIERS

    return Accounts(AccountsConfig(args.auth_db, Path(args.tiers) if args.tiers else DEFAULT_TIERS))


def cmd_keys_create(args: argparse.Namespace) -> int:
    import asyncio

    async def run() -> str:
        accounts = _accounts(args)
        try:
            new = await accounts.create_key(args.tier, args.label)
        finally:
            await accounts.close()
        print(f"created key {new.key_id} (tier {args.tier}); it is shown once, store it now:", file=sys.stderr)
        return new.token

    print(asyncio.run(run()))
    return 0


def cmd_keys_revoke(args: argparse.Namespace) -> int:
    import asyncio
    import time

    async def run() -> bool:
        accounts = _accounts(args)
        try:
            return await accounts.ledger.revoke_key(args.key_id, time.time())
        finally:
            await accounts.close()

    if not asyncio.run(run()):
        print(f"no key {args.key_id!r} in {args.auth_db}", file=sys.stderr)
        return 1
    print(f"revoked {args.key_id}")
    return 0


def cmd_keys_list(args: argparse.Namespace) -> int:
    import asyncio
    import time

    async def run():  # type: ignore[no-untyped-def]
        accounts = _accounts(args)
        try:
            return await accounts.ledger.list_keys()
        finally:
            await accounts.close()

    print("key_id\ttier\tcreated\trevoked\tlabel")
    for k in asyncio.run(run()):
        fmt = "%Y-%m-%dT%H:%M:%SZ"
        revoked = time.strftime(fmt, time.gmtime(k.revoked)) if k.revoked is not None else "-"
        print(f"{k.key_id}\t{k.tier}\t{time.strftime(fmt, time.gmtime(k.created))}\t{revoked}\t{k.label}")
    return 0


def cmd_credits(args: argparse.Namespace) -> int:
    import time

    import grpc

    from runtime.client import describe_error, get_balance

    try:
        b = get_balance(args.target, args.api_key, tls=_client_tls(args))
    except grpc.RpcError as e:
        print(describe_error(e), file=sys.stderr)
        return 1
    reset = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(b.reset_unix))
    print(f"key {b.key_id} (tier {b.tier}): {b.remaining} credit(s) left today of {b.daily_credits} daily + "
          f"{b.granted} granted; spent {b.spent}, held by running requests {b.held}; resets {reset}")
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    import grpc

    from proto.kiln.v1 import kiln_pb2 as pb
    from runtime.client import describe_credits, describe_error, generate, key_metadata

    request = pb.GenerateRequest(
        model=args.model, prompt=args.prompt, negative_prompt=args.negative_prompt, width=args.width,
        height=args.height, steps=args.steps, sampler=args.sampler, num_images=args.num_images,
        request_id=args.request_id, preview_every=args.preview_every, decoder=args.decoder,
    )
    if args.guidance is not None:
        request.guidance_scale = args.guidance
    if args.seed is not None:
        request.seed = args.seed
    if args.mask and not args.init_image:
        raise ValueError("--mask needs --init-image (the image to inpaint)")
    if args.strength is not None and not args.init_image:
        raise ValueError("--strength applies only with --init-image")
    if args.init_image:  # sent as the file's bytes: the server decodes and checks them
        request.init_image = Path(args.init_image).read_bytes()
    if args.mask:
        request.mask_image = Path(args.mask).read_bytes()
        request.mask_blur = args.mask_blur
    if args.strength is not None:
        request.strength = args.strength
    for text in args.lora:
        name, sep, scale = text.rpartition(":")
        try:
            request.loras.append(pb.LoraSelection(name=name, scale=float(scale)) if sep else pb.LoraSelection(name=text))
        except ValueError:
            raise ValueError(f"--lora {text!r}: expected NAME or NAME:SCALE (a number)") from None
    metadata = key_metadata(args.api_key)
    if args.idempotency_key:
        metadata += (("x-idempotency-key", args.idempotency_key),)
    try:
        result = generate(args.target, request, Path(args.out), timeout=args.timeout, progress=not args.quiet,
                          metadata=metadata, tls=_client_tls(args))
    except grpc.RpcError as e:
        print(describe_error(e), file=sys.stderr)
        return 1
    credits = describe_credits(result.metadata)
    if credits:
        print(credits, file=sys.stderr)
    s = result.started
    for path, a in zip(result.paths, result.artifacts, strict=False):
        total = sum(t.seconds for t in a.timings)
        steps = f"{s.steps} steps" if s.mode == "text_to_image" else \
            f"{s.mode}, strength {s.strength:g}: {s.denoising_steps} of {s.steps} steps"
        print(f"wrote {path} ({s.width}x{s.height}, {steps}, {s.sampler}, seed {a.seed}, {total:.2f}s)")
    return 0


def cmd_models_list(args: argparse.Namespace) -> int:
    import grpc

    from runtime.client import describe_error, list_models

    try:
        response = list_models(args.target, api_key=args.api_key, tls=_client_tls(args))
    except grpc.RpcError as e:
        print(describe_error(e), file=sys.stderr)
        return 1
    if response.memory_budget_bytes:
        print(f"# memory budget {response.memory_budget_bytes / 1e6:.0f} MB, models hold "
              f"{response.memory_used_bytes / 1e6:.0f} MB (process {response.process_resident_bytes / 1e6:.0f} MB)")
    for m in response.models:
        precision = ",".join(f"{k}={v}" for k, v in sorted(m.precision.items()))
        fidelity = ""
        if m.HasField("fidelity"):
            fidelity = f"\tvs fp32 {m.fidelity.psnr_db:.1f} dB" + (" LOW FIDELITY" if m.fidelity.low_fidelity else "")
        state = (f"loaded {m.memory_bytes / 1e6:.0f} MB" if m.loaded else "not loaded") + (" pinned" if m.pinned else "")
        print(f"{m.name}\t{m.version}\t{state}\t{m.default_width}x{m.default_height}\t{m.default_sampler}/{m.default_steps} "
              f"steps\tsizes {m.limits.min_size}-{m.limits.max_size}\t{precision}{fidelity}"
              + ("\tinpainting model" if m.inpainting_model else "")
              + ("\tSDXL" if m.architecture == "sdxl" else "")
              + (f"\tembeddings {' '.join(m.embedding_tokens)}" if m.embedding_tokens else "")
              + (f"\tfrom {m.source_family}" if m.source_family not in ("", "diffusers-folder") else "")
              + (f"\tloras {' '.join(f'{lo.name}:{lo.scale:g}' for lo in m.fused_loras)}" if m.fused_loras else "")
              + (f"\tLoRA adapters (up to {m.limits.max_loras}): " + ", ".join(f"{a.name} (rank {a.rank})" for a in m.adapters)
                 if m.adapters else "")
              + (f"\taliases {' '.join(f'{a}->{v}' for a, v in sorted(m.aliases.items()))}" if m.aliases else "")
              + (f"\tengine {m.engine}" if m.engine and m.engine != "onnxruntime" else ""))
    return 0


def cmd_models_load(args: argparse.Namespace) -> int:
    import grpc

    from runtime.client import describe_error, load_model

    unload = args.models_command == "unload"
    try:
        m = load_model(args.target, args.model, unload=unload, api_key=args.api_key, tls=_client_tls(args))
    except grpc.RpcError as e:
        print(describe_error(e), file=sys.stderr)
        return 1
    print(f"{m.name}\t{m.version}\t" + (f"loaded {m.memory_bytes / 1e6:.0f} MB in {m.load_seconds:.2f}s" if m.loaded
                                         else "not loaded") + (f"\tloaded versions {' '.join(m.loaded_versions)}"
                                                               if m.loaded_versions else ""))
    return 0


def cmd_models_alias(args: argparse.Namespace) -> int:
    from model_store import Store
    from model_store.aliases import AliasError, ModelRef, read_aliases, remove_alias, set_alias

    store = Store(args.store)
    try:
        if args.remove:
            target = remove_alias(store.root, args.remove)
            print(f"removed alias {args.remove} (was {target})")
        elif args.target_version:
            ref = ModelRef.parse(args.target_version)
            if not args.alias:
                raise AliasError("give the alias: kiln models alias NAME@VERSION ALIAS")
            set_alias(store.root, ref, args.alias, store.versions(ref.name), store.names())
            print(f"{args.alias} -> {ref}" + ("  (the plain name now serves this version; --remove "
                                             f"{args.alias} to follow the newest again)" if args.alias == ref.name
                                             else ""))
        else:
            for alias, ref in sorted(read_aliases(store.root).items()):
                print(f"{alias}\t{ref}")
    except AliasError as e:
        print(f"kiln models alias: error: {e}", file=sys.stderr)
        return 2
    return 0


def cmd_wait(args: argparse.Namespace) -> int:
    from runtime.client import wait_ready

    wait_ready(args.target, args.timeout, tls=_client_tls(args))
    return 0


class _Archs:
    """`--arch` choices, read from the compiler's arch table only when `models init` is parsed or its help is
    shown: building the parser for `kiln serve` or `kiln generate` must import nothing from compiler/."""

    def _names(self) -> list[str]:
        from compiler.source.init import ARCHS  # the arch table only: no torch

        return sorted(ARCHS)

    def __contains__(self, name: object) -> bool:
        return name in self._names()

    def __iter__(self):  # type: ignore[no-untyped-def]
        return iter(self._names())


class _Presets:
    """`--preset` choices, read from the compile config only when `compile` is parsed (as `_Archs`)."""

    def _names(self) -> list[str]:
        from compiler.config import PRESETS

        return sorted(PRESETS)

    def __contains__(self, name: object) -> bool:
        return name in self._names()

    def __iter__(self):  # type: ignore[no-untyped-def]
        return iter(self._names())


def _api_key(p: argparse.ArgumentParser) -> None:
    p.add_argument("--api-key", default=os.environ.get("KILN_API_KEY", ""),
                   help="API key for servers with accounts (default: $KILN_API_KEY)")
    _tls_client_flags(p)


def _tls_client_flags(p: argparse.ArgumentParser) -> None:
    t = p.add_argument_group("TLS (servers started with --tls-cert)")
    t.add_argument("--tls", action="store_true", help="speak TLS, trusting the system's CA roots")
    t.add_argument("--tls-ca", metavar="PEM", help="speak TLS, trusting this CA bundle (implies --tls)")
    t.add_argument("--tls-cert", metavar="PEM", help="client certificate, for servers that require one (mutual TLS)")
    t.add_argument("--tls-key", metavar="PEM", help="the client certificate's private key")


def _client_tls(args: argparse.Namespace):  # type: ignore[no-untyped-def]
    from runtime.tls import ClientTls

    if not (args.tls or args.tls_ca or args.tls_cert or args.tls_key):
        return None
    return ClientTls(ca=Path(args.tls_ca) if args.tls_ca else None, cert=Path(args.tls_cert) if args.tls_cert else None,
                     key=Path(args.tls_key) if args.tls_key else None)


def _tracing_flags(p) -> None:  # type: ignore[no-untyped-def]
    from cli.flags import add_flags
    from runtime.server.tracing_config import TracingConfig

    add_flags(p, TracingConfig)


def _gateway_flags(p, skip: tuple[str, ...] = ()) -> None:  # type: ignore[no-untyped-def]
    from cli.flags import add_flags
    from gateway.config import GatewayConfig

    add_flags(p, GatewayConfig, parse={"api_auth": GatewayConfig.parse_api_auth}, skip=skip)


def parser() -> argparse.ArgumentParser:
    from runtime.samplers import SAMPLERS

    p = argparse.ArgumentParser(prog="kiln", description="Compile Stable Diffusion models to ONNX bundles and serve them.")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", required=True)

    models = sub.add_parser("models", help="source models and served models").add_subparsers(dest="models_command",
                                                                                             required=True)
    init = models.add_parser("init", help="write a diffusers folder with deterministic random weights")
    init.add_argument("dir")
    init.add_argument("--arch", required=True, choices=_Archs(), metavar="ARCH",
                      help="%(choices)s. shapes: the model Kiln trained (default demo); tiny, sd-v1 and their "
                           "-inpainting (9-channel UNet) variants: random weights; tiny-v2 (and -inpainting), "
                           "tiny-v2-768 (v-prediction): the SD 2.x design at tiny size; sd-v2, sd-v2-768, sd-turbo: "
                           "SD 2.x at real size")
    init.add_argument("--seed", type=int, default=0)
    init.set_defaults(func=cmd_models_init)
    ls = models.add_parser("list", help="list the models a server serves")
    ls.add_argument("--target", default="127.0.0.1:50051")
    _api_key(ls)
    ls.set_defaults(func=cmd_models_list)
    for name, helptext in (("load", "load a model on a running server now (admin keys on servers with accounts)"),
                           ("unload", "unload a model from a running server once its requests end (admin keys)")):
        lp = models.add_parser(name, help=helptext)
        lp.add_argument("model", help="NAME, NAME@VERSION or an alias")
        lp.add_argument("--target", default="127.0.0.1:50051")
        _api_key(lp)
        lp.set_defaults(func=cmd_models_load)
    al = models.add_parser("alias", help="name one version of a model (in the store; running servers follow): "
                                         "`NAME@VERSION ALIAS`; ALIAS = NAME pins what the plain name serves "
                                         "(rollback); without arguments, list the aliases")
    al.add_argument("target_version", nargs="?", metavar="NAME@VERSION")
    al.add_argument("alias", nargs="?", metavar="ALIAS")
    al.add_argument("--store", required=True)
    al.add_argument("--remove", metavar="ALIAS", help="remove an alias (a plain name follows its newest version again)")
    al.set_defaults(func=cmd_models_alias)

    c = sub.add_parser("compile", help="compile a local diffusers folder or single-file checkpoint into a bundle")
    c.add_argument("source", help="local diffusers folder (model_index.json, unet/, vae/, ...) or a single-file "
                   "checkpoint in the original layout (.safetensors, or .ckpt read with PyTorch's weights_only)")
    c.add_argument("--name", required=True)
    c.add_argument("--store", required=True)
    c.add_argument("--precision", default="fp32", metavar="SPEC",
                   help="fp32 | int8 | nf4 | int4 | fp16, optionally with per-component overrides, e.g. "
                        "int8,vae_decoder=fp32 or unet=int8,text_encoder=int8 (see quantize/precision.py)")
    b = c.add_argument_group("bring your own model (see README)")
    b.add_argument("--lora", action="append", default=[], metavar="FILE[:SCALE]",
                   help="fuse a LoRA (kohya/AUTOMATIC1111 or diffusers/PEFT) at SCALE (default 1); repeatable")
    b.add_argument("--lora-inputs", action="store_true",
                   help="export the UNet and text encoder with LoRA inputs, so requests select adapters added with "
                        "`kiln lora add` without recompiling (fp32 UNet and text encoder only)")
    b.add_argument("--max-loras", type=int, default=4, metavar="N",
                   help="with --lora-inputs: most adapters one request may select (default 4)")
    b.add_argument("--embedding", action="append", default=[], metavar="FILE[:TOKEN]",
                   help="add a textual-inversion embedding as TOKEN (default: a diffusers file's own token, "
                   "else the file name without extension, as AUTOMATIC1111 does); repeatable")
    b.add_argument("--vae", metavar="PATH", help="replace the VAE: a diffusers folder (AutoencoderKL or "
                   "AutoencoderTiny) or a single-file VAE")
    b.add_argument("--tiny-decoder", metavar="DIR", help="add a diffusers AutoencoderTiny folder (TAESD) as a second, "
                   "fast decoder that requests pick with decoder=tiny")
    b.add_argument("--prediction-type", choices=["epsilon", "v_prediction"],
                   help="single-file checkpoints: what the UNet predicts, when neither the tensors nor NAME.yaml "
                   "beside the file tell (SD 2.x 768 models: v_prediction)")
    b.add_argument("--model-config", metavar="DIR", help="single-file checkpoints: a diffusers folder whose "
                   "configs describe the checkpoint, instead of the family detected from its tensors")
    q = c.add_argument_group("quantization (precisions other than fp32)")
    q.add_argument("--calibration-prompts", type=int, default=8, help="prompts run through fp32 to calibrate int8")
    q.add_argument("--calibration-file", help="prompt file instead of quantize/prompts/calibration.txt")
    q.add_argument("--calibration-steps", type=int, help="steps per calibration prompt (default: bundle default)")
    q.add_argument("--calibration-size", type=int, metavar="PX",
                   help="width and height of the calibration images (default: the bundle's default size); "
                        "smaller bounds the calibrator's memory on large UNets")
    q.add_argument("--int8-activations", default="u8", choices=["u8", "s8"])
    q.add_argument("--int8-weight-bits", type=int, default=7, choices=[7, 8],
                   help="7 (default): int8 weights in [-64, 64], the same integers on every x86 CPU; 8: the full "
                        "[-127, 127], for CPUs with VNNI or AMX (elsewhere served slower by ONNX Runtime's exact "
                        "kernels, refused by OpenVINO)")
    q.add_argument("--nf4-block-size", type=int, default=64)
    q.add_argument("--int4-block-size", type=int, default=32)
    q.add_argument("--int4-accuracy-level", type=int, default=4)
    q.add_argument("--weight-min-elements", type=int, default=4096,
                   help="nf4/int4: smallest MatMul weight (K*N) converted (default 4096)")
    q.add_argument("--fidelity-size", type=int, metavar="PX",
                   help="width and height of the fidelity gate's images (default: the bundle's default size)")
    q.add_argument("--fidelity-prompts", type=int, default=2, help="prompts the fidelity gate generates")
    q.add_argument("--min-psnr", type=float, default=25.0, help="fidelity gate: dB vs fp32 (default 25)")
    q.add_argument("--max-rel-error", type=float, default=0.25,
                   help="fidelity gate: a component's relative output error vs fp32 (default 0.25)")
    q.add_argument("--allow-low-fidelity", action="store_true",
                   help="publish even if the gate fails (the manifest and ListModels say so)")
    c.add_argument("--opset", type=int, default=17)
    c.add_argument("--no-fusions", action="store_true", help="skip ONNX Runtime's transformer fusions")
    c.add_argument("--tome", type=float, default=0.0, metavar="RATIO",
                   help="token merging in the UNet's highest-resolution self-attention, 0 (off) to <1; e.g. 0.5")
    c.add_argument("--attention-slicing", default="off", metavar="auto|N",
                   help="self-attention without the whole score matrix in memory: off, auto, or 2-64 slices")
    c.add_argument("--no-reuse", action="store_true",
                   help="export every component again even if a bundle in the store has the same fp32 graphs")
    c.add_argument("--parity-threshold", default="", metavar="COMPONENT=MAXDIFF[,...]",
                   help="override the max abs difference allowed against PyTorch, e.g. unet=2e-3")
    c.add_argument("--default-steps", type=int, help="request default (else the source's kiln.json, else 20)")
    c.add_argument("--default-guidance", type=float, help="request default (else kiln.json, else 7.5)")
    c.add_argument("--default-sampler", choices=list(SAMPLERS),
                   help="request default (else kiln.json, else dpmpp_2m_karras)")
    c.add_argument("--default-size", type=int, metavar="PX",
                   help="request default width and height, a multiple of 8 (else kiln.json's size, else the UNet's "
                        "sample_size x 8)")
    c.add_argument("--preset", choices=_Presets(), metavar="NAME",
                   help="request defaults for a kind of model, recorded in the manifest; explicit --default-* flags "
                        "win. turbo (SD-Turbo, SDXL-Turbo): steps 1, guidance 0, sampler turbo, size 512 "
                        "(compiler/config.py PRESETS)")
    c.add_argument("--quiet", action="store_true")
    c.set_defaults(func=cmd_compile)

    la = sub.add_parser("lora", help="LoRA adapters requests select per request").add_subparsers(
        dest="lora_command", required=True).add_parser(
        "add", help="add a LoRA file as an adapter of a model compiled with --lora-inputs")
    la.add_argument("file", help="LoRA file: kohya / AUTOMATIC1111 or diffusers / PEFT")
    la.add_argument("--model", required=True, help="the bundle name in the store")
    la.add_argument("--store", required=True)
    la.add_argument("--name", help="adapter name requests use (default: the file name's stem)")
    la.set_defaults(func=cmd_lora_add)

    t = sub.add_parser("train", help="train a model Kiln ships").add_subparsers(dest="train_command", required=True)
    ts = t.add_parser("shapes", help="the shapes demo model: VAE, VAE decoder, UNet + text encoder "
                      "(about 85 min on 2 cores)")
    ts.add_argument("out", help="folder for checkpoints, the loss log and the final diffusers model (OUT/model)")
    ts.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt")
    ts.add_argument("--seed", type=int, default=0)
    ts.add_argument("--vae-steps", type=int, default=None, help="override the recipe (see train/shapes/trainer.py)")
    ts.add_argument("--unet-steps", type=int, default=None, help="override the recipe")
    ts.add_argument("--dataset-size", type=int, default=None, help="override the recipe")
    ts.add_argument("--quiet", action="store_true")
    ts.set_defaults(func=cmd_train)
    try:  # the flags come from the config dataclass, which a serving install (the Docker image) lacks
        from train.dreambooth.config import DreamboothConfig
    except ModuleNotFoundError:
        DreamboothConfig = None  # type: ignore[assignment,misc]
    td = t.add_parser("dreambooth", help="teach a model a subject from a few images under a rare token, with "
                      "class-prior preservation; a full UNet fine-tune or a LoRA (train/README.md)")
    td.add_argument("base", help="the base model: an SD 1.x / 2.x diffusers folder")
    td.add_argument("out", help="folder for class images, checkpoints, losses.csv and the output (OUT/model or "
                    "OUT/lora.safetensors)")
    td.add_argument("--instance-images", required=True, metavar="DIR", help="the subject's images (3-5 usually)")
    td.add_argument("--instance-prompt", default="",
                    help="their prompt, with the token (e.g. 'a photo of sks dog'); an image NAME.png with a caption "
                         "file NAME.txt beside it trains with that caption instead")
    if DreamboothConfig is not None:
        from cli.flags import add_flags

        add_flags(td, DreamboothConfig, skip=("instance_prompt",))
    td.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt (same flags)")
    td.add_argument("--quiet", action="store_true", help="no progress bars")
    td.set_defaults(func=cmd_train_dreambooth)

    s = sub.add_parser("serve", help="serve a store's bundles over gRPC")
    s.add_argument("--config", metavar="TOML", help="flags from a TOML file (keys: the long flags; the command line "
                                                    "wins); deploy/kiln.toml documents every key")
    s.add_argument("--store", required=True)
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=50051)
    s.add_argument("--threads", type=int, default=0, help="ONNX Runtime threads per session (0: one per core)")
    s.add_argument("--shutdown-grace", type=float, default=300.0, help="seconds in-flight requests get on SIGTERM")
    s.add_argument("--lame-duck", type=float, default=0.0,
                   help="seconds new calls are still taken after SIGTERM turned health NOT_SERVING, so a load "
                        "balancer drops the server first (default 0: refused at once)")
    s.add_argument("--device", default="cpu", metavar="cpu|cuda[:N]",
                   help="where ONNX Runtime runs the graphs: cpu (default), or an NVIDIA GPU (needs onnxruntime-gpu; "
                        "fp16 bundles need one)")
    s.add_argument("--providers", default="", metavar="P[,P...]",
                   help="execution providers in order of preference, from cpu, cuda, tensorrt (default: cuda,cpu on "
                        "a GPU, cpu on the CPU); tensorrt needs --trt-cache")
    s.add_argument("--trt-cache", metavar="DIR", help="TensorRT engine and timing cache folder (kept across starts)")
    s.add_argument("--cache-dir", metavar="DIR",
                   help="where the sha256 of verified bundle files are remembered so restarts do not hash them again "
                        "(default: $KILN_CACHE_DIR, else ~/.cache/kiln; none: hash at every start)")
    s.add_argument("--no-graph-cache", action="store_true",
                   help="do not keep ONNX Runtime's optimized graphs and OpenVINO's compiled models in the cache dir "
                        "(default: kept, so a restart skips graph optimization; about a bundle's size on disk)")
    s.add_argument("--engine", default="onnxruntime", choices=["onnxruntime", "openvino", "auto"],
                   help="who runs the graphs (openvino: CPU, bf16 on AMX; reads fp32/int8/int4 bundles, not nf4 or fp16; "
                        "pip extra kiln[openvino]; auto: per bundle, OpenVINO where the CPU has AMX and it reads the "
                        "bundle, else ONNX Runtime)")
    s.add_argument("--openvino-precision", default="default", choices=["default", "bf16", "f32"],
                   help="OpenVINO engine: inference precision (default: OpenVINO's, bf16 on AMX CPUs)")
    s.add_argument("--openvino-static-shapes", action="store_true",
                   help="OpenVINO engine: compile a static-shape model per input shape when a request first brings it "
                        "(faster calls; a compile or cache read at a shape's first request, and a model's memory per shape)")
    b = s.add_argument_group("step-level batching (README: Performance)")
    b.add_argument("--no-batching", action="store_true",
                   help="one UNet call per request per step instead of one per model and image size")
    b.add_argument("--max-batch", type=int, default=8,
                   help="most UNet batch rows per call (an image counts 2 with guidance > 1); default 8")
    b.add_argument("--max-wait-ms", type=float, default=5.0,
                   help="an idle engine waits this long for more requests before starting; default 5")
    b.add_argument("--max-queue", type=int, default=64,
                   help="most requests running or waiting; beyond it RESOURCE_EXHAUSTED SERVER_BUSY; default 64")
    a = s.add_argument_group("accounts (README: Quotas)")
    a.add_argument("--auth-db", help="sqlite:///PATH or redis://HOST:PORT/DB (rediss:// for TLS): require API keys, enforce credits, "
                                     "rate and tier limits (without it: open, loopback only)")
    a.add_argument("--tiers", help="tiers TOML file (default: runtime/accounts/tiers.toml: free, pro, admin)")
    a.add_argument("--hold-ttl", type=float, default=60.0,
                   help="seconds a dead server's reservations outlive it before their credits come back")
    a.add_argument("--insecure-open", action="store_true",
                   help="allow a non-loopback --host without --auth-db (anyone who reaches it can generate)")
    s.add_argument("--log-format", choices=["text", "json"], default="text",
                   help="text lines, or one JSON object per line (access log: one per request, with its fields)")
    s.add_argument("--metrics-port", type=int, default=None,
                   help="serve Prometheus metrics at http(s)://HOST:PORT/metrics (0 picks a port; off by default)")
    s.add_argument("--metrics-host", default="127.0.0.1", help="address the metrics port binds (default 127.0.0.1)")
    t = s.add_argument_group("TLS for the gRPC port (README: TLS)")
    t.add_argument("--tls-cert", metavar="PEM", help="certificate chain the server presents; with --tls-key")
    t.add_argument("--tls-key", metavar="PEM", help="its private key")
    t.add_argument("--tls-client-ca", metavar="PEM",
                   help="mutual TLS: clients must present a certificate this CA signed")
    from cli.flags import add_flags
    from runtime.pool.config import PoolConfig

    pool = s.add_argument_group("model pool and hot publish (README: Model pool)")
    add_flags(pool, PoolConfig)
    gw = s.add_argument_group("HTTP gateway beside the server (README: HTTP API)")
    gw.add_argument("--gateway-port", type=int, default=None,
                    help="also serve the HTTP gateway (AUTOMATIC1111 and OpenAI APIs, web page) on this port; 0 picks one")
    gw.add_argument("--gateway-host", default="127.0.0.1", help="address the gateway binds (default: 127.0.0.1)")
    _gateway_flags(gw, skip=("target", "host", "port", "insecure_open"))
    _tracing_flags(s.add_argument_group("OpenTelemetry tracing (README: Tracing)"))
    s.set_defaults(func=cmd_serve)

    gp = sub.add_parser("gateway", help="serve the HTTP gateway (AUTOMATIC1111 and OpenAI APIs, SSE, web page) in "
                                        "front of a Kiln gRPC server")
    gp.add_argument("--log-format", choices=["text", "json"], default="text", help="text lines or JSON objects")
    gp.add_argument("--config", metavar="TOML", help="flags from a TOML file (keys: the long flags; the command "
                                                     "line wins)")
    _gateway_flags(gp)
    gp.set_defaults(func=cmd_gateway)

    k = sub.add_parser("keys", help="API keys in an auth db").add_subparsers(dest="keys_command", required=True)
    for name, helptext, func in (("create", "make a key; prints it as the last line of stdout, once", cmd_keys_create),
                                 ("revoke", "refuse a key from now on", cmd_keys_revoke),
                                 ("list", "list keys (ids, tiers, labels; never secrets)", cmd_keys_list)):
        kp = k.add_parser(name, help=helptext)
        kp.add_argument("--auth-db", required=True, help="sqlite:///PATH or redis://HOST:PORT/DB (rediss:// for TLS)")
        kp.add_argument("--tiers", help="tiers TOML file (default: the shipped one)")
        if name == "create":
            kp.add_argument("--tier", required=True)
            kp.add_argument("--label", default="", help="free text, e.g. the owner")
        if name == "revoke":
            kp.add_argument("key_id", help="the key's id (kiln_<id>_...), as `kiln keys list` shows it")
        kp.set_defaults(func=func)

    cr = sub.add_parser("credits", help="the balance of an API key on a running server")
    cr.add_argument("--target", default="127.0.0.1:50051")
    _api_key(cr)
    cr.set_defaults(func=cmd_credits)

    g = sub.add_parser("generate", help="generate images from a running server")
    g.add_argument("--target", default="127.0.0.1:50051")
    g.add_argument("--model", required=True)
    g.add_argument("--prompt", required=True)
    g.add_argument("--negative-prompt", default="")
    g.add_argument("--width", type=int, default=0, help="0: the model's default")
    g.add_argument("--height", type=int, default=0, help="0: the model's default")
    g.add_argument("--steps", type=int, default=0, help="0: the model's default")
    g.add_argument("--guidance", type=float, default=None, help="unset: the model's default")
    g.add_argument("--sampler", default="", help=f"{' | '.join(SAMPLERS)} (unset: the model's default)")
    g.add_argument("--seed", type=int, default=None, help="unset: random, printed")
    g.add_argument("--num-images", type=int, default=1)
    g.add_argument("--request-id", default="")
    g.add_argument("--timeout", type=float, default=None, help="deadline in seconds")
    g.add_argument("--out", default="out.png")
    g.add_argument("--quiet", action="store_true", help="no progress bar")
    g.add_argument("--decoder", default="", metavar="full|tiny",
                   help="the VAE decoder that draws the images: full (default) or tiny, where the model has one")
    g.add_argument("--preview-every", type=int, default=0, metavar="K",
                   help="save a latent preview every K steps beside the first image (OUT.preview-stepNNN.png)")
    g.add_argument("--init-image", default="", metavar="PATH",
                   help="img2img: start from this PNG/JPEG/WebP (its size when --width/--height are 0)")
    g.add_argument("--strength", type=float, default=None,
                   help="how much of the init image to redraw, (0, 1]; runs int(steps x strength) steps "
                        "(unset: 0.8 for img2img, 1.0 for inpainting)")
    g.add_argument("--mask", default="", metavar="PATH",
                   help="inpainting: white = redraw, black = keep; the init image's size")
    g.add_argument("--mask-blur", type=int, default=0, metavar="PX",
                   help="inpainting: blur radius of the mask's edge, 0-64 pixels")
    g.add_argument("--lora", action="append", default=[], metavar="NAME[:SCALE]",
                   help="apply the model's LoRA adapter NAME (`kiln models list`) at SCALE (default 1); repeatable")
    g.add_argument("--idempotency-key", default="", help="retries with the same key are charged once")
    _api_key(g)
    g.set_defaults(func=cmd_generate)

    p.config_commands = {"serve": s, "gateway": gp}  # type: ignore[attr-defined]

    w = sub.add_parser("wait", help="wait until a server reports SERVING")
    w.add_argument("--target", default="127.0.0.1:50051")
    w.add_argument("--timeout", type=float, default=60.0)
    _tls_client_flags(w)
    w.set_defaults(func=cmd_wait)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    p = parser()
    if (path := config_path(argv)) is not None:
        command = next((t for t in argv if not t.startswith("-")), "")
        sub = p.config_commands.get(command)  # type: ignore[attr-defined]
        if sub is None:
            p.error(f"--config applies to {' and '.join(p.config_commands)}, not {command!r}")  # type: ignore[attr-defined]
        try:
            apply(sub, path)
        except ConfigError as e:
            print(f"kiln {command}: error: {e}", file=sys.stderr)
            return 2
    args = p.parse_args(argv)
    from cli.logs import configure

    configure(args.verbose, getattr(args, "log_format", "text"))
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # diffusers imports bitsandbytes when installed (Kiln only uses it as the nf4 reference in tests), and it
    # warns about an optional GPU-kernel package on every CPU import
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    try:
        return args.func(args)
    except ModuleNotFoundError as e:
        if (e.name or "").split(".")[0] not in COMPILER_MODULES:
            raise
        print(f"kiln: error: `kiln {args.command}` needs the compiler ({e.name} is not installed here; a serving "
              "install such as the Docker image has only the runtime). Install it with: pip install 'kiln[compiler]'",
              file=sys.stderr)
        return 2
    except (ValueError, FileNotFoundError, FileExistsError) as e:
        print(f"kiln: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
