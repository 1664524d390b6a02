"""The heavy-input attack: while attackers send multi-megabyte prompts, how long does another
tenant's stream stall between two tokens?

`measure` runs against a live server (gRPC target, optionally its HTTP base URL): first the
victim streams alone, then again while `attackers` threads send huge prompts as fast as they
are answered. Reports both largest token gaps, how the heavy requests ended and, given the
server's pid, its RSS growth. tools/heavy_input.py is the command line; a test runs it too.
"""

import threading
import time

import grpc

from jblock.client import Client


def _rss_bytes(pid: int | None) -> int | None:
  if not pid:
    return None
  try:
    with open(f"/proc/{pid}/status") as f:
      for line in f:
        if line.startswith("VmRSS:"):
          return int(line.split()[1]) * 1024
  except OSError:
    return None
  return None


def victim_gap(target: str, model: str, prompt: str, max_tokens: int,
               api_key: str | None = None, timeout_s: float = 120.0
               ) -> tuple[float, int, str | None]:
  """(largest gap in seconds between two streamed chunks, chunks, error) of one greedy
  stream. A stream that fails (e.g. its deadline passes) counts the time from its last
  chunk to the failure as a gap, and names the error."""
  stamps, error = [time.monotonic()], None
  with Client(target, api_key=api_key) as client:
    try:
      for chunk in client.generate(model, prompt, max_tokens=max_tokens, timeout=timeout_s):
        if chunk.token_ids:
          stamps.append(time.monotonic())
    except grpc.RpcError as e:
      error = e.code().name
      stamps.append(time.monotonic())
  # The first gap is the time to the first token: a gap too (a stalled prefill).
  gaps = [b - a for a, b in zip(stamps, stamps[1:])]
  return (max(gaps) if gaps else 0.0), len(stamps) - 1 - (error is not None), error


def _attacker(protocol: str, target: str, http_url: str | None, model: str, prompt: str,
              api_key: str | None, done: threading.Event, outcomes: list, lock: threading.Lock,
              timeout_s: float):
  if protocol == "http":
    import httpx2 as httpx
    import json
    body = json.dumps({"model": model, "prompt": prompt, "max_tokens": 1}).encode()
    headers = {"Content-Type": "application/json"}
    if api_key:
      headers["Authorization"] = f"Bearer {api_key}"
    with httpx.Client(timeout=timeout_s) as http:
      while not done.is_set():
        try:
          status = str(http.post(f"{http_url}/completions", content=body, headers=headers)
                       .status_code)
        except Exception as e:  # a dropped connection is an outcome too
          status = type(e).__name__
        with lock:
          outcomes.append(status)
    return
  with Client(target, api_key=api_key,
              options=[("grpc.max_send_message_length", 64 << 20)]) as client:
    while not done.is_set():
      try:
        client.generate_text(model, prompt, max_tokens=1, timeout=timeout_s)
        status = "OK"
      except grpc.RpcError as e:
        status = e.code().name
      with lock:
        outcomes.append(status)


def measure(target: str, *, victim_model: str, attacker_model: str, http_url: str | None = None,
            protocol: str = "grpc", attackers: int = 4, prompt_bytes: int = 3_500_000,
            victim_prompt: str = "The sea", max_tokens: int = 60, victim_key: str | None = None,
            attacker_key: str | None = None, server_pid: int | None = None,
            warmup_s: float = 1.0, victim_timeout_s: float = 120.0) -> dict:
  """The victim's largest token gap alone and under the attack, and what the attack got."""
  for _ in range(2):  # compile / warm up every length the victim reaches
    alone, _, _ = victim_gap(target, victim_model, victim_prompt, max_tokens, victim_key)
  rss_before = _rss_bytes(server_pid)
  words = "the quick brown fox jumps over the lazy dog "
  heavy = (words * (prompt_bytes // len(words) + 1))[:prompt_bytes]
  done, outcomes, lock = threading.Event(), [], threading.Lock()
  threads = [threading.Thread(target=_attacker, daemon=True,
                              args=(protocol, target, http_url, attacker_model, heavy,
                                    attacker_key, done, outcomes, lock, victim_timeout_s))
             for _ in range(attackers)]
  for t in threads:
    t.start()
  rss_peak = rss_before
  try:
    deadline = time.monotonic() + warmup_s
    while time.monotonic() < deadline:  # let the attack get going
      time.sleep(0.05)
    result = {}

    def run_victim():
      result["gap"], result["chunks"], result["error"] = victim_gap(
          target, victim_model, victim_prompt, max_tokens, victim_key, victim_timeout_s)

    victim = threading.Thread(target=run_victim)
    victim.start()
    while victim.is_alive():
      victim.join(0.1)
      rss = _rss_bytes(server_pid)
      if rss is not None and rss_peak is not None:
        rss_peak = max(rss_peak, rss)
  finally:
    done.set()
    for t in threads:
      t.join(victim_timeout_s + 60)
  counts = {}
  for status in outcomes:
    counts[status] = counts.get(status, 0) + 1
  return {"protocol": protocol, "attackers": attackers, "prompt_bytes": prompt_bytes,
          "victim_gap_alone_s": round(alone, 4), "victim_gap_attacked_s": round(result["gap"], 4),
          "victim_chunks": result["chunks"], "victim_error": result["error"],
          "heavy_requests": counts,
          "server_rss_growth_bytes": (rss_peak - rss_before) if rss_before is not None else None}
