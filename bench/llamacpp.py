"""llama.cpp as a peer: find a build, drive llama-server (or llama-bench), and, run as a
script, one generation in this process tree (what bench/e2e.py runs inside a memory cgroup:
the standard library only, so the wrapper adds little to the measured memory).

    python bench/llamacpp.py --model target.gguf --ids '[1, 2, 3]' --tokens 128 [--context 4096]

prints {"prefill_s", "decode_s", "tokens", "new_tokens", ...} as JSON.
"""

from __future__ import annotations

import argparse
import atexit
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path


class LlamaServer:
    """llama-server on a free local port; /completion with the prompt as token ids."""

    def __init__(self, binary: Path, path: Path, threads: int, context: int, draft: Path | None = None):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        self.log = tempfile.TemporaryFile()
        cmd = [binary, "-m", path, "-t", threads, "-c", context, "-np", "1", "--host", "127.0.0.1", "--port", port]
        if draft is not None:  # llama.cpp's own speculative decoding with a draft model
            cmd += ["-md", draft, "--spec-type", "draft-simple"]
        self.proc = subprocess.Popen([str(c) for c in cmd], stdout=self.log, stderr=subprocess.STDOUT)
        atexit.register(self.close)
        self.version = _version(binary)
        self.method = (
            f"{binary} -t {threads}; POST /completion {{prompt: ids, n_predict: N, ignore_eos, temperature 0, top_k 1, "
            "cache_prompt false}; prefill = timings.prompt_ms, decode = timings.predicted_ms (N-1 forwards after the first token)"
        )
        deadline = time.time() + 900
        while not self._healthy():
            if self.proc.poll() is not None or time.time() > deadline:
                self.close()
                self.log.seek(0)
                raise RuntimeError(f"llama-server did not start: {self.log.read()[-2000:].decode(errors='replace')}")
            time.sleep(0.5)

    def _healthy(self) -> bool:
        try:
            with urllib.request.urlopen(self.url + "/health", timeout=5) as r:
                return r.status == 200
        except OSError:
            return False

    def run(self, ids: list[int], n: int) -> dict:
        body = {"prompt": ids, "n_predict": n, "ignore_eos": True, "temperature": 0.0, "top_k": 1, "cache_prompt": False, "return_tokens": True}
        req = urllib.request.Request(self.url + "/completion", json.dumps(body).encode(), {"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=3600) as r:
            out = json.load(r)
        t = out["timings"]
        return {
            "prefill_s": t["prompt_ms"] / 1e3, "decode_s": t["predicted_ms"] / 1e3, "tokens": out.get("tokens") or None,
            "new_tokens": t["predicted_n"], "prompt_tokens_reported": t["prompt_n"],
        }  # fmt: skip

    def close(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def find_llamacpp() -> tuple[Path | None, str]:
    """(llama-server or llama-bench binary, "") or (None, why not)."""
    env = os.environ.get("LLAMACPP_BIN", "")
    if env and Path(env).is_file():
        return Path(env), ""
    peers = Path(os.environ.get("LLMCAD_PEERS", Path.home() / ".cache" / "llmcad-peers")) / "llama.cpp" / "bin"
    path = os.pathsep.join(p for p in (env, os.environ.get("PATH", ""), str(peers)) if p)
    for name in ("llama-server", "llama-bench"):
        if found := shutil.which(name, path=path):
            return Path(found), ""
    others = [n for n in ("llama-cli", "llama-simple") if shutil.which(n, path=path)]
    if others:
        return None, f"found only {', '.join(others)}: this benchmark drives llama-server or llama-bench"
    return None, f"no llama-server or llama-bench in $LLAMACPP_BIN, PATH or {peers} (shared/tools/build-llamacpp builds one)"


def llama_bench(binary: Path, path: Path, threads: int, prompt_tokens: int, n: int, reps: int = 3) -> dict:
    """One llama-bench run: pp{prompt_tokens} and tg{n} (generation from an empty context)."""
    cmd = [binary, "-m", path, "-t", threads, "-p", prompt_tokens, "-n", n, "-r", reps, "-o", "json"]
    rows = json.loads(subprocess.run([str(c) for c in cmd], capture_output=True, text=True, check=True).stdout)
    pp = next(r for r in rows if r["n_gen"] == 0)
    tg = next(r for r in rows if r["n_prompt"] == 0)
    return {
        "source": "llama-bench", "version": _version(binary), "prompt_tokens": prompt_tokens,
        "prefill_s": prompt_tokens / pp["avg_ts"], "decode_tokens_per_s": tg["avg_ts"],
        "method": f"{' '.join(map(str, cmd))}: tg = n generated tokens / their time (mean of {reps}), empty context; "
        "not per prompt, so less comparable than the per-prompt engines",
    }  # fmt: skip


def _version(binary: Path) -> str:
    try:
        out = subprocess.run([str(binary), "--version"], capture_output=True, text=True, timeout=60)
        return (out.stdout + out.stderr).strip().splitlines()[-1]
    except (OSError, subprocess.SubprocessError, IndexError):
        return "unknown"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", type=Path, required=True)
    p.add_argument("--ids", required=True, help="prompt token ids, a JSON list")
    p.add_argument("--tokens", type=int, default=128)
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--context", type=int, default=4096)
    p.add_argument("--draft", type=Path, default=None, help="a draft GGUF: llama.cpp's own speculative decoding")
    args = p.parse_args()
    binary, reason = find_llamacpp()
    if binary is None or "bench" in binary.name:
        sys.exit(f"llama-server not found: {reason or binary}")
    server = LlamaServer(binary, args.model, args.threads, args.context, args.draft)
    try:
        print(json.dumps(server.run(json.loads(args.ids), args.tokens) | {"version": server.version}))
    finally:
        server.close()


if __name__ == "__main__":
    main()
