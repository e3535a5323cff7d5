"""The `llmcad` command: generate, chat, serve, info, convert, verify, pull."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time

from llmcad import hub, kernels
from llmcad.errors import LlmcadError
from llmcad.engine import AUTO, DEFAULT_FALLBACK, DEFAULT_PRECISION, MODES, Engine, default_limits, open_store
from llmcad.fallback import FALLBACKS, TreeLimits
from llmcad.quant import PRECISIONS


PRECISION_HELP = (
    "compute and storage precision: gguf (a GGUF's own quantized blocks on the native kernels; other sources in Q8_0), "
    "q4_0 (the native kernels in 4-bit blocks: Q4_K kept, every other matrix requantized to Q4_0), "
    "q4 (PyTorch's 4-bit kernel), int8, fp32 (default: %(default)s)"
)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if not kernels.available():
        print(f"llmcad: {kernels.unavailable_reason()}; computing with PyTorch's kernels instead", file=sys.stderr)
    try:
        return args.run(args)
    except LlmcadError as e:
        print(f"llmcad: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\nllmcad: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="llmcad", description="Run LLMs larger than memory, fast and exactly.")
    commands = parser.add_subparsers(required=True, metavar="COMMAND")

    gen = commands.add_parser("generate", help="generate text from a prompt")
    gen.add_argument("prompt", metavar="PROMPT", help="the prompt text ('-' reads it from stdin)")
    _add_model_options(gen)
    gen.add_argument("--draft-tokens", type=int, default=4, metavar="K", help="sd: tokens drafted per verification (default: %(default)s)")
    gen.add_argument("--tree-nodes", type=int, default=None, metavar="N", help=f"tree/llmcad: most drafted nodes per verification (default: tree {TreeLimits.max_nodes}, llmcad the engine's tree slots less one)")
    gen.add_argument("--tree-depth", type=int, default=None, metavar="D", help=f"tree/llmcad: maximum depth (default: tree {TreeLimits.max_depth}, llmcad 12)")
    gen.add_argument("--tree-width", type=int, default=None, metavar="W", help=f"tree/llmcad: children per node at most (default: {TreeLimits.width})")
    gen.add_argument("--branch-threshold", type=float, default=None, metavar="P", help=f"tree/llmcad: draft probability that opens a branch (default: {TreeLimits.branch_threshold})")
    gen.add_argument("--pipeline", action="store_true", help="llmcad: the draft keeps drafting while the target verifies (default: it waits; on 2 cores the target's compute needs both)")
    gen.add_argument("--show-tree", action="store_true", help="draw every token tree on stderr, accepted path marked with *")
    gen.add_argument("--chat", action="store_true", help="wrap PROMPT in the model's chat template as a user message")
    gen.add_argument("--max-tokens", type=int, default=256, metavar="N")
    gen.add_argument("--temperature", type=float, default=0.0, metavar="T", help="0 = greedy (default)")
    gen.add_argument("--top-k", type=int, default=0, metavar="K")
    gen.add_argument("--top-p", type=float, default=1.0, metavar="P")
    gen.add_argument("--seed", type=int, default=None, metavar="S")
    gen.add_argument("--stop", action="append", default=[], metavar="TEXT", help="stop string (repeatable)")
    gen.add_argument("--ignore-eos", action="store_true", help="keep generating past end-of-sequence tokens")
    gen.add_argument("--json", action="store_true", help="print one JSON object instead of streaming text")
    gen.set_defaults(run=_generate)

    serve = commands.add_parser("serve", help="serve the model over an OpenAI-compatible HTTP API")
    _add_model_options(serve)
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (default: %(default)s, this machine only)")
    serve.add_argument("--port", type=int, default=8000, help="port (default: %(default)s; 0 picks a free one)")
    serve.add_argument("--api-key", default=os.environ.get("LLMCAD_API_KEY"), metavar="KEY", help="require 'Authorization: Bearer KEY' (default: $LLMCAD_API_KEY, else none)")
    serve.add_argument("--queue-size", type=int, default=16, metavar="N", help="requests that may wait while one generates; more get 429 (default: %(default)s)")
    serve.add_argument("--request-timeout", type=float, default=600.0, metavar="S", help="seconds a request may take, queued and generating (default: %(default)s)")
    serve.set_defaults(run=_serve)

    chat = commands.add_parser("chat", help="talk with the model in the terminal (or one message per line from a pipe)")
    _add_model_options(chat)
    chat.add_argument("--system", default=None, metavar="TEXT", help="system message that opens the conversation")
    chat.add_argument("--max-tokens", type=int, default=None, metavar="N", help="most tokens per answer (default: the rest of the context window)")
    chat.add_argument("--temperature", type=float, default=0.0, metavar="T", help="0 = greedy (default)")
    chat.add_argument("--top-k", type=int, default=0, metavar="K")
    chat.add_argument("--top-p", type=float, default=1.0, metavar="P")
    chat.add_argument("--seed", type=int, default=None, metavar="S")
    chat.set_defaults(run=_chat)

    info = commands.add_parser("info", help="describe a model (and whether a draft can draft for it)")
    info.add_argument("model", metavar="MODEL", help="GGUF file, HF folder or alias")
    info.add_argument("--draft", metavar="DRAFT", default=None, help="say whether DRAFT can draft for MODEL, and why not (exit status 1 when not)")
    info.add_argument("--json", action="store_true")
    info.set_defaults(run=_info)

    ver = commands.add_parser("verify", help="check a model's file and layer stores in full (sha256 of every byte)")
    ver.add_argument("model", metavar="MODEL", help="alias, GGUF file, HF folder or layer store")
    ver.add_argument("--precision", choices=PRECISIONS, default=None, help="the store to check (default: every precision converted)")
    ver.set_defaults(run=_verify)

    conv = commands.add_parser("convert", help="write a model's layer store (the layout the target is streamed from)")
    conv.add_argument("model", metavar="MODEL", help="GGUF file, HF folder or alias")
    conv.add_argument("--out", default=None, metavar="DIR", help="store folder (default: the cache under LLMCAD_HOME that generate uses)")
    conv.add_argument("--precision", choices=PRECISIONS, default=DEFAULT_PRECISION, help=PRECISION_HELP)
    conv.set_defaults(run=_convert)

    pull = commands.add_parser("pull", help="download and verify default models")
    pull.add_argument("aliases", nargs="*", metavar="ALIAS", help=f"default: {hub.DEFAULT_DRAFT} {hub.DEFAULT_TARGET}")
    pull.set_defaults(run=_pull)
    return parser


def _add_model_options(parser: argparse.ArgumentParser) -> None:
    """The options that choose and load the models, shared by generate, chat and serve."""
    parser.add_argument("--target", default=hub.DEFAULT_TARGET, metavar="MODEL", help="GGUF file, HF folder, layer store or alias (default: %(default)s)")
    drafts = parser.add_mutually_exclusive_group()
    pairs = ", ".join(f"{t}: {d}" for t, d in hub.PAIRS.items())
    drafts.add_argument("--draft", default=AUTO, metavar="MODEL", help=f"draft model for speculative decoding (default: the target alias's pair, {pairs}; else none)")
    drafts.add_argument("--no-draft", dest="draft", action="store_const", const=None, help="run the target alone")
    parser.add_argument("--mode", choices=MODES, default=None, help="ar: target alone; sd: linear draft; tree: token tree with fixed limits; llmcad: token tree grown until the fallback policy says verify (default: llmcad with a draft, else ar)")
    parser.add_argument("--fallback", choices=FALLBACKS, default=DEFAULT_FALLBACK, help="llmcad: when to stop drafting and verify; fixed: at the tree limits, llmcad: tree confidence against a self-adjusting threshold, cost: when expected accepted tokens per second would fall (default: %(default)s)")
    parser.add_argument("--precision", choices=(AUTO, *PRECISIONS), default=AUTO, help="target " + PRECISION_HELP)
    parser.add_argument("--draft-precision", choices=(AUTO, *PRECISIONS), default=AUTO, help="draft " + PRECISION_HELP.replace("(default: %(default)s)", "(default: the target's, q4_0 beside gguf)"))
    parser.add_argument("--draft-vocab", type=int, default=0, metavar="N", help="the draft proposes only the first N token ids and the special tokens: a smaller, faster draft head, fewer tokens accepted (default: 0, every token)")
    parser.add_argument("--memory-budget", default=AUTO, metavar="SIZE", help="memory for the whole process, e.g. 1.5GB or 1000MB: the target is streamed from storage, keeping resident what fits; 'none': no limit (default: auto, the memory available to this process, MemAvailable or its memory cgroup's limit, less 10%%)")
    parser.add_argument("--keep-page-cache", action="store_true", help="leave streamed pages in the OS page cache (default: drop them after use, as a device without spare RAM would)")
    parser.add_argument("--max-context", type=int, default=None, metavar="N", help="KV cache size in tokens, prompt plus completion (default: 4096; under a budget, generate sizes it to the prompt plus --max-tokens, leaving the rest of the budget to resident layers, and chat and serve take the largest of 4096, 2048, 1024, 512 that fits)")


def _load_engine(args: argparse.Namespace, progress: bool, target=None, max_context: int | None = None) -> Engine:
    """The Engine the model options ask for (`target` and `max_context` in place of the
    options'). What was chosen is printed on stderr in two lines, and the whole memory plan
    when a budget was given; `args.load_s` is the time it took."""
    started = time.perf_counter()
    engine = Engine.load(
        target or args.target,
        draft=hub.paired_draft(args.target) if args.draft == AUTO else args.draft,
        mode=args.mode,
        precision=args.precision,
        draft_precision=args.draft_precision,
        max_context=max_context or args.max_context,
        memory_budget=_memory_budget(args),
        keep_page_cache=args.keep_page_cache,
        fallback=args.fallback,
        draft_vocab=args.draft_vocab or None,
        progress=progress,
    )
    args.load_s = time.perf_counter() - started
    print(engine.describe(), file=sys.stderr)
    if engine.budget_note == "given":
        print(engine.plan.describe(), file=sys.stderr)
    return engine


def _memory_budget(args: argparse.Namespace) -> str | None:
    """--memory-budget as Engine.load takes it: None for "none"."""
    return None if args.memory_budget.lower() == "none" else args.memory_budget


def _generate(args: argparse.Namespace) -> int:
    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    progress = not args.json and sys.stderr.isatty()  # bars only on a terminal, never in a log
    store = open_store(args.target, DEFAULT_PRECISION if args.precision == AUTO else args.precision, progress)
    ids = store.tokenizer.encode_chat([{"role": "user", "content": prompt}]) if args.chat else store.tokenizer.encode(prompt)
    if args.max_context and len(ids) + args.max_tokens > args.max_context:  # said before the models load
        raise LlmcadError(f"prompt ({len(ids)} tokens) plus max_tokens ({args.max_tokens}) exceeds the context window ({args.max_context} tokens)")
    # under a budget the context is this job's: every slot more is memory a resident layer could use
    context = args.max_context or (len(ids) + max(1, args.max_tokens) if _memory_budget(args) is not None else None)
    # without the native kernels the engine picks int8 or q4 by its plan: it opens the store itself
    target = store if args.precision != AUTO or kernels.available() else None
    # closed on the way out: a reader thread still running at interpreter exit aborts it
    with _load_engine(args, progress, target, context) as engine:
        limits = default_limits(engine.mode, engine.tree_slots)
        if engine.mode == "sd":
            limits = TreeLimits.linear(args.draft_tokens)
        elif limits is not None:
            given = dict(max_nodes=args.tree_nodes, max_depth=args.tree_depth, width=args.tree_width, branch_threshold=args.branch_threshold)
            limits = dataclasses.replace(limits, **{k: v for k, v in given.items() if v is not None})
        options = dict(
            max_tokens=args.max_tokens,
            temperature=args.temperature,
            top_k=args.top_k,
            top_p=args.top_p,
            seed=args.seed,
            stop=args.stop,
            ignore_eos=args.ignore_eos,
            limits=limits,
            pipeline=args.pipeline,
            on_verify=_tree_printer(engine.tokenizer) if args.show_tree else None,
        )
        if args.json:
            result = engine.generate(ids, **options)
            setup = {**engine.setup(), "load_s": round(args.load_s, 3)}
            print(json.dumps({**result.to_dict(), "setup": setup, "memory_plan": dataclasses.asdict(engine.plan), "max_context": engine.max_context}, ensure_ascii=False))
            return 0
        for piece in engine.stream(ids, **options):
            sys.stdout.write(piece.text)
            sys.stdout.flush()
        s = piece.stats
        line = (
            f"\n\n[{engine.name}, {engine.precision}, {s.extra['mode']}] prompt: {s.prompt_tokens} tokens, {s.prefill_tokens_per_s:.1f} tok/s"
            f" | generated: {s.new_tokens} tokens, {s.decode_tokens_per_s:.2f} tok/s"
        )
        if "verifications" in s.extra:
            line += f" | {s.extra['tokens_per_verification']:.2f} tokens per verification ({s.extra['verifications']} verifications)"
        if s.extra.get("bytes_read"):
            passes = max(1, s.extra["target_passes"])
            line += f" | streamed: {s.extra['bytes_read'] / passes / 2**20:.0f} MB per pass, waited on IO {s.extra['io_wait_s']:.1f} s"
        print(f"{line} | finish: {piece.finish_reason} | peak RSS: {s.peak_rss_mb:.0f} MB", file=sys.stderr)
        return 0


def _serve(args: argparse.Namespace) -> int:
    from llmcad.server import make_server

    if args.queue_size < 0 or args.request_timeout <= 0:
        raise LlmcadError("--queue-size must be >= 0 and --request-timeout > 0")
    with _load_engine(args, sys.stderr.isatty()) as engine:  # its reader thread stops before the interpreter does
        try:
            server = make_server(
                engine,
                args.host,
                args.port,
                model_ids=[args.target, engine.name] if args.target in hub.MODELS else [engine.name],
                api_key=args.api_key,
                queue_size=args.queue_size,
                request_timeout=args.request_timeout,
            )
        except OSError as e:
            raise LlmcadError(f"cannot listen on {args.host}:{args.port}: {e.strerror or e}") from e
        with server:
            print(f"llmcad: serving {engine.name} ({engine.mode}, {engine.precision}, context {engine.max_context}) at {server.url}/v1", flush=True)
            if args.api_key is None and args.host not in ("127.0.0.1", "localhost", "::1"):
                print(f"llmcad: warning: {args.host} is reachable from other machines and no --api-key is set", file=sys.stderr)
            server.serve_forever()
    return 0


def _chat(args: argparse.Namespace) -> int:
    from llmcad.chat import run_chat

    interactive = sys.stdin.isatty()
    with _load_engine(args, sys.stderr.isatty()) as engine:
        if engine.tokenizer.chat_template is None:
            raise LlmcadError(f"{engine.name} has no chat template; chat needs one (use generate)")
        options = dict(max_tokens=args.max_tokens, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed)
        banner = f"llmcad chat: {engine.name} ({engine.mode}, {engine.precision}, context {engine.max_context} tokens)"
        return run_chat(engine.conversation(system=args.system), sys.stdin, sys.stdout, interactive, options, banner=banner)


def _tree_printer(tokenizer):
    def show(tree, path):
        print(f"--- tree: {tree.size - 1} drafted, {len(path) - 1} accepted", file=sys.stderr)
        print(tree.render(tokenizer.decode, accepted=path), file=sys.stderr)

    return show


def _info(args: argparse.Namespace) -> int:
    from llmcad.weights import open_checkpoint

    ckpt = open_checkpoint(hub.resolve_model(args.model, progress=sys.stderr.isatty()))
    c, tok = ckpt.config, ckpt.tokenizer
    facts = {
        "path": str(ckpt.path),
        "format": ckpt.format,
        "architecture": c.arch,
        "parameters": c.num_parameters(),
        "layers": c.num_layers,
        "hidden_size": c.hidden_size,
        "heads": c.num_heads,
        "kv_heads": c.num_kv_heads,
        "context_length": c.max_position_embeddings,
        "file_bytes": ckpt.file_bytes,
        "tensors": ckpt.tensor_count,
        "tokenizer_vocab": tok.vocab_size,
        "eos_tokens": [tok.id_to_token(i) for i in sorted(tok.eos_token_ids)],
        "chat_template": tok.chat_template is not None,
        "paired_draft": hub.paired_draft(args.model),  # the draft generate, chat and serve take by default
        # the family and what of it this model uses (None: not used)
        **c.family_features(),
    }
    if args.draft is not None:
        facts["draft"] = _draft_facts(ckpt, args.draft)
    if args.json:
        print(json.dumps(facts))
    else:
        width = max(map(len, facts))
        for key, value in facts.items():
            if key == "parameters":
                value = f"{value / 1e9:.2f}B" if value >= 1e9 else f"{value / 1e6:.1f}M"
            elif key == "file_bytes":
                value = f"{value / 1e6:.1f} MB"
            elif key == "features":
                value = ", ".join(value) or "none beyond Llama's"
            elif key == "sliding_window" and value:
                text = f"{value['tokens']} tokens, on {value['layers']} of {value['of']} layers"
                more = []
                if "pattern" in value:
                    more.append(f"{value['pattern']['sliding']} local then {value['pattern']['full']} global, repeated")
                if "rope_theta" in value:
                    more.append(f"local rotary base {value['rope_theta']:g}")
                value = text + (f" ({'; '.join(more)})" if more else "")
            elif key == "rope_scaling" and value:
                value = ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in value.items())
            elif key == "soft_capping" and value:
                value = ", ".join(f"{k} {v:g}" for k, v in value.items() if v)
            elif key == "draft":
                verdict = "usable" if value["usable"] else f"not usable: {value['reason']}"
                value = f"{value['path']}: {verdict}" + (f" ({value['note']})" if value.get("note") else "")
            print(f"{key:<{width}}  {value}")
    return 0 if facts.get("draft", {}).get("usable", True) else 1


def _draft_facts(target, draft: str) -> dict:
    """Whether `draft` can draft for the checkpoint `target`, by the engine's own check
    (`engine.vocabulary_mismatch`: the token strings of every id both vocabularies have),
    and why not."""
    from llmcad.engine import vocabulary_mismatch
    from llmcad.weights import open_checkpoint

    facts = {"path": draft, "usable": False, "reason": None, "family": None, "note": None}
    try:
        ckpt = open_checkpoint(hub.resolve_model(draft, progress=sys.stderr.isatty()))
    except LlmcadError as e:
        facts["reason"] = str(e)
        return facts
    facts.update(path=str(ckpt.path), family=ckpt.config.arch)
    facts["reason"] = vocabulary_mismatch(target.config, target.tokenizer, ckpt)
    if facts["reason"] is not None:
        return facts
    facts["usable"] = True
    ours, theirs = target.config.vocab_size, ckpt.config.vocab_size
    if ours != theirs:
        facts["note"] = f"vocabulary rows: target {ours}, draft {theirs}; the draft's logits take the target's {ours} columns"
    return facts


def _convert(args: argparse.Namespace) -> int:
    from llmcad.store import LayerStore, convert, store_path
    from llmcad.weights import open_checkpoint

    progress = sys.stderr.isatty()
    ckpt = open_checkpoint(hub.resolve_model(args.model, progress=progress))
    out = args.out or store_path(ckpt, args.precision)
    store = LayerStore.open(convert(ckpt, out, args.precision, progress), verify=False)
    size = sum(f["bytes"] for f in store.files.values())
    print(f"{store.path}: {store.config.num_layers} layers of {store.layer_bytes / 2**20:.1f} MB, {size / 2**20:.0f} MB in all ({args.precision})")
    return 0


def _verify(args: argparse.Namespace) -> int:
    """Hash the model file (where the hub knows its sha256) and its cached stores in full;
    one line per thing checked, or an error at the first mismatch."""
    from tqdm import tqdm

    from llmcad.store import MANIFEST, LayerStore, file_sha256, store_path

    progress = sys.stderr.isatty()
    spec = hub.MODELS.get(args.model)
    if spec is not None:
        path = hub.llmcad_home() / "models" / spec.filename
        if not path.is_file():
            raise LlmcadError(f"model {spec.alias} is not pulled (llmcad pull {spec.alias})")
    else:
        path = hub.resolve_model(args.model, progress=False)
        pulled = {(hub.llmcad_home() / "models" / s.filename).resolve(): s for s in hub.MODELS.values()}
        spec = pulled.get(path.resolve())
    if spec is not None:
        size = path.stat().st_size
        with tqdm(total=size, unit="B", unit_scale=True, desc=f"verifying {path.name}", disable=not progress) as bar:
            sha = file_sha256(path, bar.update)
        if (size, sha) != (spec.size, spec.sha256):
            raise LlmcadError(f"{path}: {size} bytes with sha256 {sha}, expected {spec.size} bytes with sha256 {spec.sha256} (delete it and run llmcad pull {spec.alias})")
        print(f"{path}: OK ({size} bytes, the sha256 of {spec.alias})")
    if (path / MANIFEST).is_file():
        stores = [path]
    else:
        stores = [store_path(path, p) for p in ([args.precision] if args.precision else PRECISIONS)]
        stores = [s for s in stores if (s / MANIFEST).is_file()]
        if args.precision and not stores:
            raise LlmcadError(f"{args.model}: no {args.precision} layer store converted (llmcad convert {args.model} --precision {args.precision})")
    for folder in stores:
        store = LayerStore.open(folder, full=True, progress=progress)
        size = sum(f["bytes"] for f in store.files.values())
        print(f"{store.path}: OK ({len(store.files)} files, {size / 2**20:.0f} MB, {store.precision})")
    if spec is None and not stores:
        print(f"{args.model}: nothing to verify (no layer store converted, and not a model pulled by llmcad)")
    return 0


def _pull(args: argparse.Namespace) -> int:
    for alias in args.aliases or [hub.DEFAULT_DRAFT, hub.DEFAULT_TARGET]:
        print(hub.pull(alias, progress=sys.stderr.isatty()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
