"""Load test of `sdlite serve`: bursts of concurrent txt2img requests against a real server.

    python -m benchmarks.load_test                      # 50 requests x 3 rounds, the bundled model
    python -m benchmarks.load_test --model PATH --requests 50 --max-queue 16 --steps 20

It starts `python -m sdlite serve` on a free loopback port (only loopback traffic), then per round
sends `--requests` requests at once (one thread each, every prompt and seed distinct) while a
poller asks `/sdapi/v1/progress` every 50 ms. It checks that

- every request is answered 200 with its own images (the prompt and seed it sent come back in the
  metadata) or refused 503 with Retry-After: none lost, none answered twice or with another's images;
- the server's own counts agree (jobs done == requests answered, refusals == 503s);
- `/progress` kept answering during the burst (its slowest answer is reported);
- the server's resident memory after the last round is within `--memory-slack-mb` of the first.

Prints a JSON report; exits 1 if a check fails. `run()` is what tests/test_server.py calls.
"""

import argparse
import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def request(url: str, body: dict | None = None, timeout: float = 600):
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as response:
            return response.status, dict(response.headers), json.loads(response.read())
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), json.loads(e.read() or b"null")


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def start_server(model: str | None, max_queue: int) -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    command = [sys.executable, "-m", "sdlite", "serve", "--port", str(port), "--max-queue", str(max_queue)]
    command += [] if model is None else ["--model", model]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    env.pop("SDLITE_API_KEY", None)
    process = subprocess.Popen(command, env=env, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        try:
            if request(f"{url}/sdlite/v1/info", timeout=2)[0] == 200:
                return process, url
        except OSError:
            pass
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            raise RuntimeError(f"the server did not start: {process.stderr.read()}")
        time.sleep(0.2)


def burst(url: str, tag: str, requests: int, steps: int | None) -> tuple[list, float]:
    """Send `requests` requests at once; return their outcomes and the slowest /progress answer."""
    outcomes = [None] * requests
    stop = threading.Event()
    slowest = [0.0]

    def send(i):
        body = {"prompt": f"load {tag} {i}", "seed": 1000 + i, "batch_size": 1}
        if steps is not None:
            body["steps"] = steps
        try:
            outcomes[i] = (i, *request(f"{url}/sdapi/v1/txt2img", body))
        except Exception as e:  # a lost request: no HTTP answer at all
            outcomes[i] = (i, None, {}, repr(e))

    def poll():
        while not stop.is_set():
            start = time.monotonic()
            status, _, _ = request(f"{url}/sdapi/v1/progress?skip_current_image=true", timeout=30)
            slowest[0] = max(slowest[0], time.monotonic() - start)
            if status != 200:
                raise RuntimeError(f"/progress answered {status}")
            stop.wait(0.05)

    poller = threading.Thread(target=poll, daemon=True)
    poller.start()
    threads = [threading.Thread(target=send, args=(i,)) for i in range(requests)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    stop.set()
    poller.join(30)
    return outcomes, slowest[0]


def check_round(tag: str, outcomes: list) -> dict:
    answered, rejected, lost, errors, job_ids = 0, 0, 0, [], []
    for i, status, headers, answer in outcomes:
        if status == 200:
            info = json.loads(answer["info"])
            job_ids.append(info["job_id"])
            if info["prompt"] != f"load {tag} {i}" or info["all_seeds"] != [1000 + i] or len(answer["images"]) != 1:
                errors.append(f"request {i} got another's answer: {info['prompt']!r}, seeds {info['all_seeds']}")
            answered += 1
        elif status == 503:
            if "Retry-After" not in headers and "retry-after" not in headers:
                errors.append(f"request {i}: 503 without Retry-After")
            rejected += 1
        elif status is None:
            lost += 1
            errors.append(f"request {i} lost: {answer}")
        else:
            errors.append(f"request {i}: unexpected {status}: {answer}")
    return dict(answered=answered, rejected=rejected, lost=lost, duplicated=len(job_ids) - len(set(job_ids)),
                errors=errors)


def run(model: str | None = None, requests: int = 50, max_queue: int = 16, steps: int | None = None,
        rounds: int = 3, memory_slack_mb: float = 50.0) -> dict:
    """Run the load test; a report of the last round plus totals and memory (see the module docstring)."""
    process, url = start_server(model, max_queue)
    try:
        report = dict(requests=requests, rounds=rounds, answered=0, rejected=0, lost=0, duplicated=0, errors=[],
                      progress_max_s=0.0, rss_mb=[])
        start = time.monotonic()
        for r in range(rounds):
            outcomes, slowest = burst(url, str(r), requests, steps)
            checked = check_round(str(r), outcomes)
            counts = request(f"{url}/sdlite/v1/jobs")[2]
            if counts["pending"] or counts["running"]:
                checked["errors"].append(f"round {r}: jobs left behind: {counts}")
            report["rss_mb"].append(round(rss_mb(process.pid), 1))
            report["progress_max_s"] = max(report["progress_max_s"], round(slowest, 3))
            for key in ("lost", "duplicated", "errors"):
                report[key] += checked[key]
            report["answered"], report["rejected"] = checked["answered"], checked["rejected"]
            report.setdefault("per_round", []).append({k: checked[k] for k in ("answered", "rejected")})
        totals = request(f"{url}/sdlite/v1/jobs")[2]["counts"]
        report["server_counts"] = totals
        answered = sum(r["answered"] for r in report["per_round"])
        rejected = sum(r["rejected"] for r in report["per_round"])
        if totals["done"] != answered or totals["rejected"] != rejected or totals["submitted"] != answered:
            report["errors"].append(f"server counts {totals} disagree with {answered} answered, {rejected} refused")
        report["memory_growth_mb"] = round(report["rss_mb"][-1] - report["rss_mb"][0], 1)
        if rounds > 1 and report["memory_growth_mb"] > memory_slack_mb:
            report["errors"].append(f"memory grew {report['memory_growth_mb']} MB after the first round")
        report["seconds"] = round(time.monotonic() - start, 1)
        return report
    finally:
        process.terminate()
        try:
            process.wait(20)
        except subprocess.TimeoutExpired:
            process.kill()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.load_test", description=__doc__.split("\n")[0])
    parser.add_argument("--model", help="model folder (default: the bundled model)")
    parser.add_argument("--requests", type=int, default=50, help="concurrent requests per round (default 50)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--max-queue", type=int, default=16, help="the server's --max-queue (default 16)")
    parser.add_argument("--steps", type=int, help="steps per request (default: the model's)")
    parser.add_argument("--memory-slack-mb", type=float, default=50.0)
    args = parser.parse_args(argv)
    report = run(args.model, args.requests, args.max_queue, args.steps, args.rounds, args.memory_slack_mb)
    print(json.dumps(report, indent=2))
    failed = report["errors"] or report["lost"] or report["duplicated"]
    print("load test: " + ("FAILED" if failed else "passed"), file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
