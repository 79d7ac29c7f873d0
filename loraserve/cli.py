"""Command line: `loraserve serve | lora-server | generate | workload | bench | simulate | plan | demo-model`."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from loraserve.cache.policy import POLICIES
from loraserve.config import CacheConfig, EngineConfig, SchedulerConfig
from loraserve.dtypes import CHOICES
from loraserve.flags import add_flag
from loraserve.errors import RequestError
from loraserve.lora.adapter import AdapterError
from loraserve.model.spec import ModelError
from loraserve.router import POLICIES as ROUTING_POLICIES
from loraserve.remote.config import MODES, TRANSPORTS, LoraServerConfig, RemoteLoraConfig
from loraserve.sampling import SamplingParams
from loraserve.server.limits import ServerLimits
from loraserve.units import UNITS, format_bytes, parse_bytes, split_size


def default_home() -> Path:
    return Path(os.environ.get("LORASERVE_HOME", Path.home() / ".cache" / "loraserve"))


def demo_dir() -> Path:
    """The embedded demo (built once): model and adapters."""
    from loraserve.demo import build_demo

    return build_demo(default_home() / "demo")


def _name_path(value: str) -> tuple[str, str]:
    if "=" not in value:
        raise argparse.ArgumentTypeError(f"expected NAME=PATH, got {value!r}")
    name, path = value.split("=", 1)
    return name, path


def cmd_generate(args: argparse.Namespace) -> int:
    from loraserve.llm import LLM

    adapters = dict(args.adapter or [])
    model = args.model
    if model is None:
        demo = demo_dir()
        model = str(demo / "model")
        if not adapters:
            adapters = {p.name: str(p) for p in sorted((demo / "adapters").iterdir())}
    lora = args.lora
    if lora is None and len(args.adapter or []) == 1:
        lora = args.adapter[0][0]
    llm = LLM(model, adapters=adapters, dtype=args.dtype, lora_dtype=args.lora_dtype)
    if lora is not None and lora not in adapters:
        raise KeyError(f"no adapter named {lora!r}; loaded: {sorted(adapters)}")
    prompts = args.prompt or ["What is the capital of France?"]
    if args.chat:
        prompts = [llm.engine.tokenizer.chat_tokens([{"role": "user", "content": p}]) for p in prompts]
    sampling = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                              top_k=args.top_k, seed=args.seed)
    for out in llm.generate(prompts, sampling, adapter=lora):
        print(out.text)
    return 0


def _size(text: str) -> str:
    """argparse type: validate a cache size (turned into bytes once the device is known)."""
    if split_size(text) is None:
        raise argparse.ArgumentTypeError(f"{text!r} is neither a size like 512MiB nor a fraction like 0.3")
    return text


def _cache_bytes(text: str, tier: str, device: str, after_load: bool = False) -> int:
    """Bytes of a tier given as a size or a fraction of free memory. `after_load`:
    the engine sizes a fractional CUDA device tier itself once its weights are
    loaded (`_device_fraction`), and this is a placeholder."""
    value, unit = split_size(text)
    if value >= 1 or unit:
        return int(value * UNITS[unit])
    if tier == "device" and device.startswith("cuda"):
        if after_load:
            return 1
        import torch
        free = torch.cuda.mem_get_info(torch.device(device))[0]
    else:
        free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    return int(value * free)


def _device_fraction(text: str, device: str) -> float:
    value, unit = split_size(text)
    return value if device.startswith("cuda") and value < 1 and not unit else 0.0


def engine_config(args: argparse.Namespace, model: str) -> EngineConfig:
    """The `serve` flags as an EngineConfig."""
    remote = None
    if args.lora_server:
        remote = RemoteLoraConfig(args.lora_server, mode=args.lora_mode, overlap=args.lora_overlap,
                                  timeout_s=args.lora_server_timeout, transport=args.lora_transport)
    return EngineConfig(
        lora_server=remote,
        model=model, dtype=args.dtype, lora_dtype=args.lora_dtype, device=args.device,
        max_lora_rank=args.max_lora_rank, max_model_len=args.max_model_len,
        cache=CacheConfig(block_size=args.block_size, policy=args.cache_policy,
                          device_bytes=_cache_bytes(args.device_cache, "device", args.device, after_load=True),
                          device_fraction=_device_fraction(args.device_cache, args.device),
                          host_bytes=_cache_bytes(args.host_cache, "host", args.device)),
        scheduler=SchedulerConfig(max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
                                  max_loras=args.max_loras))


def cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from loraserve.engine.async_engine import AsyncEngine
    from loraserve.engine.llm_engine import LLMEngine
    from loraserve.server.app import build_app
    from loraserve.server.lifecycle import DrainingServer
    from loraserve.server.limits import ServerLimits
    from loraserve.threads import apart, compute_alone

    adapters = dict(args.lora or [])
    model, served_name = args.model, args.served_model_name
    if model is None:
        demo = demo_dir()
        model, served_name = str(demo / "model"), served_name or "smollm2"
        adapters = adapters or {p.name: str(p) for p in sorted((demo / "adapters").iterdir())}
    if args.lora_server and args.model is None:
        raise ValueError("--lora-server needs --model (the demo's adapters are the LoRA server's to serve)")
    if (args.ray_address or args.lora_server_ranks) and args.replicas is None:
        raise ValueError("--ray-address and --lora-server-ranks need --replicas (how many engine replicas to deploy)")
    if args.replicas is not None:
        try:
            from loraserve.cluster.deploy import ClusterOptions, start_cluster, stop_cluster
        except ImportError as e:
            raise RuntimeError(f"--replicas needs Ray Serve: pip install 'loraserve[cluster]' ({e})") from e

        server = remote = None
        if args.lora_server_ranks:
            from loraserve.cluster.lora_server import parse_ranks

            if args.model is None or args.lora_server:
                raise ValueError("--lora-server-ranks needs --model and no --lora-server (it starts the server)")
            ep, pp = parse_ranks(args.lora_server_ranks)
            server = LoraServerConfig(model=model, device=args.device, dtype=args.dtype,
                                      max_lora_rank=args.max_lora_rank, ep=ep, pp=pp)
            remote = dict(mode=args.lora_mode, overlap=args.lora_overlap, timeout_s=args.lora_server_timeout,
                          transport=args.lora_transport)
        opts = ClusterOptions(args.replicas, args.ray_address, args.replica_cpus, args.replica_gpus, args.routing,
                              lora_server=server, remote=remote, lora_server_gpus=args.lora_server_gpus,
                              lora_dirs=tuple(args.lora_dir or ()))
        async_engine = start_cluster(engine_config(args, model), adapters, opts, args.max_waiting)
        where = f"{args.replicas} replicas on Ray Serve ({args.routing} routing)"
        dtype, close = async_engine.info["dtype"], lambda: stop_cluster(opts)
    else:
        def build() -> LLMEngine:
            engine = LLMEngine(engine_config(args, model))
            engine.memory.prefault()  # a server takes its host tier at start (see TierMemory.prefault)
            for name, path in adapters.items():
                engine.add_adapter(name, path)
            return engine

        engine = apart(build)  # the engine thread steps it: the loading thread's OpenMP team must not stay
        compute_alone()
        async_engine = AsyncEngine(engine, max_waiting=args.max_waiting)
        where, dtype, close = "one process", engine.dtype, engine.close
    limits = ServerLimits(max_request_bytes=args.max_request_bytes)
    app = build_app(async_engine, served_name or Path(model).name, api_key=args.api_key,
                    lora_dirs=args.lora_dir, public_metrics=args.public_metrics, limits=limits)
    lora_dtype = async_engine.info["lora_dtype"]
    lora_note = f", adapters in {lora_dtype}" if lora_dtype not in (dtype, "remote") else ""
    print(f"loraserve: serving {model} ({dtype}{' by --dtype auto' if args.dtype == 'auto' else ''}{lora_note}) "
          f"with {len(adapters)} adapters in {where} on http://{args.host}:{args.port}", flush=True)
    server = DrainingServer(uvicorn.Config(app, host=args.host, port=args.port, log_level="warning",
                                           timeout_keep_alive=limits.keep_alive_s, timeout_graceful_shutdown=10),
                            async_engine)
    try:
        server.run()
    finally:
        async_engine.shutdown()
        close()
    if async_engine.dead is not None:  # non-zero, so that a supervisor restarts the server
        print(f"loraserve: error: the engine stopped ({async_engine.dead}); exiting", file=sys.stderr)
        return 1
    return 0


def lora_server_config(args: argparse.Namespace) -> LoraServerConfig:
    """The `lora-server` flags as a LoraServerConfig."""
    return LoraServerConfig(
        model=args.model, device=args.device, dtype=args.dtype, max_lora_rank=args.max_lora_rank,
        max_loras=args.max_loras, batch_window_us=args.batch_window_us, layerwise=args.layerwise,
        ep=args.ep, pp=args.pp,
        cache=CacheConfig(block_size=args.block_size, policy=args.cache_policy,
                          device_bytes=_cache_bytes(args.device_cache, "device", args.device),
                          host_bytes=_cache_bytes(args.host_cache, "host", args.device)))


def cmd_lora_server(args: argparse.Namespace) -> int:
    import signal

    from prometheus_client import start_http_server

    from loraserve.lora_server.server import LoraServer

    server = LoraServer(lora_server_config(args), args.listen, args.lora_dir or [])
    try:
        for name, path in args.lora or []:
            server.load(name, path)
        if args.metrics_port is not None:
            http, _ = start_http_server(args.metrics_port, addr=args.metrics_host, registry=server.metrics.registry)
            print(f"loraserve lora-server: metrics on http://{args.metrics_host}:{http.server_port}/metrics",
                  flush=True)
        signal.signal(signal.SIGTERM, lambda *_: server.stop.set())
        print(f"loraserve lora-server: {len(server.store.listing())} adapters, listening on {server.endpoint}",
              flush=True)
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.close()
    return 0


def cmd_demo_model(args: argparse.Namespace) -> int:
    from loraserve.demo import build_demo, build_tiny

    out = build_tiny(args.dir, args.tiny) if args.tiny else build_demo(args.dir)
    print(out)
    return 0


def build_parser() -> argparse.ArgumentParser:
    """Every command's flags; engine and sampling defaults come from the dataclasses (`flags.add_flag`)."""
    parser = argparse.ArgumentParser(prog="loraserve", description="Serve one base LLM with many LoRA adapters.")
    sub = parser.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="generate text offline")
    g.add_argument("--model", help="HF model directory (default: the embedded demo model)")
    g.add_argument("--adapter", action="append", type=_name_path, metavar="NAME=PATH", help="PEFT adapter (repeatable)")
    g.add_argument("--lora", help="adapter to use (default: the only --adapter, else the base model)")
    g.add_argument("--prompt", action="append", help="prompt (repeatable)")
    g.add_argument("--chat", action="store_true", help="wrap each prompt in the chat template")
    # a command-line answer is short and greedy unless asked, unlike SamplingParams' OpenAI defaults
    g.add_argument("--max-tokens", type=int, default=64, help="tokens to generate (default: %(default)s)")
    g.add_argument("--temperature", type=float, default=0.0, help="0 is greedy (default: %(default)s)")
    add_flag(g, "--top-p", SamplingParams, "top_p", help="nucleus sampling; 1 keeps every token")
    add_flag(g, "--top-k", SamplingParams, "top_k", help="keep the k most likely tokens; 0 keeps all")
    add_flag(g, "--seed", SamplingParams, "seed", help="seed of the request (default: the engine's generator)")
    add_flag(g, "--dtype", EngineConfig, "dtype", choices=CHOICES)
    add_flag(g, "--lora-dtype", EngineConfig, "lora_dtype", choices=CHOICES)
    g.set_defaults(func=cmd_generate)

    v = sub.add_parser("serve", help="serve the OpenAI-compatible API")
    v.add_argument("--model", help="HF model directory (default: the embedded demo model and its adapters)")
    v.add_argument("--lora", action="append", type=_name_path, metavar="NAME=PATH", help="PEFT adapter (repeatable)")
    v.add_argument("--served-model-name", help="the base model's name in the API (default: the directory name)")
    v.add_argument("--host", default="127.0.0.1", help="address to listen on (default: %(default)s)")
    v.add_argument("--port", type=int, default=8000, help="port to listen on (default: %(default)s)")
    v.add_argument("--api-key", help="require 'Authorization: Bearer KEY' on every path but /health")
    v.add_argument("--public-metrics", action="store_true",
                   help="serve /metrics without the API key (for a scraper that cannot send one)")
    v.add_argument("--lora-dir", action="append", help="directory runtime-loaded adapters may come from (repeatable)")
    # AsyncEngine's default, checked by tests/test_config.py (importing the server here would slow every command)
    v.add_argument("--max-waiting", type=int, default=1024,
                   help="waiting requests past which new ones get 429 (default: %(default)s)")
    add_flag(v, "--max-request-bytes", ServerLimits, "max_request_bytes", type=parse_bytes, show=format_bytes)
    add_flag(v, "--max-lora-rank", EngineConfig, "max_lora_rank")
    add_flag(v, "--dtype", EngineConfig, "dtype", choices=CHOICES)
    add_flag(v, "--lora-dtype", EngineConfig, "lora_dtype", choices=CHOICES)
    add_flag(v, "--max-model-len", EngineConfig, "max_model_len",
             help="prompt + output limit (default: the model's max_position_embeddings)")
    add_flag(v, "--block-size", CacheConfig, "block_size")
    add_flag(v, "--device", EngineConfig, "device")
    add_flag(v, "--device-cache", CacheConfig, "device_bytes", type=_size, show=format_bytes,
             help="device tier for adapters + KV: bytes (e.g. 512MiB, 2GiB) or a fraction of free memory (0.3)")
    add_flag(v, "--host-cache", CacheConfig, "host_bytes", type=_size, show=format_bytes,
             help="host tier for adapters + evicted KV: bytes or a fraction of free host memory; 0: none")
    add_flag(v, "--cache-policy", CacheConfig, "policy", choices=list(POLICIES),
             help="what to keep where: elora, its ablations, or the vllm / slora baselines")
    add_flag(v, "--max-num-seqs", SchedulerConfig, "max_num_seqs")
    add_flag(v, "--max-num-batched-tokens", SchedulerConfig, "max_num_batched_tokens")
    add_flag(v, "--max-loras", SchedulerConfig, "max_loras")
    r = v.add_argument_group("disaggregated LoRA (adapters on a LoRA server)")
    r.add_argument("--lora-server", metavar="ADDRESS",
                   help="tcp://HOST:PORT or ipc://PATH of a `loraserve lora-server`: this instance then holds no "
                        "adapter weights; its adapters are the server's (and --lora loads there)")
    add_flag(r, "--lora-mode", RemoteLoraConfig, "mode", choices=MODES)
    add_flag(r, "--lora-overlap", RemoteLoraConfig, "overlap", action=argparse.BooleanOptionalAction)
    add_flag(r, "--lora-server-timeout", RemoteLoraConfig, "timeout_s", type=float)
    add_flag(r, "--lora-transport", RemoteLoraConfig, "transport", choices=TRANSPORTS)
    c = v.add_argument_group("scale-out on Ray Serve (pip install loraserve[cluster])")
    c.add_argument("--replicas", type=int, metavar="N",
                   help="N engine replicas as a Ray Serve deployment behind this one endpoint (default: one process, "
                        "no Ray)")
    c.add_argument("--ray-address", help="join this Ray cluster ('auto' or ray://HOST:PORT; default: start a local one)")
    c.add_argument("--replica-cpus", type=float, help="CPUs per replica (default: this machine's cores / N)")
    c.add_argument("--replica-gpus", type=float, default=0.0, help="GPUs per replica (default: %(default)s)")
    c.add_argument("--lora-server-ranks", metavar="EPxPP",
                   help="the disaggregated layout: a LoRA server of EP×PP ranks (e.g. 1x1, 2x1) as a Ray actor that "
                        "every replica calls for its deltas; restarted at the same address if it dies")
    c.add_argument("--lora-server-gpus", type=float, default=0.0,
                   help="GPUs per LoRA server rank (default: %(default)s)")
    c.add_argument("--routing", default="affinity", choices=ROUTING_POLICIES,
                   help="which replica a request goes to: the one holding its session, then its adapter, within "
                        "an imbalance bound, else the least loaded (affinity); or a plain policy (default: %(default)s)")
    v.set_defaults(func=cmd_serve)

    ls = sub.add_parser("lora-server", help="hold every adapter and compute LoRA deltas for base-model instances")
    ls.add_argument("--model", required=True, help="the base model's directory (only config.json is read)")
    ls.add_argument("--listen", default="tcp://127.0.0.1:5557",
                    help="tcp://HOST:PORT (port 0: any free one) or ipc://PATH (default: %(default)s)")
    ls.add_argument("--lora", action="append", type=_name_path, metavar="NAME=PATH", help="PEFT adapter (repeatable)")
    ls.add_argument("--lora-dir", action="append",
                    help="directory runtime loads (forwarded by instances) may come from (repeatable); "
                         "without it runtime loading is off")
    ls.add_argument("--metrics-port", type=int, help="serve Prometheus metrics on this port (0: any free one)")
    ls.add_argument("--metrics-host", default="127.0.0.1", help="address of the metrics port (default: %(default)s)")
    add_flag(ls, "--device", LoraServerConfig, "device")
    add_flag(ls, "--dtype", LoraServerConfig, "dtype", choices=CHOICES)
    add_flag(ls, "--max-lora-rank", LoraServerConfig, "max_lora_rank")
    add_flag(ls, "--max-loras", LoraServerConfig, "max_loras")
    add_flag(ls, "--batch-window-us", LoraServerConfig, "batch_window_us")
    add_flag(ls, "--layerwise", LoraServerConfig, "layerwise", action=argparse.BooleanOptionalAction)
    add_flag(ls, "--ep", LoraServerConfig, "ep")
    add_flag(ls, "--pp", LoraServerConfig, "pp")
    add_flag(ls, "--block-size", CacheConfig, "block_size")
    add_flag(ls, "--device-cache", LoraServerConfig, "cache.device_bytes", type=_size, show=format_bytes)
    add_flag(ls, "--host-cache", LoraServerConfig, "cache.host_bytes", type=_size, show=format_bytes)
    add_flag(ls, "--cache-policy", CacheConfig, "policy", choices=list(POLICIES))
    ls.set_defaults(func=cmd_lora_server)

    d = sub.add_parser("demo-model", help="build the embedded demo model (or a tiny random one) with adapters")
    d.add_argument("dir")
    d.add_argument("--tiny", metavar="FAMILY", help="tiny random model: llama, qwen2, mistral, mixtral, qwen2_moe, qwen3_moe")
    d.set_defaults(func=cmd_demo_model)

    from loraserve.bench.cli import add_parser as add_bench
    from loraserve.plan.cli import add_parser as add_plan
    from loraserve.sim.cli import add_parser as add_simulate
    from loraserve.workload.cli import add_parser as add_workload

    add_workload(sub)
    add_bench(sub)
    add_simulate(sub)
    add_plan(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except (ModelError, AdapterError, ValueError, KeyError, RuntimeError, RequestError) as e:
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"loraserve: error: {msg}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
